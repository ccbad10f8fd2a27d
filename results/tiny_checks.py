"""The tiny task's checks, one row per seed's run folder: pi_ref's mean r* and Best-of-16's, each
beside the exact P(label | text) of the same samples, r*'s ceiling (its mean on reviews of six +3
opinions, the generator's best), the best evaluation below 2 nats and its distance to that ceiling,
the largest KL reached, r*'s calibration against the exact P, and the exact reward of the best run.
r* is read as the pipeline reads it, its calibration (classifier/calibration.json) folded in.
Markdown, for results/tiny.md.

    python results/tiny_checks.py out/seed_1337 out/seed_1 out/seed_2 out/seed_3 out/seed_4
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sampling import calibrated, reward  # noqa: E402
from stages import make_model  # noqa: E402
from data.corpus import load_checkpoint, read_jsonl  # noqa: E402
from data.tiny import prepare as tiny  # noqa: E402
from model import WordTokenizer  # noqa: E402
from plots.frontier import read_runs  # noqa: E402


def best_reviews(n, seed=0):
    """n reviews of the generator's templates whose six opinions are all +3 (P = sigmoid(4) =
    0.982)."""
    rng = np.random.default_rng(seed)
    top = [w for w, v in tiny.WEIGHTS.items() if v == 3]

    def pick(xs):
        return xs[rng.integers(len(xs))]
    texts = []
    for _ in range(n):
        parts = [pick(tiny.OPENERS).format(t=pick(tiny.TITLES), g=pick(tiny.GENRES), y=1999)]
        parts += [pick(tiny.OPINIONS).format(a=pick(tiny.ASPECTS), w=pick(top))
                  for _ in range(tiny.N_OPINIONS - 1)]
        parts.append(pick(tiny.CLOSERS).format(w=pick(top), g=pick(tiny.GENRES)))
        texts.append(" ".join(parts))
    return texts


def ceiling(out):
    """r*'s mean on 256 of the generator's best reviews: the top of r* in that run folder."""
    settings = json.load(open(os.path.join(out, "settings.json")))["classifier"]
    shape = ("init", "n_layer", "n_head", "n_embd", "block_size", "model")
    args = argparse.Namespace(**{k: settings[k] for k in shape}, seed=0, device="cpu")
    enc = WordTokenizer(tiny.vocabulary())
    classifier = make_model(args, enc.n_vocab, score_head=True)
    weights = load_checkpoint(os.path.join(out, "classifier", "model.pt"))["model"]
    classifier.load_state_dict(weights)
    if os.path.exists(os.path.join(out, "classifier", "calibration.json")):
        calibrated(classifier, os.path.join(out, "classifier"))  # r* as the pipeline scores with it
    ids = [enc.encode_ordinary(t) for t in best_reviews(256)]
    with torch.no_grad():
        r = reward(classifier.eval(), [[]] * len(ids), ids, enc.eot_token, args.block_size, "cpu")
    return r.mean().item()


def row(out):
    runs = read_runs(out)
    first = next(iter(runs.values()))[0]
    bon = {r["n"]: r for r in read_jsonl(os.path.join(out, "best_of_n.jsonl"))}
    top = ceiling(out)
    below2 = max((r["reward"], name) for name, recs in runs.items() for r in recs if r["kl"] < 2)
    kl_max = max(r["kl"] for recs in runs.values() for r in recs)
    test = json.load(open(os.path.join(out, "classifier", "accuracy.json")))["calibration"]
    samples = json.load(open(os.path.join(out, "pairs_calibration.json")))
    best = max((recs[-1]["reward"], name) for name, recs in runs.items())
    exact = runs[best[1]][-1]["reward_exact"]
    seed = os.path.basename(os.path.normpath(out))
    bon16 = f"{bon[16]['reward']:.3f} / {bon[16].get('reward_exact', float('nan')):.3f}"
    return (f"| {seed} | {first['reward']:.3f} / {first['reward_exact']:.3f} | {bon16} | {top:.3f} | "
            f"{below2[0]:.3f} ({below2[1]}) | {top - below2[0]:.3f} | {kl_max:.1f} | "
            f"{test['mean_abs_error']:.3f} | {samples['mean_abs_error']:.3f} | "
            f"{best[1]} {best[0]:.3f} / {exact:.3f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dirs", nargs="+",
                   help="run folders of dpo.py on the tiny preset, one per seed")
    a = p.parse_args()
    print("| seed | pi_ref r* / exact P | Best-of-16 r* / exact P | r* ceiling | best below 2 nats | its gap | largest KL "
          "| mean abs(r* - P), test reviews | same, pi_ref's samples "
          "| best run's last r* / exact P |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for out in a.out_dirs:
        print(row(out))


if __name__ == "__main__":
    main()
