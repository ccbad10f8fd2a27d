"""calibration.py: r*'s Platt scaling, fitted on training reviews r* never trained on and folded into its head,
and the seams around it (the classifier's batches leave those reviews out; sample.py scores with the same
calibrated r* as the pipeline).

    python -m pytest tests/test_calibration.py     (CPU; a few seconds)
"""
import json
import os

import numpy as np
import pytest
import torch
from conftest import sharp_gpt

import calibration
import sample
import stages
from data.corpus import Split, save_checkpoint
from errors import UsageError
from model import model_record
from sampling import score


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_platt_recovers_the_scale_and_shift_that_drew_the_labels():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 40000)
    y = (rng.random(z.size) < sigmoid(1.7 * z - 0.4)).astype(float)
    a, b = calibration.platt(z, y)
    assert a == pytest.approx(1.7, abs=0.05) and b == pytest.approx(-0.4, abs=0.05)
    assert calibration.mean_nll(z, y, a, b) < calibration.mean_nll(z, y, 1.0, 0.0)


def test_platt_leaves_a_calibrated_head_alone_and_stays_finite_on_separable_labels():
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.5, 40000)
    y = (rng.random(z.size) < sigmoid(z)).astype(float)
    a, b = calibration.platt(z, y)
    assert a == pytest.approx(1.0, abs=0.04) and b == pytest.approx(0.0, abs=0.04)
    a, b = calibration.platt(np.array([-1.0, 1.0]), np.array([0.0, 1.0]))  # separable: the prior holds a
    assert np.isfinite([a, b]).all() and 1.0 < a < 3.0


def scores_of(model):
    """common.sharded's fn: the head's logit on each text (token lists), read as the pipeline reads r*."""
    return lambda texts, start: score(model, [[]] * len(texts), texts, 256, 64, "cpu").tolist()


def test_calibrate_folds_the_fit_into_the_head_once_and_reuses_the_file(tmp_path):
    """After calibrate the head's logit is a * logit + b of the fit it wrote; a second classifier calibrated from
    the same file (a rerun) gets the same head without fitting again."""
    texts = [[int(t) for t in np.random.default_rng(i).integers(0, 256, 12)] for i in range(60)]
    labels = np.arange(60) % 2
    model = sharp_gpt(2, score_head=True)
    before = score(model, [[]] * 60, texts, 256, 64, "cpu")
    calibration.calibrate(model, scores_of(model), texts, labels, str(tmp_path))
    with open(tmp_path / "calibration.json") as f:
        cal = json.load(f)
    assert cal["reviews"] == 60 and cal["nll_after"] <= cal["nll_before"]
    after = score(model, [[]] * 60, texts, 256, 64, "cpu")
    torch.testing.assert_close(after, cal["scale"] * before + cal["shift"], rtol=1e-5, atol=1e-5)

    rerun = sharp_gpt(2, score_head=True)
    never = lambda texts, start: pytest.fail("refitted although calibration.json exists")
    calibration.calibrate(rerun, never, texts, labels, str(tmp_path))
    torch.testing.assert_close(score(rerun, [[]] * 60, texts, 256, 64, "cpu"), after)


def test_the_classifier_never_trains_on_the_reviews_it_is_calibrated_on():
    """ReviewBatches(rows=n) draws from the first n reviews only: the calibration reviews are held out."""
    n, held = 50, 5
    lengths = np.full(n, 3)
    tokens = np.concatenate([np.full(3, i) for i in range(n)])  # review i is three tokens i
    split = Split(tokens, np.concatenate([[0], np.cumsum(lengths)]), np.arange(n) % 2, lengths)
    batches = stages.ReviewBatches(split, 16, 32, 255, seed=0, rows=n - held)
    seen = set()
    for step in range(200):
        idx = batches(step)[0]
        seen |= set(idx.flatten().tolist()) - {255}
    assert seen == set(range(n - held))
    assert calibration.calibration_reviews(split) == 5 and calibration.calibration_reviews(range(20000)) == 1000


def test_sample_py_scores_with_the_pipelines_calibrated_classifier(tmp_path):
    """A run folder's classifier/ holds the head as trained and calibration.json; sample.py's r* is the one the
    pipeline scores with, the calibration folded in."""
    folder = tmp_path / "classifier"
    folder.mkdir()
    model = sharp_gpt(3, score_head=True)
    save_checkpoint(model_record(model, "bytes"), str(folder / "model.pt"))
    with open(folder / "calibration.json", "w") as f:
        json.dump(dict(scale=0.5, shift=-0.25, reviews=1, nll_before=1.0, nll_after=1.0), f)
    texts = [[5, 6, 7], [8, 9]]
    want = 0.5 * score(model, [[]] * 2, texts, 256, 64, "cpu") - 0.25
    loaded = sample.classifier_of(str(tmp_path), "cpu")
    torch.testing.assert_close(score(loaded, [[]] * 2, texts, 256, 64, "cpu"), want, rtol=1e-5, atol=1e-5)
    os.remove(folder / "calibration.json")  # an older run folder: r* as trained
    torch.testing.assert_close(score(sample.classifier_of(str(tmp_path), "cpu"), [[]] * 2, texts, 256, 64, "cpu"),
                               want * 2 + 0.5, rtol=1e-5, atol=1e-5)


def test_a_corpus_sorted_by_label_is_refused_before_r_star_trains(tmp_path):
    """The reviews r* calibrates on are the training split's last: in a corpus sorted by label (an older imdb.npz)
    they are all positive, and the fit would push every r* up. That is one line naming the file, not a run."""
    labels = np.array([0] * 600 + [1] * 400)
    with pytest.raises(UsageError, match="imdb.npz: the last 100 training reviews.*100% positive"):
        calibration.check_held_out(labels, 900, "data/imdb/imdb.npz")
    calibration.check_held_out(np.random.default_rng(0).permutation(labels), 900, "data/imdb/imdb.npz")
