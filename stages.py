"""
The stages around the algorithms (the numbering of common.py):
  1. data: the labelled reviews, and prompts cut from them                  load_data, make_prompts
  2. the SFT reference pi_ref: a language model on the reviews                sft
  3. the ground-truth reward r*: a sentiment classifier on the labels         classifier
  4. preference pairs from pi_ref's samples, scored by r*                     make_pairs, pairs_from
     and the Best-of-N baseline drawn on the frontier                         best_of_n
  6. evaluation: samples of a policy, their mean r* and exact KL to pi_ref    evaluate
SFT and the classifier train with common.fit, on ReviewBatches; sampling.py samples and scores.
"""
import json
import math
import os
from functools import partial
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F

from calibration import against_truth, calibrate, calibration_reviews, describe, exact_truth
from common import (accuracy, amp, barrier, fit, is_main, local_rank_first, log, logprobs,
                    masked_mean, pack, rank_world, real_lengths, sharded, unwrap)
from data.corpus import load_checkpoint, load_corpus, save_checkpoint, write_atomic
from data.tiny.prepare import generator_digest, prepare as prepare_tiny, vocabulary as tiny_vocabulary
from hf import from_pretrained
from model import GPT, GPTConfig
from sampling import Score, reward, sample, sample_and_score, score


# ------------------------------------------------------------ 1. data
def load_data(data_dir, name):
    path = os.path.join(data_dir, f"{name}.npz")
    with local_rank_first():
        data = load_corpus(path) if os.path.exists(path) else None
        # made offline in seconds; also replaces the corpus of another version of the generator
        if name == "tiny" and (data is None or data["source"] != generator_digest()
                               or data["words"] != tiny_vocabulary()):
            prepare_tiny(data_dir)
            data = None
    return data or load_corpus(path)


def make_prompts(split, n, min_chars, rng):
    """Prefixes of 2-8 tokens of reviews longer than min_chars characters (the paper's protocol)."""
    ok = np.flatnonzero(split.chars > min_chars)
    pick = rng.choice(ok, size=min(n, len(ok)), replace=False)
    return [split.review(i)[: rng.integers(2, 9)].tolist() for i in pick]


# ------------------------------------------------------------ the model
def make_model(args, vocab_size, score_head=False):
    """pretrained GPT-2 (args.model), or a GPT of the preset's shape from scratch, seeded by
    args.seed."""
    if args.init == "pretrained":
        with local_rank_first():  # one download per machine
            model = from_pretrained(args.model, dropout=0.0, score_head=score_head)
            return model.to(args.device)
    cfg = GPTConfig(block_size=args.block_size, vocab_size=vocab_size, n_layer=args.n_layer,
                    n_head=args.n_head, n_embd=args.n_embd, score_head=score_head)
    torch.manual_seed(args.seed)
    return GPT(cfg).to(args.device)


# ------------------------------------------------------------ 2. SFT and 3. the classifier
class ReviewBatches(NamedTuple):
    """batches(step): this rank's share of `batch` reviews, deterministic in (seed, step) so that a
    resumed run sees the same batches. A review is laid out as common.layout([], review + [EOS]),
    cut at the block size. With scored_len (the classifier) each review is cut to a random length of
    at least 8 tokens, half the time at most scored_len: the classifier must judge the short texts
    it scores later (a prompt of up to 8 tokens and a response) as well as whole reviews. Returns
    idx, targets, mask (B, T) and the labels (B,)."""
    split: object
    batch: int
    block_size: int
    eos: int
    seed: int
    scored_len: Optional[int] = None
    rows: Optional[int] = None  # draw from the split's first `rows` reviews (default: all)

    def __call__(self, step):
        rng, (rank, world) = np.random.default_rng([self.seed, step]), rank_world()
        rows = rng.integers(self.rows or len(self.split), size=self.batch)
        # drawn for the whole batch: a row's crop does not depend on the ranks
        lengths = [None] * self.batch
        if self.scored_len is not None:
            top = self.block_size - 2
            tops = np.where(rng.random(self.batch) < 0.5, top, min(self.scored_len, top))
            lengths = rng.integers(8, tops + 1)
        rows, lengths = rows[rank::world], lengths[rank::world]
        seqs = [self.split.review(i).tolist()[:n] + [self.eos] for i, n in zip(rows, lengths)]
        idx, targets, mask = pack([[]] * len(seqs), seqs, self.block_size, self.eos)
        return idx, targets, mask, torch.tensor(self.split.labels[rows], dtype=torch.float)


def sft_loss(model, batch, impl="auto"):
    """Next-token NLL of the reviews, per token."""
    idx, targets, mask = batch[:3]  # a review's labels (ReviewBatches') are not read
    return -masked_mean(logprobs(model, None, idx, targets, mask, impl).token_pol, mask), {}


def sft(args, data, eos, vocab):
    """The reference pi_ref: next-token NLL on whole reviews (a pretrained GPT-2 fine-tuned, or from
    scratch)."""
    batches = ReviewBatches(data["train"], args.batch, args.block_size, eos, args.seed)
    loss = partial(sft_loss, impl=args.impl)
    return fit("sft", make_model(args, vocab), loss, batches, args.sft_steps, args.sft_lr, args)


def classifier_loss(model, batch):
    """Binary cross-entropy of the scalar head, read at the last input token (the text's last
    token)."""
    idx, targets, mask, labels = batch
    logit = unwrap(model).score(model(idx, lengths=real_lengths(mask)), mask)
    acc = accuracy(logit.float() * (2 * labels - 1))  # above 0: the side of the label
    return F.binary_cross_entropy_with_logits(logit.float(), labels), {"acc": acc}


def classifier(args, data, eos, vocab, sft_model):
    """The ground truth r*: p(positive) of a GPT with a scalar head, trained on the labels of the
    training reviews but the last calibration_reviews, then calibrated on those."""
    model = make_model(args, vocab, score_head=True)
    # a classifier from scratch learns slowly: start from the SFT model's weights
    if args.init == "scratch":
        model.load_state_dict(sft_model.state_dict(), strict=False)
    train = data["train"]
    n_fit = len(train) - calibration_reviews(train)
    folder = os.path.join(args.out, "classifier")
    if is_main() and not os.path.exists(os.path.join(folder, "model.pt")):
        for name in ("calibration.json", "accuracy.json"):  # of an earlier head, if any
            if os.path.exists(os.path.join(folder, name)):
                os.remove(os.path.join(folder, name))
    batches = ReviewBatches(train, args.batch, args.block_size, eos, args.seed + 1,
                            scored_len(args), rows=n_fit)
    model = fit("classifier", model, classifier_loss, batches, args.classifier_steps,
                args.classifier_lr, args)
    model.eval()
    texts = [train.review(i).tolist()[:scored_len(args)] for i in range(n_fit, len(train))]
    scores = partial(classifier_scores, classifier=model, args=args, eos=eos)
    calibrate(model, scores, texts, train.labels[n_fit:], folder)
    classifier_accuracy(model, data["test"], args, eos, exact_truth(data))
    return model


def scored_len(args):
    """The longest text r* judges in the pipeline: a prompt of up to 8 tokens and a response."""
    return 8 + args.max_new_tokens


def classifier_scores(texts, start, classifier, args, eos):
    """The classifier's logit on each text (a list of token lists), for sharded; start: the chunk's
    start."""
    return score(classifier, [[]] * len(texts), texts, eos, args.block_size, args.device).tolist()


@torch.no_grad()
def classifier_accuracy(classifier, split, args, eos, truth=None):
    """Accuracy of r* > 0.5 on every review of the split (r* = 0.5 counts half), read whole (as far
    as the block size allows) and cut to the length r* judges in the pipeline; with truth
    (exact_truth), r*'s calibration on the whole reviews. Written to
    out/<preset>/classifier/accuracy.json."""
    path = os.path.join(args.out, "classifier", "accuracy.json")
    if not os.path.exists(path):
        reviews = [split.review(i).tolist() for i in range(len(split))]
        sign = 2 * torch.from_numpy(split.labels).float() - 1
        logits = partial(classifier_scores, classifier=classifier, args=args, eos=eos)
        whole_logits = torch.tensor(sharded(logits, reviews))
        whole = accuracy(sign * whole_logits)
        cut = [r[:scored_len(args)] for r in reviews]
        scored = accuracy(sign * torch.tensor(sharded(logits, cut)))
        acc = dict(whole=whole, scored=scored, scored_len=scored_len(args), reviews=len(reviews))
        if truth is not None:
            acc["calibration"] = against_truth(torch.sigmoid(whole_logits), reviews, truth)
        if is_main():
            write_atomic(path, lambda f: f.write(json.dumps(acc).encode()))
        barrier()
    with open(path) as f:
        acc = json.load(f)
    log(f"[classifier] accuracy on all {acc['reviews']} test reviews: {acc['whole']:.3f} whole, "
        f"{acc['scored']:.3f} cut to the scored {acc['scored_len']} tokens")
    if "calibration" in acc:
        log(f"[classifier] calibration on the test reviews: {describe(acc['calibration'])}")
    return acc


# ------------------------------------------------------------ 4. preference pairs
def make_pairs(sft_model, classifier, prompts, args, eos, name="pairs.pt", truth=None):
    """4 samples per prompt from pi_ref, scored by r*; all 6 pairs, chosen = higher reward, ties
    dropped. With truth (exact_truth), r*'s calibration on those samples goes beside, to
    <name>_calibration.json."""
    path = os.path.join(args.out, name)
    # under torchrun every rank samples a share, rank 0 writes, every rank reads
    if not os.path.exists(path):
        sft_model.eval()
        repeated = [p for p in prompts for _ in range(4)]
        r_star = Score(classifier, eos, args.block_size, args.device, probability=True)
        samples, rewards = sample_and_score(sft_model, r_star, repeated, args, eos, name)
        if is_main():
            pairs = pairs_from(prompts, samples, rewards)
            log(f"[pairs] {len(pairs['prompt'])} pairs from {len(prompts)} prompts ({name}); "
                f"mean reward of pi_ref samples {np.mean(rewards):.3f}")
            if truth is not None:
                texts = [p + x for p, x in zip(repeated, samples)]
                cal = against_truth(rewards, texts, truth)
                log(f"[pairs] calibration on pi_ref's samples: {describe(cal)}")
                write_atomic(path.replace(".pt", "_calibration.json"),
                             lambda f: f.write(json.dumps(cal).encode()))
            save_checkpoint(pairs, path)
    barrier()
    return load_checkpoint(path)


def pairs_from(prompts, samples, rewards, k=4):
    """samples[k*i : k*(i+1)] answer prompts[i]; every pair of them with different rewards becomes
    (prompt, chosen = the higher reward, rejected), each response as sampled: a response cut
    at --max-new-tokens gets no EOS it never sampled (measured: results/tiny.md, "Truncated
    responses")."""
    pairs = dict(prompt=[], chosen=[], rejected=[])
    for n, p in enumerate(prompts):
        for i in range(k * n, k * n + k):
            for j in range(i + 1, k * n + k):
                if rewards[i] != rewards[j]:  # ties are dropped
                    hi, lo = (i, j) if rewards[i] > rewards[j] else (j, i)
                    pairs["prompt"].append(p)
                    pairs["chosen"].append(samples[hi])
                    pairs["rejected"].append(samples[lo])
    return pairs


def best_of_n_kl(n):
    """Best-of-N's KL(pi_BoN || pi_ref) is at most log N - (N - 1) / N (Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


@torch.no_grad()
def best_of_n(sft_model, classifier, prompts, args, eos, truth=None):
    """The Best-of-N baseline: N samples of pi_ref per held-out prompt, keep the one r* likes
    best; with truth (exact_truth), the kept samples' mean exact P(label | text) beside r*."""
    path = os.path.join(args.out, "best_of_n.jsonl")
    ns = sorted(int(n) for n in args.best_of.split(","))
    if os.path.exists(path):
        return
    many = [p for p in prompts for _ in range(ns[-1])]
    r_star = Score(classifier, eos, args.block_size, args.device, probability=True)
    # every rank a share
    samples, rewards = sample_and_score(sft_model, r_star, many, args, eos, "best_of_n")
    r = torch.tensor(rewards).view(len(prompts), ns[-1])
    records = [dict(n=n, reward=r[:, :n].max(1).values.mean().item(), kl_bound=best_of_n_kl(n))
               for n in ns]
    if truth is not None:  # the exact P of each prompt's best of its first n samples
        for x in records:
            best = (ns[-1] * i + j for i, j in enumerate(r[:, :x["n"]].argmax(1).tolist()))
            x["reward_exact"] = float(np.mean([truth(many[k] + samples[k]) for k in best]))
    if is_main():
        lines = "".join(json.dumps(x) + "\n" for x in records)
        write_atomic(path, lambda f: f.write(lines.encode()))
    log("[best-of-n] " + ", ".join(f"N={x['n']}: {x['reward']:.3f}" for x in records))


# ------------------------------------------------------------ 6. evaluation
@torch.no_grad()
def evaluate(policy, ref, classifier, prompts, *, eos, seed, max_new_tokens, block_size, device,
             impl, decode=None, n_samples=4, truth=None):
    """Mean r* of policy samples on held-out prompts, and KL(pi || pi_ref) on those samples: exact
    (the per-token KL over the whole vocabulary, summed over the response) and sampled (sum of
    log-ratios). With decode (ids -> text), also the first n_samples (prompt, response, reward) for
    people to read; with truth (exact_truth), the samples' mean exact P(label | text) beside r*
    (reward_exact). The policy samples in eval mode and is handed back in the mode it came in.
    classifier None (--pairs, no r*): the same without the rewards."""
    training = policy.training
    policy.eval()
    # the same seed at every evaluation of every run (common random numbers): differences between
    # steps and runs then come from the policies more than from the draw
    responses = sample(policy, prompts, max_new_tokens, eos, seed, device)
    # no classifier (--pairs): no ground truth to score by
    r = None if classifier is None else reward(classifier, prompts, responses, eos, block_size, device)
    kl, kl_sampled = [], []
    for i in range(0, len(prompts), 64):
        resp = [x if x else [eos] for x in responses[i:i + 64]]  # an empty sample still has its EOS
        idx, targets, mask = (x.to(device) for x in pack(prompts[i:i + 64], resp, block_size, eos))
        with amp(device):
            out = logprobs(policy, ref, idx, targets, mask, impl, with_kl=True)
        kl.append(out.kl.sum(-1).float().cpu())
        kl_sampled.append((out.seq_pol - out.seq_ref).float().cpu())
    policy.train(training)
    record = {} if r is None else dict(reward=r.mean().item())
    record |= dict(kl=torch.cat(kl).mean().item(), kl_sampled=torch.cat(kl_sampled).mean().item(),
                   length=float(np.mean([len(x) for x in responses])))
    if truth is not None:
        record["reward_exact"] = float(np.mean([truth(p + x) for p, x in zip(prompts, responses)]))
    if decode is not None:
        record["samples"] = [dict(prompt=decode(p), response=decode(x),
                                  **({} if r is None else dict(reward=r[i].item())), prompt_ids=p,
                                  response_ids=x)
                             for i, (p, x) in enumerate(zip(prompts[:n_samples], responses))]
    return record

