"""
How far the ground truth r* can be trusted as a probability. The classifier learns P(positive | text)
from labels, and stops after a few hundred noisy steps: its head can end off by a constant. On the
tiny task one seed's r* read pi_ref's samples 0.08 below their exact P, enough to move every reward
on the frontier. So r* is calibrated (Platt scaling) on training reviews it never trained on:

    r* = sigmoid(a * logit + b),   a, b by maximum likelihood on those reviews' labels

and, where the data's generator knows the exact P(label | text) (tiny), measured against it on the
test reviews and on pi_ref's samples (the texts the pairs are scored on).
"""
import json
import os
from functools import partial

import numpy as np

from common import barrier, is_main, log, sharded
from data.corpus import write_atomic
from data.tiny.prepare import p_positive
from errors import UsageError
from model import get_tokenizer
from sampling import calibrated

CALIBRATION_REVIEWS = 1000  # the last training reviews, held out of r*'s training to calibrate it


def calibration_reviews(split):
    """How many of a split's last reviews r* leaves out of its training, to calibrate on."""
    return min(CALIBRATION_REVIEWS, len(split) // 10)


def check_held_out(labels, n_fit, data):
    """Before r* trains: the reviews held out to calibrate it (labels[n_fit:]) must be labelled as
    the rest are. A corpus sorted by label (an older nanoDPO's imdb.npz) would hold out one label
    only, and the fit would push every r* to that side."""
    held, rest = labels[n_fit:].mean(), labels[:n_fit].mean()
    if len(labels) > n_fit and abs(held - rest) > 0.1:
        raise UsageError(f"{data}: the last {len(labels) - n_fit} training reviews, which calibrate "
                         f"r*, are {held:.0%} positive against {rest:.0%} in the rest; expected a "
                         f"shuffled corpus: prepare it again (python data/<name>/prepare.py)")


def calibrate(classifier, scores, texts, labels, folder):
    """Fit Platt's a and b to the held-out texts (token lists, cut as r* judges them) and their 0/1
    labels, write them to folder/calibration.json (once), and fold them into the classifier's head.
    scores(texts, start) -> logits, as for common.sharded."""
    path = os.path.join(folder, "calibration.json")
    if not os.path.exists(path):
        z = np.array(sharded(scores, texts), dtype=np.float64)
        y = np.asarray(labels, dtype=np.float64)
        if not np.isfinite(z).all():
            raise FloatingPointError(f"r*'s logits on the held-out reviews are not all finite: "
                                     f"{folder}/model.pt is broken; delete {folder} to redo it")
        a, b = platt(z, y)
        cal = dict(scale=a, shift=b, reviews=len(y), nll_before=mean_nll(z, y, 1.0, 0.0),
                   nll_after=mean_nll(z, y, a, b))
        if is_main():
            write_atomic(path, lambda f: f.write(json.dumps(cal).encode()))
        barrier()
    calibrated(classifier, folder)
    with open(path) as f:
        cal = json.load(f)
    log(f"[classifier] calibrated on {cal['reviews']} held-out reviews: r* = sigmoid("
        f"{cal['scale']:.3f} * logit {cal['shift']:+.3f}); their NLL {cal['nll_before']:.4f} -> "
        f"{cal['nll_after']:.4f}")


def platt(z, y, prior=1.0, steps=50):
    """(a, b) minimising sum -log p(y | sigmoid(a z + b)) + prior ((a - 1)^2 + b^2) / 2: z, y (n,)
    the logits and 0/1 labels. The weak prior at (1, 0), no change, keeps a few separable reviews
    from sending a to infinity. The objective is convex: Newton's method, each step halved until it
    lowers the objective (a full step can overshoot from far away)."""
    w0 = np.array([1.0, 0.0])
    loss = lambda w: len(y) * mean_nll(z, y, *w) + prior * ((w - w0) ** 2).sum() / 2
    x, w = np.stack([z, np.ones_like(z)], 1), w0.copy()
    for _ in range(steps):
        p = 1 / (1 + np.exp(-np.clip(x @ w, -50, 50)))
        grad = x.T @ (p - y) + prior * (w - w0)
        hess = (x * (p * (1 - p))[:, None]).T @ x + prior * np.eye(2)
        step, t, now = np.linalg.solve(hess, grad), 1.0, loss(w)
        while loss(w - t * step) > now and t > 1e-6:
            t /= 2
        w = w - t * step
    return float(w[0]), float(w[1])


def mean_nll(z, y, a, b):
    """The labels' mean negative log-likelihood under sigmoid(a z + b)."""
    return float(np.logaddexp(0, -(2 * y - 1) * (a * z + b)).mean())


# ------------------------------------------------------------ against the exact truth
def exact_truth(data):
    """The exact P(label = 1 | text) as a function of token ids, where the data's generator knows
    it (tiny: data/tiny/prepare.p_positive), else None. r* only learned it from labels drawn from
    it."""
    if data["tokenizer"] != "words":
        return None
    return partial(tiny_truth, get_tokenizer("words", data["words"]))


def tiny_truth(enc, ids):
    return p_positive(enc.decode([t for t in ids if t != enc.eot_token]))


def against_truth(rewards, texts, truth):
    """How far r* is from the exact P(label | text) on these texts (token lists): the mean |r* - P|
    and both means."""
    r = np.asarray(rewards, dtype=np.float64)
    p = np.array([truth(t) for t in texts])
    return dict(mean_abs_error=float(np.abs(r - p).mean()), mean_reward=float(r.mean()),
                mean_exact=float(p.mean()), texts=len(p))


def describe(cal):
    return (f"mean |r* - P(label | text)| {cal['mean_abs_error']:.3f} over {cal['texts']} texts "
            f"(mean r* {cal['mean_reward']:.3f}, mean P {cal['mean_exact']:.3f})")
