"""
Sampling and scoring, which pairs (4), the online runs (5) and evaluation (6) share: completions of
a policy, the text a scalar head reads, its logit or r*'s p(positive), and samples drawn and scored
by every rank a share of the prompts.
"""
import json
import os
from functools import partial
from typing import NamedTuple

import torch

from common import amp, derive_seed, layout, pack, real_lengths, sharded
from model import left_pad


@torch.no_grad()
def sample(model, prompts, max_new_tokens, eos, seed, device, temperature=1.0):
    """One completion per prompt (temperature 1, no top-k, in the pipeline; 0 is greedy), each from
    common.layout(prompt, []), as token lists ending in EOS if it came."""
    out = []
    g = torch.Generator(device=device).manual_seed(seed)
    for i in range(0, len(prompts), 256):
        idx, pmask = left_pad([layout(p, [], eos) for p in prompts[i:i + 256]], eos)
        with amp(device):
            new, new_mask = model.generate(idx.to(device), pmask.to(device), max_new_tokens,
                                           temperature=temperature, eos=eos, generator=g)
        out += [row[m].tolist() for row, m in zip(new.cpu(), new_mask.cpu())]
    return out


def score_batch(prompts, responses, eos, block_size):
    """What every scalar head reads (the classifier r* and PPO's reward model): the text prompt +
    response (its EOS, if any, dropped) in the SFT's layout, common.layout([], text + [EOS]),
    right-padded. Returns idx (B, T) and mask (B, T); the head reads the hidden state of the last
    True, the text's last token."""
    seqs = [p + [t for t in r if t != eos] + [eos] for p, r in zip(prompts, responses)]
    idx, _, mask = pack([[]] * len(seqs), seqs, block_size, eos)
    return idx, mask


@torch.no_grad()
def score(model, prompts, responses, eos, block_size, device):
    """The scalar head's logit on each (prompt, response), in chunks of 256."""
    out = []
    for i in range(0, len(prompts), 256):
        batch = score_batch(prompts[i:i + 256], responses[i:i + 256], eos, block_size)
        idx, mask = (x.to(device) for x in batch)
        with amp(device):
            out.append(model.score(model(idx, lengths=real_lengths(mask)), mask).float().cpu())
    return torch.cat(out)


def calibrated(classifier, folder):
    """The classifier with folder/calibration.json (calibration.calibrate's fit on held-out reviews)
    folded into its head; model.pt keeps the head as trained."""
    with open(os.path.join(folder, "calibration.json")) as f:
        cal = json.load(f)
    classifier.calibrate_score(cal["scale"], cal["shift"])
    return classifier


def reward(classifier, prompts, responses, eos, block_size, device):
    """r*(x, y) = p(positive) of the classifier."""
    return torch.sigmoid(score(classifier, prompts, responses, eos, block_size, device))


class Score(NamedTuple):
    """A score of (prompts, responses) -> (B,) from a scalar head: r*, the classifier's p(positive)
    (probability), or the head's logit (PPO's reward model r_phi)."""
    model: torch.nn.Module
    eos: int
    block_size: int
    device: str
    probability: bool = False

    def __call__(self, prompts, responses):
        of = reward if self.probability else score
        return of(self.model, prompts, responses, self.eos, self.block_size, self.device)


def sample_and_score(model, score_fn, prompts, args, eos, purpose):
    """One sample of model per prompt and score_fn(prompts, samples) of each (r*, or a score PPO
    normalises), as lists. Under torchrun every rank draws its share of the chunks (each chunk
    seeded by (seed, purpose, its start)) and every rank gets them all."""
    draw = partial(draw_and_score, model=model, score_fn=score_fn, args=args, eos=eos,
                   purpose=purpose)
    samples, scores = zip(*sharded(draw, prompts))
    return list(samples), list(scores)


def draw_and_score(chunk, start, model, score_fn, args, eos, purpose):
    """[(sample, score)] of a chunk of prompts that starts at `start` of the list (its seed)."""
    seed = derive_seed(args.seed, purpose, start)
    samples = sample(model, chunk, args.max_new_tokens, eos, seed, args.device)
    return list(zip(samples, score_fn(chunk, samples).tolist()))
