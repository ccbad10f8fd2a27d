"""
PPO, the RLHF baseline DPO is measured against (Fig. 2 of the DPO paper), read top to bottom:

  5a. a reward model r_phi, the SFT model with a scalar head trained with the Bradley-Terry loss on
      the pairs DPO trains on (PPO), or the classifier r* itself (PPO-GT): scores.py
  5b. rollouts: the policy samples a response per prompt, exactly as evaluation does; the reward of
      each response token is -beta_kl * log(pi / pi_ref), and the response's normalised score is
      added at its last token
  5c. advantages: GAE (gamma = 1, lambda = 0.95) from a value head on the policy, whitened per
      rollout
  5d. a few epochs of minibatches over each rollout: the clipped policy objective and clipped
      value loss
  5e. beta_kl follows an adaptive controller toward a target KL (Ziegler et al. 2019): a run is
      named by its target, ppo:6 or ppo-gt:6
and its critic-free successors, which drop the value head and sample a group of k = --group
responses per prompt instead (k x prompts = --ppo-batch samples per rollout, as PPO's), on r_phi:
  5f. RLOO (Ahmadian et al. 2024): the sequence reward R_i = r(x, y_i) - beta * sum_t log(pi /
      pi_ref); the baseline of sample i is the mean R of the other k - 1 samples of its prompt;
      REINFORCE on log pi(y_i | x), the log-probs summed over the response: rloo:beta
  5g. GRPO (Shao et al. 2024): the advantage (r_i - mean) / std over the group at every token,
      PPO's clipped surrogate, and beta * KL(pi || pi_ref) as a loss term; averaged over every
      response token of the batch: grpo:beta
Both reuse a rollout for PPO's epochs and minibatches: on a fresh rollout (pi = pi_old) the clipped
per-token surrogate has exactly REINFORCE's gradient, and the clip keeps the later, off-policy
updates near it, as PPO's does. One update per rollout (the RLOO paper's) would give them 1/8 of
PPO's updates on the same samples: the comparison would then be of update counts, not of advantages.
One loop runs all three (run): for each iteration a Rollout (the same named tensors for every
method), then epochs of minibatches, each a loss, backward and an optimizer step, with the helpers
of DPO's loop (common.py): checkpoints at rollout boundaries, resume, torchrun and logging. Run them
with `python dpo.py --runs ppo:6,ppo-gt:6,rloo:0.05,grpo:0.05` (the stages 1-4 are shared).
"""
import copy
from typing import NamedTuple, Optional

import numpy as np
import torch

from common import (Clock, amp, check_finite, derive_seed, distributed, finish,
                    global_mean, log_step, logprobs, make_optimizer, masked_mean, pack, rank_world,
                    real_lengths, resume, save, set_lr, unwrap, write_evaluation)
from methods import METHODS, rollout_prompts, run_folder
from sampling import sample
from scores import with_zero_head

GAMMA, LAM = 1.0, 0.95  # GAE: no discount over a response of at most max_new_tokens tokens
CLIP = 0.2  # of the probability ratio, and of the value's move from its rollout estimate
VF_COEF = 0.1  # weight of the value loss in the shared trunk's loss
KL_INIT = 0.2  # beta_kl before the controller moves it


# ------------------------------------------------------------ 5b. per-token rewards, 5c. advantages
def token_rewards(logratio, score_, mask, kl_coef):
    """-kl_coef * log(pi / pi_ref) at every response token, plus the score at the last one.
    logratio, mask: (B, T); score_: (B,). Zero off the mask (prompt and padding)."""
    r = -kl_coef * logratio * mask
    # the first position where the count of response tokens peaks
    last = mask.long().cumsum(1).argmax(1)
    r[torch.arange(len(r)), last] += score_.to(r.dtype)
    return r


def gae(rewards, values, mask, gamma=GAMMA, lam=LAM):
    """Generalised advantage estimation over the response tokens of each row, read backwards:
        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}
    with V after the last response token = 0. rewards, values, mask: (B, T) -> advantages (B, T), 0
    off the mask."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    next_adv = next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        m = mask[:, t]
        a = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_adv
        # off the mask nothing changes: the response's own order
        next_adv = torch.where(m, a, next_adv)
        next_value = torch.where(m, values[:, t], next_value)
        adv[:, t] = torch.where(m, a, 0.0)
    return adv


def whiten(x, mask):
    """(x - mean) / std over the masked entries of the whole rollout (every rank's share, weighted
    by its tokens), 0 off the mask."""
    n, s1, s2 = global_mean(mask.sum().item(), (x * mask).sum().item(), (x * x * mask).sum().item(),
                            device=x.device)
    mean, sq = s1 / n, s2 / n
    return (x - mean) * (sq - mean ** 2 + 1e-8) ** -0.5 * mask


# ------------------------------------------------------------ 5d. the losses
def clipped_surrogate(logp, old_logp, adv):
    """max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) at each token, rho = pi / pi_old (Schulman et al.
    2017), and 1.0 where the clip binds (the clipped term is the larger, so that token has no
    gradient). old_logp and adv are the rollout's, constants here; adv (B, T), or (B, 1) for one
    advantage per sequence."""
    old_logp, adv = old_logp.detach(), adv.detach()
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP)
    return torch.max(unclipped, clipped), (clipped > unclipped).float()


def policy_loss(logp, old_logp, adv, mask):
    """PPO's policy loss: the clipped surrogate's mean over tokens, and the fraction of tokens where
    the clip binds."""
    per_token, binds = clipped_surrogate(logp, old_logp, adv)
    return masked_mean(per_token, mask), masked_mean(binds, mask)


def value_loss(values, old_values, returns, mask):
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, -eps, eps);
    V_old and the returns R are the rollout's, constants here."""
    old_values, returns = old_values.detach(), returns.detach()
    clipped = old_values + (values - old_values).clamp(-CLIP, CLIP)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def ppo_loss(model, batch, impl):
    """One minibatch (a Rollout's rows): the policy's log-probs from the fused kernel and the values
    from the same hidden states; the clipped objective plus VF_COEF times the clipped value loss."""
    h = model(batch.idx, lengths=real_lengths(batch.mask))
    logp = logprobs(model, None, batch.idx, batch.targets, batch.mask, impl, hidden=h).token_pol
    values = unwrap(model).values(h)
    pg, clipfrac = policy_loss(logp, batch.logp, batch.advantages, batch.mask)
    vf = value_loss(values, batch.values, batch.returns, batch.mask)
    return pg + VF_COEF * vf, {"pg": pg.item(), "vf": vf.item(), "clipfrac": clipfrac.item()}


# ------------------------------------------------------------ 5e. the KL controller
def kl_update(kl_coef, kl, target, n, horizon):
    """Adaptive KL (Ziegler et al. 2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n /
    horizon, n the samples in the rollout: more KL than the target raises beta, less lowers it."""
    return kl_coef * (1 + float(np.clip(kl / target - 1, -0.2, 0.2)) * n / horizon)


# ------------------------------------------------------------ 5f. RLOO, 5g. GRPO: no value head
def rloo_advantages(scores, seq_logratio, k, beta):
    """R_i = score_i - beta * sum_t log(pi / pi_ref), and A_i = R_i - the mean R of the k - 1 other
    samples of its prompt (a baseline that does not depend on y_i, so the gradient stays unbiased).
    scores, seq_logratio: (B,), the k samples of a prompt in consecutive rows -> A (B,)."""
    R = (scores - beta * seq_logratio).view(-1, k)
    return (R - (R.sum(1, keepdim=True) - R) / (k - 1)).view(-1)


def grpo_advantages(scores, k, eps=1e-4):
    """A_i = (score_i - mean) / (std + eps) over the k samples of its prompt (std unbiased, as
    torch.std). The KL is not in the advantage but a loss term (grpo_loss). scores: (B,), a prompt's
    samples consecutive -> (B,)."""
    s = scores.view(-1, k)
    return ((s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + eps)).view(-1)


def rloo_loss(logp, old_logp, adv, mask):
    """REINFORCE with RLOO's advantage: -mean_i A_i log pi(y_i | x), the log-prob summed over the
    response's tokens (B, T); adv (B,). Each token's term is the clipped surrogate, so that a fresh
    rollout gets exactly this gradient and its reuse stays near it. Returns the loss and the
    fraction of tokens where the clip binds."""
    per_token, binds = clipped_surrogate(logp, old_logp, adv[:, None])
    return (per_token * mask).sum(1).mean(), masked_mean(binds, mask)


def grpo_loss(logp, old_logp, ref_logp, adv, mask, beta):
    """GRPO: the clipped surrogate with the sample's advantage adv (B,) at each of its tokens, plus
    beta * KL_t with the estimator pi_ref/pi - log(pi_ref/pi) - 1 (>= 0, unbiased for KL(pi ||
    pi_ref) under samples of pi), at the current pi. Averaged over every response token of the batch
    (DAPO's token-level mean), not the paper's mean over each sequence's tokens first: that one
    weighs a token of a short response more than one of a long response, a bias in the length the
    policy learns (Liu et al. 2025). ref_logp: pi_ref's, a constant. Under torchrun the mean is over
    every rank's tokens, as whiten's: each rank divides its sum by the ranks' mean token count, so
    DDP's mean of the ranks' gradients is that of one token mean (not a mean of the ranks' means).
    Returns the loss, the fraction of tokens where the clip binds, and the mean KL_t (this rank's)."""
    per_token, binds = clipped_surrogate(logp, old_logp, adv[:, None])
    d = ref_logp.detach() - logp
    kl = torch.exp(d) - d - 1
    # every rank's mean token count; one process: mask.sum(), so masked_mean's value
    n = global_mean(mask.sum().item(), device=mask.device)[0]
    loss = ((per_token + beta * kl) * mask).sum() / n
    return loss, masked_mean(binds, mask), masked_mean(kl, mask)


def critic_free_loss(model, batch, method, beta, impl):
    """One minibatch of RLOO or GRPO (a Rollout's rows): the policy's log-probs from the fused
    kernel."""
    logp = logprobs(model, None, batch.idx, batch.targets, batch.mask, impl).token_pol
    if method == "rloo":
        loss, clipfrac = rloo_loss(logp, batch.logp, batch.advantages, batch.mask)
        return loss, {"clipfrac": clipfrac.item()}
    loss, clipfrac, kl = grpo_loss(logp, batch.logp, batch.ref_logp, batch.advantages, batch.mask,
                                   beta)
    return loss, {"clipfrac": clipfrac.item(), "kl_term": kl.item()}


# ------------------------------------------------------------ rollouts
class Rollout(NamedTuple):
    """The samples of one iteration and what the updates read of them, the same for PPO, RLOO and
    GRPO."""
    idx: torch.Tensor  # (B, T) inputs: the beginning-of-text token, the prompt, the response
    targets: torch.Tensor  # (B, T) the sequence shifted by one
    mask: torch.Tensor  # (B, T) True at the response tokens
    logp: torch.Tensor  # (B, T) log pi_old of each token, the policy's when it sampled
    ref_logp: torch.Tensor  # (B, T) log pi_ref of each token
    values: Optional[torch.Tensor]  # (B, T) PPO's value estimates V(s_t); None without a value head
    # (B, T) PPO's whitened GAE, (B,) RLOO's and GRPO's per sample
    advantages: Optional[torch.Tensor]
    returns: Optional[torch.Tensor]  # (B, T) PPO's value targets; None without a value head

    def rows(self, i):
        """The rollout's rows i (a minibatch)."""
        return Rollout(*(None if x is None else x[i.to(x.device)] for x in self))

    def to(self, device):
        return Rollout(*(None if x is None else x.to(device) for x in self))


@torch.no_grad()
def rollout(policy, ref, score_fn, prompts, seed, args, eos):
    """Sample one response per prompt (this rank's prompts) from the policy as it is now, score it,
    and take its per-token log-probs under pi and pi_ref, and the values if the policy has a value
    head, in one forward. Returns a Rollout without advantages, the scores (B,), and the rollout's
    mean score and exact KL over every rank."""
    policy.eval()
    responses = sample(policy, prompts, args.max_new_tokens, eos, seed, args.device)
    s = score_fn(prompts, responses).to(args.device)
    idx, targets, mask = (x.to(args.device) for x in pack(prompts, responses, args.block_size, eos))
    with amp(args.device):
        h = policy(idx, lengths=real_lengths(mask))
        out = logprobs(policy, ref, idx, targets, mask, args.impl, with_kl=True, hidden=h)
        values = None  # RLOO, GRPO
        if policy.score_head is not None:  # PPO's value head
            values = policy.values(h) * mask
    policy.train()
    exact_kl = out.kl.sum(-1).float().mean().item()
    score_mean, kl = global_mean(s.mean().item(), exact_kl, device=s.device)
    logp, ref_logp = out.token_pol.float(), out.token_ref.float()
    samples = Rollout(idx, targets, mask, logp, ref_logp, values, advantages=None, returns=None)
    return samples, s, dict(score=score_mean, rollout_kl=kl)


def ppo_rollout(policy, ref, score_fn, prompts, kl_coef, seed, args, eos):
    """PPO's rollout: one response per prompt, GAE's advantages (whitened) and returns."""
    samples, scores, stats = rollout(policy, ref, score_fn, prompts, seed, args, eos)
    mask, values = samples.mask, samples.values
    rewards = token_rewards(samples.logp - samples.ref_logp, scores, mask, kl_coef)
    adv = gae(rewards, values, mask)
    return samples._replace(advantages=whiten(adv, mask), returns=adv + values), stats


def group_rollout(policy, ref, score_fn, prompts, method, beta, seed, args, eos):
    """RLOO's and GRPO's rollout: args.group responses to each prompt, in consecutive rows, so that
    a group's advantages are computed where it was sampled (a prompt's group is never split across
    ranks)."""
    k = args.group
    repeated = [p for p in prompts for _ in range(k)]
    samples, scores, stats = rollout(policy, ref, score_fn, repeated, seed, args, eos)
    if method == "rloo":
        seq_logratio = ((samples.logp - samples.ref_logp) * samples.mask).sum(1)
        adv = rloo_advantages(scores, seq_logratio, k, beta)
    else:
        adv = grpo_advantages(scores, k)
    return samples._replace(advantages=adv), stats


def draw_prompts(train_prompts, n_prompts, it, seed):
    """Iteration it's rollout: n_prompts training prompts drawn by (seed, it), this rank's share of
    them, and the seed this rank samples its responses with (seed, it, rank)."""
    rank, world = rank_world()
    rng = np.random.default_rng([seed + 6, it])
    rows = rng.choice(len(train_prompts), n_prompts, replace=False)
    return [train_prompts[i] for i in rows[rank::world]], derive_seed(seed, "rollout", it, rank)


# ------------------------------------------------------------ one run: the loop of PPO, RLOO, GRPO
def run(method, param, sft_model, ref, score_fn, train_prompts, evaluate, at_start, args, eos):
    """One online run, the policy starting as the SFT model: PPO toward target KL param (with a
    zero-initialised value head), or RLOO or GRPO at KL coefficient param. score_fn is the
    normalised reward model (ppo, rloo, grpo) or the normalised r* (ppo-gt); evaluate(policy) ->
    dict is DPO's evaluation, at_start pi_ref's."""
    n_prompts = rollout_prompts(method, args)
    if len(train_prompts) < n_prompts:
        raise ValueError(f"--ppo-batch {args.ppo_batch}: a rollout of {method} draws {n_prompts} "
                         f"prompts, more than the {len(train_prompts)} training prompts")
    name, value_head = run_folder(method, param), METHODS[method].value_head
    policy = with_zero_head(sft_model, args.device) if value_head else copy.deepcopy(sft_model)
    policy.train()  # PPO: its scalar head is the value head V(s_t)
    opt = make_optimizer(policy, args.optimizer, args.ppo_lr)
    start, state = resume(name, policy, opt, args.out, dict(kl_coef=KL_INIT) if value_head else {})
    if start is None:
        return policy
    updates = args.ppo_epochs * args.ppo_minibatches  # optimizer steps per rollout
    steps, kl_coef = args.ppo_iters * updates, state.get("kl_coef")  # kl_coef: PPO's beta_kl
    model, clock = distributed(policy), Clock(start, steps)
    for it in range(start // updates, args.ppo_iters):  # resume starts on a rollout boundary
        if it % args.ppo_eval_every == 0:  # 6. evaluate
            write_evaluation(name, it * updates, evaluate(policy) if it else at_start, args.out)
        prompts, seed = draw_prompts(train_prompts, n_prompts, it, args.seed)  # 5b, 5c: a rollout
        if value_head:
            samples, stats = ppo_rollout(policy, ref, score_fn, prompts, kl_coef, seed, args, eos)
            stats["beta_kl"] = kl_coef
            # 5e: the KL controller moves beta_kl toward the target KL for the next rollout
            kl_coef = kl_update(kl_coef, stats["rollout_kl"], param, args.ppo_batch,
                                args.kl_horizon)
        else:
            samples, stats = group_rollout(policy, ref, score_fn, prompts, method, param, seed,
                                           args, eos)
        # 5d: epochs of minibatches over the rollout, a fresh order each
        for epoch in range(args.ppo_epochs):
            order = np.random.default_rng([args.seed + 7, it, epoch]).permutation(len(samples.idx))
            for mb in range(args.ppo_minibatches):
                step = it * updates + epoch * args.ppo_minibatches + mb
                set_lr(opt, step, args.ppo_lr, args.warmup)
                batch = samples.rows(torch.from_numpy(order[mb::args.ppo_minibatches]))
                with amp(args.device):
                    if value_head:
                        loss, metrics = ppo_loss(model, batch, args.impl)
                    else:
                        loss, metrics = critic_free_loss(model, batch, method, param, args.impl)
                check_finite(loss, name, step, args.out)
                loss.backward()  # DDP averages the gradients over the ranks
                grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0).item()
                opt.step()
                opt.zero_grad(set_to_none=True)
                clock.tick(batch.idx.numel())
                if step % args.log_every == 0 or step == steps - 1:
                    line = dict(loss=loss.item(), **stats, **metrics, grad=grad_norm)
                    lr = opt.param_groups[0]["lr"]
                    log_step(name, step, line, clock, args.device, args.out, lr)  # metrics.jsonl too
        state = dict(kl_coef=kl_coef) if value_head else {}
        if (it + 1) % args.ppo_eval_every == 0 and it + 1 < args.ppo_iters:
            save(name, (it + 1) * updates, policy, opt, args.out, state, args.tokenizer)
    write_evaluation(name, steps, evaluate(policy), args.out)
    return finish(name, policy, args.out, clock, state, args.tokenizer)
