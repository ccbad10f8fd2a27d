"""sample.py and export.py on fabricated run folders: a run's policy, pi_ref, a checkpoint of the
old kind (weights only) and a Hugging Face folder; rewards where the run has its classifier;
mistakes in one line.

    python -m pytest tests/test_sample.py      (CPU; a few seconds)
"""
import copy
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import f64_score, sharp_gpt

import export
import sample
from data.corpus import UsageError, save_checkpoint
from hf import from_pretrained
from model import get_tokenizer, model_record

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ["good", "bad", "it", "is", "was", "."]
ENC = get_tokenizer("words", WORDS)  # <|endoftext|> = 6


def fake_run(root, legacy=False):
    """A run folder: settings.json, sft/ (pi_ref), runs/dpo_0.1/ (the policy, other weights),
    reward/ (r*). legacy: checkpoints of weights only, as nanoDPO wrote them before model_record, in
    the bytes tokenizer."""
    vocab, tok, words = (257, "bytes", []) if legacy else (len(WORDS) + 1, "words", WORDS)
    gpt = lambda seed, head=False: sharp_gpt(seed, vocab=vocab, block=32, score_head=head, scale=2.0)
    models = dict(sft=gpt(0), policy=gpt(1), rm=gpt(2, head=True))
    for name, folder in (("sft", "sft"), ("policy", "runs/dpo_0.1"), ("rm", "reward")):
        record = model_record(models[name], tok, words)
        if legacy:
            record = dict(model=models[name].state_dict())
        save_checkpoint(record | dict(state={}), str(root / folder / "model.pt"))
    (root / "settings.json").write_text(json.dumps({"sft": dict(init="scratch", n_head=2, n_layer=1),
                                                    "reward": dict(max_new_tokens=5)}))
    return {k: m.eval() for k, m in models.items()}


def greedy(model, prompt, eos, n):
    """The argmax continuation, one full float64 forward per token: a second path to generate's KV
    cache."""
    m, seq = copy.deepcopy(model).double(), [eos] + prompt
    for _ in range(n):
        with torch.no_grad():
            seq.append(int(m.lm_head(m(torch.tensor([seq])))[0, -1].argmax()))
        if seq[-1] == eos:
            break
    return seq[1 + len(prompt):]


def test_a_runs_policy_greedy_with_rewards_of_its_classifier(tmp_path, capsys):
    models = fake_run(tmp_path)
    records = sample.main([str(tmp_path / "runs" / "dpo_0.1"), "--device", "cpu", "--prompt", "it was",
                           "--prompt", "good", "--n", "2", "--temperature", "0",
                           "--out", str(tmp_path / "s.jsonl")])
    assert [r["prompt"] for r in records] == ["it was", "it was", "good", "good"]
    for r in records:
        prompt = ENC.encode_ordinary(r["prompt"])
        want = greedy(models["policy"], prompt, 6, 5)  # the run's max_new_tokens, from settings.json
        assert r["completion"] == ENC.decode([t for t in want if t != 6])
        assert r["ended"] == (want[-1:] == [6])
        r_star = 1 / (1 + math.exp(-f64_score(models["rm"], prompt, want, 6)))
        assert r["reward"] == pytest.approx(r_star, abs=1e-5)
    assert [json.loads(line) for line in open(tmp_path / "s.jsonl")] == records
    out = capsys.readouterr().out
    assert out.startswith("--- 'it was'\n[r* ") and out.count("[r* ") == 4


def test_pi_ref_and_temperature_draws_are_seeded(tmp_path):
    models = fake_run(tmp_path)
    draw = lambda seed: [r["completion"] for r in sample.main(
        [str(tmp_path / "sft"), "--device", "cpu", "--prompt", "it is", "--n", "8",
         "--seed", str(seed)])]
    a = draw(1)
    assert a == draw(1) and a != draw(2) and len(set(a)) > 1
    greedy_ref = sample.main([str(tmp_path / "sft"), "--device", "cpu", "--prompt", "it is", "--n", "1",
                              "--temperature", "0"])
    want = greedy(models["sft"], ENC.encode_ordinary("it is"), 6, 5)
    assert greedy_ref[0]["completion"] == ENC.decode([t for t in want if t != 6])


def test_a_checkpoint_of_weights_only_reads_its_heads_and_tokenizer_elsewhere(tmp_path):
    """Heads from the run's settings.json, the tokenizer from the vocabulary size."""
    models = fake_run(tmp_path, legacy=True)
    model, tokenizer, words = sample.load(str(tmp_path / "runs" / "dpo_0.1" / "model.pt"))
    assert (tokenizer, words, model.config.n_head, model.config.n_layer) == ("bytes", [], 2, 1)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in models["policy"].state_dict().items())
    rm = sample.classifier_of(sample.find_root(str(tmp_path / "runs" / "dpo_0.1")), "cpu")
    assert torch.equal(rm.score_head.weight, models["rm"].score_head.weight)


THREE = ["--device", "cpu", "--prompt", "it was", "--n", "3", "--max-new-tokens", "5"]


def test_a_hugging_face_export_samples_the_same_and_has_no_reward(tmp_path, capsys):
    fake_run(tmp_path)
    export.export(str(tmp_path / "runs" / "dpo_0.1"), str(tmp_path / "hf"))
    from_hf = sample.main([str(tmp_path / "hf")] + THREE)
    from_run = sample.main([str(tmp_path / "runs" / "dpo_0.1")] + THREE)
    assert [r["completion"] for r in from_hf] == [r["completion"] for r in from_run]
    assert "reward" not in from_hf[0] and "reward" in from_run[0]
    assert "no classifier r*" in capsys.readouterr().err


def test_export_of_a_classifier_writes_its_trunk_not_its_head(tmp_path):
    models = fake_run(tmp_path, legacy=True)
    res = subprocess.run([sys.executable, os.path.join(REPO, "export.py"), str(tmp_path / "reward"),
                          str(tmp_path / "hf")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert res.returncode == 0 and "its scalar head is not written" in res.stdout, res.stderr
    back = from_pretrained(str(tmp_path / "hf"))
    assert back.score_head is None and torch.equal(back.transformer.h[0].attn.c_attn.weight,
                                                   models["rm"].transformer.h[0].attn.c_attn.weight)
    assert json.load(open(tmp_path / "hf" / "config.json"))["nanodpo"]["tokenizer"] == "bytes"


@pytest.mark.parametrize("argv, message", [
    (["nowhere", "--prompt", "it"], "nowhere: no such file or folder"),
    (["{run}", "--prompt", "it"], "no model.pt, ckpt.pt or config.json there"),
    (["{run}/runs/dpo_0.1"], "no prompt: give --prompt"),
    (["{run}/runs/dpo_0.1", "--prompt", "it is great"], "a prompt: 'great' is not in the tokenizer's"),
    (["{run}/runs/dpo_0.1", "--prompt", "it", "--max-new-tokens", "40"], "the model's block size 32"),
    (["{run}/runs/dpo_0.1", "--prompt", "it", "--n", "0"], "expected positive numbers"),
])
def test_mistakes_are_one_line(tmp_path, argv, message):
    fake_run(tmp_path)
    argv = [a.replace("{run}", str(tmp_path)) for a in argv]
    res = subprocess.run([sys.executable, os.path.join(REPO, "sample.py"), *argv], capture_output=True,
                         text=True, timeout=120, cwd=REPO)
    assert res.returncode != 0 and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
