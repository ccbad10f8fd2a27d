"""common.py: settings, prompts, batching and masks, the training loop (resume, NaN, DDP), checkpoints.

    python -m pytest tests/test_common.py     (CPU; about 20 s)
"""
import json
import os
import subprocess
import sys
from functools import partial
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import (EOS, Interrupted, free_port, interrupt_at, killed_at, leave_process_group, random_pairs,
                      tiny_gpt)

import common
import dpo
import experiment
import methods
import record
import sample
import sampling
import settings
import stages
from data.corpus import Split, UsageError, load_checkpoint, load_corpus, read_jsonl, save_checkpoint
from data.tiny.prepare import prepare as prepare_tiny
from kernels import sequence_logprobs


# ---------------------------------------------------------------- settings

def test_runs_are_parsed_and_checked(capsys):
    assert settings.parse_runs("dpo:0.1,ft,ppo:6,ppo-gt:3") == [("dpo", 0.1), ("ft", 0.0), ("ppo", 6.0), ("ppo-gt", 3.0)]
    for spec, message in [("dpo:0.1,sppo:1", "unknown method 'sppo'"), ("dpo:abc", "'abc' is not a number"),
                          ("ppo:0", "target KL > 0"), ("ppo-gt:-3", "target KL > 0"), ("ppo", "target KL > 0"),
                          ("dpo", "dpo needs beta > 0"), ("ipo:0", "ipo needs beta > 0"), ("ul", "alpha > 0"),
                          ("ft:0.5", "ft takes no parameter")]:
        with pytest.raises(SystemExit):
            settings.get_args(["--device", "cpu", "--runs", spec])
        err = capsys.readouterr().err
        assert message in err and "--runs" in err and "Traceback" not in err


FLAG_MISTAKES = [  # (flags, environment, the one line's message)
    (["--optimizer", "rmsprob"], {}, "argument --optimizer: invalid choice: 'rmsprob'"),
    (["--device", "foo"], {}, "--device foo: expected cpu, cuda or cuda:N"),
    (["--device", "cpu", "--impl", "triton"], {"TRITON_INTERPRET": None}, "--impl triton: the Triton kernel needs"),
    (["--n-head", "3"], {}, "--n-head 3: expected a divisor of --n-embd 128"),
    (["--seed", "-1"], {}, "--seed -1: expected a whole number >= 0"),
    (["--log-every", "0"], {}, "--log-every 0: expected a positive number"),
    (["--preset", "tiny", "--model", "gpt2"], {}, "--model gpt2: the tiny preset trains a GPT from scratch"),
    (["--preset", "imdb", "--device", "cpu", "--block-size", "2048"], {}, "--block-size 2048: GPT-2 (gpt2) has 1024"),
    (["--runs", "ppo:6", "--ppo-batch", "64", "--n-prompts", "50"], {}, "--ppo-batch 64 is more than --n-prompts 50"),
    (["--batch", "1"], {"WORLD_SIZE": "2"}, "--batch 1: fewer rows than the 2 torchrun processes"),
    (["--runs", "dpo:0.1", "--dpo-batch", "1"], {"WORLD_SIZE": "2"}, "--dpo-batch 1: fewer rows than the 2 torchrun"),
    (["--runs", "ppo:6", "--ppo-batch", "1", "--ppo-minibatches", "1"], {"WORLD_SIZE": "2"}, "--ppo-batch 1: fewer rows"),
    (["--runs", "ppo:6", "--ppo-batch", "3", "--ppo-minibatches", "2"], {"WORLD_SIZE": "2"},
     "--ppo-minibatches 2 is more than --ppo-batch 3 / 2 processes"),
]


@pytest.mark.parametrize("flags, env, message", FLAG_MISTAKES)
def test_flag_mistakes_are_one_line_before_any_work(flags, env, message, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v) if v is not None else monkeypatch.delenv(k, raising=False)
    with pytest.raises(SystemExit):
        settings.get_args(["--device", "cpu", *flags] if "--preset" in flags else ["--preset", "tiny", "--device", "cpu", *flags])
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(SystemExit):
        settings.get_args(["--device", "cpu", "--out", str(tmp_path / "notes.txt")])
    assert f"--out {tmp_path}/notes.txt: is a file; expected a run folder" in capsys.readouterr().err


def test_every_flag_has_help_with_its_preset_defaults():
    p = settings.parser()
    for action in p._actions:
        assert action.help and "\n" not in action.help, action.option_strings
    helps = {a.dest: a.help for a in p._actions}
    for k in set(settings.PRESETS["tiny"]) | set(settings.PRESETS["imdb"]):
        if k != "data":  # the data set comes with the preset; --data-dir says where it lies
            t, i = (settings.PRESETS[p].get(k, "-") for p in ("tiny", "imdb"))
            assert helps[k].startswith(settings.HELP[k]) and helps[k].endswith(f" [tiny: {t}; imdb: {i}]"), k


def test_run_folders():
    assert [methods.run_folder(m, p) for m, p in [("dpo", 0.1), ("ft", 0.0), ("ppo-gt", 6.0), ("ul", 0.5)]] == \
        ["runs/dpo_0.1", "runs/ft", "runs/ppo-gt_6", "runs/ul_0.5"]


# ---------------------------------------------------------------- prompts, batching, masks

def test_prompts_are_2_to_8_tokens_of_long_reviews():
    lengths = np.array([50, 300, 250, 20, 400])
    tokens = np.arange(lengths.sum()) % 256
    split = Split(tokens.astype(np.uint16), np.concatenate([[0], np.cumsum(lengths)]), np.zeros(5, np.uint8),
                  lengths.astype(np.int32))
    prompts = stages.make_prompts(split, 100, 200, np.random.default_rng(0))
    assert len(prompts) == 3  # only the three reviews over 200 characters
    starts = {int(split.offsets[i]) % 256 for i in (1, 2, 4)}
    assert all(2 <= len(p) <= 8 and p[0] in starts for p in prompts)


def test_pack_lays_out_bos_prompt_response_and_masks_only_response_targets():
    idx, targets, mask = common.pack([[10, 11, 12], [20]], [[13, 14, EOS], [21, EOS]], 64, EOS)
    assert idx.tolist() == [[EOS, 10, 11, 12, 13, 14], [EOS, 20, 21, EOS, EOS, EOS]]
    assert targets.tolist() == [[10, 11, 12, 13, 14, EOS], [20, 21, EOS, EOS, EOS, EOS]]
    assert mask.tolist() == [[False, False, False, True, True, True], [False, True, True, False, False, False]]


def test_prompt_and_padding_do_not_enter_the_sum():
    torch.manual_seed(0)
    idx, targets, mask = common.pack([[1, 2, 3, 4], [5]], [[6, EOS], [7, 8, 9, EOS]], 64, EOS)
    h = torch.randn(2, idx.size(1), 16)
    w = torch.randn(257, 16)
    base = sequence_logprobs(h, w, None, None, targets, mask).seq_pol
    h2 = h.clone()
    h2[0, :4] += 5.0  # BOS and prompt positions of row 0 (their targets are prompt tokens)
    h2[1, 5:] -= 5.0  # padding of row 1
    assert torch.equal(sequence_logprobs(h2, w, None, None, targets, mask).seq_pol, base)
    h2[0, 4] += 5.0  # the first response target of row 0 does count
    assert not torch.equal(sequence_logprobs(h2, w, None, None, targets, mask).seq_pol[0], base[0])


def test_empty_response_and_long_prompt():
    with pytest.raises(ValueError, match="empty response"):
        common.pack([[1, 2]], [[]], 64, EOS)
    with pytest.raises(ValueError, match="prompt of 63 tokens and its beginning-of-text token do not fit block_size 64"):
        common.pack([list(range(63))], [[1, EOS]], 64, EOS)
    idx, targets, mask = common.pack([[1, 2]], [list(range(100))], 16, EOS)  # a long response is cut at the block size
    assert idx.shape == (1, 16) and mask.sum() == 14


def test_masked_mean():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, -50.0, 5.0]])
    mask = torch.tensor([[True, True, False], [True, False, True]])
    assert common.masked_mean(x, mask).item() == pytest.approx((1 + 2 + 3 + 5) / 4)


def test_the_longest_prompt_that_fits_is_block_size_minus_2_tokens():
    """BOS + a prompt of block_size - 2 tokens leaves one position for the response: packed, not refused."""
    idx, targets, mask = common.pack([list(range(62))], [[1, 2, EOS]], 64, EOS)
    assert idx.shape == (1, 64) and mask[0].nonzero().flatten().tolist() == [62, 63]
    assert targets[0, 62:].tolist() == [1, 2]  # the response cut at the block size


def test_logprobs_hands_the_impl_to_the_kernel():
    """The impl asked for (--impl) reaches the kernel: an unknown one is refused there, not replaced by the default."""
    idx, targets, mask = common.pack([[1, 2]], [[3, EOS]], 64, EOS)
    with pytest.raises(ValueError, match="impl must be 'auto', 'triton' or 'reference', got 'fused'"):
        common.logprobs(tiny_gpt(0), None, idx, targets, mask, "fused")


def test_accuracy_counts_every_margin_above_0_and_ties_half():
    """Hand-worked: margins 0.5, -0.3, 0, 2, 1e-3 -> (1 + 0 + 0.5 + 1 + 1) / 5, small margins as much as large."""
    assert common.accuracy(torch.tensor([0.5, -0.3, 0.0, 2.0, 1e-3])) == pytest.approx(0.7)


def test_global_mean_of_one_process_is_its_values_in_float64():
    """Without torchrun the means are the values themselves, not rounded through float32 (PPO's whitening sums
    squares of thousands of tokens with it)."""
    xs = (0.1, 2.0 ** 40 + 0.5, 3)
    assert common.global_mean(*xs, device="cpu") == [0.1, 2.0 ** 40 + 0.5, 3.0]


def test_sharded_hands_out_chunks_of_256_in_order():
    """One process: fn sees every chunk of 256 items with its start, and the results come back flattened in order."""
    seen = []
    out = common.sharded(lambda xs, i: seen.append((i, len(xs))) or [(i, x) for x in xs], list(range(600)))
    assert seen == [(0, 256), (256, 256), (512, 88)]
    assert out == [(256 * (x // 256), x) for x in range(600)]


def test_prompts_are_distinct_reviews_over_min_chars_and_every_length_2_to_8():
    """make_prompts on 300 reviews, 150 of exactly min_chars characters (not long enough) and 150 of one more: all 150
    long ones, each once, each prompt a prefix of its review of 2 to 8 tokens, every length among 150 draws."""
    reviews = [[1000 + i] + list(range(1, 12)) for i in range(300)]  # the first token says which review
    chars = np.array([100 + i % 2 for i in range(300)], np.int32)
    split = Split(np.array(sum(reviews, []), np.uint16), np.arange(0, 12 * 301, 12), np.zeros(300, np.uint8), chars)
    prompts = stages.make_prompts(split, 150, 100, np.random.default_rng(0))
    firsts = sorted(p[0] - 1000 for p in prompts)
    assert firsts == list(range(1, 300, 2))  # the long reviews, each once
    assert all(p == reviews[p[0] - 1000][:len(p)] for p in prompts)
    assert sorted({len(p) for p in prompts}) == [2, 3, 4, 5, 6, 7, 8]


def test_make_model_from_scratch_has_the_settings_shape_and_seed():
    """A GPT from scratch: the layers, heads, width, positions and vocabulary asked for, no scalar head unless asked,
    the same weights for the same --seed and others for another."""
    args = settings.get_args(["--preset", "tiny", "--device", "cpu", "--n-layer", "3", "--n-head", "4", "--n-embd",
                              "48", "--block-size", "72", "--seed", "5"])
    model = stages.make_model(args, 123)
    assert len(model.transformer.h) == 3 and model.transformer.h[0].attn.n_head == 4
    assert model.transformer.wte.weight.shape == (123, 48) and model.transformer.wpe.weight.shape == (72, 48)
    assert model.score_head is None and stages.make_model(args, 123, score_head=True).score_head.weight.shape == (1, 48)
    again = stages.make_model(args, 123).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
    args.seed = 6
    assert not torch.equal(stages.make_model(args, 123).transformer.wte.weight, model.transformer.wte.weight)


def test_a_pretrained_model_is_the_folder_s_weights_without_dropout(tmp_path):
    """--init pretrained with a Hugging Face folder (config.json, pytorch_model.bin with Conv1D weights stored
    (in, out)): the folder's weights, dropout 0 (training mode gives the same hidden states as evaluation), and a
    scalar head only when asked."""
    src = tiny_gpt(3).eval()
    conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
    sd = {k: (v.t() if k.endswith(conv1d) else v).contiguous() for k, v in src.state_dict().items()
          if not k.startswith("lm_head")}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    config = dict(n_positions=64, vocab_size=257, n_layer=1, n_head=2, n_embd=32)
    (tmp_path / "config.json").write_text(json.dumps(config))
    args = SimpleNamespace(init="pretrained", model=str(tmp_path), device="cpu", seed=0)
    idx = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))
    for score_head in (False, True):
        model = stages.make_model(args, 257, score_head=score_head).train()
        assert (model.score_head is not None) == score_head and model.config.dropout == 0
        assert all(torch.equal(p, model.state_dict()[k]) for k, p in src.state_dict().items())
        with torch.no_grad():
            torch.testing.assert_close(model(idx), src(idx), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- the training loop: resume, NaN, DDP

def loop_args(out, **settings_):
    """The settings the loops read, for a model of the tests' own."""
    return SimpleNamespace(**dict(out=str(out), device="cpu", warmup=0, eval_every=100, log_every=10, seed=0,
                                  impl="auto", optimizer="adamw", dpo_lr=1e-3, dpo_steps=6, dpo_batch=4,
                                  block_size=64, label_smoothing=0.0, tokenizer=None) | settings_)


def small_dpo_run(out, interrupt=None):
    """dpo.run on fixed pairs with a tiny model, evaluated every 2 steps (the evaluation samples)."""
    sft_model, ref = tiny_gpt(1), tiny_gpt(1).requires_grad_(False)
    rm = tiny_gpt(2, score_head=True)
    pairs, rand = random_pairs()
    prompts = [rand(2) for _ in range(4)]
    evaluate = partial(stages.evaluate, ref=ref, classifier=rm, prompts=prompts, eos=EOS, seed=0, max_new_tokens=6,
                       block_size=64, device="cpu", impl="auto")
    # the pairs of seed 4 + 3; every step logged; the checkpoints record the byte tokenizer
    args = loop_args(out, eval_every=2, seed=4, log_every=1, tokenizer=("bytes", []))
    with killed_at(dpo, interrupt):
        policy = dpo.run("dpo", 0.1, sft_model, ref, pairs, evaluate, evaluate(sft_model), args, EOS)
    return [json.loads(x) for x in open(os.path.join(out, "runs", "dpo_0.1", "eval.jsonl"))], policy


def test_interrupted_run_resumes_to_the_same_metrics(tmp_path):
    full, p_full = small_dpo_run(tmp_path / "full")
    with pytest.raises(Interrupted):
        small_dpo_run(tmp_path / "resumed", interrupt=3)  # killed at step 3 (checkpoint after step 2)
    run = tmp_path / "resumed" / "runs" / "dpo_0.1"
    assert [json.loads(x)["step"] for x in open(run / "eval.jsonl")] == [0, 2]
    assert [json.loads(x)["step"] for x in open(run / "metrics.jsonl")] == [0, 1, 2]  # past the checkpoint
    assert (run / "ckpt.pt").exists()
    # the checkpoint rebuilds the policy alone (sample.py's load), config and tokenizer included
    ckpt = load_checkpoint(str(run / "ckpt.pt"))
    assert ckpt["step"] == 2 and ckpt["config"] == vars(tiny_gpt(1).config)
    assert ckpt["tokenizer"]["name"] == "bytes"
    resumed, p_res = small_dpo_run(tmp_path / "resumed")
    assert resumed == full
    assert all(torch.equal(a, b) for a, b in zip(p_full.state_dict().values(), p_res.state_dict().values()))
    assert not (run / "ckpt.pt").exists()
    # the resumed run's curves: every step once, as the uninterrupted run's
    lines = lambda out: open(out / "runs" / "dpo_0.1" / "metrics.jsonl").read()
    assert [json.loads(x)["step"] for x in lines(tmp_path / "resumed").splitlines()] == list(range(6))
    assert lines(tmp_path / "resumed") == lines(tmp_path / "full")
    first = json.loads(lines(tmp_path / "full").splitlines()[0])
    assert {"loss", "lr", "rewards/accuracies", "logps/chosen"} <= set(first)
    model, tokenizer, _ = sample.load(str(run))
    assert tokenizer == "bytes" and all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                                         p_full.state_dict().values()))


def sft_args(tmp_path, out):
    return settings.get_args(["--preset", "tiny", "--device", "cpu", "--out", str(out), "--sft-steps", "6",
                            "--classifier-steps", "6", "--eval-every", "2", "--batch", "4", "--n-layer", "1",
                            "--n-embd", "32", "--n-head", "2", "--block-size", "64", "--max-new-tokens", "8"])


@pytest.mark.parametrize("stage", ["sft", "classifier"])
def test_sft_and_the_classifier_resume_from_a_checkpoint_to_the_same_bytes(tmp_path, stage, monkeypatch, capsys):
    """An SFT or classifier killed mid-stage resumes from its last checkpoint, not from step 0, and ends with
    the model file of an uninterrupted one."""
    prepare_tiny(str(tmp_path / "data"), n_train=40, n_test=10)
    data = load_corpus(str(tmp_path / "data" / "tiny.npz"))

    def make(out, interrupt=None):
        batches = stages.ReviewBatches
        if interrupt is not None:  # only this stage's batches are cut short (the classifier's are cropped)
            cut = lambda b: interrupt_at(b, interrupt) if (b.scored_len is not None) == (stage == "classifier") else b
            monkeypatch.setattr(stages, "ReviewBatches", lambda *a, **k: cut(batches(*a, **k)))
        try:
            args = sft_args(tmp_path, out)
            stages.classifier(args, data, EOS, 257, stages.sft(args, data, EOS, 257))
        finally:
            monkeypatch.setattr(stages, "ReviewBatches", batches)
    make(tmp_path / "full")
    with pytest.raises(Interrupted):
        make(tmp_path / "cut", interrupt=5)  # killed at step 5: the checkpoint of step 4 is there
    assert load_checkpoint(str(tmp_path / "cut" / stage / "ckpt.pt"))["step"] == 4
    capsys.readouterr()
    make(tmp_path / "cut")
    assert f"[{stage}] resumed at step 4" in capsys.readouterr().out
    for s in ("sft", "classifier"):
        assert (tmp_path / "cut" / s / "model.pt").read_bytes() == (tmp_path / "full" / s / "model.pt").read_bytes(), s


def test_nan_loss_is_an_error(tmp_path):
    batch = lambda step: common.pack([[1, 2]], [[3, EOS]], 64, EOS)
    with pytest.raises(FloatingPointError, match=r"\[nan\] loss is nan at step 0"):
        common.fit("nan", tiny_gpt(), lambda m, b: (m(b[0]).sum() * float("nan"), {}), batch, 3, 1e-3,
                   loop_args(tmp_path))


def _ddp_worker(rank, world, port, out_dir, result):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    common.setup_distributed("cpu")
    sft_model, ref = tiny_gpt(1), tiny_gpt(2).requires_grad_(False)
    pairs, _ = random_pairs()
    args = loop_args(out_dir, dpo_steps=1, dpo_lr=1e-2, eval_every=1)  # the pairs of seed 0 + 3
    # the gradient DDP averages: this rank's half of the batch, all-reduced in backward
    probe = tiny_gpt(1)
    wrapped = torch.nn.parallel.DistributedDataParallel(probe) if world > 1 else probe
    dpo.pair_loss(wrapped, dpo.pair_batch(pairs, 0, 4, 64, EOS, 3), ref, "dpo", 0.1)[0].backward()
    grads = {n: p.grad.clone() for n, p in probe.named_parameters()}
    losses, pair_loss = [], dpo.pair_loss

    def recorded(*a, **kw):  # the loss of dpo.run's one step, on this rank
        loss, metrics = pair_loss(*a, **kw)
        losses.append(loss.item())
        return loss, metrics
    dpo.pair_loss = recorded
    try:
        policy = dpo.run("dpo", 0.1, sft_model, ref, pairs, lambda m: {}, {}, args, EOS)
    finally:
        dpo.pair_loss = pair_loss
    torch.save(dict(loss=losses[0], params=policy.state_dict(), grads=grads), f"{result}.{rank}")
    if world > 1:
        leave_process_group()


def test_ddp_two_processes_match_one(tmp_path):
    """Two processes with half of the batch each: their mean loss and the gradient DDP averages are those of one
    process on the whole batch, and after a step of DPO's loop both ranks hold the same parameters."""
    _ddp_worker(0, 1, free_port(), str(tmp_path / "single"), str(tmp_path / "single.pt"))
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path / "ddp"), str(tmp_path / "ddp.pt")), nprocs=2)
    single = torch.load(tmp_path / "single.pt.0", weights_only=True)
    ranks = [torch.load(tmp_path / f"ddp.pt.{r}", weights_only=True) for r in (0, 1)]
    # each rank's loss is the mean over its half of the batch: their mean is the one-process loss
    assert abs((ranks[0]["loss"] + ranks[1]["loss"]) / 2 - single["loss"]) < 1e-6
    assert ranks[0]["loss"] != ranks[1]["loss"]
    for k, g in single["grads"].items():  # float32 sums in another order: measured 4.5e-8 at most, gradients to 0.15
        assert g.abs().max() > 0, k
        for r in (0, 1):
            torch.testing.assert_close(ranks[r]["grads"][k], g, rtol=0, atol=1e-6, msg=k)
    start = tiny_gpt(1).state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in ranks[0]["params"].items())
    for k, v in ranks[0]["params"].items():  # one step later both ranks agree
        assert torch.equal(v, ranks[1]["params"][k]), k


# ---------------------------------------------------------------- the loop's optimizer step, by hand

class Linear2(torch.nn.Module):
    """loss = w . g: its gradient is the batch's g, chosen per step."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5, -0.25]))

    def forward(self, g):
        return (self.w * g).sum()


@pytest.mark.parametrize("warmup", [0, 3])
def test_fit_steps_are_adamw_on_clipped_gradients_with_linear_warmup(tmp_path, warmup):
    """common.fit against AdamW written out in float64: gradients clipped to norm 1 (the first and third are
    longer, the others not), learning rate lr * min(1, (step + 1) / warmup), no weight decay."""
    G = [[30.0, 40.0], [0.3, -0.1], [-3.0, 4.0], [0.5, 0.5], [1.0, -2.0]]
    model, seen = Linear2(), []

    def loss_fn(m, batch):
        seen.append(m.w.detach().double().clone())
        return m(batch[0]), {}
    common.fit("w", model, loss_fn, lambda step: [torch.tensor(G[step])], len(G), 0.1,
               loop_args(tmp_path, warmup=warmup))
    w, m, v = torch.tensor([0.5, -0.25], dtype=torch.float64), 0.0, 0.0
    want = []
    for t, g in enumerate(G, start=1):
        want.append(w.clone())
        g = torch.tensor(g, dtype=torch.float64)
        g = g * min(1.0, 1.0 / (g.norm().item() + 1e-6))
        lr = 0.1 * min(1.0, t / max(1, warmup))
        m, v = 0.9 * m + 0.1 * g, 0.999 * v + 0.001 * g * g
        w = w - lr * (m / (1 - 0.9 ** t)) / ((v / (1 - 0.999 ** t)).sqrt() + 1e-8)
    want.append(w)
    got = seen + [model.w.detach().double()]
    for t, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=f"after {t} steps")


def test_steps_with_rmsprop_are_rmsprop_on_clipped_gradients():
    """make_optimizer("rmsprop") (--optimizer, the paper's DPO optimizer) and set_lr, stepped as dpo.run and
    ppo.run step them, against RMSprop written out in float64: v = 0.99 v + 0.01 g^2, w -= lr g / (sqrt(v) + 1e-8),
    on clipped gradients, with the linear warm-up."""
    G = [[30.0, 40.0], [0.3, -0.1], [-3.0, 4.0], [0.5, 0.5], [1.0, -2.0]]
    model = Linear2()
    opt = common.make_optimizer(model, "rmsprop", 0.01)
    for step, g in enumerate(G):
        common.set_lr(opt, step, 0.01, 2)
        model(torch.tensor(g)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    w, v = torch.tensor([0.5, -0.25], dtype=torch.float64), 0.0
    for t, g in enumerate(G, start=1):
        g = torch.tensor(g, dtype=torch.float64)
        g = g * min(1.0, 1.0 / (g.norm().item() + 1e-6))
        v = 0.99 * v + 0.01 * g * g
        w = w - 0.01 * min(1.0, t / 2) * g / (v.sqrt() + 1e-8)
    torch.testing.assert_close(model.w.detach().double(), w, rtol=0, atol=1e-6)


def test_evaluations_and_samples_of_a_resumed_fit_are_those_of_an_uninterrupted_one(tmp_path):
    """common.fit, 7 steps, an evaluation (and a checkpoint) every 2. eval.jsonl: the step and the evaluation's
    numbers at steps 0, 2, 4, 6 and 7; samples.jsonl its samples, each with its step. Killed at step 5, the
    checkpoint is the one after step 3 (step 4) and the record of step 4 is dropped, to be made again; resumed,
    the files and weights equal those of an uninterrupted run."""
    G = [[0.3, -0.1], [1.0, 2.0], [-0.5, 0.25], [0.5, 0.5], [1.0, -2.0], [0.1, 0.7], [-0.4, -0.2]]
    evaluate = lambda m: dict(w0=m.w[0].item(), samples=[dict(text=f"w {m.w.tolist()}")])

    def run(name, interrupt=None):
        model = Linear2()
        batches = interrupt_at(lambda s: [torch.tensor(G[s])], interrupt)
        common.fit(name, model, lambda m, b: (m(b[0]), {}), batches, 7, 0.1, loop_args(tmp_path, eval_every=2),
                   evaluate=evaluate)
        return model
    read = lambda name, f: [json.loads(x) for x in open(tmp_path / name / f)]
    full = run("full")
    records, samples = read("full", "eval.jsonl"), read("full", "samples.jsonl")
    assert [r["step"] for r in records] == [0, 2, 4, 6, 7] and all(set(r) == {"step", "w0"} for r in records)
    assert [s["step"] for s in samples] == [0, 2, 4, 6, 7] and len({s["text"] for s in samples}) == 5
    with pytest.raises(Interrupted):
        run("resumed", interrupt=5)
    assert load_checkpoint(str(tmp_path / "resumed" / "ckpt.pt"))["step"] == 4
    assert [r["step"] for r in read("resumed", "eval.jsonl")] == [0, 2, 4]
    resumed = run("resumed")
    assert read("resumed", "eval.jsonl") == records and read("resumed", "samples.jsonl") == samples
    assert torch.equal(resumed.w, full.w)


def test_a_checkpoint_resumes_its_step_optimizer_and_state_and_a_finished_stage_its_state(tmp_path):
    """save, then resume into a fresh model and optimizer: the step, weights, optimizer state and the loop's
    state (PPO keeps its KL coefficient there) come back; after finish, resume says done (None) with the
    final state and weights, and the checkpoint is gone."""
    model = Linear2()
    opt = common.make_optimizer(model, "adamw", 0.1)
    assert common.resume("s", model, opt, str(tmp_path), {"n": 0}) == (0, {"n": 0})
    model(torch.tensor([1.0, 2.0])).backward()
    opt.step()
    common.save("s", 3, model, opt, str(tmp_path), {"n": 3})
    fresh = Linear2()
    fresh_opt = common.make_optimizer(fresh, "adamw", 0.1)
    assert common.resume("s", fresh, fresh_opt, str(tmp_path), {"n": 0}) == (3, {"n": 3})
    assert torch.equal(fresh.w, model.w)
    assert torch.equal(fresh_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    common.finish("s", fresh, str(tmp_path), common.Clock(3, 7), {"n": 7})
    assert not (tmp_path / "s" / "ckpt.pt").exists()
    again = Linear2()
    assert common.resume("s", again, common.make_optimizer(again, "adamw", 0.1), str(tmp_path), {"n": 0}) == \
        (None, {"n": 7})
    assert torch.equal(again.w, model.w)


# ---------------------------------------------------------------- the settings record

RUNS = "dpo:0.1,cdpo:0.1,ppo:3,ppo-gt:3,rloo:0.1,grpo:0.1"
NEW = dict(n_layer=3, n_head=2, n_embd=64, block_size=60, batch=16, warmup=5, seed=1, sft_steps=10, sft_lr=1e-3,
           classifier_steps=10, classifier_lr=1e-3, max_new_tokens=40, n_prompts=200, min_chars=50, n_eval=64,
           best_of="1,2",
           dpo_steps=10, dpo_lr=1e-5, dpo_batch=8, optimizer="rmsprop", eval_every=10, bt_steps=10, bt_lr=1e-4,
           ppo_iters=10, ppo_batch=32, ppo_epochs=2, ppo_minibatches=4, ppo_lr=1e-5, ppo_eval_every=2, kl_horizon=64, group=2,
           label_smoothing=0.2)
# each stage's own settings and the stages it is made from, as the pipeline uses them (README, common.py's numbering)
OWN = {"sft": {"n_layer", "n_head", "n_embd", "block_size", "batch", "warmup", "seed", "sft_steps", "sft_lr"},
       # from the SFT model; its crops cover the scored length
       "classifier": {"classifier_steps", "classifier_lr", "max_new_tokens"},
       "pairs.pt": {"n_prompts", "min_chars"}, "best_of_n.jsonl": {"n_eval", "best_of"}, "pairs_heldout.pt": {"n_eval"},
       "reward_model": {"bt_steps", "bt_lr", "eval_every"}, "score_norm_rm.json": set(), "score_norm_gt.json": set(),
       "runs/dpo_0.1": {"n_eval", "dpo_steps", "dpo_lr", "dpo_batch", "optimizer", "eval_every"},
       "runs/cdpo_0.1": {"n_eval", "dpo_steps", "dpo_lr", "dpo_batch", "optimizer", "eval_every", "label_smoothing"},
       "runs/ppo_3": {"n_eval", "optimizer", "ppo_iters", "ppo_batch", "ppo_epochs", "ppo_minibatches", "ppo_lr",
                      "ppo_eval_every", "kl_horizon"}}
OWN["runs/ppo-gt_3"] = OWN["runs/ppo_3"]
OWN["runs/rloo_0.1"] = OWN["runs/grpo_0.1"] = OWN["runs/ppo_3"] - {"kl_horizon"} | {"group"}
PARENTS = {"sft": [], "classifier": ["sft"], "pairs.pt": ["classifier"], "best_of_n.jsonl": ["pairs.pt"],
           "pairs_heldout.pt": ["pairs.pt"], "reward_model": ["pairs_heldout.pt"], "score_norm_rm.json": ["reward_model"],
           "score_norm_gt.json": ["pairs.pt"], "runs/dpo_0.1": ["pairs.pt"], "runs/cdpo_0.1": ["pairs.pt"],
           "runs/ppo_3": ["score_norm_rm.json"], "runs/ppo-gt_3": ["score_norm_gt.json"],
           "runs/rloo_0.1": ["score_norm_rm.json"], "runs/grpo_0.1": ["score_norm_rm.json"]}


def test_each_setting_changes_the_record_of_its_stage_and_every_stage_after_it():
    """stage_plan with one setting changed: exactly the stages that use it, and every stage made from them,
    record another value (a stage whose record missed an upstream setting would be reused when it changed)."""
    plan = lambda *flags: record.stage_plan(settings.get_args(["--preset", "tiny", "--device", "cpu", "--runs", RUNS,
                                                                *flags]), "0" * 64)
    base = plan()
    assert set(base) == set(OWN)

    def uses(stage, key):
        return key in OWN[stage] or any(uses(p, key) for p in PARENTS[stage])
    for key, value in NEW.items():
        changed = plan("--" + key.replace("_", "-"), str(value))
        assert {s for s in base if changed[s] != base[s]} == {s for s in OWN if uses(s, key)}, key

# ---------------------------------------------------------------- files

def test_truncated_data_file(tmp_path):
    prepare_tiny(str(tmp_path), n_train=20, n_test=10)
    path = tmp_path / "tiny.npz"
    assert len(load_corpus(str(path))["train"]) == 20
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="tiny.npz is truncated or corrupt"):
        load_corpus(str(path))
    with pytest.raises(UsageError, match="run python data/"):
        load_corpus(str(tmp_path / "missing" / "x.npz"))


def test_tiny_data_is_made_in_a_folder_that_does_not_exist_yet(tmp_path):
    data = stages.load_data(str(tmp_path / "new" / "folder"), "tiny")
    assert len(data["train"]) == 12000 and data["tokenizer"] == "words" and len(data["words"]) == 156


def test_corrupt_checkpoint(tmp_path):
    path = str(tmp_path / "model.pt")
    save_checkpoint(tiny_gpt().state_dict(), path)
    assert os.listdir(tmp_path) == ["model.pt"]  # no temporary file left
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 200)
    with pytest.raises(ValueError, match="model.pt is truncated or corrupt"):
        load_checkpoint(path)


def test_a_torn_last_line_is_dropped_on_resume_and_a_bad_line_is_named(tmp_path, capsys):
    full, _ = small_dpo_run(tmp_path / "full")
    with pytest.raises(Interrupted):
        small_dpo_run(tmp_path / "torn", interrupt=3)
    evals = tmp_path / "torn" / "runs" / "dpo_0.1" / "eval.jsonl"
    with open(evals, "a") as f:
        f.write('{"step": 4, "rew')  # killed in the middle of writing the step-4 evaluation
    resumed, _ = small_dpo_run(tmp_path / "torn")
    assert resumed == full and "dropped its torn last line 3" in capsys.readouterr().err
    evals.write_text('{"step": 0}\nnot json\n{"step": 2}\n')
    with pytest.raises(UsageError, match=r"dpo_0.1/eval.jsonl, line 2: not a JSON record"):
        read_jsonl(str(evals))


def test_the_settings_record_keeps_the_stages_a_command_did_not_name(tmp_path):
    """check_settings merges this command's plan into out/settings.json: a later command that names fewer stages
    leaves the others' records, so a changed setting of such a stage is still refused, not reused."""
    out = str(tmp_path)
    record.check_settings(out, {"sft": {"sft_steps": 3}, "runs/dpo_0.1": {"dpo_lr": 1.0}}, redo=False)
    record.check_settings(out, {"sft": {"sft_steps": 3}}, redo=False)
    assert json.load(open(tmp_path / "settings.json")) == {"sft": {"sft_steps": 3}, "runs/dpo_0.1": {"dpo_lr": 1.0}}
    (tmp_path / "runs" / "dpo_0.1").mkdir(parents=True)
    with pytest.raises(UsageError, match=r"runs/dpo_0.1 was made with other settings \(dpo_lr 1.0 -> 2.0\)"):
        record.check_settings(out, {"sft": {"sft_steps": 3}, "runs/dpo_0.1": {"dpo_lr": 2.0}}, redo=False)


def test_redo_remakes_a_stage_made_with_other_settings(tmp_path):
    """A stage folder recorded with other settings: refused without redo; with redo deleted (to be made again)
    and the new settings recorded."""
    out = str(tmp_path)
    record.check_settings(out, {"sft": {"sft_steps": 3}, "pairs.pt": {"n_prompts": 10}}, redo=False)
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "model.pt").write_bytes(b"old")
    (tmp_path / "pairs.pt").write_bytes(b"old")
    new = {"sft": {"sft_steps": 4}, "pairs.pt": {"n_prompts": 20}}
    with pytest.raises(UsageError, match=r"sft was made with other settings \(sft_steps 3 -> 4\)"):
        record.check_settings(out, new, redo=False)
    record.check_settings(out, new, redo=True)  # a folder and a file
    assert not (tmp_path / "sft").exists() and not (tmp_path / "pairs.pt").exists()
    assert json.load(open(tmp_path / "settings.json")) == new


def test_flags_at_their_bounds_are_accepted_and_one_past_refused(monkeypatch):
    """check_args at each edge: the last value a flag allows is accepted, the next one refused; and the defaults
    of one process on a CPU (the tiny preset, out/tiny, the data folder beside settings.py, seed 1337, no --redo).
    --impl triton on a CPU is accepted with TRITON_INTERPRET=1 only (refused without it: FLAG_MISTAKES), so it
    is set here: conftest sets it only where there is no GPU."""
    ok = [["--seed", "0"], ["--log-every", "1"], ["--warmup", "0"], ["--batch", "1"], ["--label-smoothing", "0"],
          ["--max-new-tokens", "9", "--block-size", "18"], ["--max-new-tokens", "20", "--block-size", "29"],
          ["--runs", "ppo-gt:3", "--ppo-batch", "4", "--ppo-minibatches", "4"],
          ["--impl", "triton"], ["--impl", "auto"], ["--preset", "imdb", "--block-size", "1024"]]
    bad = [["--sft-steps", "0"], ["--label-smoothing", "0.5"], ["--best-of", "0,2"],
           ["--max-new-tokens", "20", "--block-size", "28"],
           ["--runs", "ppo-gt:3", "--ppo-batch", "4", "--ppo-minibatches", "5"],
           ["--preset", "imdb", "--block-size", "1025"], ["--impl", "fused"], ["--preset", "huge"]]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for flags in ok:
        settings.get_args(["--preset", "tiny", "--device", "cpu", *flags])
    for flags in bad:
        with pytest.raises(SystemExit):
            settings.get_args(["--preset", "tiny", "--device", "cpu", *flags])
    args = settings.get_args(["--device", "cpu"])
    here = os.path.dirname(os.path.abspath(settings.__file__))
    assert (args.preset, args.out, args.data_dir, args.seed, args.redo) == (
        "tiny", os.path.join("out", "tiny"), os.path.join(here, "data", "tiny"), 1337, False)
    assert settings.get_args(["--device", "cpu", "--redo"]).redo is True


def test_every_method_with_a_parameter_refuses_a_bad_one():
    """parse_runs: beta, alpha or the target KL must be > 0 for each method that takes one; orpo's lambda must be
    given and >= 0; the value is kept as given."""
    for m in ("dpo", "ipo", "cdpo", "simpo", "kto", "ul", "ppo", "ppo-gt"):
        for bad in (f"{m}:0", f"{m}:-0.5", m):
            with pytest.raises(ValueError, match=f"{m} needs"):
                settings.parse_runs(bad)
        assert settings.parse_runs(f"{m}:0.5") == [(m, 0.5)]
    for bad in ("orpo", "orpo:-0.1"):
        with pytest.raises(ValueError, match="orpo needs lambda >= 0"):
            settings.parse_runs(bad)
    assert settings.parse_runs("orpo:0,orpo:0.1") == [("orpo", 0.0), ("orpo", 0.1)]


def test_the_sft_record_names_the_pretrained_weights():
    """--init pretrained: the SFT stage (and so every stage after it) records which GPT-2 it started from, so that
    another --model is not served the old stages; from scratch it records none."""
    plan = lambda *flags: record.stage_plan(settings.get_args(["--device", "cpu", "--runs", "dpo:0.1", *flags]),
                                              "0" * 64)
    small, medium = plan("--preset", "imdb", "--model", "gpt2"), plan("--preset", "imdb", "--model", "gpt2-medium")
    assert small["sft"]["model"] == "gpt2" and medium["sft"]["model"] == "gpt2-medium"
    assert all(small[s] != medium[s] for s in small)
    assert plan("--preset", "tiny")["sft"]["model"] is None


def test_held_out_prompts_of_the_reward_model_are_a_tenth_of_n_prompts_at_least_32():
    assert [settings.n_heldout(SimpleNamespace(n_prompts=n)) for n in (200, 339, 1000, 25000)] == [32, 33, 100, 2500]
    assert isinstance(settings.n_heldout(SimpleNamespace(n_prompts=1000)), int)


def test_check_data_counts_reviews_longer_than_min_chars(tmp_path):
    """check_data on a test split with 3 reviews longer than --min-chars 100 (and 2 of exactly 100): --n-eval 3 fits
    (no PPO: no held-out prompts), 4 does not, nor 1 with ppo's 32 held-out prompts; with ppo-gt, --ppo-batch is
    checked against the train split's."""
    split = lambda chars: Split(np.arange(5 * len(chars), dtype=np.uint16), np.arange(0, 5 * len(chars) + 1, 5),
                                np.zeros(len(chars), np.uint8), np.array(chars, np.int32))
    data = dict(train=split([100, 150, 300, 100]), test=split([100, 101, 150, 100, 200]), tokenizer="words")
    args = lambda *flags: settings.get_args(["--preset", "tiny", "--device", "cpu", "--data-dir", str(tmp_path),
                                             "--min-chars", "100", "--ppo-minibatches", "1", *flags])
    settings.check_data(args("--runs", "dpo:0.1", "--n-eval", "3"), data)
    with pytest.raises(UsageError, match="--n-eval 4: the test split of .* has 3 reviews longer than --min-chars 100"):
        settings.check_data(args("--runs", "dpo:0.1", "--n-eval", "4"), data)
    with pytest.raises(UsageError, match="--n-eval 1 \\+ 32 held-out prompts of PPO's reward model: the test split"):
        settings.check_data(args("--runs", "ppo:3", "--n-eval", "1", "--ppo-batch", "2"), data)  # ppo: 32 held out
    settings.check_data(args("--runs", "ppo-gt:3", "--n-eval", "3", "--ppo-batch", "2"), data)
    with pytest.raises(UsageError, match="--ppo-batch 3: a rollout draws 3 prompts, but the train split of .* has 2 "
                                         "reviews longer than"):
        settings.check_data(args("--runs", "ppo-gt:3", "--n-eval", "3", "--ppo-batch", "3"), data)


def _outcome_on_rank(rank, world, port, out, result, job):
    """job(out) on one of `world` gloo ranks; what came of it ("went on" or the UsageError) goes to result.<rank>."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    common.setup_distributed("cpu")
    try:
        job(out)
        outcome = "went on"
    except UsageError as e:
        outcome = str(e)
    with open(f"{result}.{rank}", "w") as f:
        f.write(outcome)
    leave_process_group()


def _check_300_sft_steps(out):
    record.check_settings(out, {"sft": {"sft_steps": 300}}, redo=False)


def test_a_stale_stage_stops_every_rank(tmp_path):
    """Rank 0 checks the settings; under torchrun every rank must stop with it, not wait at a barrier."""
    (tmp_path / "sft").mkdir()
    (tmp_path / "settings.json").write_text(json.dumps({"sft": {"sft_steps": 200}}))
    mp.spawn(_outcome_on_rank, args=(2, free_port(), str(tmp_path), str(tmp_path / "r"), _check_300_sft_steps), nprocs=2)
    for rank in (0, 1):
        assert "sft was made with other settings (sft_steps 200 -> 300)" in (tmp_path / f"r.{rank}").read_text()


def test_settings_json_that_is_not_json_is_named(tmp_path):
    (tmp_path / "settings.json").write_text('{"sft": {"sft_steps": 3')  # cut off mid-write by a foreign tool
    with pytest.raises(UsageError, match=rf"{tmp_path}/settings.json is not JSON \(.*line 1\)"):
        record.check_settings(str(tmp_path), {"sft": {"sft_steps": 3}}, redo=False)


HOLD = """import sys, time
import record
with record.locked(sys.argv[1]):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_run_folder_is_locked_while_a_command_uses_it(tmp_path):
    """A second command into a run folder in use stops with one line, before any stage; the lock goes with its
    holder's process, even one killed with SIGKILL."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "out")], cwd=repo, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UsageError, match=rf"{tmp_path}/out is in use by another command \(process {holder.pid}\)"):
            experiment.main(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "out"), "--data-dir",
                      str(tmp_path / "data"), "--runs", "ft"])
        assert sorted(os.listdir(tmp_path / "out")) == [".lock"]  # no stage started, no settings recorded
    finally:
        holder.kill()  # SIGKILL: no clean-up code runs
        holder.wait()
    with record.locked(str(tmp_path / "out")):  # free again
        pass


def _enter_the_lock(out):
    with record.locked(out):
        common.barrier()  # both ranks inside at once: one torchrun shares its run folder


def test_the_ranks_of_one_torchrun_share_the_lock_and_all_stop_when_it_is_taken(tmp_path):
    mp.spawn(_outcome_on_rank, args=(2, free_port(), str(tmp_path / "out"), str(tmp_path / "free"), _enter_the_lock),
             nprocs=2)
    assert [(tmp_path / f"free.{r}").read_text() for r in (0, 1)] == ["went on", "went on"]
    with record.locked(str(tmp_path / "out")):  # another command holds it: every rank stops, none waits
        mp.spawn(_outcome_on_rank, args=(2, free_port(), str(tmp_path / "out"), str(tmp_path / "taken"), _enter_the_lock),
                 nprocs=2)
    for r in (0, 1):
        assert f"{tmp_path}/out is in use by another command (process {os.getpid()})" in (tmp_path / f"taken.{r}").read_text()


def test_real_lengths_of_packed_and_scored_batches():
    """common.real_lengths: each row's real tokens (BOS + prompt + response, its last input position), the lengths
    the model skips the padding after, for pack's batches and for the scalar heads' batches."""
    prompts, responses = [[1, 2, 3], [4], []], [[5, EOS], [6, 7, 8, 9, 10, 11], [12]]
    idx, _, mask = common.pack(prompts, responses, 64, EOS)
    assert common.real_lengths(mask).tolist() == [1 + 3 + 2 - 1, 1 + 1 + 6 - 1, 1 + 0 + 1 - 1]
    idx, mask = sampling.score_batch(prompts, responses, EOS, 64)
    assert common.real_lengths(mask).tolist() == [1 + 3 + 1, 1 + 1 + 6, 1 + 0 + 1] == mask.sum(1).tolist()
