"""stages.py: review batches, the score layout, pairs, the Best-of-N bound, evaluation.

    python -m pytest tests/test_stages.py     (CPU; a few seconds)
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import EOS, tiny_gpt

import common
import ppo
import stages
from data.corpus import Split
from model import WordTokenizer


def test_pairs_all_six_minus_ties_chosen_higher():
    prompts = [[1], [2]]
    samples = [[10], [11, EOS], [12], [13], [20], [21], [22], [23]]
    rewards = [0.9, 0.1, 0.5, 0.5, 0.3, 0.2, 0.8, 0.3]  # prompt 0 has one tie, prompt 1 has one tie
    pairs = stages.pairs_from(prompts, samples, rewards)
    assert len(pairs["prompt"]) == 10 and pairs["prompt"].count([1]) == 5
    value = {tuple(s): r for s, r in zip(samples, rewards)}  # responses as sampled: no EOS appended
    assert all(value[tuple(c)] > value[tuple(r)] for c, r in zip(pairs["chosen"], pairs["rejected"]))
    assert [11, EOS] in pairs["rejected"] and [10] in pairs["chosen"]


def test_best_of_n_kl_bound():
    assert stages.best_of_n_kl(1) == 0
    assert stages.best_of_n_kl(2) == pytest.approx(np.log(2) - 0.5)
    assert stages.best_of_n_kl(64) == pytest.approx(np.log(64) - 63 / 64)


def test_scores_read_the_text_as_the_classifier_was_trained_on_it():
    """score() of (prompt, response) equals the head on review_batches' layout of the same text."""
    tokens = np.array([5, 6, 7, 8, 9, 10, 11], np.uint16)
    split = Split(tokens, np.array([0, 7]), np.array([1], np.uint8), np.array([7], np.int32))
    idx, _, mask, labels = stages.review_batches(split, 1, 64, EOS, 0)(0)
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


def test_ties_count_half_in_accuracies(tmp_path):
    """A head that scores everything 0 tells nothing apart: 0.5 in every accuracy, not 0 (nor the share of one label)."""
    zero = ppo.with_zero_head(tiny_gpt(0), "cpu")
    lengths = np.array([20, 30, 25])
    split = Split((np.arange(lengths.sum()) % 256).astype(np.uint16), np.concatenate([[0], np.cumsum(lengths)]),
                  np.ones(3, np.uint8), lengths.astype(np.int32))  # every review positive
    assert stages.classifier_loss(zero, stages.review_batches(split, 4, 64, EOS, 0, scored_len=20)(0))[1]["acc"] == 0.5
    args = SimpleNamespace(block_size=64, device="cpu", out=str(tmp_path), max_new_tokens=12)
    assert stages.classifier_accuracy(zero, split, args, EOS) == dict(whole=0.5, scored=0.5, scored_len=20, reviews=3)
    pairs = dict(prompt=[[1], [2]], chosen=[[3, EOS], [4, 5, EOS]], rejected=[[6, EOS], [7, EOS]])
    assert ppo.bradley_terry_loss(zero, ppo.pair_score_batch(pairs, [0, 1], EOS, 64))[1]["acc"] == 0.5


# ---------------------------------------------------------------- one layout from SFT to every later stage

@pytest.fixture(scope="module")
def sft_and_cuts(tmp_path_factory):
    """A small SFT model (60 steps on the tiny corpus's training reviews, in the SFT's own batches), the EOS id,
    and held-out reviews cut at a prompt length: (prompt, continuation + EOS)."""
    data = common.load_data(str(tmp_path_factory.mktemp("data")), "tiny")
    eos = WordTokenizer(data["words"]).eot_token
    model = tiny_gpt(0, vocab=eos + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    get_batch = stages.review_batches(data["train"], 16, 64, eos, 0)
    for step in range(60):
        idx, targets, mask, _ = get_batch(step)
        (-common.masked_mean(common.logprobs(model, None, idx, targets, mask, "reference").token_pol, mask)).backward()
        opt.step(), opt.zero_grad()
    rng = np.random.default_rng(0)
    cuts = []
    for i in rng.choice(len(data["test"]), 6, replace=False):
        r = data["test"].review(i).tolist()
        k = int(rng.integers(2, 9))
        cuts.append((r[:k], r[k:] + [eos]))
    return model.eval(), eos, cuts


def test_pipeline_logprobs_of_a_continuation_are_those_of_the_sft_layout(sft_and_cuts):
    """The log-probs pairs, DPO, PPO and evaluation compute (common.pack) for a held-out review's continuation
    given its prompt equal those of the same tokens in the layout SFT trained on (stages.review_batches)."""
    model, eos, cuts = sft_and_cuts
    for prompt, cont in cuts:
        split = Split(np.array(prompt + cont[:-1], np.uint16), np.array([0, len(prompt) + len(cont) - 1]),
                      np.array([1], np.uint8), np.array([100], np.int32))
        idx, targets, mask, _ = stages.review_batches(split, 1, 64, eos, 0)(0)  # SFT: the whole review
        sft = common.logprobs(model, None, idx, targets, mask, "reference").token_pol[0, len(prompt):]
        idx, targets, mask = common.pack([prompt], [cont], 64, eos)  # the pipeline: prompt, then response
        got = common.logprobs(model, None, idx, targets, mask, "reference").token_pol[0][mask[0]]
        assert targets[0][mask[0]].tolist() == cont and got.shape == sft.shape
        torch.testing.assert_close(got, sft, rtol=0, atol=1e-6)


def test_greedy_sampling_continues_as_the_sft_layout_predicts(sft_and_cuts):
    """stages.sample at temperature 0 (prompts of different lengths, left-padded in one batch) gives, token by
    token, the argmax of the model run on the training layout BOS + prompt + what came so far."""
    model, eos, cuts = sft_and_cuts
    prompts = [p for p, _ in cuts]
    got = stages.sample(model, prompts, 10, eos, 0, "cpu", temperature=0)
    for prompt, tokens in zip(prompts, got):
        seq = [eos] + prompt
        while len(seq) < len(prompt) + 11 and seq[-1:] != [eos] or len(seq) == len(prompt) + 1:
            h = model(torch.tensor([seq]))
            seq.append(int(model.lm_head(h[0, -1]).argmax()))
        assert tokens == seq[len(prompt) + 1:] and len(set(tokens)) > 1
