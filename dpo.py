"""
nanoDPO: Direct Preference Optimization (Rafailov et al., 2023), read top to bottom.

    python dpo.py                  # the imdb preset on a GPU, the tiny one on a CPU (said first)
    python dpo.py --preset tiny    # synthetic reviews, a small GPT from scratch, minutes on a CPU
    python dpo.py --runs dpo:0.1,ppo:6,rloo:0.05    # any subset of the runs, the online ones too
    torchrun --nproc_per_node=8 dpo.py --preset imdb

The controlled sentiment experiment of the paper (Sec. 6.1, App. C.1). This file is DPO itself
(stage 5): the pairs it trains on and its loss, its successors (SimPO, ORPO, KTO), and one run, its
loop in plain sight. The stages around it (1-4: data, the SFT reference pi_ref, the ground-truth
reward r*, the preference pairs; 6: evaluation) are in stages.py, the helpers every loop calls in
common.py, PPO, RLOO and GRPO in ppo.py, and the experiment that runs them all (every run on one
axis, then the figure) in experiment.py, which `python dpo.py` starts.
"""
import copy

import numpy as np
import torch
import torch.nn.functional as F

from common import (Clock, accuracy, amp, check_finite, distributed, finish, global_mean,
                    log_step, logprobs, make_optimizer, masked_mean, pack, rank_world, resume, save,
                    set_lr, write_evaluation)
from data.pairs import batch_rows
from methods import METHODS, run_folder


# ------------------------------------------------------------ 5. the pairs DPO trains on
def pair_batch(pairs, step, dpo_batch, block_size, eos, seed, mismatched=False):
    """This rank's share of step's dpo_batch pairs (prompt x, chosen y_w, rejected y_l), drawn by
    (seed, step), chosen and rejected packed into one batch, so both go through one forward: rows
    [0, n) chosen, [n, 2n) rejected. mismatched (KTO): rows [2n, 3n) pair each prompt with the next
    pair's chosen response in the whole batch (not in this rank's share, which may hold one pair),
    for its KL estimate."""
    rank, world = rank_world()
    rows = batch_rows(pairs, dpo_batch, seed, step)
    rows, next_rows = rows[rank::world], np.roll(rows, -1)[rank::world]
    prompts = [pairs["prompt"][i] for i in rows]
    chosen, rejected = [pairs["chosen"][i] for i in rows], [pairs["rejected"][i] for i in rows]
    # KTO: each prompt with the next pair's chosen response too
    others = [pairs["chosen"][i] for i in next_rows] if mismatched else None
    return pack_pairs(prompts, chosen, rejected, block_size, eos, others)


def pack_pairs(prompts, chosen, rejected, block_size, eos, others=None):
    """The batch pair_loss reads: rows [0, n) prompt + chosen, [n, 2n) prompt + rejected, and with
    others (KTO) [2n, 3n) each prompt + another pair's chosen response."""
    if others is None:
        return pack(prompts + prompts, chosen + rejected, block_size, eos)
    return pack(prompts * 3, chosen + rejected + others, block_size, eos)


# ------------------------------------------------------------ 5. the loss
def dpo_loss(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected, beta, method="dpo",
             label_smoothing=0.0):
    """The DPO loss (Eq. 7) and its variants, from summed response log-probs (not averaged).
    logp_chosen, logp_rejected: Shape (batch,). log pi_theta(y_w | x) and log pi_theta(y_l | x).
    ref_logp_chosen, ref_logp_rejected: Shape (batch,). The same under the frozen reference pi_ref.
    beta: the strength of the KL constraint. The implicit reward is beta * log(pi / pi_ref); a small
        beta lets the policy move far from pi_ref (more reward, more KL), a large one holds it
        close.
    method, with u = the chosen response's log-ratio log(pi / pi_ref) minus the rejected one's:
          'dpo':  -log sigmoid(beta * u)
          'cdpo': conservative DPO, labels flipped with probability label_smoothing
          'ipo':  (u - 1 / (2 beta))^2 (Azar et al. 2023), with summed log-probs
    Returns losses Shape (batch,), and the rewards beta * log(pi / pi_ref) of chosen and rejected
    (detached)."""
    chosen_logratio = logp_chosen - ref_logp_chosen
    rejected_logratio = logp_rejected - ref_logp_rejected
    u = chosen_logratio - rejected_logratio
    if method == "ipo":
        losses = (u - 1 / (2 * beta)) ** 2
    else:
        eps = label_smoothing if method == "cdpo" else 0.0
        losses = -(1 - eps) * F.logsigmoid(beta * u) - eps * F.logsigmoid(-beta * u)
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def unlikelihood_loss(token_logp_chosen, mask_chosen, token_logp_rejected, mask_rejected, alpha):
    """Preferred-FT (alpha = 0) and Unlikelihood: raise log p of the chosen tokens and push down the
    rejected ones with -log(1 - p) (Welleck et al. 2019). token_logp_*: Shape (batch, T) per-token
    log-probs. log(1 - p) = log(-expm1(log p)), exact in fp32 too; log p is clamped at -1e-6 (p <= 1
    - 1e-6) so that a rejected token the policy is sure of costs 13.8 nats at most, and such a token
    gets no gradient."""
    nll = -masked_mean(token_logp_chosen, mask_chosen)
    if alpha == 0:
        return nll
    unlikely = torch.log(-torch.expm1(token_logp_rejected.clamp(max=-1e-6)))  # log(1 - p)
    return nll - alpha * masked_mean(unlikely, mask_rejected)


# ------------------------------------------------------------ DPO's successors on the same pairs
def simpo_loss(logp_chosen, logp_rejected, len_chosen, len_rejected, beta, gamma_ratio=0.5):
    """SimPO (Meng et al. 2024): -log sigmoid(beta / |y_w| log pi(y_w | x) - beta / |y_l| log pi(y_l
    | x) - gamma). No reference model: the reward is the length-normalised log-likelihood itself,
    and the margin gamma = gamma_ratio * beta asks the chosen to win by that much. len_*: Shape
    (batch,) response lengths in tokens. Returns losses Shape (batch,) and the rewards of chosen and
    rejected (detached)."""
    reward_chosen = beta * logp_chosen / len_chosen
    reward_rejected = beta * logp_rejected / len_rejected
    losses = -F.logsigmoid(reward_chosen - reward_rejected - gamma_ratio * beta)
    return losses, reward_chosen.detach(), reward_rejected.detach()


def log_odds(mean_logp):
    """log(P / (1 - P)) for P = exp(mean_logp) < 1, computed without forming 1 - P where P is near
    1. mean_logp is clamped at -1e-6 (P <= 1 - 1e-6, log odds <= 13.8), where the odds would be
    infinite."""
    m = mean_logp.clamp(max=-1e-6)
    # log(1 - e^m)
    log1m = torch.where(m > -0.6931, torch.log(-torch.expm1(m)), torch.log1p(-torch.exp(m)))
    return m - log1m


def orpo_loss(logp_chosen, logp_rejected, len_chosen, len_rejected, lam):
    """ORPO (Hong et al. 2024): the chosen response's NLL (per token) + lam * -log sigmoid(log
    odds(y_w) - log odds(y_l)), odds(y) = P / (1 - P) with P = exp(log pi(y | x) / |y|), the
    length-normalised likelihood, clamped at P <= 1 - 1e-6 (log_odds). No reference model. Returns
    losses Shape (batch,) and the log odds of chosen and rejected (detached)."""
    odds_chosen = log_odds(logp_chosen / len_chosen)
    odds_rejected = log_odds(logp_rejected / len_rejected)
    losses = -logp_chosen / len_chosen - lam * F.logsigmoid(odds_chosen - odds_rejected)
    return losses, odds_chosen.detach(), odds_rejected.detach()


def kto_loss(logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected, mismatched_logratio,
             beta, lambda_d=1.0, lambda_u=1.0):
    """KTO (Ethayarajh et al. 2024) on the pairs split into desirable (chosen) and undesirable
        (rejected) examples: lambda_d * (1 - sigmoid(beta * (r_w - z0))) and lambda_u * (1 -
        sigmoid(beta * (z0 - r_l))),
    r = log pi(y | x) - log pi_ref(y | x), z0 = max(0, mean log-ratio of mismatched (x, y') in the
    batch): an estimate of KL(pi || pi_ref) that carries no gradient. mismatched_logratio: Shape
    (batch,). Returns losses Shape (2 * batch,), desirable first, and the rewards beta * r of chosen
    and rejected (detached)."""
    total, n = global_mean(mismatched_logratio.sum().item(), len(mismatched_logratio),
                           device=logp_chosen.device)
    z0 = max(0.0, total / n)  # over every rank's rows; a number, no gradient
    chosen_logratio = logp_chosen - ref_logp_chosen
    rejected_logratio = logp_rejected - ref_logp_rejected
    losses = torch.cat([lambda_d * (1 - torch.sigmoid(beta * (chosen_logratio - z0))),
                        lambda_u * (1 - torch.sigmoid(beta * (z0 - rejected_logratio)))])
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def pair_loss(model, batch, ref, method, param, impl="auto", label_smoothing=0.0):
    """The loss of one batch of pairs (pair_batch's) under `method`, param its beta, alpha or lambda
    (METHODS[method].param), and its metrics by name."""
    idx, targets, mask = batch
    n = idx.size(0) // (3 if method == "kto" else 2)
    needs_ref = METHODS[method].reference
    out = logprobs(model, ref if needs_ref else None, idx, targets, mask, impl)  # every row at once
    chosen, rejected, mismatched = slice(0, n), slice(n, 2 * n), slice(2 * n, None)
    logp_chosen, logp_rejected = out.seq_pol[chosen], out.seq_pol[rejected]
    if method in ("ft", "ul"):
        alpha = 0.0 if method == "ft" else param
        token_logp = out.token_pol
        loss = unlikelihood_loss(token_logp[chosen], mask[chosen], token_logp[rejected],
                                 mask[rejected], alpha)
        return loss, {}
    if method in ("simpo", "orpo"):  # no pi_ref: the log-probs per token of each response
        len_chosen, len_rejected = mask[chosen].sum(-1), mask[rejected].sum(-1)
        loss_of = simpo_loss if method == "simpo" else orpo_loss  # param: beta, lambda
        losses, reward_chosen, reward_rejected = loss_of(
            logp_chosen, logp_rejected, len_chosen, len_rejected, param)
    elif method == "kto":
        ref_logp_chosen, ref_logp_rejected = out.seq_ref[chosen], out.seq_ref[rejected]
        mismatched_logratio = out.seq_pol[mismatched] - out.seq_ref[mismatched]
        losses, reward_chosen, reward_rejected = kto_loss(
            logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected, mismatched_logratio,
            beta=param)
    else:  # dpo, ipo, cdpo
        ref_logp_chosen, ref_logp_rejected = out.seq_ref[chosen], out.seq_ref[rejected]
        losses, reward_chosen, reward_rejected = dpo_loss(
            logp_chosen, logp_rejected, ref_logp_chosen, ref_logp_rejected, beta=param,
            method=method, label_smoothing=label_smoothing)
    margin = reward_chosen - reward_rejected
    return losses.mean(), {"rewards/chosen": reward_chosen.mean().item(),
                           "rewards/rejected": reward_rejected.mean().item(),
                           "rewards/accuracies": accuracy(margin),
                           "rewards/margins": margin.mean().item(),
                           "logps/chosen": logp_chosen.mean().item(),
                           "logps/rejected": logp_rejected.mean().item()}


# ------------------------------------------------------------ 5. one run: DPO's loop
def run(method, param, sft_model, ref, pairs, evaluate, at_start, args, eos):
    """A policy that starts as pi_ref, trained on the pairs with the loss of `method` (param: its
    beta, alpha or lambda) for args.dpo_steps steps, evaluated every args.eval_every steps by
    evaluate(policy) -> dict (step 0: at_start, pi_ref's evaluation, made once for every run).
    Writes out/runs/<method>_<param>/, metrics.jsonl there a line per logged step."""
    name, policy = run_folder(method, param), copy.deepcopy(sft_model).train()
    opt = make_optimizer(policy, args.optimizer, args.dpo_lr)
    start, _ = resume(name, policy, opt, args.out)
    if start is None:
        return policy
    model, clock, steps = distributed(policy), Clock(start, args.dpo_steps), args.dpo_steps
    for step in range(start, steps):
        if step % args.eval_every == 0:  # 6. evaluate
            write_evaluation(name, step, evaluate(policy) if step else at_start, args.out)
        set_lr(opt, step, args.dpo_lr, args.warmup)
        batch = pair_batch(pairs, step, args.dpo_batch, args.block_size, eos, args.seed + 3,
                           mismatched=method == "kto")  # this rank's share of the pairs
        batch = [x.to(args.device) for x in batch]
        with amp(args.device):  # 5. the loss
            loss, metrics = pair_loss(model, batch, ref, method, param, args.impl,
                                      args.label_smoothing)
        check_finite(loss, name, step, args.out)  # on every rank: all stop together
        loss.backward()  # DDP averages the gradients over the ranks
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        clock.tick(batch[0].numel())
        if step % args.log_every == 0 or step == steps - 1:
            metrics = dict(loss=loss.item(), **metrics, grad=grad_norm)
            # and a line in metrics.jsonl: the curves
            log_step(name, step, metrics, clock, args.device, args.out, opt.param_groups[0]["lr"])
        if (step + 1) % args.eval_every == 0 and step + 1 < steps:
            # resume starts here after an interruption
            save(name, step + 1, policy, opt, args.out, tokenizer=args.tokenizer)
    write_evaluation(name, steps, evaluate(policy), args.out)
    return finish(name, policy, args.out, clock, tokenizer=args.tokenizer)


if __name__ == "__main__":
    # the whole experiment: stages 1-4, every run, the figure (experiment.py)
    from experiment import cli
    cli()
