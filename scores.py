"""
What the online runs of ppo.py train on (5a of ppo.py's story): the reward model r_phi, the SFT
model with a scalar head trained with the Bradley-Terry loss on the pairs DPO trains on (PPO, RLOO,
GRPO), or the classifier r* itself (PPO-GT); each normalised by a fixed affine map to mean 0 and std
1 on samples of pi_ref.
"""
import copy
import json
import os
from functools import partial
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

from common import accuracy, barrier, fit, is_main, rank_world, real_lengths, unwrap
from data.corpus import write_atomic
from data.pairs import batch_rows
from sampling import Score, sample_and_score, score, score_batch

MAX_NORM_SAMPLES = 1024  # SFT samples that fix each score's affine normalisation


# ------------------------------------------------------------ the reward model r_phi
def with_zero_head(model, device):
    """A copy of model with a zero-initialised scalar head: its first scores (or values) are all
    0."""
    copied = copy.deepcopy(model)
    copied.score_head = torch.nn.Linear(copied.config.n_embd, 1).to(device)
    torch.nn.init.zeros_(copied.score_head.weight), torch.nn.init.zeros_(copied.score_head.bias)
    return copied


def bradley_terry_loss(model, batch):
    """-log sigmoid(r(x, y_w) - r(x, y_l)): chosen rows first, then the rejected ones, in score
    layout."""
    idx, mask = batch
    s = unwrap(model).score(model(idx, lengths=real_lengths(mask)), mask).float()
    n = len(s) // 2
    margin = s[:n] - s[n:]
    return -F.logsigmoid(margin).mean(), {"acc": accuracy(margin)}


def pair_score_batch(pairs, rows, eos, block_size):
    """The pairs of `rows` in score layout: the chosen texts, then the rejected ones."""
    prompts = [pairs["prompt"][i] for i in rows]
    responses = [pairs["chosen"][i] for i in rows] + [pairs["rejected"][i] for i in rows]
    return score_batch(prompts + prompts, responses, eos, block_size)


class ScorePairBatches(NamedTuple):
    """batches(step): this rank's share of `batch` pairs drawn by (seed, step), in score layout."""
    pairs: dict
    batch: int
    block_size: int
    eos: int
    seed: int

    def __call__(self, step):
        rank, world = rank_world()
        rows = batch_rows(self.pairs, self.batch, self.seed, step)[rank::world]
        return pair_score_batch(self.pairs, rows, self.eos, self.block_size)


def heldout_accuracy(model, heldout, eos, block_size, device):
    """How often the reward model scores the chosen response of a held-out pair above the rejected
    one."""
    s_chosen, s_rejected = (score(model, heldout["prompt"], heldout[k], eos, block_size, device)
                            for k in ("chosen", "rejected"))
    return dict(heldout_acc=accuracy(s_chosen - s_rejected))


def reward_model(sft_model, pairs, heldout, args, eos):
    """r_phi, initialised from the SFT model (a zero scalar head) and trained on DPO's pairs; its
    accuracy on the pairs of held-out prompts is evaluated as it trains
    (out/<preset>/reward_model/eval.jsonl)."""
    batches = ScorePairBatches(pairs, args.batch, args.block_size, eos, args.seed + 4)
    accuracy_of = partial(heldout_accuracy, heldout=heldout, eos=eos, block_size=args.block_size,
                          device=args.device)
    return fit("reward_model", with_zero_head(sft_model, args.device), bradley_terry_loss, batches,
               args.bt_steps, args.bt_lr, args, evaluate=accuracy_of).eval()


def normalised(score_fn, sft_model, prompts, args, eos, name):
    """score_fn(prompts, responses) with a fixed affine map to mean 0 and std 1 on samples of pi_ref
    (one per prompt, at most MAX_NORM_SAMPLES), computed once and kept in
    out/<preset>/score_norm_<name>.json."""
    path = os.path.join(args.out, f"score_norm_{name}.json")
    # under torchrun every rank samples a share, rank 0 writes, every rank reads
    if not os.path.exists(path):
        _, scores = sample_and_score(sft_model, score_fn, prompts[:MAX_NORM_SAMPLES], args, eos,
                                     f"score_norm_{name}")
        s = torch.tensor(scores)
        norm = json.dumps(dict(mean=s.mean().item(), std=s.std().item()))
        if is_main():
            write_atomic(path, lambda f: f.write(norm.encode()))
    barrier()
    with open(path) as f:
        norm = json.load(f)
    return Normalised(score_fn, norm["mean"], norm["std"])


class Normalised(NamedTuple):
    """(score_fn(prompts, responses) - mean) / std, the score an online run trains on."""
    score_fn: Callable
    mean: float
    std: float

    def __call__(self, prompts, responses):
        return (self.score_fn(prompts, responses) - self.mean) / self.std


# ------------------------------------------------------------ the scores, normalised
def score_functions(sft_model, classifier, pairs, heldout, train_prompts, args, eos, scores):
    """{'rm': the normalised reward model r_phi, 'gt': the normalised r*}, for the scores asked for
    (METHODS[method].score says which an online method trains on)."""
    fns = {}
    if "gt" in scores:
        r_star = Score(classifier, eos, args.block_size, args.device, probability=True)
        fns["gt"] = normalised(r_star, sft_model, train_prompts, args, eos, "gt")
    if "rm" in scores:
        learned = reward_model(sft_model, pairs, heldout, args, eos)
        r_phi = Score(learned, eos, args.block_size, args.device)
        fns["rm"] = normalised(r_phi, sft_model, train_prompts, args, eos, "rm")
    return fns
