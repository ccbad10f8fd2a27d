"""
nanoDPO: Direct Preference Optimization (Rafailov et al., 2023), read top to bottom.

    python dpo.py                  # the imdb preset on a GPU, the tiny one on a CPU (said on the first line)
    python dpo.py --preset tiny    # synthetic reviews, a small GPT from scratch, minutes on a CPU
    python dpo.py --runs dpo:0.1,ppo:6,rloo:0.05    # any subset of the runs, the online ones included
    torchrun --nproc_per_node=8 dpo.py --preset imdb

The controlled sentiment experiment of the paper (Sec. 6.1, App. C.1). Stages 1-4 (data, the SFT
reference pi_ref, the ground-truth reward r*, the preference pairs) are in stages.py, the machinery
(settings, batching, the fused log-probs, the training loop) in common.py, PPO, RLOO and GRPO in ppo.py.
This file is DPO itself: 5. the pairs it trains on and its loss, its successors (SimPO, ORPO, KTO), one
run per beta and the baselines on the same loop, then 6. evaluation of every run on one axis and 7. the
figure. Every stage writes under out/<preset>/, with the settings it was made with; a rerun skips what is
complete.
"""
import copy
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import ppo
import stages
from common import (accuracy, barrier, global_mean, load_data, log, logprobs, make_prompts, masked_mean, pack,
                    rank_world, setup_distributed, train)
from data.corpus import UsageError
from model import get_tokenizer
from plots.frontier import plot_frontier
from settings import (SCORE, check_data, check_settings, data_digest, get_args, locked, n_heldout, run_folder,
                      stage_plan)


# ----------------------------------------------------------------------------- 5. the pairs DPO trains on
def pair_batches(pairs, dpo_batch, block_size, eos, seed, mismatched=False):
    """get_batch(step): this rank's share of dpo_batch pairs (prompt x, chosen y_w, rejected y_l), chosen and
    rejected packed into one batch, so both go through one forward: rows [0, n) chosen, [n, 2n) rejected.
    mismatched (KTO): rows [2n, 3n) pair each prompt with the next pair's chosen response in the whole batch
    (not in this rank's share, which may hold one pair), for its KL estimate."""
    def get_batch(step):
        rank, world = rank_world()
        rows = np.random.default_rng([seed, step]).integers(len(pairs["prompt"]), size=dpo_batch)
        rows, next_rows = rows[rank::world], np.roll(rows, -1)[rank::world]
        prompts, chosen = [pairs["prompt"][i] for i in rows], [pairs["chosen"][i] for i in rows]
        extra = (prompts, [pairs["chosen"][i] for i in next_rows]) if mismatched else ([], [])
        return pack(prompts + prompts + extra[0], chosen + [pairs["rejected"][i] for i in rows] + extra[1], block_size,
                    eos)
    return get_batch


# ----------------------------------------------------------------------------- 5. the loss
def dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, method="dpo", label_smoothing=0.0):
    """The DPO loss (Eq. 7) and its variants, from summed response log-probs (not averaged).
    pi_c, pi_r: Shape (batch,). log pi_theta(y_w | x) and log pi_theta(y_l | x), chosen and rejected.
    ref_c, ref_r: Shape (batch,). The same under the frozen reference pi_ref.
    beta: the strength of the KL constraint. The implicit reward is beta * log(pi / pi_ref); a small
        beta lets the policy move far from pi_ref (more reward, more KL), a large one holds it close.
    method, with u = (pi_c - ref_c) - (pi_r - ref_r) the difference of the two log-ratios:
          'dpo':  -log sigmoid(beta * u)
          'cdpo': conservative DPO, labels flipped with probability label_smoothing
          'ipo':  (u - 1 / (2 beta))^2 (Azar et al. 2023), with summed log-probs
    Returns losses Shape (batch,), and the rewards beta * (pi - ref) of chosen and rejected (detached)."""
    u = (pi_c - ref_c) - (pi_r - ref_r)
    if method == "ipo":
        losses = (u - 1 / (2 * beta)) ** 2
    else:
        eps = label_smoothing if method == "cdpo" else 0.0
        losses = -(1 - eps) * F.logsigmoid(beta * u) - eps * F.logsigmoid(-beta * u)
    return losses, beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()


def unlikelihood_loss(tok_c, mask_c, tok_r, mask_r, alpha):
    """Preferred-FT (alpha = 0) and Unlikelihood: raise log p of the chosen tokens and push down the
    rejected ones with -log(1 - p) (Welleck et al. 2019). tok_*: Shape (batch, T) per-token log-probs.
    log(1 - p) = log(-expm1(log p)), exact in fp32 too; log p is clamped at -1e-6 (p <= 1 - 1e-6) so that a
    rejected token the policy is sure of costs 13.8 nats at most, and such a token gets no gradient."""
    nll = -masked_mean(tok_c, mask_c)
    if alpha == 0:
        return nll
    return nll - alpha * masked_mean(torch.log(-torch.expm1(tok_r.clamp(max=-1e-6))), mask_r)


# ----------------------------------------------------------------------------- DPO's successors on the same pairs
def simpo_loss(pi_c, pi_r, len_c, len_r, beta, gamma_ratio=0.5):
    """SimPO (Meng et al. 2024): -log sigmoid(beta / |y_w| * log pi(y_w | x) - beta / |y_l| * log pi(y_l | x) - gamma).
    No reference model: the reward is the length-normalised log-likelihood itself, and the margin gamma =
    gamma_ratio * beta asks the chosen to win by that much. len_*: Shape (batch,) response lengths in tokens.
    Returns losses Shape (batch,) and the rewards of chosen and rejected (detached)."""
    r_c, r_r = beta * pi_c / len_c, beta * pi_r / len_r
    return -F.logsigmoid(r_c - r_r - gamma_ratio * beta), r_c.detach(), r_r.detach()


def log_odds(mean_logp):
    """log(P / (1 - P)) for P = exp(mean_logp) < 1, computed without forming 1 - P where P is near 1.
    mean_logp is clamped at -1e-6 (P <= 1 - 1e-6, log odds <= 13.8), where the odds would be infinite."""
    m = mean_logp.clamp(max=-1e-6)
    log1m = torch.where(m > -0.6931, torch.log(-torch.expm1(m)), torch.log1p(-torch.exp(m)))  # log(1 - e^m)
    return m - log1m


def orpo_loss(pi_c, pi_r, len_c, len_r, lam):
    """ORPO (Hong et al. 2024): the chosen response's NLL (per token) + lam * -log sigmoid(log odds(y_w) - log
    odds(y_l)), odds(y) = P / (1 - P) with P = exp(log pi(y | x) / |y|), the length-normalised likelihood,
    clamped at P <= 1 - 1e-6 (log_odds). No reference model. Returns losses Shape (batch,) and the log odds of
    chosen and rejected (detached)."""
    o_c, o_r = log_odds(pi_c / len_c), log_odds(pi_r / len_r)
    return -pi_c / len_c - lam * F.logsigmoid(o_c - o_r), o_c.detach(), o_r.detach()


def kto_loss(pi_c, pi_r, ref_c, ref_r, mismatched_logratio, beta, lambda_d=1.0, lambda_u=1.0):
    """KTO (Ethayarajh et al. 2024) on the pairs split into desirable (chosen) and undesirable (rejected) examples:
        lambda_d * (1 - sigmoid(beta * (r_w - z0))) and lambda_u * (1 - sigmoid(beta * (z0 - r_l))),
    r = log pi(y | x) - log pi_ref(y | x), z0 = max(0, mean log-ratio of mismatched (x, y') in the batch): an
    estimate of KL(pi || pi_ref) that carries no gradient. mismatched_logratio: Shape (batch,).
    Returns losses Shape (2 * batch,), desirable first, and the rewards beta * r of chosen and rejected (detached)."""
    total, n = global_mean(mismatched_logratio.sum().item(), len(mismatched_logratio), device=pi_c.device)
    z0 = max(0.0, total / n)  # over every rank's rows; a number, no gradient
    r_c, r_r = pi_c - ref_c, pi_r - ref_r
    losses = torch.cat([lambda_d * (1 - torch.sigmoid(beta * (r_c - z0))),
                        lambda_u * (1 - torch.sigmoid(beta * (z0 - r_r)))])
    return losses, beta * r_c.detach(), beta * r_r.detach()


REFERENCE_FREE = ("ft", "ul", "simpo", "orpo")  # trained without a reference forward (evaluation still has one)


def pair_loss(model, batch, ref, method, param, impl="auto", label_smoothing=0.0):
    """The loss of one batch of pairs under `method`, param its beta, alpha or lambda."""
    idx, targets, mask = batch
    n = idx.size(0) // (3 if method == "kto" else 2)
    out = logprobs(model, None if method in REFERENCE_FREE else ref, idx, targets, mask, impl)  # all rows, one forward
    c, r, m = slice(0, n), slice(n, 2 * n), slice(2 * n, None)
    if method in ("ft", "ul"):
        alpha = 0.0 if method == "ft" else param
        return unlikelihood_loss(out.token_pol[c], mask[c], out.token_pol[r], mask[r], alpha), {}
    if method == "simpo":
        losses, r_c, r_r = simpo_loss(out.seq_pol[c], out.seq_pol[r], mask[c].sum(-1), mask[r].sum(-1), param)
    elif method == "orpo":
        losses, r_c, r_r = orpo_loss(out.seq_pol[c], out.seq_pol[r], mask[c].sum(-1), mask[r].sum(-1), param)
    elif method == "kto":
        losses, r_c, r_r = kto_loss(out.seq_pol[c], out.seq_pol[r], out.seq_ref[c], out.seq_ref[r],
                                    out.seq_pol[m] - out.seq_ref[m], param)
    else:
        losses, r_c, r_r = dpo_loss(out.seq_pol[c], out.seq_pol[r], out.seq_ref[c], out.seq_ref[r], param, method,
                                    label_smoothing)
    return losses.mean(), {"acc": accuracy(r_c - r_r), "margin": (r_c - r_r).mean().item(),
                           "chosen": r_c.mean().item(), "rejected": r_r.mean().item(),
                           "logp_c": out.seq_pol[c].mean().item(), "logp_r": out.seq_pol[r].mean().item()}


# ----------------------------------------------------------------------------- 5. one run
def run(method, param, sft_model, ref, pairs, evaluator, args, eos):
    """A policy that starts as pi_ref, trained on the pairs with the loss of `method` (param: beta, alpha or lambda)."""
    policy = copy.deepcopy(sft_model).train()
    batches = pair_batches(pairs, args.dpo_batch, args.block_size, eos, args.seed + 3, mismatched=method == "kto")
    return train(run_folder(method, param), policy,
                 lambda m, b: pair_loss(m, b, ref, method, param, args.impl, args.label_smoothing), batches,
                 args.dpo_steps, args.dpo_lr, out=args.out, device=args.device, optimizer=args.optimizer,
                 warmup=args.warmup, eval_every=args.eval_every, evaluator=evaluator, log_every=args.log_every)


# ----------------------------------------------------------------------------- the sweep: every run on one axis
def main(argv=None):
    args = get_args(argv)
    args.device = setup_distributed(args.device)
    log(f"nanoDPO: preset {args.preset} on {args.device} -> {args.out}")
    data = load_data(args.data_dir, args.data)  # 1. data
    check_data(args, data)
    with locked(args.out):  # one command at a time in a run folder
        sweep(args, data)


def sweep(args, data):
    """Stages 2-7 into args.out, which main holds locked."""
    check_settings(args.out, stage_plan(args, data_digest(data)), args.redo)  # reused only if its settings match
    t_start = time.time()
    enc = get_tokenizer(data["tokenizer"], data["words"])
    eos, vocab = enc.eot_token, enc.n_vocab
    rng = np.random.default_rng(args.seed)
    train_prompts = make_prompts(data["train"], args.n_prompts, args.min_chars, rng)
    test_prompts = make_prompts(data["test"], args.n_eval + n_heldout(args), args.min_chars, rng)
    eval_prompts, heldout_prompts = test_prompts[:args.n_eval], test_prompts[args.n_eval:]

    sft = stages.sft(args, data, eos, vocab)  # 2. the reference
    classifier = stages.classifier(args, data, eos, vocab, sft)  # 3. the ground-truth reward r*
    pairs = stages.make_pairs(sft, classifier, train_prompts, args, eos)  # 4. the preference pairs
    stages.best_of_n(sft, classifier, eval_prompts, args, eos)
    ref = copy.deepcopy(sft).eval().requires_grad_(False)
    evaluate = lambda m: stages.evaluate(m, ref, classifier, eval_prompts, eos=eos, seed=args.seed,
                                         max_new_tokens=args.max_new_tokens, block_size=args.block_size,
                                         device=args.device, impl=args.impl, decode=enc.decode)
    at_start = {}  # every run starts as pi_ref, so every run's step-0 evaluation is pi_ref's: made once

    def evaluator(model, step):
        if step > 0:
            return evaluate(model)
        if not at_start:
            at_start.update(evaluate(model))
        return dict(at_start)

    scores = {SCORE[m] for m, _ in args.run_list if m in SCORE}  # what the online runs (ppo.py) train on
    if scores:  # the reward model learns from the same pairs, validated on pairs of held-out prompts
        heldout = None
        if "rm" in scores:
            heldout = stages.make_pairs(sft, classifier, heldout_prompts, args, eos, name="pairs_heldout.pt")
        score_fns = ppo.score_functions(sft, classifier, pairs, heldout, train_prompts, args, eos, scores)
    for method, param in args.run_list:  # 5. and 6. every run, evaluated the same way
        if method in SCORE:
            ppo.run(method, param, sft, ref, score_fns[SCORE[method]], train_prompts, evaluator, args, eos)
        else:
            run(method, param, sft, ref, pairs, evaluator, args, eos)
    if rank_world()[0] == 0:  # 7. the figure of this command's runs
        names = [os.path.basename(run_folder(m, p)) for m, p in args.run_list]
        log(f"wrote {plot_frontier(args.out, args.figure or os.path.join(args.out, 'frontier.png'), names)}")
    log(f"nanoDPO: done in {time.time() - t_start:.0f}s")
    barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:  # a user's mistake (bad data, a stale stage): one line, no traceback
        sys.exit(f"nanoDPO: error: {e}")
