"""python dpo.py --pairs FILE --model DIR end to end, offline: a random transformers-saved GPT-2,
GPT-2's real BPE, separable pairs in HH's style (the prompt inside both texts); every bad record a
line before any work; the held-out metrics, metrics.jsonl, the checkpoints, the settings record.

    python -m pytest tests/test_pairs_run.py      (CPU; about 25 s)
"""
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import EOS, random_pairs, sharp_gpt, tiny_gpt

import dpo
import experiment
import settings
import stages
from common import pack
from data.corpus import load_checkpoint
from data.pairs import read_pairs
from plots.curves import NAMES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_BPE = os.path.join(REPO, "..", "shared", "tiktoken")
SUBJECTS = "movie film story plot actor scene music night city river song book".split()
CHOSEN, REJECTED = " Wonderful, I loved it.", " Terrible, I hated it."  # the first word differs


def bpe_env():
    """The environment of a subprocess that finds GPT-2's BPE files offline."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or SHARED_BPE
    if not os.path.isdir(cache):
        pytest.skip("GPT-2's BPE files are not cached offline (set TIKTOKEN_CACHE_DIR)")
    return dict(os.environ, TIKTOKEN_CACHE_DIR=cache, OMP_NUM_THREADS="1")


def write_lines(path, records):
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n"
                              for r in records))
    return str(path)


def separable(n=48):
    """(TRL records, the same as HH records): a prompt per pair, chosen always one phrase, rejected
    another."""
    prompts = [f"Tell me about the {a} and the {b}." for a in SUBJECTS for b in SUBJECTS if a != b][:n]
    trl = [dict(prompt=p, chosen=CHOSEN, rejected=REJECTED) for p in prompts]
    hh = [dict(chosen=p + CHOSEN, rejected=p + REJECTED) for p in prompts]
    return trl, hh


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A random GPT-2 of GPT-2's vocabulary, 64 positions, saved by transformers."""
    transformers = pytest.importorskip("transformers", reason="test-only (requirements-test.txt)")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=1, n_head=2, vocab_size=50257)
    folder = str(tmp_path_factory.mktemp("hf") / "gpt2-tiny")
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


def dpo_py(*argv, env):
    return subprocess.run([sys.executable, os.path.join(REPO, "dpo.py"), *argv], capture_output=True,
                          text=True, timeout=300, env=env)


FAST = ["--sft-steps", "0", "--runs", "dpo:0.1", "--dpo-steps", "12", "--dpo-batch", "4",
        "--dpo-lr", "2e-3", "--warmup", "1", "--eval-every", "6", "--log-every", "3",
        "--max-new-tokens", "4", "--n-eval", "8", "--heldout", "0.25", "--device", "cpu"]


def test_the_styles_read_the_same_pairs(tmp_path):
    trl, hh = separable()
    a = read_pairs(write_lines(tmp_path / "trl.jsonl", trl))
    b = read_pairs(write_lines(tmp_path / "hh.jsonl", hh))
    assert a[1] == "prompt" and b[1] == "joined" and a[0] == b[0]


def test_every_bad_record_is_a_line_before_any_work(tmp_path, gpt2_folder):
    env = dict(os.environ, OMP_NUM_THREADS="1")  # the file is read before the tokenizer
    trl, _ = separable(4)
    bad = [b"{\"prompt\": \"Hi\", \"chosen\": \"a\xff\", \"rejected\": \"b\"}",  # line 2
           dict(prompt="Hi", chosen=" a"),  # 3
           dict(prompt="Hi", chosen="", rejected=" b"),  # 4
           dict(prompt="Hi", chosen=" same", rejected=" same"),  # 5
           dict(chosen="Hi a", rejected="Hi b")]  # 6
    path = write_lines(tmp_path / "bad.jsonl", [trl[0], *bad, trl[1]])
    res = dpo_py("--pairs", path, "--model", gpt2_folder, "--out", str(tmp_path / "out"), *FAST, env=env)
    assert res.returncode == 1 and "Traceback" not in res.stderr and res.stdout == ""
    assert res.stderr.strip().splitlines() == [f"nanoDPO: error: {path}, line {n}: {what}" for n, what in [
        (2, "not UTF-8 (byte 30 of the line); save the file as UTF-8"),
        (3, "no 'rejected' key; expected prompt, chosen, rejected"),
        (4, "'chosen' is empty"),
        (5, "chosen and rejected are the same text: a pair must differ"),
        (6, "no \"prompt\" key, but line 1 has one: one file holds one style of record")]]
    assert not (tmp_path / "out").exists()  # nothing made, not even the lock


def test_dpo_on_separable_pairs_from_a_gpt2_folder(tmp_path, gpt2_folder):
    env = bpe_env()
    _, hh = separable()
    path, out = write_lines(tmp_path / "hh.jsonl", hh), tmp_path / "out"
    res = dpo_py("--pairs", path, "--model", gpt2_folder, "--out", str(out), *FAST, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "the prompt inside both (HH style); 36 to train on, 12 held out" in res.stdout
    assert "no frontier figure" in res.stdout and not (out / "frontier.png").exists()
    run = out / "runs" / "dpo_0.1"
    assert (run / "curves.png").stat().st_size > 10_000
    # a line per logged step, the ranks' mean, under TRL's names
    metrics = [json.loads(x) for x in open(run / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [0, 3, 6, 9, 11]
    assert all(set(NAMES) | {"step", "lr", "loss", "grad"} == set(m) for m in metrics)
    # evaluations: at pi_ref nothing is preferred; trained, every held-out pair's margin is right
    evals = [json.loads(x) for x in open(run / "eval.jsonl")]
    assert [e["step"] for e in evals] == [0, 6, 12] and "reward" not in evals[0]
    assert evals[0]["rewards/accuracies"] == 0.5 and evals[0]["kl"] == pytest.approx(0, abs=1e-6)
    assert evals[-1]["rewards/accuracies"] > 0.9 and evals[-1]["rewards/margins"] > 0
    assert evals[-1]["kl"] > 0 and evals[-1]["length"] <= 4
    samples = [json.loads(x) for x in open(run / "samples.jsonl")]
    assert len(samples) == 3 * 4 and samples[0]["prompt"].startswith("Tell me about the")
    # the final model records its config and tokenizer: sample.py needs nothing else
    final = load_checkpoint(str(run / "model.pt"))
    assert final["config"]["vocab_size"] == 50257 and final["config"]["block_size"] == 64
    assert final["tokenizer"] == dict(name="gpt2", words=[])
    recorded = json.load(open(out / "settings.json"))["runs/dpo_0.1"]
    assert recorded["block_size"] == 64 and recorded["sft_steps"] == 0 and len(recorded["pairs_sha256"]) == 64
    # a rerun trains nothing; a changed file is not reused silently
    res = dpo_py("--pairs", path, "--model", gpt2_folder, "--out", str(out), *FAST, env=env)
    assert res.returncode == 0 and "done already" in res.stdout and "step     0" not in res.stdout
    write_lines(tmp_path / "hh.jsonl", hh[:-1])
    res = dpo_py("--pairs", path, "--model", gpt2_folder, "--out", str(out), *FAST, env=env)
    assert res.returncode == 1 and len(res.stderr.strip().splitlines()) == 1
    assert "runs/dpo_0.1 was made with other settings (pairs_sha256 " in res.stderr


def test_pairs_flags_are_checked_in_one_line(tmp_path, gpt2_folder, capsys):
    argv = ["--pairs", "p.jsonl", "--out", str(tmp_path / "o")]
    args = settings.get_args(["--device", "cpu", *argv, "--model", gpt2_folder, "--sft-steps", "0"])
    assert args.block_size == 64 and args.init == "pretrained" and args.run_list == [("dpo", 0.1)]
    for extra, message in [([], "--pairs p.jsonl: give --model"),
                           (["--model", gpt2_folder, "--runs", "dpo:0.1,rloo:0.1"], "--runs: rloo sample as"),
                           (["--model", gpt2_folder, "--heldout", "1"], "--heldout 1.0 in (0, 1)"),
                           (["--model", gpt2_folder, "--block-size", "65"], "--block-size 65 at most the 64"),
                           (["--model", gpt2_folder, "--init", "scratch"], "expected no --init scratch"),
                           (["--model", str(tmp_path)], "(no n_positions in ")]:
        with pytest.raises(SystemExit):
            settings.get_args(["--device", "cpu", *argv, *extra])
        assert message in capsys.readouterr().err, extra
    with pytest.raises(SystemExit):  # without --pairs there is no pi_ref without SFT
        settings.get_args(["--device", "cpu", "--sft-steps", "0"])
    assert "--sft-steps: expected a positive number, got 0" in capsys.readouterr().err


# ---------------------------------------------------------------- the pieces, in-process on tiny models

def test_heldout_metrics_are_pair_loss_over_every_pair_whatever_the_chunks():
    pairs, _ = random_pairs(10)
    policy, ref = sharp_gpt(0, scale=3.0), sharp_gpt(1, scale=3.0).requires_grad_(False)
    of = lambda method, param, chunk: experiment.heldout_metrics(
        policy.train(), ref, pairs, method, param, label_smoothing=0.0, eos=EOS, block_size=64,
        device="cpu", impl="reference", chunk=chunk)
    whole = pack(pairs["prompt"] * 2, pairs["chosen"] + pairs["rejected"], 64, EOS)
    loss, want = dpo.pair_loss(policy.eval(), whole, ref, "dpo", 0.5, "reference")
    for chunk in (3, 64):  # chunks of 3, 3, 3, 1 pairs weigh as the 10 pairs do
        got = of("dpo", 0.5, chunk)
        assert got == pytest.approx(want | dict(loss=loss.item()), rel=1e-5, abs=1e-6)
    assert policy.training  # handed back in the mode it came in
    # ft has no implicit reward: its own are DPO's at beta 1, the log-ratios, with no loss
    assert of("ft", 0.0, 4) == pytest.approx({k: v for k, v in of("dpo", 1.0, 4).items() if k != "loss"})
    kto = of("kto", 0.1, 64)  # its mismatched rows built: the rewards are beta times DPO's at 1
    assert kto["rewards/margins"] == pytest.approx(0.1 * of("dpo", 1.0, 64)["rewards/margins"], rel=1e-5)


def test_sft_on_pairs_fits_the_chosen_responses_after_their_prompts(tmp_path):
    pairs, _ = random_pairs(4)
    batch = experiment.ChosenBatches(pairs, 8, 64, EOS, seed=0)(0)
    idx, targets, mask = batch
    for i in range(8):  # each row: BOS, a prompt, its chosen response; the mask on the response only
        row = targets[i][mask[i]].tolist()
        j = pairs["chosen"].index(row)
        assert idx[i, :4].tolist() == [EOS] + pairs["prompt"][j]
    args = SimpleNamespace(sft_steps=0, out=str(tmp_path), device="cpu", warmup=0, eval_every=100,
                           log_every=10, impl="reference", batch=8, block_size=64, seed=0,
                           sft_lr=3e-3, tokenizer=("bytes", []))
    model = tiny_gpt(0)
    assert experiment.sft_on_pairs(args, model, pairs, EOS) is model  # --sft-steps 0: --model itself
    before = chosen_nll(model, batch)
    args.sft_steps = 30
    after = chosen_nll(experiment.sft_on_pairs(args, model, pairs, EOS), batch)
    assert after < before - 1.0 and (tmp_path / "sft" / "model.pt").exists()


def chosen_nll(model, batch):
    with torch.no_grad():
        return stages.sft_loss(model, batch, "reference")[0].item()


def test_pairs_mode_fine_tunes_at_the_pretrained_presets_learning_rates(gpt2_folder, tmp_path):
    """On a CPU the preset is tiny, whose learning rates train a GPT from scratch (SFT at 2e-3):
    --pairs starts from a pretrained GPT-2 and takes the imdb preset's instead; a flag still wins."""
    argv = ["--pairs", "p.jsonl", "--model", gpt2_folder, "--out", str(tmp_path)]
    args = settings.get_args(["--device", "cpu", *argv])
    imdb = settings.PRESETS["imdb"]
    assert args.preset == "tiny" and (args.sft_lr, args.dpo_lr, args.optimizer) == (
        imdb["sft_lr"], imdb["dpo_lr"], imdb["optimizer"])
    args = settings.get_args(["--device", "cpu", *argv, "--dpo-lr", "3e-4", "--optimizer", "adamw"])
    assert (args.sft_lr, args.dpo_lr, args.optimizer) == (imdb["sft_lr"], 3e-4, "adamw")
