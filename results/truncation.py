"""Truncated responses with and without an appended EOS (results/tiny.md): the same SFT model, classifier and
samples, pairs whose cut responses do or do not get an EOS they never sampled, then DPO beta=0.1 and Preferred-FT.

    for s in 1337 1 2 3 4; do python dpo.py --seed $s --out out/seed_$s; done     # the five seeds, first
    python results/truncation.py 1337 1 2 3 4

For each seed: at the default budget, out/seed_S's stages are copied to out/trunc_eos_S and its pairs made again
with the EOS; at --max-new-tokens 16 (most responses cut), out/stress_noeos_S and out/stress_eos_S copy its SFT
model and make the rest both ways. Prints one table row per budget and seed.
"""
import json
import os
import shutil
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import experiment  # noqa: E402
import stages  # noqa: E402
from model import get_tokenizer  # noqa: E402
from data.corpus import load_corpus  # noqa: E402

PLAIN = stages.pairs_from


def run(seed, out, copy, append_eos, eos, *flags):
    """dpo:0.1 and ft into `out`, its stages `copy` taken from out/seed_<seed>."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for x in copy:
        (shutil.copytree if os.path.isdir(f"out/seed_{seed}/{x}") else shutil.copy)(f"out/seed_{seed}/{x}", f"{out}/{x}")
    stages.pairs_from = (lambda prompts, samples, rewards, k=4: PLAIN(
        prompts, [x if x[-1:] == [eos] else x + [eos] for x in samples], rewards, k)) if append_eos else PLAIN
    experiment.main(["--seed", str(seed), "--device", "cpu", "--out", out, "--runs", "dpo:0.1,ft", "--best-of", "1", *flags])


def row(budget, seed, a, b, eos):
    last = lambda d, r: [json.loads(x) for x in open(f"{d}/runs/{r}/eval.jsonl")][-1]
    pairs = torch.load(f"{a}/pairs.pt", weights_only=True)
    cut = sum(r[-1] != eos for r in pairs["chosen"] + pairs["rejected"]) / (2 * len(pairs["prompt"]))
    cells = [budget, str(seed), f"{cut:.1%}"]
    for r in ("dpo_0.1", "ft"):
        x, y = last(a, r), last(b, r)
        cells += [f"{x[k]:.{d}f} / {y[k]:.{d}f}" for k, d in (("reward", 3), ("length", 1), ("kl", 1))]
    return "| " + " | ".join(cells) + " |"


if __name__ == "__main__":
    data = load_corpus("data/tiny/tiny.npz")
    eos = get_tokenizer(data["tokenizer"], data["words"]).eot_token
    rows = []
    for s in map(int, sys.argv[1:]):
        run(s, f"out/trunc_eos_{s}", ("sft", "classifier", "settings.json"), True, eos)
        rows.append(row("48 (default)", s, f"out/seed_{s}", f"out/trunc_eos_{s}", eos))
        for variant in ("noeos", "eos"):
            run(s, f"out/stress_{variant}_{s}", ("sft", "settings.json"), variant == "eos", eos, "--max-new-tokens", "16",
                "--redo")
        rows.append(row("16", s, f"out/stress_noeos_{s}", f"out/stress_eos_{s}", eos))
    print("| new tokens | seed | responses in pairs cut | DPO β = 0.1 reward | length | KL | Preferred-FT reward | length"
          " | KL |\n|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
