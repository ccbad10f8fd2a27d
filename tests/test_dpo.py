"""dpo.py: the losses against their formulas, one step, the fused kernel against the reference, and the
whole pipeline end to end (PPO runs included) at toy sizes.

    python -m pytest tests/test_dpo.py     (CPU; about 30 s)
"""
import json
import math
import os
import subprocess
import sys
import urllib.error

import numpy as np
import pytest
import torch
from conftest import (DEVICE, EOS, assert_fused_matches_reference, f64_dists, f64_logprob, recording, sharp_gpt,
                      tiny_gpt)

import dpo
import experiment
import hf
import sampling
import stages
from common import pack
from data.corpus import Split, UsageError, load_checkpoint, save_corpus
from data.tiny.prepare import prepare as prepare_tiny, vocabulary
from model import GPT, GPTConfig, WordTokenizer, get_tokenizer
from settings import get_args


def test_loss_is_ln2_when_policy_is_reference():
    model = tiny_gpt()
    idx, targets, mask = pack([[1, 2, 3], [4, 5]] * 2, [[6, 7, EOS], [8, EOS], [9, 9, 9, EOS], [10, EOS]], 64, EOS)
    for method in ("dpo", "cdpo"):
        loss, m = dpo.pair_loss(model, (idx, targets, mask), model, method, 0.1, label_smoothing=0.1)
        assert abs(loss.item() - math.log(2)) < 1e-6 and m["rewards/margins"] == 0 and m["rewards/chosen"] == 0
        assert m["rewards/accuracies"] == 0.5  # every pair a tie: half right, not all wrong


def test_losses_match_their_formulas():
    pi_c, pi_r = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -4.0])
    ref_c, ref_r = torch.tensor([-4.0, -9.0]), torch.tensor([-4.5, -6.0])
    u = torch.tensor([(-3 + 4) - (-5 + 4.5), (-10 + 9) - (-4 + 6)])  # [1.5, -3.0]
    beta = 0.5
    sig = lambda x: 1 / (1 + math.exp(-x))
    losses, r_c, r_r = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta)
    assert torch.allclose(losses, torch.tensor([-math.log(sig(0.75)), -math.log(sig(-1.5))]))
    assert torch.allclose(r_c, torch.tensor([0.5, -0.5])) and torch.allclose(r_r, torch.tensor([-0.25, 1.0]))
    losses, _, _ = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, "cdpo", label_smoothing=0.2)
    want = [-(0.8 * math.log(sig(beta * x)) + 0.2 * math.log(sig(-beta * x))) for x in u.tolist()]
    assert torch.allclose(losses, torch.tensor(want))
    losses, _, _ = dpo.dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, "ipo")
    assert torch.allclose(losses, (u - 1.0) ** 2)  # 1 / (2 beta) = 1
    tok_c = torch.tensor([[-1.0, -2.0, 0.0]])
    mask_c = torch.tensor([[True, True, False]])
    tok_r = torch.tensor([[-0.5, 0.0, 0.0]])
    mask_r = torch.tensor([[True, False, False]])
    assert torch.isclose(dpo.unlikelihood_loss(tok_c, mask_c, tok_r, mask_r, 0.0), torch.tensor(1.5))
    want = 1.5 - 0.3 * math.log(1 - math.exp(-0.5))
    assert torch.isclose(dpo.unlikelihood_loss(tok_c, mask_c, tok_r, mask_r, 0.3), torch.tensor(want))


def test_pair_batch_puts_chosen_first():
    pairs = dict(prompt=[[1], [2]], chosen=[[10, EOS], [20, EOS]], rejected=[[11, 12, EOS], [21, EOS]])
    idx, targets, mask = dpo.pair_batch(pairs, 0, 4, 64, EOS, seed=0)
    n = idx.size(0) // 2
    for i in range(n):  # row i and row n + i share the prompt; row i holds the chosen response
        k = idx[i, 1].item() - 1  # position 0 holds the beginning-of-text token, then the prompt
        assert idx[n + i, 1].item() == k + 1
        assert targets[i][mask[i]].tolist() == pairs["chosen"][k]
        assert targets[n + i][mask[n + i]].tolist() == pairs["rejected"][k]


@pytest.mark.parametrize("method", ["dpo", "ul"])
def test_fused_kernel_gives_the_reference_gradients(method):
    """A DPO (or Unlikelihood) loss through a GPT with the fused kernel (the interpreter on a CPU) and with
    the plain reference: the same loss and the same gradient of every parameter, the tied embedding
    included (it gets gradient both as wte and as lm_head)."""
    policy, ref = tiny_gpt(seed=0).to(DEVICE), tiny_gpt(seed=1).to(DEVICE).requires_grad_(False)
    batch = [x.to(DEVICE) for x in pack([[1, 2, 3], [4]] * 2, [[5, 6, EOS], [7, 8, 9, EOS], [5, EOS], [9, 9, EOS]], 64,
                                         EOS)]
    assert_fused_matches_reference(policy, lambda impl: dpo.pair_loss(policy, batch, ref, method, 0.5, impl)[0])


SMOKE = ["--sft-steps", "6", "--classifier-steps", "4", "--dpo-steps", "4", "--eval-every", "2", "--n-prompts", "16",
         "--n-eval", "4", "--max-new-tokens", "8", "--batch", "4", "--dpo-batch", "4", "--n-layer", "1",
         "--n-embd", "32", "--n-head", "2", "--block-size", "64", "--bt-steps", "4", "--ppo-iters", "2",
         "--ppo-batch", "8", "--ppo-eval-every", "1", "--runs",
         "dpo:0.1,ft,ul:0.5,ipo:0.1,cdpo:0.1,simpo:2,orpo:0.1,kto:0.1,ppo:2,ppo-gt:2,rloo:0.05,grpo:0.05"]


def smoke_argv(tmp_path, *extra):
    return ["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "out"), "--data-dir", str(tmp_path / "data"),
            *SMOKE, *extra]


def test_smoke_whole_pipeline(tmp_path, capsys, monkeypatch):
    calls = recording(monkeypatch, stages, "evaluate")
    experiment.main(smoke_argv(tmp_path))
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("nanoDPO: preset tiny on cpu")
    assert (tmp_path / "out" / "frontier.png").stat().st_size > 10_000 and (tmp_path / "out" / "pairs.pt").exists()
    for run, steps in [("dpo_0.1", [0, 2, 4]), ("ft", [0, 2, 4]), ("ul_0.5", [0, 2, 4]), ("ipo_0.1", [0, 2, 4]),
                       ("cdpo_0.1", [0, 2, 4]), ("simpo_2", [0, 2, 4]), ("orpo_0.1", [0, 2, 4]), ("kto_0.1", [0, 2, 4]),
                       ("ppo_2", [0, 8, 16]), ("ppo-gt_2", [0, 8, 16]), ("rloo_0.05", [0, 8, 16]),
                       ("grpo_0.05", [0, 8, 16])]:
        records = [json.loads(x) for x in open(tmp_path / "out" / "runs" / run / "eval.jsonl")]
        assert [r["step"] for r in records] == steps, run
        assert records[0]["kl"] == pytest.approx(0, abs=1e-5) and 0 <= records[-1]["reward"] <= 1
        # the curves: a line per logged step (every 10th and the last), their figure beside
        metrics = [json.loads(x) for x in open(tmp_path / "out" / "runs" / run / "metrics.jsonl")]
        assert [m["step"] for m in metrics] == ([0, 3] if steps[-1] == 4 else [0, 10, 15]), run
        assert "rewards/margins" in metrics[0] or run in ("ft", "ul_0.5") or steps[-1] == 16, run
        assert (tmp_path / "out" / "runs" / run / "curves.png").exists()
    # every checkpoint holds its config and tokenizer: sample.py reads it alone
    for stage in ("sft", "classifier", "reward_model", "runs/dpo_0.1", "runs/ppo_2"):
        saved = load_checkpoint(str(tmp_path / "out" / stage / "model.pt"))
        assert saved["config"]["n_embd"] == 32 and saved["tokenizer"]["name"] == "words", stage
    # every run starts as pi_ref: one evaluation of it serves every run's step 0 (12 runs, 2 more evaluations each)
    firsts = [json.loads(open(d / "eval.jsonl").readline()) for d in (tmp_path / "out" / "runs").iterdir()]
    assert len(firsts) == 12 and all(f == firsts[0] for f in firsts) and len(calls) == 1 + 12 * 2
    assert calls[0][2]["reward"] == firsts[0]["reward"] and calls[0][2]["length"] == firsts[0]["length"]
    rm_evals = [json.loads(x) for x in open(tmp_path / "out" / "reward_model" / "eval.jsonl")]
    assert 0 <= rm_evals[-1]["heldout_acc"] <= 1
    # samples to read: a few per evaluation, their rewards those of r* on the same tokens
    samples = [json.loads(x) for x in open(tmp_path / "out" / "runs" / "dpo_0.1" / "samples.jsonl")]
    assert [s["step"] for s in samples] == [0] * 4 + [2] * 4 + [4] * 4
    enc = WordTokenizer(vocabulary())  # the tiny corpus's words
    classifier = GPT(GPTConfig(block_size=64, vocab_size=enc.n_vocab, n_layer=1, n_head=2, n_embd=32, score_head=True))
    classifier.load_state_dict(torch.load(tmp_path / "out" / "classifier" / "model.pt", weights_only=True)["model"])
    classifier = sampling.calibrated(classifier, tmp_path / "out" / "classifier")  # r* as the pipeline scores
    r = sampling.reward(classifier, [s["prompt_ids"] for s in samples], [s["response_ids"] for s in samples],
                      enc.eot_token, 64, "cpu")
    assert r.tolist() == pytest.approx([s["reward"] for s in samples], abs=1e-6)
    assert all(s["prompt"] == enc.decode(s["prompt_ids"]) and s["response"] == enc.decode(s["response_ids"])
               for s in samples)
    # a rerun finds every stage complete and trains nothing
    experiment.main(smoke_argv(tmp_path))
    assert "step     0 loss" not in capsys.readouterr().out
    # a run redone after deleting its model starts a fresh evaluation file
    os.remove(tmp_path / "out" / "runs" / "dpo_0.1" / "model.pt")
    experiment.main(smoke_argv(tmp_path))
    assert [json.loads(x)["step"] for x in open(tmp_path / "out" / "runs" / "dpo_0.1" / "eval.jsonl")] == [0, 2, 4]
    assert "[runs/dpo_0.1] step     0" in capsys.readouterr().out
    # changed settings are refused before any work, or with --redo the stage and all after it are made again
    made = r"out/classifier was made with other settings \(classifier_steps 4 -> 5\): .*--redo"
    with pytest.raises(UsageError, match=made):
        experiment.main(smoke_argv(tmp_path, "--classifier-steps", "5"))
    assert "step" not in capsys.readouterr().out
    experiment.main(smoke_argv(tmp_path, "--classifier-steps", "5", "--redo"))
    out = capsys.readouterr().out
    assert "[sft] done already" in out and "[classifier] step     0" in out and "[runs/ppo_2] step     0" in out
    assert "[redo]" in out and "runs/ft was made with other settings" in out


def test_stages_of_an_older_nanodpo_are_not_reused(tmp_path):
    (tmp_path / "out" / "sft").mkdir(parents=True)
    torch.save({}, tmp_path / "out" / "sft" / "model.pt")
    with pytest.raises(UsageError, match="out/sft has no record of its settings"):
        experiment.main(smoke_argv(tmp_path))


def test_a_run_from_another_directory_writes_only_under_its_out(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    figure = os.path.join(repo, "plots", "tiny_frontier.png")
    before = os.stat(figure).st_mtime_ns
    argv = ["--preset", "tiny", "--device", "cpu", "--out", "here", "--data-dir", "data", *SMOKE[:-1], "dpo:0.1"]
    res = subprocess.run([sys.executable, os.path.join(repo, "dpo.py"), *argv], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert (tmp_path / "here" / "frontier.png").exists() and (tmp_path / "data" / "tiny.npz").exists()
    assert os.stat(figure).st_mtime_ns == before


@pytest.mark.parametrize("flags, message", [
    (["--runs", "dpo"], "--runs: 'dpo': dpo needs beta > 0"),
    (["--runs", "dpo:abc"], "'abc' is not a number"),
    (["--dpo-steps", "-5"], "--dpo-steps: expected a positive number, got -5"),
    (["--eval-every", "0"], "--eval-every: expected a positive number, got 0"),
    (["--n-prompts", "0"], "--n-prompts: expected a positive number, got 0"),
    (["--block-size", "8"], "--block-size 8: expected at least 18"),
    (["--best-of", "1,x"], "--best-of 1,x: expected"),
    (["--label-smoothing", "0.7"], "--label-smoothing"),
    (["--preset", "imdb", "--device", "cpu", "--model", "gpt3"], "--model gpt3: expected one of gpt2"),
    (["--runs", "dpo:0.1,simpo:0"], "'simpo:0': simpo needs beta > 0"),
    (["--runs", "orpo:-0.1"], "'orpo:-0.1': orpo needs lambda >= 0"),
    (["--runs", "kto:-1"], "'kto:-1': kto needs beta > 0"),
])
def test_bad_flags_are_one_line_errors_before_any_stage(tmp_path, flags, message):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, os.path.join(repo, "dpo.py"), "--out", str(tmp_path / "out"), *flags],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and message in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_data_is_a_one_line_error(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, os.path.join(repo, "dpo.py"), "--preset", "imdb", "--device", "cpu",
                          "--data-dir", str(tmp_path), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"nanoDPO: error: {tmp_path}/imdb.npz does not exist: run python "
                                               f"data/imdb/prepare.py --out {tmp_path}"]


@pytest.mark.parametrize("flags, message", [
    (["--n-eval", "5000"], r"--n-eval 5000 \+ 32 held-out prompts of PPO's reward model: the test split of .*tiny.npz "
                           r"has \d+ reviews longer than --min-chars 100"),
    (["--runs", "ppo-gt:3", "--n-prompts", "20000", "--ppo-batch", "20000"],
     r"--ppo-batch 20000: a rollout draws 20000 prompts, but the train split of .*tiny.npz has \d+ reviews"),
])
def test_sizes_the_data_cannot_serve_are_refused_before_sft(tmp_path, flags, message):
    with pytest.raises(UsageError, match=message):
        experiment.main(smoke_argv(tmp_path, *flags))
    assert not (tmp_path / "out").exists()


SHORT = ("--sft-steps", "2", "--classifier-steps", "2", "--dpo-steps", "2", "--runs", "ft")


def test_other_data_into_the_same_out_is_refused(tmp_path, capsys):
    """The settings record names the data by its content: another corpus under the same name is not reused."""
    experiment.main(smoke_argv(tmp_path, *SHORT))
    data_b = tmp_path / "other"
    prepare_tiny(str(data_b), seed=7)  # another tiny.npz: the same name, the same sizes, other reviews
    capsys.readouterr()
    with pytest.raises(UsageError, match=r"out/sft was made with other settings \(data_sha256 [0-9a-f]{64} -> "):
        experiment.main(smoke_argv(tmp_path, *SHORT, "--data-dir", str(data_b)))  # the last --data-dir counts
    assert "step" not in capsys.readouterr().out
    prepare_tiny(str(tmp_path / "again"))  # the same data written again (other file times) is the same data
    experiment.main(smoke_argv(tmp_path, *SHORT, "--data-dir", str(tmp_path / "again")))
    assert "step     0" not in capsys.readouterr().out


def test_offline_gpt2_download_is_one_line(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("Name or service not known")
    monkeypatch.setattr(hf, "open_url", offline)
    monkeypatch.setenv("NANODPO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(experiment, "get_tokenizer", lambda name, words: get_tokenizer("bytes"))  # GPT-2's BPE may be offline too
    texts = ["A fine film with a cast.", "A dull film with no plot."] * 4  # an imdb.npz that says it holds GPT-2 tokens
    save_corpus(str(tmp_path / "imdb"), "imdb", {"train": (texts, [1, 0] * 4), "test": (texts, [1, 0] * 4)},
                get_tokenizer("bytes"), tokenizer="gpt2")
    with pytest.raises(UsageError, match=r"could not download the gpt2 weights .* put it at"):  # main prints one line
        experiment.main(["--preset", "imdb", "--device", "cpu", "--out", str(tmp_path / "out"), "--data-dir",
                  str(tmp_path / "imdb"), "--runs", "dpo:0.1", "--n-eval", "2", "--n-prompts", "4", "--min-chars", "1"])


# ---------------------------------------------------------------- DPO's successors: SimPO, ORPO, KTO

def f64(*xs):
    return [torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in xs]


SUCCESSOR_CASES = [  # hand-picked log-probs of chosen and rejected, then random ones
    ([-3.0, -10.0, -0.5], [-5.0, -4.0, -0.7]),
    (list(np.random.default_rng(0).uniform(-60, -0.01, 6)), list(np.random.default_rng(1).uniform(-60, -0.01, 6))),
]


@pytest.mark.parametrize("pi_c, pi_r", SUCCESSOR_CASES)
def test_simpo_and_orpo_match_their_formulas_values_and_gradients(pi_c, pi_r):
    n = len(pi_c)
    len_c, len_r = torch.arange(2.0, 2 + n, dtype=torch.float64), torch.arange(7.0, 7 + n, dtype=torch.float64)
    sig = lambda x: 1 / (1 + math.exp(-x))
    for name, loss_fn, param in [("simpo", dpo.simpo_loss, 2.0), ("orpo", dpo.orpo_loss, 0.1)]:
        c, r = f64(pi_c, pi_r)
        losses, _, _ = loss_fn(c, r, len_c, len_r, param)
        losses.sum().backward()
        for i in range(n):
            mc, mr, lc = pi_c[i] / len_c[i].item(), pi_r[i] / len_r[i].item(), len_c[i].item()
            if name == "simpo":  # -log sigmoid(beta mc - beta mr - gamma), gamma = beta / 2
                z = param * (mc - mr) - param / 2
                want, d_c = -math.log(sig(z)), -(1 - sig(z)) * param / lc
            else:  # -mc + lam * -log sigmoid(log odds(mc) - log odds(mr)), log odds(m) = m - log(1 - e^m)
                lo = lambda m: m - math.log(1 - math.exp(m))
                z = lo(mc) - lo(mr)
                want = -mc - param * math.log(sig(z))
                d_c = (-1 - param * (1 - sig(z)) * (1 + math.exp(mc) / (1 - math.exp(mc)))) / lc
            assert losses[i].item() == pytest.approx(want, rel=1e-9), (name, i)
            assert c.grad[i].item() == pytest.approx(d_c, rel=1e-7), (name, i)


def test_orpo_log_odds_are_finite_near_certainty():
    m = torch.tensor([-1e-9, -1e-4, -0.69, -0.7, -30.0], dtype=torch.float32)
    got = dpo.log_odds(m).double()
    want = torch.tensor([math.log(math.exp(x) / -math.expm1(x)) for x in [-1e-6, -1e-4, -0.69, -0.7, -30.0]],
                        dtype=torch.float64)
    assert torch.isfinite(got).all() and torch.allclose(got, want, rtol=1e-4)


@pytest.mark.parametrize("pi_c, pi_r", SUCCESSOR_CASES)
def test_kto_matches_its_formula_and_z0_is_a_clamped_constant(pi_c, pi_r):
    n, beta = len(pi_c), 0.1
    ref_c, ref_r = [x + 1.0 for x in pi_c], [x - 0.5 for x in pi_r]
    sig = lambda x: 1 / (1 + math.exp(-x))
    for mismatched, z0 in [([2.0] * n, 2.0), ([-3.0] * n, 0.0)]:  # z0 is the mean log-ratio, never below 0
        c, r, mm = f64(pi_c, pi_r, mismatched)
        losses, _, _ = dpo.kto_loss(c, r, torch.tensor(ref_c, dtype=torch.float64),
                                    torch.tensor(ref_r, dtype=torch.float64), mm, beta)
        losses.sum().backward()
        want = [1 - sig(beta * (pc - rc - z0)) for pc, rc in zip(pi_c, ref_c)] + \
               [1 - sig(beta * (z0 - (pr - rr))) for pr, rr in zip(pi_r, ref_r)]
        assert losses.tolist() == pytest.approx(want, rel=1e-12)
        assert c.grad.tolist() == pytest.approx([-beta * sig(beta * (pc - rc - z0)) * (1 - sig(beta * (pc - rc - z0)))
                                                 for pc, rc in zip(pi_c, ref_c)], rel=1e-9)
        assert mm.grad is None  # z0 carries no gradient


def test_reference_free_losses_do_not_read_the_reference():
    policy = tiny_gpt(0)
    batch = pack([[1, 2], [3]] * 2, [[4, 5, EOS], [6, EOS], [7, EOS], [8, 9, EOS]], 64, EOS)
    for method, param in [("simpo", 2.0), ("orpo", 0.1)]:
        without, _ = dpo.pair_loss(policy, batch, None, method, param)
        with_ref, _ = dpo.pair_loss(policy, batch, tiny_gpt(5), method, param)
        assert without.item() == with_ref.item()


@pytest.mark.parametrize("method, param", [("simpo", 2.0), ("orpo", 0.1), ("kto", 0.1)])
def test_one_step_of_each_successor_raises_the_chosen_over_the_rejected(method, param):
    policy, ref = tiny_gpt(), tiny_gpt().requires_grad_(False)
    pairs = dict(prompt=[[1, 2], [3, 4]], chosen=[[3, 4, EOS], [5, 5, EOS]], rejected=[[5, 6, EOS], [7, 8, 9, EOS]])
    batch = dpo.pair_batch(pairs, 0, 2, 64, EOS, seed=0, mismatched=method == "kto")
    opt = torch.optim.SGD(policy.parameters(), lr=0.5)
    before, m0 = dpo.pair_loss(policy, batch, ref, method, param)
    before.backward()
    opt.step()
    after, m1 = dpo.pair_loss(policy, batch, ref, method, param)
    gap = lambda m: m["logps/chosen"] - m["logps/rejected"]
    assert gap(m1) > gap(m0) and after < before


@pytest.mark.parametrize("method", ["simpo", "orpo", "kto"])
def test_fused_kernel_gives_the_reference_gradients_for_the_successors(method):
    policy, ref = tiny_gpt(seed=0).to(DEVICE), tiny_gpt(seed=1).to(DEVICE).requires_grad_(False)
    pairs = dict(prompt=[[1, 2, 3], [4]], chosen=[[5, 6, EOS], [7, 8, 9, EOS]], rejected=[[5, EOS], [9, 9, EOS]])
    batch = [x.to(DEVICE) for x in dpo.pair_batch(pairs, 0, 4, 64, EOS, seed=0, mismatched=method == "kto")]
    param = {"simpo": 2.0, "orpo": 0.1, "kto": 0.5}[method]
    assert_fused_matches_reference(policy, lambda impl: dpo.pair_loss(policy, batch, ref, method, param, impl)[0])


def test_kto_batches_add_mismatched_rows():
    pairs = dict(prompt=[[1], [2], [3]], chosen=[[10, EOS], [20, EOS], [30, EOS]], rejected=[[11, EOS], [21, EOS], [31, EOS]])
    idx, targets, mask = dpo.pair_batch(pairs, 0, 3, 64, EOS, seed=0, mismatched=True)
    n = idx.size(0) // 3
    for i in range(n):  # row 2n + i: the prompt of pair i with the chosen response of pair i + 1
        assert idx[2 * n + i, 1] == idx[i, 1] and targets[2 * n + i][mask[2 * n + i]].tolist() == \
            targets[(i + 1) % n][mask[(i + 1) % n]].tolist()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_device_cuda_without_a_gpu_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit):
        get_args(["--device", "cuda"])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "error: --device cuda: no CUDA GPU is visible to torch; use --device cpu" in err


def test_pretrained_gpt2_on_a_corpus_of_other_tokens_is_refused(tmp_path):
    (tmp_path / "hf").mkdir()
    with pytest.raises(UsageError, match=r"--init pretrained: GPT-2's weights read GPT-2's BPE tokens, but .*tiny.npz "
                                         r"holds words tokens"):
        experiment.main(smoke_argv(tmp_path, "--init", "pretrained", "--model", str(tmp_path / "hf")))
    assert not (tmp_path / "out" / "sft").exists()
# ---------------------------------------------------------------- every loss against float64 log-probs

def loss_case():
    """A policy and a reference that differ (KL of nats), three pairs whose chosen and rejected have different
    lengths, and each sequence's float64 log-prob under both (kto: the mismatched rows too)."""
    policy, ref = sharp_gpt(0), sharp_gpt(1).requires_grad_(False)
    prompts = [[1, 2, 3], [4], [5, 6]]
    chosen = [[7, 8, EOS], [9, 10, 11, 12, EOS], [19, 20, 21]]
    rejected = [[14, 15, 16, 17, EOS], [18, EOS], [13, EOS]]  # the policy prefers the third rejected: acc 2/3
    greedy = []
    for _ in range(4):  # the first rejected: the policy's own greedy text, likely tokens, for Unlikelihood's term
        greedy.append(int(f64_dists(policy, prompts[0], greedy + [0], EOS)[-1].argmax()))
    rejected[0] = greedy + [EOS]
    mismatched = chosen[1:] + chosen[:1]  # dpo.pair_batches' KTO rows: each prompt with the next pair's chosen
    lp = lambda model, ps, rs: [f64_logprob(model, p, r, EOS) for p, r in zip(ps, rs)]
    seqs = dict(pc=lp(policy, prompts, chosen), pr=lp(policy, prompts, rejected), rc=lp(ref, prompts, chosen),
                rr=lp(ref, prompts, rejected), pm=lp(policy, prompts, mismatched), rm=lp(ref, prompts, mismatched))
    return policy, ref, prompts, chosen, rejected, mismatched, seqs


def test_pair_loss_of_every_method_is_its_formula_on_float64_logprobs():
    """pair_loss (the fused kernel on a packed batch) against each paper's formula on float64 sequence log-probs,
    with --label-smoothing's default 0.1 passed to every method (only cDPO may use it)."""
    policy, ref, prompts, chosen, rejected, mismatched, s = loss_case()
    n = len(prompts)
    sig = lambda x: 1 / (1 + math.exp(-x))
    ls = lambda x: math.log(sig(x))
    lc, lr = [len(c) for c in chosen], [len(r) for r in rejected]
    u = [(s["pc"][i] - s["rc"][i]) - (s["pr"][i] - s["rr"][i]) for i in range(n)]
    mean = lambda xs: sum(xs) / len(xs)
    lo = lambda m: m - math.log(1 - math.exp(m))  # log odds of P = e^m
    z0 = max(0.0, mean([a - b for a, b in zip(s["pm"], s["rm"])]))
    rw = [s["pc"][i] - s["rc"][i] for i in range(n)]
    rl = [s["pr"][i] - s["rr"][i] for i in range(n)]
    want = {
        ("dpo", 0.5): mean([-ls(0.5 * x) for x in u]),
        ("cdpo", 0.5): mean([-(0.9 * ls(0.5 * x) + 0.1 * ls(-0.5 * x)) for x in u]),
        ("ipo", 0.25): mean([(x - 2.0) ** 2 for x in u]),  # 1 / (2 beta) = 2; at beta 0.5 it would equal 2 beta
        ("simpo", 2.0): mean([-ls(2 * s["pc"][i] / lc[i] - 2 * s["pr"][i] / lr[i] - 1.0) for i in range(n)]),
        ("orpo", 0.1): mean([-s["pc"][i] / lc[i] - 0.1 * ls(lo(s["pc"][i] / lc[i]) - lo(s["pr"][i] / lr[i]))
                             for i in range(n)]),
        ("kto", 0.5): mean([1 - sig(0.5 * (x - z0)) for x in rw] + [1 - sig(0.5 * (z0 - x)) for x in rl]),
    }
    # KTO with the two models' roles swapped: the mismatched log-ratio changes sign, so one of the two has z0 > 0
    z0_swapped = max(0.0, mean([b - a for a, b in zip(s["pm"], s["rm"])]))
    assert max(z0, z0_swapped) > 0.5
    kto_swapped = mean([1 - sig(0.5 * (-x - z0_swapped)) for x in rw] + [1 - sig(0.5 * (z0_swapped + x)) for x in rl])
    tok = lambda model, ps, rs: [f64_dists(model, p, r, EOS)[torch.arange(len(r)), torch.tensor(r)] for p, r in zip(ps, rs)]
    c_tok, r_tok = torch.cat(tok(policy, prompts, chosen)), torch.cat(tok(policy, prompts, rejected))
    want[("ft", 0.0)] = -c_tok.mean().item()  # the mean over every chosen token, not per sequence
    assert -torch.log1p(-r_tok.exp()).mean() > 0.05  # the unlikelihood term matters here
    for alpha in (0.3, 1.0):
        want[("ul", alpha)] = -c_tok.mean().item() - alpha * torch.log1p(-r_tok.exp()).mean().item()
    for (method, param), expected in want.items():
        extra = (prompts, mismatched) if method == "kto" else ([], [])
        batch = pack(prompts + prompts + extra[0], chosen + rejected + extra[1], 64, EOS)
        loss, metrics = dpo.pair_loss(policy, batch, ref, method, param, label_smoothing=0.1)
        assert loss.item() == pytest.approx(expected, rel=2e-5), method
        if method in ("dpo", "cdpo", "ipo", "kto"):  # the implicit rewards beta * log(pi / pi_ref), chosen and rejected
            assert metrics["rewards/chosen"] == pytest.approx(mean([param * x for x in rw]), abs=2e-5)
            assert metrics["rewards/rejected"] == pytest.approx(mean([param * x for x in rl]), abs=2e-5)
            assert metrics["rewards/margins"] == pytest.approx(mean([param * x for x in u]), abs=4e-5)
            assert metrics["rewards/accuracies"] == pytest.approx(mean([float(x > 0) for x in u])) and 0 < metrics["rewards/accuracies"] < 1
        if method == "kto":
            assert dpo.pair_loss(ref, batch, policy, "kto", 0.5)[0].item() == pytest.approx(kto_swapped, rel=2e-5)
    assert len({round(v, 6) for v in want.values()}) == len(want)  # the cases tell every loss apart


def test_one_step_raises_the_float64_margin():
    """One SGD step on the DPO loss raises the margin (pi_c - ref_c) - (pi_r - ref_r) as float64 log-probs
    measure it, not as the loss under test reports it."""
    policy, ref = tiny_gpt(), tiny_gpt(1).requires_grad_(False)
    prompts, chosen, rejected = [[1, 2], [3]], [[3, 4, EOS], [8, EOS]], [[5, 6, EOS], [9, 9, EOS]]
    batch = pack(prompts * 2, chosen + rejected, 64, EOS)

    def margin():
        return sum(f64_logprob(policy, p, c, EOS) - f64_logprob(ref, p, c, EOS) - f64_logprob(policy, p, r, EOS)
                   + f64_logprob(ref, p, r, EOS) for p, c, r in zip(prompts, chosen, rejected))
    before = margin()
    opt = torch.optim.SGD(policy.parameters(), lr=0.1)
    dpo.pair_loss(policy, batch, ref, "dpo", 0.1)[0].backward()
    opt.step()
    assert margin() > before + 1e-3


def test_evaluation_prompts_come_from_the_test_split(tmp_path, monkeypatch):
    """main draws the training prompts (pairs) from the train split and the evaluation and held-out prompts
    (evaluate, Best-of-N, PPO's held-out pairs) from the test split, disjoint. The train reviews here use even
    word ids and the test reviews odd ones, so each prompt says where it was cut from."""
    words = vocabulary()

    def split(parity, n):
        rng = np.random.default_rng(parity)
        reviews = [[2 * i + parity] + (2 * rng.integers(0, 88, 11) + parity).tolist() for i in range(n)]
        offsets = np.concatenate([[0], np.cumsum([len(r) for r in reviews])])
        return Split(np.array(sum(reviews, []), np.uint16), offsets, np.arange(n, dtype=np.uint8) % 2,
                     np.full(n, 500, np.int32))
    data = dict(tokenizer="words", words=words, train=split(0, 80), test=split(1, 80))
    seen = {}
    monkeypatch.setattr(stages, "load_data", lambda *a: data)
    monkeypatch.setattr(stages, "sft", lambda *a: tiny_gpt(0, vocab=len(words) + 1))
    monkeypatch.setattr(stages, "classifier", lambda *a: None)
    monkeypatch.setattr(stages, "make_pairs", lambda sft, rm, prompts, args, eos, name="pairs.pt", truth=None:
                        seen.setdefault(name, prompts) and dict(prompt=[], chosen=[], rejected=[]))
    monkeypatch.setattr(stages, "best_of_n", lambda sft, rm, prompts, args, eos, truth=None: seen.setdefault("best_of_n", prompts))
    monkeypatch.setattr(stages, "evaluate",
                        lambda policy, ref, classifier, prompts, **kw: dict(p=seen.setdefault("evaluate", prompts)))
    monkeypatch.setattr(experiment, "score_functions", lambda *a: {"rm": None})
    monkeypatch.setattr(experiment.ppo, "run", lambda *a: None)
    monkeypatch.setattr(experiment.dpo, "run", lambda method, param, sft, ref, pairs, evaluate, at_start, args, eos:
                        evaluate(sft))
    monkeypatch.setattr(experiment, "plot_frontier", lambda out, png, names: png)
    experiment.main(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path), "--n-prompts", "20", "--n-eval", "12",
              "--ppo-batch", "16", "--runs", "dpo:0.1,ppo:3"])
    parity = lambda prompts: {t % 2 for p in prompts for t in p}
    assert len(seen["pairs.pt"]) == 20 and parity(seen["pairs.pt"]) == {0}
    assert len(seen["evaluate"]) == 12 and parity(seen["evaluate"]) == {1} and seen["best_of_n"] == seen["evaluate"]
    assert len(seen["pairs_heldout.pt"]) == 32 and parity(seen["pairs_heldout.pt"]) == {1}
    first = lambda prompts: {p[0] for p in prompts}  # each review's first word is its own: no review used twice
    assert not first(seen["evaluate"]) & first(seen["pairs_heldout.pt"])
