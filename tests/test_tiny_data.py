"""data/tiny/prepare.py: the graded ground truth P(label | text), the label drawn from it, the reviews' sizes,
and the seams that carry it (the data digest, r*'s calibration, evaluate's exact reward).

    python -m pytest tests/test_tiny_data.py     (CPU; a few seconds)
"""
import copy
import math

import numpy as np
import pytest
import torch
from conftest import EOS, recording, sharp_gpt

import calibration
import stages
from stages import load_data
from data.tiny import prepare as tiny
from model import WordTokenizer
from record import data_digest
from settings import PRESETS


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


def test_exact_truth_hand_worked():
    """P = sigmoid(4 D / 18), D the sum of the graded words' weights, clipped at +-18; other words weigh 0."""
    assert tiny.p_positive("I saw Moonfall.") == 0.5
    assert tiny.p_positive("A superb western.") == pytest.approx(sigmoid(4 * 3 / 18))
    text = "So, Red Summer. The plot was dull. What good music! I found the cast weak. Overall, brilliant."
    assert tiny.p_positive(text) == pytest.approx(sigmoid(4 * (-2 + 1 - 1 + 3) / 18))
    assert tiny.p_positive("The acting was awful. " * 5 + "In short, painful.") == pytest.approx(sigmoid(-4))
    assert tiny.p_positive("What superb acting! " * 9) == pytest.approx(sigmoid(4))  # clipped: no gain past the top


def test_every_review_is_six_graded_opinions_and_its_p_is_the_rule():
    rng = np.random.default_rng(0)
    enc = WordTokenizer(tiny.vocabulary())
    for _ in range(500):
        text, p, label = tiny.review(rng)
        graded = [w for w in enc.decode(enc.encode_ordinary(text)).replace(".", " ").replace("!", " ").split()
                  if w in tiny.WEIGHTS]
        assert len(graded) == tiny.N_OPINIONS and label in (0, 1)
        assert p == pytest.approx(sigmoid(tiny.K * sum(tiny.WEIGHTS[w] for w in graded) / tiny.D_MAX))


def test_labels_are_drawn_from_p():
    """In every band of P the share of positive labels is P's mean there, within 4 standard errors: a label that
    is a threshold of P (or a majority of votes) fails in the middle bands, one that ignores P fails at the ends."""
    rng = np.random.default_rng(1)
    reviews = [tiny.review(rng) for _ in range(20000)]
    p = np.array([x[1] for x in reviews])
    y = np.array([x[2] for x in reviews])
    for lo, hi in [(0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1)]:
        band = (p >= lo) & (p < hi)
        assert band.sum() > 300
        se = math.sqrt(p[band].mean() * (1 - p[band].mean()) / band.sum())
        assert abs(y[band].mean() - p[band].mean()) < 4 * se, (lo, hi)


def test_the_top_is_rare_and_writing_less_never_reaches_it():
    """The generator's mean P is near 0.5 and a review of six +3 opinions is rare; a review cut short (fewer
    opinions) has at most the weight of what it kept: with a fixed denominator, less text never scores higher."""
    rng = np.random.default_rng(2)
    reviews = [tiny.review(rng) for _ in range(20000)]
    p = np.array([x[1] for x in reviews])
    assert 0.45 < p.mean() < 0.55 and (p > sigmoid(4 * 15 / 18)).mean() < 0.01
    best = "I saw Moonfall." + " The acting was superb." * 5 + " Overall, brilliant."
    sentences = best.split(". ")
    ps = [tiny.p_positive(". ".join(sentences[:k])) for k in range(1, len(sentences) + 1)]
    assert ps == sorted(ps) and ps[-1] == pytest.approx(sigmoid(4)) and ps[-2] < ps[-1]


def test_reviews_fit_the_tiny_pipeline_whole():
    """A sampled review is never cut: every review fits --max-new-tokens after the shortest prompt (2 tokens),
    and the block size with its BOS and EOS."""
    rng = np.random.default_rng(3)
    enc = WordTokenizer(tiny.vocabulary())
    longest = max(len(enc.encode_ordinary(tiny.review(rng)[0])) for _ in range(5000))
    assert longest + 1 - 2 <= PRESETS["tiny"]["max_new_tokens"] and longest + 2 <= PRESETS["tiny"]["block_size"]


def test_data_digest_names_the_labels(tmp_path):
    """The same tokens with other labels are other data: every stage made on them is refused, not reused."""
    tiny.prepare(str(tmp_path), n_train=40, n_test=10)
    data = load_data(str(tmp_path), "tiny")
    flipped = copy.deepcopy(data)
    flipped["train"].labels = 1 - flipped["train"].labels
    assert data_digest(flipped) != data_digest(data)
    assert data_digest(copy.deepcopy(data)) == data_digest(data)


def test_exact_truth_of_token_ids_is_p_of_the_text(tmp_path):
    tiny.prepare(str(tmp_path), n_train=40, n_test=10)
    data = load_data(str(tmp_path), "tiny")
    truth = calibration.exact_truth(data)
    enc = WordTokenizer(data["words"])
    for i in range(10):
        ids = data["test"].review(i).tolist()
        assert truth(ids) == tiny.p_positive(enc.decode(ids)) == truth(ids + [enc.eot_token])
    assert calibration.exact_truth(dict(data, tokenizer="gpt2")) is None


def test_calibration_against_hand_values():
    truth = {(1,): 0.2, (2,): 0.9, (3,): 0.5}
    cal = calibration.against_truth([0.3, 0.6, 0.5], [[1], [2], [3]], lambda ids: truth[tuple(ids)])
    assert cal["mean_abs_error"] == pytest.approx((0.1 + 0.3 + 0) / 3)
    assert cal["mean_reward"] == pytest.approx(1.4 / 3) and cal["mean_exact"] == pytest.approx(1.6 / 3)
    assert cal["texts"] == 3


def test_evaluate_reports_the_exact_reward_of_the_samples_it_scored(monkeypatch):
    """reward_exact is the truth of prompt + response of the very samples evaluate drew (not of the prompts alone,
    nor of other draws)."""
    policy, rm = sharp_gpt(0), sharp_gpt(1, score_head=True)
    prompts = [[1, 2], [3], [4, 5, 6]]
    samples = recording(monkeypatch, stages)
    truth = lambda ids: len([t for t in ids if t != EOS]) / 100 + ids[0] / 1000
    record = stages.evaluate(policy, policy, rm, prompts, eos=EOS, seed=0, max_new_tokens=6, block_size=64,
                             device="cpu", impl="auto", truth=truth)
    (_, _, responses), = samples
    want = np.mean([truth(p + r) for p, r in zip(prompts, responses)])
    assert record["reward_exact"] == pytest.approx(want)
    assert "reward_exact" not in stages.evaluate(policy, policy, rm, prompts, eos=EOS, seed=0, max_new_tokens=6,
                                                 block_size=64, device="cpu", impl="auto")


def test_a_tiny_corpus_of_an_older_generator_is_made_again(tmp_path):
    """An older nanoDPO's tiny.npz (another word list, other labels) is not this generator's: load_data remakes it
    rather than training on it."""
    from data.corpus import save_corpus
    old = WordTokenizer(["I", "loved", "it", "."])
    save_corpus(str(tmp_path), "tiny", {"train": (["I loved it."], [1]), "test": (["I loved it."], [1])}, old,
                tokenizer="words")
    data = load_data(str(tmp_path), "tiny")
    assert data["words"] == tiny.vocabulary() and len(data["train"]) == 12000


def test_a_tiny_corpus_of_another_generator_with_the_same_words_is_made_again(tmp_path):
    """The generator's rules changed but not its words (as #23's port went through): the corpus records the
    generator that made it, and load_data remakes it; the generator's own corpus is read as it is."""
    from data.corpus import save_corpus
    enc = WordTokenizer(tiny.vocabulary())
    save_corpus(str(tmp_path), "tiny", {"train": (["I saw Moonfall."], [1]), "test": (["So, Moonfall."], [0])}, enc,
                tokenizer="words", source="another generator")
    assert len(load_data(str(tmp_path), "tiny")["train"]) == 12000
    tiny.prepare(str(tmp_path), n_train=40, n_test=10)
    assert len(load_data(str(tmp_path), "tiny")["train"]) == 40
