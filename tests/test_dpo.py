"""dpo.py: the losses, the masks, one step, the pipeline end to end, resume, DDP, and bad input.

    python -m pytest tests/test_dpo.py     (CPU; about a minute)
"""
import json
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import dpo
import stages
from data.corpus import load_corpus
from kernels import sequence_logprobs
from model import GPT, GPTConfig

EOT = 256


def args_for(tmp_path, *extra):
    return dpo.get_args(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "out"), *extra])


def tiny_gpt(seed=0, vocab=257, block=64):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=block, vocab_size=vocab, n_layer=1, n_head=2, n_embd=32))


# ---------------------------------------------------------------- losses

def test_loss_is_ln2_when_policy_is_reference():
    torch.manual_seed(0)
    model = tiny_gpt()
    idx, targets, mask = dpo.pack([[1, 2, 3], [4, 5]] * 2, [[6, 7, EOT], [8, EOT], [9, 9, 9, EOT], [10, EOT]], 64)
    args = dpo.get_args(["--device", "cpu"])
    for method in ("dpo", "cdpo"):
        loss, m = dpo.pair_loss(model, (idx, targets, mask), args, model, method, 0.1)
        assert abs(loss.item() - math.log(2)) < 1e-6 and m["margin"] == 0 and m["chosen"] == 0


def test_losses_match_their_formulas():
    pi_c, pi_r = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -4.0])
    ref_c, ref_r = torch.tensor([-4.0, -9.0]), torch.tensor([-4.5, -6.0])
    h = torch.tensor([(-3 + 4) - (-5 + 4.5), (-10 + 9) - (-4 + 6)])  # [1.5, -3.0]
    beta = 0.5
    sig = lambda x: 1 / (1 + math.exp(-x))
    losses, r_c, r_r = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
    assert torch.allclose(losses, torch.tensor([-math.log(sig(0.75)), -math.log(sig(-1.5))]))
    assert torch.allclose(r_c, torch.tensor([0.5, -0.5])) and torch.allclose(r_r, torch.tensor([-0.25, 1.0]))
    losses, _, _ = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, "cdpo", label_smoothing=0.2)
    want = [-(0.8 * math.log(sig(beta * x)) + 0.2 * math.log(sig(-beta * x))) for x in h.tolist()]
    assert torch.allclose(losses, torch.tensor(want))
    losses, _, _ = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, "ipo")
    assert torch.allclose(losses, (h - 1.0) ** 2)  # 1 / (2 beta) = 1
    tok_c = torch.tensor([[-1.0, -2.0, 0.0]])
    mask_c = torch.tensor([[True, True, False]])
    tok_r = torch.tensor([[-0.5, 0.0, 0.0]])
    mask_r = torch.tensor([[True, False, False]])
    assert torch.isclose(dpo.unlikelihood_loss(tok_c, mask_c, tok_r, mask_r, 0.0), torch.tensor(1.5))
    want = 1.5 - 0.3 * math.log(1 - math.exp(-0.5))
    assert torch.isclose(dpo.unlikelihood_loss(tok_c, mask_c, tok_r, mask_r, 0.3), torch.tensor(want))


# ---------------------------------------------------------------- masks

def test_pack_masks_only_response_targets():
    idx, targets, mask = dpo.pack([[10, 11, 12], [20]], [[13, 14, EOT], [21, EOT]], 64, pad=0)
    assert idx.tolist() == [[10, 11, 12, 13, 14], [20, 21, 0, 0, 0]]
    assert targets.tolist() == [[11, 12, 13, 14, EOT], [21, EOT, 0, 0, 0]]
    assert mask.tolist() == [[False, False, True, True, True], [True, True, False, False, False]]


def test_prompt_and_padding_do_not_enter_the_sum():
    torch.manual_seed(0)
    idx, targets, mask = dpo.pack([[1, 2, 3, 4], [5]], [[6, EOT], [7, 8, 9, EOT]], 64)
    h = torch.randn(2, idx.size(1), 16)
    w = torch.randn(257, 16)
    base = sequence_logprobs(h, w, None, None, targets, mask).seq_pol
    h2 = h.clone()
    h2[0, :3] += 5.0  # prompt positions of row 0 (their targets are prompt tokens)
    h2[1, 4:] -= 5.0  # padding of row 1
    assert torch.equal(sequence_logprobs(h2, w, None, None, targets, mask).seq_pol, base)
    h2[0, 3] += 5.0  # the first response target of row 0 does count
    assert not torch.equal(sequence_logprobs(h2, w, None, None, targets, mask).seq_pol[0], base[0])


def test_one_step_raises_the_margin():
    torch.manual_seed(0)
    policy, ref = tiny_gpt(), tiny_gpt()
    ref.requires_grad_(False)
    batch = dpo.pack([[1, 2], [1, 2]], [[3, 4, EOT], [5, 6, EOT]], 64)  # one pair: chosen, rejected
    args = dpo.get_args(["--device", "cpu"])
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    before, m0 = dpo.pair_loss(policy, batch, args, ref, "dpo", 0.1)
    before.backward()
    opt.step()
    after, m1 = dpo.pair_loss(policy, batch, args, ref, "dpo", 0.1)
    assert m1["margin"] > m0["margin"] and after < before


@pytest.mark.parametrize("method", ["dpo", "ul"])
def test_fused_kernel_gives_the_reference_gradients(method):
    """A DPO (or Unlikelihood) loss through a GPT with the fused kernel (the interpreter on a CPU) and with
    the plain reference: the same loss and the same gradient of every parameter, the tied embedding
    included (it gets gradient both as wte and as lm_head)."""
    policy, ref = tiny_gpt(seed=0), tiny_gpt(seed=1)
    ref.requires_grad_(False)
    batch = dpo.pack([[1, 2, 3], [4]] * 2, [[5, 6, EOT], [7, 8, 9, EOT], [5, EOT], [9, 9, EOT]], 64)
    results = []
    for impl in ("triton", "reference"):
        policy.zero_grad()
        loss, _ = dpo.pair_loss(policy, batch, dpo.get_args(["--device", "cpu", "--impl", impl]), ref, method, 0.5)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in policy.named_parameters()}))
    (loss_t, grads_t), (loss_r, grads_r) = results
    assert loss_t == pytest.approx(loss_r, rel=1e-5)
    for name, g in grads_r.items():
        assert g.abs().max() > 0, name
        assert torch.allclose(grads_t[name], g, rtol=1e-4, atol=1e-6), name


# ---------------------------------------------------------------- prompts and pairs

def test_prompts_are_2_to_8_tokens_of_long_reviews():
    from data.corpus import Split
    lengths = np.array([50, 300, 250, 20, 400])
    tokens = np.arange(lengths.sum()) % 256
    split = Split(tokens.astype(np.uint16), np.concatenate([[0], np.cumsum(lengths)]), np.zeros(5, np.uint8),
                  lengths.astype(np.int32))
    prompts = dpo.make_prompts(split, 100, 200, np.random.default_rng(0))
    assert len(prompts) == 3  # only the three reviews over 200 characters
    starts = {int(split.offsets[i]) % 256 for i in (1, 2, 4)}
    assert all(2 <= len(p) <= 8 and p[0] in starts for p in prompts)


def test_pairs_all_six_minus_ties_chosen_higher():
    prompts = [[1], [2]]
    samples = [[10], [11, EOT], [12], [13], [20], [21], [22], [23]]
    rewards = [0.9, 0.1, 0.5, 0.5, 0.3, 0.2, 0.8, 0.3]  # prompt 0 has one tie, prompt 1 has one tie
    pairs = stages.pairs_from(prompts, samples, rewards, EOT)
    assert len(pairs["prompt"]) == 10 and pairs["prompt"].count([1]) == 5
    value = {tuple(s + [EOT] if s[-1] != EOT else s): r for s, r in zip(samples, rewards)}
    assert all(value[tuple(c)] > value[tuple(r)] for c, r in zip(pairs["chosen"], pairs["rejected"]))
    assert all(c[-1] == EOT and r[-1] == EOT for c, r in zip(pairs["chosen"], pairs["rejected"]))


# ---------------------------------------------------------------- the whole pipeline, resume, DDP

SMOKE = ["--sft-steps", "6", "--rm-steps", "4", "--dpo-steps", "4", "--eval-every", "2", "--n-prompts", "6",
         "--n-eval", "4", "--max-new-tokens", "8", "--batch", "4", "--dpo-batch", "4", "--n-layer", "1",
         "--n-embd", "32", "--n-head", "2", "--block-size", "64", "--runs", "dpo:0.1,ft,ul:0.5,ipo:0.1,cdpo:0.1"]


def test_smoke_whole_pipeline(tmp_path, capsys):
    fig = tmp_path / "frontier.png"
    dpo.main(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path),
              "--figure", str(fig), *SMOKE])
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("nanoDPO: preset tiny on cpu")
    assert fig.stat().st_size > 10_000 and (tmp_path / "out" / "pairs.pt").exists()
    for run in ("dpo_0.1", "ft", "ul_0.5", "ipo_0.1", "cdpo_0.1"):
        records = [json.loads(x) for x in open(tmp_path / "out" / "runs" / run / "eval.jsonl")]
        assert [r["step"] for r in records] == [0, 2, 4]
        assert records[0]["kl"] == pytest.approx(0, abs=1e-5) and 0 <= records[-1]["reward"] <= 1
    # a rerun finds every stage complete and trains nothing
    dpo.main(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path),
              "--figure", str(fig), *SMOKE])
    assert "step     0 loss" not in capsys.readouterr().out


def random_pairs():
    """8 fixed preference pairs of random byte tokens, and the generator that drew them (for more tokens)."""
    g = torch.Generator().manual_seed(0)
    rand = lambda n: torch.randint(0, 256, (n,), generator=g).tolist()
    pairs = dict(prompt=[rand(3) for _ in range(8)], chosen=[rand(5) + [EOT] for _ in range(8)],
                 rejected=[rand(4) + [EOT] for _ in range(8)])
    return pairs, rand


def small_dpo_run(tmp_path, name, stop_at=None):
    """A DPO run on fixed pairs with a tiny model, evaluated every 2 steps."""
    args = args_for(tmp_path, "--eval-every", "2", "--dpo-batch", "4", "--max-new-tokens", "6", "--block-size", "64")
    policy, ref = tiny_gpt(1), tiny_gpt(1).requires_grad_(False)
    rm = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=1, n_head=2, n_embd=32, score_head=True))
    pairs, rand = random_pairs()
    prompts = [rand(2) for _ in range(4)]
    dpo.train(name, policy, lambda m, b: dpo.pair_loss(m, b, args, ref, "dpo", 0.1), dpo.pair_batches(pairs, args, 7),
              6, 1e-3, args, evaluate=lambda m, step: dpo.evaluate(m, ref, rm, prompts, args, EOT), stop_at=stop_at)
    return [json.loads(x) for x in open(tmp_path / "out" / name / "eval.jsonl")], policy


def test_interrupted_run_resumes_to_the_same_metrics(tmp_path):
    full, p_full = small_dpo_run(tmp_path, "full")
    partial, _ = small_dpo_run(tmp_path, "resumed", stop_at=3)  # killed after step 3 (checkpoint at step 2)
    assert [r["step"] for r in partial] == [0, 2] and (tmp_path / "out" / "resumed" / "ckpt.pt").exists()
    resumed, p_res = small_dpo_run(tmp_path, "resumed")
    assert resumed == full
    assert all(torch.equal(a, b) for a, b in zip(p_full.state_dict().values(), p_res.state_dict().values()))
    assert not (tmp_path / "out" / "resumed" / "ckpt.pt").exists()


def _ddp_worker(rank, world, port, out_dir, result):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    args = dpo.get_args(["--preset", "tiny", "--device", "cpu", "--out", out_dir, "--dpo-batch", "4"])
    dpo.setup_distributed(args)
    policy, ref = tiny_gpt(1), tiny_gpt(2).requires_grad_(False)
    pairs, _ = random_pairs()
    losses = []
    loss_fn = lambda m, b: (lambda out: (losses.append(out[0].item()), out)[1])(dpo.pair_loss(m, b, args, ref, "dpo", 0.1))
    dpo.train("ddp", policy, loss_fn, dpo.pair_batches(pairs, args, 3), 1, 1e-2, args)
    torch.save(dict(loss=losses[0], params=policy.state_dict()), f"{result}.{rank}")
    if world > 1:
        torch.distributed.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_match_one(tmp_path):
    _ddp_worker(0, 1, free_port(), str(tmp_path / "single"), str(tmp_path / "single.pt"))
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path / "ddp"), str(tmp_path / "ddp.pt")), nprocs=2)
    single = torch.load(tmp_path / "single.pt.0", weights_only=True)
    ranks = [torch.load(tmp_path / f"ddp.pt.{r}", weights_only=True) for r in (0, 1)]
    # each rank's loss is the mean over its half of the batch: their mean is the one-process loss
    assert abs((ranks[0]["loss"] + ranks[1]["loss"]) / 2 - single["loss"]) < 1e-5
    for k, v in single["params"].items():  # one step later the parameters agree
        assert torch.allclose(ranks[0]["params"][k], v, atol=1e-5), k
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]), k


# ---------------------------------------------------------------- bad input

def test_truncated_data_file(tmp_path):
    from data.tiny.prepare import prepare
    prepare(str(tmp_path), n_train=20, n_test=10)
    path = tmp_path / "tiny.npz"
    assert len(load_corpus(str(path))["train"]) == 20
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="tiny.npz is truncated or corrupt"):
        load_corpus(str(path))
    with pytest.raises(FileNotFoundError, match="run python data/"):
        load_corpus(str(tmp_path / "missing" / "x.npz"))


def test_corrupt_checkpoint(tmp_path):
    model = tiny_gpt()
    path = str(tmp_path / "model.pt")
    dpo.save_checkpoint(model.state_dict(), path)
    assert not os.path.exists(path + ".tmp")
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 200)
    with pytest.raises(ValueError, match="model.pt is truncated or corrupt"):
        dpo.load_checkpoint(path)


def test_empty_response_and_long_prompt():
    with pytest.raises(ValueError, match="empty response"):
        dpo.pack([[1, 2]], [[]], 64)
    with pytest.raises(ValueError, match="prompt of 64 tokens does not fit block_size 64"):
        dpo.pack([list(range(64))], [[1, EOT]], 64)
    idx, targets, mask = dpo.pack([[1, 2]], [list(range(100))], 16)  # a long response is cut at the block size
    assert idx.shape == (1, 16) and mask.sum() == 15


def test_nan_loss_is_an_error(tmp_path):
    args = args_for(tmp_path)
    model = tiny_gpt()
    batch = lambda step: dpo.pack([[1, 2]], [[3, EOT]], 64)
    with pytest.raises(FloatingPointError, match=r"\[nan\] loss is nan at step 0"):
        dpo.train("nan", model, lambda m, b: (m(b[0]).sum() * float("nan"), {}), batch, 3, 1e-3, args)


def test_unknown_run_method(capsys):
    with pytest.raises(SystemExit):
        dpo.get_args(["--runs", "dpo:0.1,ppo:1"])
    assert "unknown method 'ppo'" in capsys.readouterr().err
