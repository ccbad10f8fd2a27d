"""stages.py: review batches, pairs, the Best-of-N bound, evaluation.

    python -m pytest tests/test_stages.py     (CPU; a few seconds)
"""
import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import EOS, f64_dists, f64_score, recording, sharp_gpt, tiny_gpt

import common
import scores
import sampling
import settings
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
    zero = scores.with_zero_head(tiny_gpt(0), "cpu")
    lengths = np.array([20, 30, 25])
    split = Split((np.arange(lengths.sum()) % 256).astype(np.uint16), np.concatenate([[0], np.cumsum(lengths)]),
                  np.ones(3, np.uint8), lengths.astype(np.int32))  # every review positive
    assert stages.classifier_loss(zero, stages.ReviewBatches(split, 4, 64, EOS, 0, scored_len=20)(0))[1]["acc"] == 0.5
    args = SimpleNamespace(block_size=64, device="cpu", out=str(tmp_path), max_new_tokens=12)
    assert stages.classifier_accuracy(zero, split, args, EOS) == dict(whole=0.5, scored=0.5, scored_len=20, reviews=3)
    pairs = dict(prompt=[[1], [2]], chosen=[[3, EOS], [4, 5, EOS]], rejected=[[6, EOS], [7, EOS]])
    assert scores.bradley_terry_loss(zero, scores.pair_score_batch(pairs, [0, 1], EOS, 64))[1]["acc"] == 0.5


# ---------------------------------------------------------------- one layout from SFT to every later stage

@pytest.fixture(scope="module")
def sft_and_cuts(tmp_path_factory):
    """A small SFT model (60 steps on the tiny corpus's training reviews, in the SFT's own batches), the EOS id,
    and held-out reviews cut at a prompt length: (prompt, continuation + EOS)."""
    data = stages.load_data(str(tmp_path_factory.mktemp("data")), "tiny")
    eos = WordTokenizer(data["words"]).eot_token
    model = tiny_gpt(0, vocab=eos + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    get_batch = stages.ReviewBatches(data["train"], 16, 64, eos, 0)
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
        idx, targets, mask, _ = stages.ReviewBatches(split, 1, 64, eos, 0)(0)  # SFT: the whole review
        sft = common.logprobs(model, None, idx, targets, mask, "reference").token_pol[0, len(prompt):]
        idx, targets, mask = common.pack([prompt], [cont], 64, eos)  # the pipeline: prompt, then response
        got = common.logprobs(model, None, idx, targets, mask, "reference").token_pol[0][mask[0]]
        assert targets[0][mask[0]].tolist() == cont and got.shape == sft.shape
        torch.testing.assert_close(got, sft, rtol=0, atol=1e-6)


def test_greedy_sampling_continues_as_the_sft_layout_predicts(sft_and_cuts):
    """sampling.sample at temperature 0 (prompts of different lengths, left-padded in one batch) gives, token by
    token, the argmax of the model run on the training layout BOS + prompt + what came so far."""
    model, eos, cuts = sft_and_cuts
    prompts = [p for p, _ in cuts]
    got = sampling.sample(model, prompts, 10, eos, 0, "cpu", temperature=0)
    for prompt, tokens in zip(prompts, got):
        seq = [eos] + prompt
        while len(seq) < len(prompt) + 11 and seq[-1:] != [eos] or len(seq) == len(prompt) + 1:
            h = model(torch.tensor([seq]))
            seq.append(int(model.lm_head(h[0, -1]).argmax()))
        assert tokens == seq[len(prompt) + 1:] and len(set(tokens)) > 1


# ---------------------------------------------------------------- the numbers the README reports, on small cases

def make_split(reviews, labels):
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in reviews])])
    return Split(np.array(sum(reviews, []), np.uint16), offsets, np.array(labels, np.uint8),
                 np.full(len(reviews), 500, np.int32))


def test_classifier_crops_cover_the_scored_length_and_whole_reviews():
    """review_batches with scored_len (the classifier's): each review is cut to 8 .. block_size - 2 tokens, half the
    time at most scored_len; the labels are those of the reviews drawn; the same (seed, step), the same batch."""
    reviews = [[i] + list(range(100, 199)) for i in range(50)]  # the first token says which review it is
    labels = [i % 2 for i in range(50)]
    get_batch = stages.ReviewBatches(make_split(reviews, labels), 2000, 64, EOS, 5, scored_len=16)
    idx, targets, mask, y = get_batch(0)
    lengths = mask.sum(1) - 1  # the text's tokens (the mask covers the EOS too)
    assert lengths.min() == 8 and lengths.max() == 62
    short = (lengths <= 16).double().mean().item()  # 1/2 + 1/2 * 9/55 expected
    assert 0.55 < short < 0.61 and (lengths[lengths > 16] > 40).any()
    assert y.tolist() == [labels[i] for i in idx[:, 1].tolist()]
    assert all(torch.equal(a, b) for a, b in zip(get_batch(0), (idx, targets, mask, y)))
    assert not torch.equal(get_batch(1)[2], mask)


def test_evaluation_reward_and_kls_are_their_float64_values(monkeypatch):
    """evaluate's reward (mean r* = sigmoid of the head), exact KL(pi || pi_ref) (summed over each response, the
    whole vocabulary at every token) and sampled KL (sum of log pi - log pi_ref), recomputed in float64 on the
    very samples it drew, for two models whose KL is nats, not ~0."""
    policy, ref, rm = sharp_gpt(0), sharp_gpt(2), sharp_gpt(1, score_head=True)
    prompts = [[1, 2], [3], [4, 5, 6], [7, 8]]
    samples = recording(monkeypatch, stages)
    record = stages.evaluate(policy, ref, rm, prompts, eos=EOS, seed=0, max_new_tokens=6, block_size=64,
                             device="cpu", impl="auto")
    (args, kwargs, responses), = samples
    assert args[1] == prompts
    kl, kl_sampled, rewards = [], [], []
    for p, r in zip(prompts, responses):
        lp, lq = f64_dists(policy, p, r, EOS), f64_dists(ref, p, r, EOS)
        kl.append((lp.exp() * (lp - lq)).sum().item())
        kl_sampled.append((lp - lq)[torch.arange(len(r)), torch.tensor(r)].sum().item())
        rewards.append(1 / (1 + math.exp(-f64_score(rm, p, r, EOS))))
    mean = lambda xs: sum(xs) / len(xs)
    assert record["reward"] == pytest.approx(mean(rewards), rel=1e-5)
    assert record["kl"] == pytest.approx(mean(kl), rel=1e-5) and mean(kl) > 1
    assert record["kl_sampled"] == pytest.approx(mean(kl_sampled), rel=1e-4, abs=1e-4)
    assert record["length"] == mean([len(r) for r in responses])
    assert abs(mean(rewards) - 0.5) > 0.05 and abs(mean(kl_sampled) - mean(kl)) > 0.1  # the case tells them apart


def test_pairs_belong_to_the_prompt_their_samples_answer():
    """Hand-worked: sample 10 * n + j answers prompt n; every pair of the 4 samples of a prompt with different
    rewards, the higher one chosen, attached to that prompt."""
    prompts = [[1], [2], [3]]
    samples = [[10 * n + j] for n in range(3) for j in range(4)]
    rewards = [0.1, 0.9, 0.5, 0.5,  0.2, 0.2, 0.2, 0.2,  0.3, 0.1, 0.4, 0.2]
    pairs = stages.pairs_from(prompts, samples, rewards)
    got = sorted(zip(map(tuple, pairs["prompt"]), map(tuple, pairs["chosen"]), map(tuple, pairs["rejected"])))
    want = [((1,), (1,), (0,)), ((1,), (2,), (0,)), ((1,), (3,), (0,)), ((1,), (1,), (2,)), ((1,), (1,), (3,)),
            ((3,), (20,), (21,)), ((3,), (22,), (20,)), ((3,), (20,), (23,)), ((3,), (22,), (21,)),
            ((3,), (23,), (21,)), ((3,), (22,), (23,))]
    assert got == sorted(want)


def test_make_pairs_scores_each_sample_against_its_own_prompt(tmp_path, monkeypatch):
    """make_pairs end to end: every pair's chosen and rejected are samples drawn for its prompt, and r* computed
    in float64 on (that prompt, response) ranks the chosen above the rejected; no pair is missing."""
    # The SFT model at scale 5, not 20: at 20 it copies the prompt's last token with p ~ 0.9, and a prompt's
    # four samples can all be the same (no pairs at all, on model.draw's random stream).
    sft, rm = sharp_gpt(0, scale=5.0), sharp_gpt(1, score_head=True)
    prompts = [[1, 2], [3], [40, 50, 60], [7, 8], [9]]
    args = settings.get_args(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path), "--max-new-tokens", "4",
                            "--block-size", "64"])
    calls = recording(monkeypatch, sampling)
    pairs = stages.make_pairs(sft, rm, prompts, args, EOS)
    drawn = {}  # prompt -> the responses sampled for it
    for (model, asked, *_), _, out in calls:
        for p, r in zip(asked, out):
            drawn.setdefault(tuple(p), []).append(r)
    assert sorted(drawn) == sorted(map(tuple, prompts)) and all(len(v) == 4 for v in drawn.values())
    r_star = lambda p, r: f64_score(rm, p, r, EOS)
    want = sum(a != b for p in prompts for i, a in enumerate(drawn[tuple(p)]) for b in drawn[tuple(p)][i + 1:])
    assert len(pairs["prompt"]) == want >= 10
    for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]):
        assert c in drawn[tuple(p)] and r in drawn[tuple(p)]
        assert r_star(p, c) > r_star(p, r) - 1e-5  # float32 and float64 may order a near-tie apart
    assert (tmp_path / "pairs.pt").exists()  # under --out, and a second call reads it instead of sampling again
    again = stages.make_pairs(sft, rm, prompts, args, EOS)
    assert len(calls) == 1 and again == pairs


def test_best_of_n_is_the_mean_of_the_best_of_the_first_n(tmp_path, monkeypatch):
    """best_of_n.jsonl: for each N, the mean over prompts of the highest r* among a prompt's first N samples,
    recomputed in float64 from the samples it drew; and the KL bound log N - (N - 1) / N."""
    sft, rm = sharp_gpt(0), sharp_gpt(1, score_head=True)
    prompts = [[1, 2], [3], [4, 5, 6]]
    args = settings.get_args(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path), "--max-new-tokens", "4",
                            "--block-size", "64", "--best-of", "1,2,4"])
    calls = recording(monkeypatch, sampling)
    stages.best_of_n(sft, rm, prompts, args, EOS)
    drawn = {}
    for (model, asked, *_), _, out in calls:
        for p, r in zip(asked, out):
            drawn.setdefault(tuple(p), []).append(1 / (1 + math.exp(-f64_score(rm, p, r, EOS))))
    records = [json.loads(x) for x in open(tmp_path / "best_of_n.jsonl")]
    assert [r["n"] for r in records] == [1, 2, 4]
    for rec in records:
        want = np.mean([max(drawn[tuple(p)][:rec["n"]]) for p in prompts])
        assert rec["reward"] == pytest.approx(want, rel=1e-5), rec["n"]
        assert rec["kl_bound"] == pytest.approx(math.log(rec["n"]) - (rec["n"] - 1) / rec["n"])
    assert records[2]["reward"] > np.mean([np.mean(drawn[tuple(p)]) for p in prompts]) + 0.01  # best, not mean


def test_a_trained_classifier_rewards_the_positive_label(tmp_path):
    """stages.classifier on reviews whose label is their vocabulary (positive: words 1-9, negative: 10-19):
    after 40 steps r* > 0.5 on positive texts and < 0.5 on negative ones, and classifier/accuracy.json says so."""
    rng = np.random.default_rng(0)
    eos = 20
    reviews = lambda n, lo, hi: [rng.integers(lo, hi, int(rng.integers(14, 24))).tolist() for _ in range(n)]
    train = reviews(64, 1, 10) + reviews(64, 10, 20)
    test = reviews(10, 1, 10) + reviews(10, 10, 20)
    data = dict(tokenizer="gpt2", train=make_split(train, [1] * 64 + [0] * 64),
                test=make_split(test, [1] * 10 + [0] * 10))
    args = settings.get_args(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path), "--n-layer", "1",
                            "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--max-new-tokens", "8",
                            "--classifier-steps", "40", "--classifier-lr", "3e-3", "--batch", "16", "--warmup", "1"])
    rm = stages.classifier(args, data, eos, eos + 1, stages.make_model(args, eos + 1))
    r = torch.sigmoid(torch.tensor([f64_score(rm, [], t, eos) for t in test]))
    assert (r[:10] > 0.5).all() and (r[10:] < 0.5).all()
    acc = json.load(open(tmp_path / "classifier" / "accuracy.json"))
    assert (tmp_path / "classifier" / "model.pt").exists()  # the stage's folder, as the settings record names it
    assert acc["whole"] == 1.0 and acc["scored"] == 1.0 and acc["scored_len"] == 16 and acc["reviews"] == 20


def test_classifier_loss_is_the_binary_cross_entropy_of_the_head():
    """classifier_loss on a batch of review_batches: -mean(y log r + (1 - y) log(1 - r)) with r = sigmoid of the
    head (float64, on each review alone), and its accuracy (r > 0.5) == label."""
    rm = sharp_gpt(1, score_head=True)
    rng = np.random.default_rng(4)
    reviews = [rng.integers(0, 256, int(rng.integers(5, 20))).tolist() for _ in range(8)]
    labels = [1, 0, 0, 1, 1, 1, 0, 1]
    batch = stages.ReviewBatches(make_split(reviews, labels), 8, 64, EOS, 0)(0)
    loss, metrics = stages.classifier_loss(rm, batch)
    rows = [reviews.index(batch[0][i][batch[2][i]][1:].tolist()) for i in range(8)]  # BOS, the review, then EOS
    z = [f64_score(rm, [], reviews[k], EOS) for k in rows]
    y = [labels[k] for k in rows]
    want = -np.mean([yi * math.log(1 / (1 + math.exp(-zi))) + (1 - yi) * math.log(1 / (1 + math.exp(zi)))
                     for yi, zi in zip(y, z)])
    assert loss.item() == pytest.approx(want, rel=1e-5)
    acc = np.mean([(zi > 0) == bool(yi) for yi, zi in zip(y, z)])
    assert metrics["acc"] == pytest.approx(acc) and 0 < acc < 1


def test_classifier_accuracy_on_a_hand_labelled_split(tmp_path):
    """accuracy.json on six reviews labelled so that the head (float64) is right on 4 of 6 whole reviews;
    cut to the scored length its accuracy is counted the same way on the cut texts."""
    rm = sharp_gpt(1, score_head=True)
    rng = np.random.default_rng(3)
    reviews = [rng.integers(0, 256, 20).tolist() for _ in range(6)]
    sign = lambda texts: [f64_score(rm, [], t, EOS) > 0 for t in texts]
    whole, cut = sign(reviews), sign([r[:12] for r in reviews])  # scored_len = 8 + max_new_tokens = 12
    labels = [int(s) for s in whole[:4]] + [int(not s) for s in whole[4:]]
    args = settings.get_args(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path), "--max-new-tokens", "4",
                            "--block-size", "64"])
    acc = stages.classifier_accuracy(rm, make_split(reviews, labels), args, EOS)
    assert acc["whole"] == pytest.approx(4 / 6)
    assert acc["scored"] == pytest.approx(np.mean([c == bool(y) for c, y in zip(cut, labels)]))
    assert acc["scored_len"] == 12 and acc["reviews"] == 6
    assert json.load(open(tmp_path / "classifier" / "accuracy.json")) == acc


def test_classifier_crops_stop_at_the_block_when_the_scored_length_exceeds_it():
    """scored_len above the block size: every crop, short half and whole half alike, is 8 .. block_size - 2
    tokens (laid out with BOS and EOS in block_size tokens, block_size - 1 inputs), uniformly; each row keeps
    its EOS."""
    reviews = [[i] + list(range(100, 149)) for i in range(50)]  # 50 tokens each, longer than the block
    get_batch = stages.ReviewBatches(make_split(reviews, [i % 2 for i in range(50)]), 2000, 16, EOS, 3,
                                      scored_len=40)
    idx, targets, mask, _ = get_batch(0)
    lengths = mask.sum(1) - 1
    assert lengths.min() == 8 and lengths.max() == 14 and idx.shape == (2000, 15)
    assert (targets[torch.arange(2000), lengths] == EOS).all()  # the target after the text's last token
    assert 215 < (lengths == 14).sum() < 360  # 2000 / 7 expected from both halves (143 if only one reached 14)


def test_classifier_loss_and_accuracy_of_a_constant_head_hand_worked():
    """A head that scores every text c (weight 0, bias c): the loss is -(p log sigmoid(c) + (1 - p) log sigmoid(-c))
    with p the share of positive labels in the batch, and the accuracy is p for c > 0 and 1 - p for c < 0, at
    |c| below and above 1."""
    reviews = [[i, i + 1, i + 2, i + 3] for i in range(10)]
    batch = stages.ReviewBatches(make_split(reviews, [1, 1, 1, 0, 1, 0, 1, 1, 0, 1]), 12, 64, EOS, 0)(0)
    p = batch[3].double().mean().item()
    assert 0 < p < 1
    for c in (0.5, -0.5, 2.0, -3.0):
        model = scores.with_zero_head(tiny_gpt(0), "cpu")
        with torch.no_grad():
            model.score_head.bias.fill_(c)
        loss, metrics = stages.classifier_loss(model, batch)
        sig = lambda x: 1 / (1 + math.exp(-x))
        assert loss.item() == pytest.approx(-(p * math.log(sig(c)) + (1 - p) * math.log(sig(-c))), rel=1e-6)
        assert metrics["acc"] == pytest.approx(p if c > 0 else 1 - p), c


def test_the_classifier_trains_on_crops_at_the_warmup_learning_rate(tmp_path, monkeypatch):
    """stages.classifier's one step: on reviews cut to the scored length (8 + --max-new-tokens = 16) half the time,
    so shorter than every whole review; and at --classifier-lr / --warmup: AdamW's first step moves each weight by the
    learning rate (m / sqrt(v) = g / |g|), so the largest move from the SFT weights it starts from is 1e-2 / 4."""
    rng = np.random.default_rng(1)
    eos = 20
    train_reviews = [rng.integers(0, 20, int(rng.integers(24, 30))).tolist() for _ in range(32)]
    data = dict(tokenizer="gpt2", train=make_split(train_reviews, [k % 2 for k in range(32)]),
                test=make_split(train_reviews[:4], [0, 1, 0, 1]))
    args = settings.get_args(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path), "--n-layer", "1",
                            "--n-head", "2", "--n-embd", "32", "--block-size", "48", "--max-new-tokens", "8",
                            "--classifier-steps", "1", "--classifier-lr", "1e-2", "--batch", "32", "--warmup", "4"])
    sft_model = stages.make_model(args, eos + 1)
    before = {k: v.clone() for k, v in sft_model.state_dict().items()}
    batches = recording(monkeypatch, stages, "classifier_loss")
    rm = stages.classifier(args, data, eos, eos + 1, sft_model)
    (_, batch), _, _ = batches[0]
    idx, _, mask, _ = batch
    lengths = (mask.sum(1) - 1).tolist()
    for row, n in zip(idx.tolist(), lengths):  # BOS, a prefix of a training review
        assert any(row[1:n + 1] == r[:n] for r in train_reviews)
    assert min(lengths) >= 8 and sum(n <= 16 for n in lengths) >= 8 and max(lengths) >= 24
    moves = [(rm.state_dict()[k] - v).abs().max().item() for k, v in before.items() if not k.startswith("score_head")]
    assert max(moves) == pytest.approx(1e-2 / 4, rel=1e-3)


def test_sft_steps_down_the_nll_of_its_batch_at_the_warmup_learning_rate(tmp_path):
    """stages.sft's one step: the next-token NLL of the batch it trained on goes down (a step up it would be a sign
    error), and at --sft-lr / --warmup: AdamW's first step moves each weight by the learning rate, so the largest
    move from the seeded initial weights is 1e-3 / 4."""
    data = stages.load_data(str(tmp_path / "data"), "tiny")
    eos = WordTokenizer(data["words"]).eot_token
    args = settings.get_args(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path / "out"), "--n-layer",
                              "1", "--n-head", "2", "--n-embd", "32", "--batch", "8", "--sft-steps", "1",
                              "--sft-lr", "1e-3", "--warmup", "4"])
    before = stages.make_model(args, eos + 1)  # seeded by --seed, as sft makes it
    idx, targets, mask, _ = stages.ReviewBatches(data["train"], 8, args.block_size, eos, args.seed)(0)
    nll = lambda m: -common.masked_mean(common.logprobs(m, None, idx, targets, mask, "reference").token_pol, mask).item()
    model = stages.sft(args, data, eos, eos + 1)
    assert nll(model) < nll(before) - 1e-3
    moves = [(p - q).abs().max().item() for p, q in zip(model.parameters(), before.parameters())]
    assert max(moves) == pytest.approx(1e-3 / 4, rel=1e-3)


# ---------------------------------------------------------------- chunk boundaries (64 in evaluate)

def test_evaluation_over_more_than_two_chunks_of_64_is_the_float64_mean_of_every_sample(monkeypatch):
    """evaluate on 130 prompts (chunks 0-63, 64-127, 128-129 of its KL loop, on cpu): reward, exact KL, sampled KL
    and length are the means over all 130 samples of their float64 values, each computed on the sample's own prompt;
    the first n_samples records pair each prompt with its own response and reward."""
    policy, ref, rm = sharp_gpt(0, scale=5.0), sharp_gpt(2, scale=5.0), sharp_gpt(1, score_head=True)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, int(rng.integers(1, 4))).tolist() for _ in range(130)]
    samples = recording(monkeypatch, stages)
    record = stages.evaluate(policy, ref, rm, prompts, eos=EOS, seed=0, max_new_tokens=3, block_size=64,
                             device="cpu", impl="auto", decode=lambda ids: list(ids), n_samples=3)
    (args, kwargs, responses), = samples
    assert args[1] == prompts and len(responses) == 130
    assert args[2:5] == (3, EOS, 0) and kwargs.get("temperature", 1.0) == 1.0  # the evaluation seed, temperature 1
    p64, q64, rm64 = (copy.deepcopy(m).double().eval() for m in (policy, ref, rm))
    kl, kl_sampled, rewards = [], [], []
    with torch.no_grad():
        for p, r in zip(prompts, responses):
            seq = torch.tensor([[EOS] + p + r])
            lp = torch.log_softmax(p64.lm_head(p64(seq)), -1)[0, len(p): len(p) + len(r)]
            lq = torch.log_softmax(q64.lm_head(q64(seq)), -1)[0, len(p): len(p) + len(r)]
            kl.append((lp.exp() * (lp - lq)).sum().item())
            kl_sampled.append((lp - lq)[torch.arange(len(r)), torch.tensor(r)].sum().item())
            text = torch.tensor([[EOS] + p + [t for t in r if t != EOS]])
            rewards.append(1 / (1 + math.exp(-rm64.score_head(rm64(text)[0, -1]).item())))
    mean = lambda xs: sum(xs) / len(xs)
    assert record["reward"] == pytest.approx(mean(rewards), rel=1e-5)
    assert record["kl"] == pytest.approx(mean(kl), rel=1e-5)
    assert record["kl_sampled"] == pytest.approx(mean(kl_sampled), rel=1e-4, abs=1e-4)
    assert record["length"] == mean([len(r) for r in responses])
    assert [(s["prompt"], s["response"], s["prompt_ids"], s["response_ids"]) for s in record["samples"]] == \
        [(p, r, p, r) for p, r in zip(prompts[:3], responses[:3])]
    assert [s["reward"] for s in record["samples"]] == pytest.approx(rewards[:3], rel=1e-5)
    # the case tells a dropped, repeated or misaligned chunk apart: the last two samples weigh in the means
    assert abs(mean(kl[:128]) - mean(kl)) > 1e-4 and abs(mean(rewards[:128]) - mean(rewards)) > 1e-5
    assert policy.training  # evaluate puts the policy back in train mode


def test_evaluation_length_and_kls_count_the_eos_a_response_drew(monkeypatch):
    """evaluate with a policy whose EOS has probability ~0.2 at every step (on cpu): length is the mean number of
    response tokens with the EOS counted, and both KLs include the EOS token's term (float64, on each sample)."""
    policy, ref, rm = tiny_gpt(0), sharp_gpt(2, scale=3.0), sharp_gpt(1, score_head=True)
    with torch.no_grad():  # as in test_samples_keep_the_eos_they_drew
        policy.transformer.ln_f.bias.copy_(torch.linspace(-1, 1, 32))
        policy.transformer.wte.weight[EOS] = torch.linspace(-1, 1, 32) * 0.37
    prompts = [[1, 2], [3], [4, 5, 6], [7]] * 5
    samples = recording(monkeypatch, stages)
    record = stages.evaluate(policy, ref, rm, prompts, eos=EOS, seed=0, max_new_tokens=6, block_size=64,
                             device="cpu", impl="auto")
    (_, _, responses), = samples
    assert sum(r[-1] == EOS for r in responses) >= 3 and any(len(r) == 6 and EOS not in r for r in responses)
    assert record["length"] == pytest.approx(np.mean([len(r) for r in responses]))  # 5 words + EOS: 6
    kl, kl_sampled = [], []
    for p, r in zip(prompts, responses):
        lp, lq = f64_dists(policy, p, r, EOS), f64_dists(ref, p, r, EOS)
        kl.append((lp.exp() * (lp - lq)).sum().item())
        kl_sampled.append((lp - lq)[torch.arange(len(r)), torch.tensor(r)].sum().item())
    assert record["kl"] == pytest.approx(np.mean(kl), rel=1e-5)
    assert record["kl_sampled"] == pytest.approx(np.mean(kl_sampled), rel=1e-4, abs=1e-4)


def test_best_of_n_hand_worked(tmp_path, monkeypatch):
    """best_of_n.jsonl from hand-set r*: prompt A's 4 samples score 0.1, 0.7, 0.3, 0.9 and prompt B's 0.6, 0.2, 0.8,
    0.4, so N=1: (0.1 + 0.6) / 2, N=2: (0.7 + 0.6) / 2, N=4: (0.9 + 0.8) / 2; each record with its own N's bound."""
    table = {(1, 2): [0.1, 0.7, 0.3, 0.9], (3,): [0.6, 0.2, 0.8, 0.4]}

    def fake(model, score_fn, prompts, args, eos, purpose):  # the k-th sample of a prompt gets its k-th reward
        seen = {}
        rewards = []
        for p in prompts:
            k = seen[tuple(p)] = seen.get(tuple(p), -1) + 1
            rewards.append(table[tuple(p)][k])
        return [[5]] * len(prompts), rewards
    monkeypatch.setattr(stages, "sample_and_score", fake)
    args = settings.get_args(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path), "--best-of", "4,1,2"])
    stages.best_of_n(None, None, [[1, 2], [3]], args, EOS)
    records = [json.loads(x) for x in open(tmp_path / "best_of_n.jsonl")]
    assert [r["n"] for r in records] == [1, 2, 4]
    assert [r["reward"] for r in records] == pytest.approx([0.35, 0.65, 0.85])
    assert [r["kl_bound"] for r in records] == pytest.approx([0, math.log(2) - 0.5, math.log(4) - 0.75])


def test_classifier_accuracy_hand_worked_prefix_cut(tmp_path, monkeypatch):
    """classifier_accuracy with a hand-set head (on cpu): +1 if a text's last token is even, -1 if odd, so that the
    whole review is judged by its last token and the cut (its first scored_len = 8 + 4 = 12 tokens) by token 11.
    Four reviews [0] * 11 + [a] + [0] * 7 + [b] with (a, b, label): (2, 2, 1) both right, (3, 2, 1) whole right,
    cut wrong, (3, 5, 0) both right, (2, 5, 0) whole right, cut wrong: whole 1, scored 1/2."""
    def head(rm, prompts, responses, eos, block_size, device):
        assert all(p == [] for p in prompts)  # the review alone, as the classifier was trained on it
        return torch.tensor([1.0 if r[-1] % 2 == 0 else -1.0 for r in responses])
    monkeypatch.setattr(stages, "score", head)
    cases = [(2, 2, 1), (3, 2, 1), (3, 5, 0), (2, 5, 0)]
    reviews = [[0] * 11 + [a] + [0] * 7 + [b] for a, b, _ in cases]
    args = settings.get_args(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path), "--max-new-tokens", "4",
                            "--block-size", "64"])
    acc = stages.classifier_accuracy(None, make_split(reviews, [y for *_, y in cases]), args, EOS)
    assert acc == dict(whole=1.0, scored=0.5, scored_len=12, reviews=4)


def test_evaluation_runs_the_policy_without_dropout(monkeypatch):
    """evaluate of a policy with dropout 0.5 (on cpu; the pipeline's models have none, a user's may) against its
    own copy in eval mode as pi_ref: both KLs are 0, so the policy sampled and was scored without dropout; and it
    comes back in train mode."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    policy = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=1, n_head=2, n_embd=32, dropout=0.5)).train()
    ref = copy.deepcopy(policy).eval()
    record = stages.evaluate(policy, ref, sharp_gpt(1, score_head=True), [[1, 2], [3], [4, 5, 6]], eos=EOS, seed=0,
                             max_new_tokens=6, block_size=64, device="cpu", impl="auto")
    assert record["kl"] == pytest.approx(0, abs=1e-6) and record["kl_sampled"] == pytest.approx(0, abs=1e-5)
    assert policy.training
