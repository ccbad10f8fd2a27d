"""stages.py: review batches, the score layout, pairs, the Best-of-N bound, evaluation.

    python -m pytest tests/test_stages.py     (CPU; a few seconds)
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import EOS, tiny_gpt

import ppo
import stages
from data.corpus import Split


def test_pairs_all_six_minus_ties_chosen_higher():
    prompts = [[1], [2]]
    samples = [[10], [11, EOS], [12], [13], [20], [21], [22], [23]]
    rewards = [0.9, 0.1, 0.5, 0.5, 0.3, 0.2, 0.8, 0.3]  # prompt 0 has one tie, prompt 1 has one tie
    pairs = stages.pairs_from(prompts, samples, rewards, EOS)
    assert len(pairs["prompt"]) == 10 and pairs["prompt"].count([1]) == 5
    value = {tuple(s + [EOS] if s[-1] != EOS else s): r for s, r in zip(samples, rewards)}
    assert all(value[tuple(c)] > value[tuple(r)] for c, r in zip(pairs["chosen"], pairs["rejected"]))
    assert all(c[-1] == EOS and r[-1] == EOS for c, r in zip(pairs["chosen"], pairs["rejected"]))


def test_best_of_n_kl_bound():
    assert stages.best_of_n_kl(1) == 0
    assert stages.best_of_n_kl(2) == pytest.approx(np.log(2) - 0.5)
    assert stages.best_of_n_kl(64) == pytest.approx(np.log(64) - 63 / 64)


def test_scores_read_the_text_as_the_classifier_was_trained_on_it():
    """score() of (prompt, response) equals the head on review_batches' layout of the same text."""
    tokens = np.array([5, 6, 7, 8, 9, 10, 11], np.uint16)
    split = Split(tokens, np.array([0, 7]), np.array([1], np.uint8), np.array([7], np.int32))
    idx, _, mask, labels = stages.review_batches(split, 1, 64, EOS, 0, crop=False)(0)
    rm = tiny_gpt(0, score_head=True)
    want = rm.score(rm(idx), mask)
    got = stages.score(rm, [[5, 6, 7]], [[8, 9, 10, 11, EOS]], EOS, 64, "cpu")
    assert torch.allclose(got, want.detach()) and labels.tolist() == [1.0]
    assert stages.reward(rm, [[5, 6, 7]], [[8, 9, 10, 11]], EOS, 64, "cpu") == torch.sigmoid(got)  # EOS or not


def test_evaluation_of_the_reference_itself_has_zero_kl():
    policy = tiny_gpt(0)
    rm = tiny_gpt(1, score_head=True)
    prompts = [[1, 2], [3], [4, 5, 6]]
    record = stages.evaluate(policy, policy, rm, prompts, eos=EOS, seed=0, max_new_tokens=6, block_size=64,
                             device="cpu", impl="auto")
    assert record["kl"] == pytest.approx(0, abs=1e-6) and record["kl_sampled"] == pytest.approx(0, abs=1e-6)
    assert 0 < record["reward"] < 1 and 1 <= record["length"] <= 6
    other = stages.evaluate(tiny_gpt(2), policy, rm, prompts, eos=EOS, seed=0, max_new_tokens=6, block_size=64,
                            device="cpu", impl="auto")
    assert other["kl"] > 0.01


def test_ties_count_half_in_accuracies():
    """A head that scores everything 0 tells nothing apart: 0.5 in every accuracy, not 0 (nor the share of one label)."""
    zero = ppo.with_zero_head(tiny_gpt(0), "cpu")
    lengths = np.array([20, 30, 25])
    split = Split((np.arange(lengths.sum()) % 256).astype(np.uint16), np.concatenate([[0], np.cumsum(lengths)]),
                  np.ones(3, np.uint8), lengths.astype(np.int32))  # every review positive
    assert stages.classifier_loss(zero, stages.review_batches(split, 4, 64, EOS, 0, crop=True)(0))[1]["acc"] == 0.5
    assert stages.classifier_accuracy(zero, split, SimpleNamespace(block_size=64, device="cpu"), EOS) == 0.5
    pairs = dict(prompt=[[1], [2]], chosen=[[3, EOS], [4, 5, EOS]], rejected=[[6, EOS], [7, EOS]])
    assert ppo.bradley_terry_loss(zero, ppo.pair_score_batch(pairs, [0, 1], EOS, 64))[1]["acc"] == 0.5
