"""
PPO, the RLHF baseline DPO is measured against (Fig. 2 of the DPO paper), read top to bottom:

  5a. a reward model r_phi: the SFT model with a scalar head, trained with the Bradley-Terry loss on the
      same preference pairs DPO trains on (PPO); or the ground-truth classifier r* itself (PPO-GT)
  5b. rollouts: the policy samples a response per prompt, exactly as evaluation does; the reward of
      each response token is -beta_kl * log(pi / pi_ref), and the response's normalised score is added
      at its last token
  5c. advantages: GAE (gamma = 1, lambda = 0.95) from a value head on the policy, whitened per rollout
  5d. a few epochs of minibatches over each rollout: the clipped policy objective and clipped value loss
  5e. beta_kl follows an adaptive controller toward a target KL (Ziegler et al. 2019): a run is named
      by its target, ppo:6 or ppo-gt:6
and its critic-free successors, which drop the value head and sample a group of k = --group responses
per prompt instead (k x prompts = --ppo-batch samples per rollout, as PPO's), on the reward model r_phi:
  5f. RLOO (Ahmadian et al. 2024): the sequence reward R_i = r(x, y_i) - beta * sum_t log(pi / pi_ref);
      the baseline of sample i is the mean R of the other k - 1 samples of its prompt; REINFORCE on
      log pi(y_i | x), the log-probs summed over the response: rloo:beta
  5g. GRPO (Shao et al. 2024): the advantage (r_i - mean) / std over the group at every token, PPO's
      clipped surrogate, and beta * KL(pi || pi_ref) as a loss term; averaged over every response token
      of the batch: grpo:beta
Both reuse a rollout for PPO's epochs and minibatches: on a fresh rollout (pi = pi_old) the clipped
per-token surrogate has exactly REINFORCE's gradient, and the clip keeps the later, off-policy updates
near it, as PPO's does. One update per rollout (the RLOO paper's) would give them 1/8 of PPO's updates on
the same samples: the comparison would then be of update counts, not of advantages.
Rollouts and updates are ordinary steps of common.train: get_batch samples a new rollout every
epochs * minibatches steps and hands out its minibatches, so checkpoints, resume, torchrun and logging
are DPO's. Run them with `python dpo.py --runs ppo:6,ppo-gt:6,rloo:0.05,grpo:0.05` (the stages 1-4 are shared).
"""
import copy
import json
import os

import numpy as np
import torch
import torch.nn.functional as F

from common import (accuracy, amp, barrier, derive_seed, global_mean, logprobs, masked_mean, pack, rank_world,
                    real_lengths, train, unwrap)
from data.corpus import write_atomic
from settings import rollout_prompts, run_folder
from stages import reward, sample, sample_and_score, score, score_batch

GAMMA, LAM = 1.0, 0.95  # GAE: no discount over a response of at most max_new_tokens tokens
CLIP = 0.2  # of the probability ratio, and of the value's move from its rollout estimate
VF_COEF = 0.1  # weight of the value loss in the shared trunk's loss
KL_INIT = 0.2  # beta_kl before the controller moves it
MAX_NORM_SAMPLES = 1024  # SFT samples that fix each score's affine normalisation


# ----------------------------------------------------------------------------- 5a. the reward model
def with_zero_head(model, device):
    """A copy of model with a zero-initialised scalar head: its first scores (or values) are all 0."""
    copied = copy.deepcopy(model)
    copied.score_head = torch.nn.Linear(copied.config.n_embd, 1).to(device)
    torch.nn.init.zeros_(copied.score_head.weight), torch.nn.init.zeros_(copied.score_head.bias)
    return copied


def bradley_terry_loss(model, batch):
    """-log sigmoid(r(x, y_w) - r(x, y_l)): chosen rows first, then the rejected ones, in score layout."""
    idx, mask = batch
    s = unwrap(model).score(model(idx, lengths=real_lengths(mask)), mask).float()
    n = len(s) // 2
    margin = s[:n] - s[n:]
    return -F.logsigmoid(margin).mean(), {"acc": accuracy(margin)}


def pair_score_batch(pairs, rows, eos, block_size):
    prompts = [pairs["prompt"][i] for i in rows]
    return score_batch(prompts + prompts, [pairs["chosen"][i] for i in rows] + [pairs["rejected"][i] for i in rows],
                       eos, block_size)


def reward_model(sft_model, pairs, heldout, args, eos):
    """r_phi, initialised from the SFT model (a zero scalar head) and trained on DPO's pairs; its accuracy
    on the pairs of held-out prompts is evaluated as it trains (out/<preset>/reward_model/eval.jsonl)."""
    rm = with_zero_head(sft_model, args.device)

    def get_batch(step):
        rank, world = rank_world()
        rows = np.random.default_rng([args.seed + 4, step]).integers(len(pairs["prompt"]), size=args.batch)[rank::world]
        return pair_score_batch(pairs, rows, eos, args.block_size)

    def heldout_accuracy(model, step):
        s_c, s_r = (score(model, heldout["prompt"], heldout[k], eos, args.block_size, args.device)
                    for k in ("chosen", "rejected"))
        return dict(heldout_acc=accuracy(s_c - s_r))

    return train("reward_model", rm, bradley_terry_loss, get_batch, args.bt_steps, args.bt_lr, out=args.out,
                 device=args.device, warmup=args.warmup, eval_every=args.eval_every, evaluator=heldout_accuracy,
                 log_every=args.log_every).eval()


def normalised(score_fn, sft_model, prompts, args, eos, name):
    """score_fn(prompts, responses) turned into a fixed affine map with mean 0 and std 1 on samples of pi_ref
    (one per prompt, at most MAX_NORM_SAMPLES), computed once and kept in out/<preset>/score_norm_<name>.json."""
    path = os.path.join(args.out, f"score_norm_{name}.json")
    if not os.path.exists(path):  # under torchrun every rank samples a share, rank 0 writes, every rank reads
        _, scores = sample_and_score(sft_model, score_fn, prompts[:MAX_NORM_SAMPLES], args, eos, f"score_norm_{name}")
        s = torch.tensor(scores)
        if rank_world()[0] == 0:
            write_atomic(path, lambda f: f.write(json.dumps(dict(mean=s.mean().item(), std=s.std().item())).encode()))
    barrier()
    norm = json.load(open(path))
    return lambda p, r: (score_fn(p, r) - norm["mean"]) / norm["std"]


# ----------------------------------------------------------------------------- 5b. per-token rewards, 5c. advantages
def token_rewards(logratio, score_, mask, kl_coef):
    """-kl_coef * log(pi / pi_ref) at every response token, plus the score at the last one.
    logratio, mask: (B, T); score_: (B,). Zero off the mask (prompt and padding)."""
    r = -kl_coef * logratio * mask
    last = mask.long().cumsum(1).argmax(1)  # the first position where the count of response tokens peaks
    r[torch.arange(len(r)), last] += score_.to(r.dtype)
    return r


def gae(rewards, values, mask, gamma=GAMMA, lam=LAM):
    """Generalised advantage estimation over the response tokens of each row, read backwards:
        delta_t = r_t + gamma * V_{t+1} - V_t,   A_t = delta_t + gamma * lam * A_{t+1}
    with V after the last response token = 0. rewards, values, mask: (B, T) -> advantages (B, T), 0 off the mask."""
    B, T = rewards.shape
    adv = torch.zeros_like(rewards)
    next_adv = next_value = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(T)):
        m = mask[:, t]
        a = rewards[:, t] + gamma * next_value - values[:, t] + gamma * lam * next_adv
        next_adv = torch.where(m, a, next_adv)  # off the mask nothing changes: the response's own order
        next_value = torch.where(m, values[:, t], next_value)
        adv[:, t] = torch.where(m, a, 0.0)
    return adv


def whiten(x, mask):
    """(x - mean) / std over the masked entries of the whole rollout (every rank's share, weighted by its
    tokens), 0 off the mask."""
    n, s1, s2 = global_mean(mask.sum().item(), (x * mask).sum().item(), (x * x * mask).sum().item(), device=x.device)
    mean, sq = s1 / n, s2 / n
    return (x - mean) * (sq - mean ** 2 + 1e-8) ** -0.5 * mask


# ----------------------------------------------------------------------------- 5d. the losses
def clipped_surrogate(logp, old_logp, adv):
    """max(-A rho, -A clip(rho, 1 - eps, 1 + eps)) at each token, rho = pi / pi_old (Schulman et al. 2017), and 1.0
    where the clip binds (the clipped term is the larger, so that token has no gradient). old_logp and adv are the
    rollout's, constants here; adv (B, T), or (B, 1) for one advantage per sequence."""
    old_logp, adv = old_logp.detach(), adv.detach()
    ratio = torch.exp(logp - old_logp)
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1 - CLIP, 1 + CLIP)
    return torch.max(unclipped, clipped), (clipped > unclipped).float()


def policy_loss(logp, old_logp, adv, mask):
    """PPO's policy loss: the clipped surrogate's mean over tokens, and the fraction of tokens where the clip binds."""
    per_token, binds = clipped_surrogate(logp, old_logp, adv)
    return masked_mean(per_token, mask), masked_mean(binds, mask)


def value_loss(values, old_values, returns, mask):
    """0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped = V_old + clip(V - V_old, -eps, eps); V_old and the
    returns R are the rollout's, constants here."""
    old_values, returns = old_values.detach(), returns.detach()
    clipped = old_values + (values - old_values).clamp(-CLIP, CLIP)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def ppo_loss(model, batch, impl):
    """One minibatch: the policy's log-probs from the fused kernel and the values from the same hidden states."""
    idx, targets, mask, old_logp, old_values, adv, returns = batch
    h = model(idx, lengths=real_lengths(mask))
    logp = logprobs(model, None, idx, targets, mask, impl, hidden=h).token_pol
    values = unwrap(model).score_head(h).squeeze(-1).float()
    pg, clipfrac = policy_loss(logp, old_logp, adv, mask)
    vf = value_loss(values, old_values, returns, mask)
    return pg + VF_COEF * vf, {"pg": pg.item(), "vf": vf.item(), "clipfrac": clipfrac.item()}


# ----------------------------------------------------------------------------- 5e. the KL controller
def kl_update(kl_coef, kl, target, n, horizon):
    """Adaptive KL (Ziegler et al. 2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon,
    n the samples in the rollout: more KL than the target raises beta, less lowers it."""
    return kl_coef * (1 + float(np.clip(kl / target - 1, -0.2, 0.2)) * n / horizon)


# ----------------------------------------------------------------------------- 5f. RLOO, 5g. GRPO: no value head
def rloo_advantages(scores, seq_logratio, k, beta):
    """R_i = score_i - beta * sum_t log(pi / pi_ref), and A_i = R_i - the mean R of the k - 1 other samples of its
    prompt (a baseline that does not depend on y_i, so the gradient stays unbiased). scores, seq_logratio: (B,),
    the k samples of a prompt in consecutive rows -> A (B,)."""
    R = (scores - beta * seq_logratio).view(-1, k)
    return (R - (R.sum(1, keepdim=True) - R) / (k - 1)).view(-1)


def grpo_advantages(scores, k, eps=1e-4):
    """A_i = (score_i - mean) / (std + eps) over the k samples of its prompt (std unbiased, as torch.std). The KL
    is not in the advantage but a loss term (grpo_loss). scores: (B,), a prompt's samples consecutive -> (B,)."""
    s = scores.view(-1, k)
    return ((s - s.mean(1, keepdim=True)) / (s.std(1, keepdim=True) + eps)).view(-1)


def rloo_loss(logp, old_logp, adv, mask):
    """REINFORCE with RLOO's advantage: -mean_i A_i log pi(y_i | x), the log-prob summed over the response's tokens
    (B, T); adv (B,). Each token's term is the clipped surrogate, so that a fresh rollout gets exactly this gradient
    and its reuse stays near it. Returns the loss and the fraction of tokens where the clip binds."""
    per_token, binds = clipped_surrogate(logp, old_logp, adv[:, None])
    return (per_token * mask).sum(1).mean(), masked_mean(binds, mask)


def grpo_loss(logp, old_logp, ref_logp, adv, mask, beta):
    """GRPO: the clipped surrogate with the sample's advantage adv (B,) at each of its tokens, plus beta * KL_t with
    the estimator pi_ref/pi - log(pi_ref/pi) - 1 (>= 0, unbiased for KL(pi || pi_ref) under samples of pi), at the
    current pi. Averaged over every response token of the batch (DAPO's token-level mean), not the paper's mean
    over each sequence's tokens first: that one weighs a token of a short response more than one of a long
    response, a bias in the length the policy learns (Liu et al. 2025). ref_logp: pi_ref's, a constant.
    Returns the loss, the fraction of tokens where the clip binds, and the mean KL_t."""
    per_token, binds = clipped_surrogate(logp, old_logp, adv[:, None])
    d = ref_logp.detach() - logp
    kl = torch.exp(d) - d - 1
    return masked_mean(per_token + beta * kl, mask), masked_mean(binds, mask), masked_mean(kl, mask)


def critic_free_loss(model, batch, method, beta, impl):
    """One minibatch of RLOO or GRPO: the policy's log-probs from the fused kernel, no value head."""
    idx, targets, mask, old_logp, ref_logp, adv = batch
    logp = logprobs(model, None, idx, targets, mask, impl).token_pol
    if method == "rloo":
        loss, clipfrac = rloo_loss(logp, old_logp, adv, mask)
        return loss, {"clipfrac": clipfrac.item()}
    loss, clipfrac, kl = grpo_loss(logp, old_logp, ref_logp, adv, mask, beta)
    return loss, {"clipfrac": clipfrac.item(), "kl_term": kl.item()}


# ----------------------------------------------------------------------------- a rollout, the run
@torch.no_grad()
def rollout(policy, ref, score_fn, prompts, seed, args, eos):
    """Sample one response per prompt (this rank's prompts) from the policy as it is now, score it, and take its
    per-token log-probs under pi and pi_ref, and the values if the policy has a value head, in one forward.
    Returns the tensors (B, T) and scores (B,) of the update, and the rollout's mean score and exact KL over
    every rank."""
    policy.eval()
    responses = sample(policy, prompts, args.max_new_tokens, eos, seed, args.device)
    s = score_fn(prompts, responses).to(args.device)
    idx, targets, mask = (x.to(args.device) for x in pack(prompts, responses, args.block_size, eos))
    with amp(args.device):
        h = policy(idx, lengths=real_lengths(mask))
        out = logprobs(policy, ref, idx, targets, mask, args.impl, with_kl=True, hidden=h)
        values = None if policy.score_head is None else policy.score_head(h).squeeze(-1).float() * mask
    policy.train()
    score_mean, kl = global_mean(s.mean().item(), out.kl.sum(-1).float().mean().item(), device=s.device)  # exact KL
    data = dict(idx=idx, targets=targets, mask=mask, logp=out.token_pol.float(), ref_logp=out.token_ref.float(),
                values=values, score=s)
    return data, dict(score=score_mean, kl=kl)


def ppo_rollout(policy, ref, score_fn, prompts, kl_coef, seed, args, eos):
    """PPO's rollout: one response per prompt, GAE's advantages (whitened) and returns."""
    d, stats = rollout(policy, ref, score_fn, prompts, seed, args, eos)
    mask, values = d["mask"], d["values"]
    adv = gae(token_rewards(d["logp"] - d["ref_logp"], d["score"], mask, kl_coef), values, mask)
    return [d["idx"], d["targets"], mask, d["logp"], values, whiten(adv, mask), adv + values], stats


def group_rollout(policy, ref, score_fn, prompts, method, beta, seed, args, eos):
    """RLOO's and GRPO's rollout: args.group responses to each prompt, in consecutive rows, so that a group's
    advantages are computed where it was sampled (a prompt's group is never split across ranks)."""
    k = args.group
    d, stats = rollout(policy, ref, score_fn, [p for p in prompts for _ in range(k)], seed, args, eos)
    if method == "rloo":
        adv = rloo_advantages(d["score"], ((d["logp"] - d["ref_logp"]) * d["mask"]).sum(1), k, beta)
    else:
        adv = grpo_advantages(d["score"], k)
    return [d["idx"], d["targets"], d["mask"], d["logp"], d["ref_logp"], adv], stats


def rollout_batches(new_rollout, n_prompts, prompts, args):
    """get_batch(step): a new rollout every epochs * minibatches steps, new_rollout(this rank's prompts, seed) ->
    its tensors, on n_prompts training prompts drawn by (seed, iteration), sampled with the seed (seed, iteration,
    rank), then its minibatches in a fresh order each epoch. Resume lands on a rollout boundary (train checkpoints
    every ppo_eval_every iterations), so it draws the same rollouts again."""
    updates = args.ppo_epochs * args.ppo_minibatches
    cache = {}

    def get_batch(step):
        it, j = divmod(step, updates)
        rank, world = rank_world()
        if cache.get("it") != it:
            rows = np.random.default_rng([args.seed + 6, it]).choice(len(prompts), n_prompts, replace=False)
            seed = derive_seed(args.seed, "rollout", it, rank)
            cache["it"], cache["data"] = it, new_rollout([prompts[i] for i in rows[rank::world]], seed)
        epoch, mb = divmod(j, args.ppo_minibatches)
        order = torch.from_numpy(np.random.default_rng([args.seed + 7, it, epoch]).permutation(len(cache["data"][0])))
        return [x[order[mb::args.ppo_minibatches].to(x.device)] for x in cache["data"]]
    return get_batch


def run(method, param, sft_model, ref, score_fn, train_prompts, evaluator, args, eos):
    """One online run, the policy starting as the SFT model: PPO toward target KL param (with a zero-initialised
    value head), or RLOO or GRPO at KL coefficient param. score_fn is the normalised reward model (ppo, rloo,
    grpo) or the normalised r* (ppo-gt); evaluator(model, step) is DPO's evaluation."""
    n_prompts = rollout_prompts(method, args)
    if len(train_prompts) < n_prompts:
        raise ValueError(f"--ppo-batch {args.ppo_batch}: a rollout of {method} draws {n_prompts} prompts, more than "
                         f"the {len(train_prompts)} training prompts")
    stats = {}
    if method in ("ppo", "ppo-gt"):
        policy = with_zero_head(sft_model, args.device).train()  # its scalar head is the value head V(s_t)
        state = dict(kl_coef=KL_INIT)

        def new_rollout(prompts, seed):
            data, new = ppo_rollout(policy, ref, score_fn, prompts, state["kl_coef"], seed, args, eos)
            stats.update(new, kl_coef=state["kl_coef"])
            state["kl_coef"] = kl_update(state["kl_coef"], new["kl"], param, args.ppo_batch, args.kl_horizon)
            return data

        def loss_fn(model, batch):
            loss, metrics = ppo_loss(model, batch, args.impl)
            return loss, dict(score=stats["score"], rollout_kl=stats["kl"], beta_kl=stats["kl_coef"], **metrics)
    else:
        policy, state = copy.deepcopy(sft_model).train(), {}

        def new_rollout(prompts, seed):
            data, new = group_rollout(policy, ref, score_fn, prompts, method, param, seed, args, eos)
            stats.update(new)
            return data

        def loss_fn(model, batch):
            loss, metrics = critic_free_loss(model, batch, method, param, args.impl)
            return loss, dict(score=stats["score"], rollout_kl=stats["kl"], **metrics)

    updates = args.ppo_epochs * args.ppo_minibatches
    return train(run_folder(method, param), policy, loss_fn, rollout_batches(new_rollout, n_prompts, train_prompts,
                 args), args.ppo_iters * updates, args.ppo_lr, out=args.out, device=args.device, optimizer=args.optimizer,
                 warmup=args.warmup, eval_every=args.ppo_eval_every * updates, evaluator=evaluator,
                 log_every=args.log_every, state=state)


def score_functions(sft_model, classifier, pairs, heldout, train_prompts, args, eos, scores):
    """{'rm': the normalised reward model r_phi, 'gt': the normalised r*}, for the scores asked for (SCORE in
    settings.py says which an online method trains on)."""
    fns = {}
    if "gt" in scores:
        gt = lambda p, r: reward(classifier, p, r, eos, args.block_size, args.device)
        fns["gt"] = normalised(gt, sft_model, train_prompts, args, eos, "gt")
    if "rm" in scores:
        rm = reward_model(sft_model, pairs, heldout, args, eos)
        learned = lambda p, r: score(rm, p, r, eos, args.block_size, args.device)
        fns["rm"] = normalised(learned, sft_model, train_prompts, args, eos, "rm")
    return fns
