"""
The stages around the algorithms (numbering of common.py), each trained by common.train:
  2. the SFT reference pi_ref: a language model on the reviews              sft
  3. the ground-truth reward r*: a sentiment classifier on the labels        classifier
  4. preference pairs from pi_ref's samples, scored by r*                    make_pairs, pairs_from
     and the Best-of-N baseline drawn on the frontier                        best_of_n
  6. evaluation: samples of a policy, their mean r* and exact KL to pi_ref   evaluate
and the sampling and scoring that 4, 5 and 6 share                          sample, score, reward
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from common import accuracy, amp, barrier, log, logprobs, make_model, masked_mean, pack, rank_world, train, unwrap
from data.corpus import load_checkpoint, save_checkpoint, write_atomic
from model import left_pad


# ----------------------------------------------------------------------------- 2. SFT and 3. the classifier
def review_batches(split, batch, block_size, eos, seed, crop):
    """get_batch(step) over reviews, deterministic in (seed, step) so that a resumed run sees the same
    batches. A review becomes EOS + its tokens + EOS (cut at the block size); crop=True takes a prefix of
    random length (the classifier must also judge the short texts that it scores later). The fourth
    tensor holds the labels."""
    def get_batch(step):
        rng, (rank, world) = np.random.default_rng([seed, step]), rank_world()
        rows = rng.integers(len(split), size=batch)[rank::world]
        seqs = []
        for i in rows:
            r = split.review(i).tolist()
            seqs.append((r[: rng.integers(16, block_size - 1)] if crop else r) + [eos])
        idx, targets, mask = pack([[eos]] * len(seqs), seqs, block_size, pad=eos)
        return idx, targets, mask, torch.tensor(split.labels[rows], dtype=torch.float)
    return get_batch


def sft(args, data, eos, vocab):
    """The reference pi_ref: next-token NLL on whole reviews (a pretrained GPT-2 fine-tuned, or from scratch)."""
    def nll(model, batch):
        idx, targets, mask, _ = batch
        return -masked_mean(logprobs(model, None, idx, targets, mask, args.impl).token_pol, mask), {}
    return train("sft", make_model(args, vocab), nll, review_batches(data["train"], args.batch, args.block_size, eos,
                 args.seed, crop=False), args.sft_steps, args.sft_lr, out=args.out, device=args.device,
                 warmup=args.warmup, log_every=args.log_every, ckpt_every=args.eval_every)


def classifier_loss(model, batch):
    """Binary cross-entropy of the scalar head, read at the last input token (the text's last token)."""
    idx, targets, mask, labels = batch
    logit = unwrap(model).score(model(idx), mask)
    acc = accuracy(logit.float() * (2 * labels - 1))  # above 0: the side of the label
    return F.binary_cross_entropy_with_logits(logit.float(), labels), {"acc": acc}


def classifier(args, data, eos, vocab, sft_model):
    """The ground truth r*: p(positive) of a GPT with a scalar head, trained on the labels."""
    rm = make_model(args, vocab, score_head=True)
    if args.init == "scratch":  # a classifier from scratch learns slowly: start from the SFT model's weights
        rm.load_state_dict(sft_model.state_dict(), strict=False)
    rm = train("reward", rm, classifier_loss, review_batches(data["train"], args.batch, args.block_size, eos,
               args.seed + 1, crop=True), args.rm_steps, args.rm_lr, out=args.out, device=args.device,
               warmup=args.warmup, log_every=args.log_every, ckpt_every=args.eval_every).eval()
    classifier_accuracy(rm, data["test"], args, eos)
    return rm


@torch.no_grad()
def classifier_accuracy(rm, split, args, eos):
    """Accuracy of r* > 0.5 on every review of the split, read whole (as far as the block size allows);
    r* = 0.5 counts half."""
    reviews = [split.review(i).tolist() for i in range(len(split))]
    logit = score(rm, [[]] * len(reviews), reviews, eos, args.block_size, args.device)
    acc = accuracy(logit * (2 * torch.from_numpy(split.labels).float() - 1))
    log(f"[reward] classifier accuracy on all {len(reviews)} test reviews: {acc:.3f}")
    return acc


# ----------------------------------------------------------------------------- sampling and scoring (stages 4, 5 and 6)
@torch.no_grad()
def sample(model, prompts, max_new_tokens, eos, seed, device):
    """One completion per prompt at temperature 1 (no top-k), as token lists ending in EOS if it came."""
    out = []
    g = torch.Generator(device=device).manual_seed(seed)
    for i in range(0, len(prompts), 256):
        idx, pmask = left_pad(prompts[i:i + 256], eos)
        with amp(device):
            new, new_mask = model.generate(idx.to(device), pmask.to(device), max_new_tokens, temperature=1.0,
                                           eos=eos, generator=g)
        out += [row[m].tolist() for row, m in zip(new.cpu(), new_mask.cpu())]
    return out


def score_batch(prompts, responses, eos, block_size):
    """The layout every scalar head reads (the classifier r* and PPO's reward model): EOS + prompt +
    response + EOS, right-padded. Returns idx (B, T) and mask (B, T), the head reading the last True."""
    seqs = [p + [t for t in r if t != eos] + [eos] for p, r in zip(prompts, responses)]
    idx, _, mask = pack([[eos]] * len(seqs), seqs, block_size, eos)
    return idx, mask


@torch.no_grad()
def score(model, prompts, responses, eos, block_size, device):
    """The scalar head's logit on each (prompt, response), in chunks of 256."""
    out = []
    for i in range(0, len(prompts), 256):
        idx, mask = (x.to(device) for x in score_batch(prompts[i:i + 256], responses[i:i + 256], eos, block_size))
        with amp(device):
            out.append(model.score(model(idx), mask).float().cpu())
    return torch.cat(out)


def reward(rm, prompts, responses, eos, block_size, device):
    """r*(x, y) = p(positive) of the classifier."""
    return torch.sigmoid(score(rm, prompts, responses, eos, block_size, device))


# ----------------------------------------------------------------------------- 4. preference pairs
def make_pairs(sft_model, rm, prompts, args, eos, name="pairs.pt"):
    """4 samples per prompt from pi_ref, scored by r*; all 6 pairs, chosen = higher reward, ties dropped."""
    path = os.path.join(args.out, name)
    if not os.path.exists(path) and rank_world()[0] == 0:  # under torchrun rank 0 samples, every rank reads its file
        sft_model.eval()
        repeated = [p for p in prompts for _ in range(4)]
        samples = sample(sft_model, repeated, args.max_new_tokens, eos, args.seed, args.device)
        rewards = reward(rm, repeated, samples, eos, args.block_size, args.device)
        pairs = pairs_from(prompts, samples, rewards.tolist(), eos)
        log(f"[pairs] {len(pairs['prompt'])} pairs from {len(prompts)} prompts ({name}); "
            f"mean reward of pi_ref samples {rewards.mean().item():.3f}")
        save_checkpoint(pairs, path)
    barrier()
    return load_checkpoint(path)


def pairs_from(prompts, samples, rewards, eos, k=4):
    """samples[k*i : k*(i+1)] answer prompts[i]; every pair of them with different rewards becomes
    (prompt, chosen = the higher reward, rejected), each response ending in EOS (appended if cut off)."""
    pairs = dict(prompt=[], chosen=[], rejected=[])
    with_eos = lambda r: r if r[-1:] == [eos] else r + [eos]
    for n, p in enumerate(prompts):
        for i in range(k * n, k * n + k):
            for j in range(i + 1, k * n + k):
                if rewards[i] != rewards[j]:  # ties are dropped
                    hi, lo = (i, j) if rewards[i] > rewards[j] else (j, i)
                    pairs["prompt"].append(p)
                    pairs["chosen"].append(with_eos(samples[hi]))
                    pairs["rejected"].append(with_eos(samples[lo]))
    return pairs


def best_of_n_kl(n):
    """Best-of-N's KL(pi_BoN || pi_ref) is at most log N - (N - 1) / N (Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


@torch.no_grad()
def best_of_n(sft_model, rm, prompts, args, eos):
    """The Best-of-N baseline: N samples of pi_ref per held-out prompt, keep the one r* likes best."""
    path = os.path.join(args.out, "best_of_n.jsonl")
    ns = sorted(int(n) for n in args.best_of.split(","))
    if os.path.exists(path) or rank_world()[0] != 0:
        return
    many = [p for p in prompts for _ in range(ns[-1])]
    samples = sample(sft_model, many, args.max_new_tokens, eos, args.seed + 1, args.device)
    r = reward(rm, many, samples, eos, args.block_size, args.device).view(len(prompts), ns[-1])
    records = [dict(n=n, reward=r[:, :n].max(1).values.mean().item(), kl_bound=best_of_n_kl(n)) for n in ns]
    write_atomic(path, lambda f: f.write("".join(json.dumps(x) + "\n" for x in records).encode()))
    log("[best-of-n] " + ", ".join(f"N={x['n']}: {x['reward']:.3f}" for x in records))


# ----------------------------------------------------------------------------- 6. evaluation
@torch.no_grad()
def evaluate(policy, ref, rm, prompts, *, eos, seed, max_new_tokens, block_size, device, impl, decode=None,
             n_samples=4):
    """Mean r* of policy samples on held-out prompts, and KL(pi || pi_ref) on those samples: exact (the
    per-token KL over the whole vocabulary, summed over the response) and sampled (sum of log-ratios).
    With decode (ids -> text), also the first n_samples (prompt, response, reward) for people to read."""
    policy.eval()
    # the same seed at every evaluation of every run (common random numbers): differences between
    # steps and runs then come from the policies more than from the draw
    responses = sample(policy, prompts, max_new_tokens, eos, seed, device)
    r = reward(rm, prompts, responses, eos, block_size, device)
    kl, kl_sampled = [], []
    for i in range(0, len(prompts), 64):
        resp = [x if x else [eos] for x in responses[i:i + 64]]  # an empty sample still has its EOS
        idx, targets, mask = (x.to(device) for x in pack(prompts[i:i + 64], resp, block_size))
        with amp(device):
            out = logprobs(policy, ref, idx, targets, mask, impl, with_kl=True)
        kl.append(out.kl.sum(-1).float().cpu())
        kl_sampled.append((out.seq_pol - out.seq_ref).float().cpu())
    policy.train()
    record = dict(reward=r.mean().item(), kl=torch.cat(kl).mean().item(), kl_sampled=torch.cat(kl_sampled).mean().item(),
                  length=float(np.mean([len(x) for x in responses])))
    if decode is not None:
        record["samples"] = [dict(prompt=decode(p), response=decode(x), reward=r[i].item(), prompt_ids=p, response_ids=x)
                             for i, (p, x) in enumerate(zip(prompts[:n_samples], responses))]
    return record
