"""
The stages around DPO in dpo.py's pipeline, trained by its one loop (dpo.train):
  2. the SFT reference pi_ref: a language model on the reviews      review_batches, sft_loss
  3. the ground-truth reward r*: a sentiment classifier on the labels  review_batches, reward_loss
  4. preference pairs from pi_ref's samples, scored by r*             make_pairs, pairs_from
     and the Best-of-N baseline drawn on the frontier                 best_of_n
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from data.corpus import load_checkpoint, save_checkpoint, write_atomic
from dpo import log, logprobs, pack, rank_world, reward, sample


# ----------------------------------------------------------------------------- 2. SFT and 3. the classifier
def review_batches(split, args, eot, seed, crop):
    """get_batch(step) over reviews, deterministic in (seed, step) so that a resumed run sees the same
    batches. A review becomes EOT + its tokens + EOT (cut at the block size); crop=True takes a prefix of
    random length (the classifier must also judge the short texts that it scores later)."""
    def get_batch(step):
        rng, (rank, world) = np.random.default_rng([seed, step]), rank_world()
        rows = rng.integers(len(split), size=args.batch)[rank::world]
        seqs = []
        for i in rows:
            r = split.review(i).tolist()
            seqs.append((r[: rng.integers(16, args.block_size - 1)] if crop else r) + [eot])
        idx, targets, mask = pack([[eot]] * len(seqs), seqs, args.block_size, pad=eot)
        return idx, targets, mask, torch.tensor(split.labels[rows], dtype=torch.float)
    return get_batch


def sft_loss(model, batch, args):
    idx, targets, mask, _ = batch
    out = logprobs(model, None, idx, targets, mask, args)
    return -(out.token_pol.sum() / mask.sum()), {}


def reward_loss(model, batch, args):
    idx, targets, mask, labels = batch
    raw = model.module if hasattr(model, "module") else model
    logit = raw.score(model(idx), mask)  # read at the last input token: the text's last token
    acc = ((logit > 0).float() == labels).float().mean().item()
    return F.binary_cross_entropy_with_logits(logit.float(), labels), {"acc": acc}


@torch.no_grad()
def test_accuracy(rm, split, args, eot, batches=8):
    test = review_batches(split, args, eot, args.seed + 2, crop=False)
    acc = np.mean([reward_loss(rm, [x.to(args.device) for x in test(i)], args)[1]["acc"] for i in range(batches)])
    log(f"[reward] classifier accuracy on {batches * args.batch} test reviews: {acc:.3f}")
    return acc


# ----------------------------------------------------------------------------- 4. preference pairs
def make_pairs(sft, rm, prompts, args, eot):
    """4 samples per prompt from pi_ref, scored by r*; all 6 pairs, chosen = higher reward, ties dropped."""
    path = os.path.join(args.out, "pairs.pt")
    rank, world = rank_world()
    if not os.path.exists(path) and rank == 0:  # under torchrun rank 0 samples, every rank reads its file
        sft.eval()
        repeated = [p for p in prompts for _ in range(4)]
        samples = sample(sft, repeated, args, eot, args.seed)
        rewards = reward(rm, repeated, samples, args, eot)
        pairs = pairs_from(prompts, samples, rewards.tolist(), eot)
        pairs["sft_reward"] = rewards.mean().item()
        log(f"[pairs] {len(pairs['prompt'])} pairs from {len(prompts)} prompts; "
            f"mean reward of pi_ref samples {pairs['sft_reward']:.3f}")
        save_checkpoint(pairs, path)
    if world > 1:
        torch.distributed.barrier()
    return load_checkpoint(path)


def pairs_from(prompts, samples, rewards, eot, k=4):
    """samples[k*i : k*(i+1)] answer prompts[i]; every pair of them with different rewards becomes
    (prompt, chosen = the higher reward, rejected), each response ending in EOS (appended if cut off)."""
    pairs = dict(prompt=[], chosen=[], rejected=[])
    with_eos = lambda r: r if r[-1:] == [eot] else r + [eot]
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
def best_of_n(sft, rm, prompts, args, eot):
    """The Best-of-N baseline: N samples of pi_ref per held-out prompt, keep the one r* likes best."""
    path = os.path.join(args.out, "best_of_n.jsonl")
    ns = sorted(int(n) for n in args.best_of.split(","))
    if os.path.exists(path) or rank_world()[0] != 0:
        return
    many = [p for p in prompts for _ in range(ns[-1])]
    r = reward(rm, many, sample(sft, many, args, eot, args.seed + 1), args, eot).view(len(prompts), ns[-1])
    records = [dict(n=n, reward=r[:, :n].max(1).values.mean().item(), kl_bound=best_of_n_kl(n)) for n in ns]
    write_atomic(path, lambda f: f.write("".join(json.dumps(x) + "\n" for x in records).encode()))
    log("[best-of-n] " + ", ".join(f"N={x['n']}: {x['reward']:.3f}" for x in records))
