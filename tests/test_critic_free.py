"""ppo.py's critic-free runs, RLOO and GRPO: their advantages and losses against float64 formulas (values and
gradients), groups of ragged responses, what the reference changes, one step, a learning run, the fused kernel
against the reference path, and bad input.

    python -m pytest tests/test_critic_free.py     (CPU; about 30 s)
"""
import statistics

import numpy as np
import pytest
import torch
from conftest import DEVICE, EOS, assert_fused_matches_reference, f64_dists, sharp_gpt, tiny_gpt
from test_ppo import low_bytes, toy_args, toy_score

import common
import ppo
import record
import sampling
import scores
import settings


# ---------------------------------------------------------------- the advantages

def test_rloo_advantage_is_the_reward_minus_the_mean_of_the_other_samples():
    g = torch.Generator().manual_seed(0)
    k, beta = 4, 0.3
    scores, logratio = torch.randn(12, generator=g, dtype=torch.float64), torch.rand(12, generator=g, dtype=torch.float64) * 5
    adv = ppo.rloo_advantages(scores, logratio, k, beta)
    R = [s - beta * lr for s, lr in zip(scores.tolist(), logratio.tolist())]
    for i in range(12):
        others = [R[j] for j in range(k * (i // k), k * (i // k) + k) if j != i]  # the other samples of its prompt
        assert adv[i].item() == pytest.approx(R[i] - sum(others) / (k - 1), rel=1e-12)
    assert adv.view(-1, k).sum(1).abs().max() < 1e-12  # within a group they sum to 0


def test_grpo_advantage_is_the_group_z_score():
    g = torch.Generator().manual_seed(1)
    k = 3
    scores = torch.randn(9, generator=g, dtype=torch.float64) * 4 + 2
    adv = ppo.grpo_advantages(scores, k)
    for i in range(9):
        group = scores[k * (i // k): k * (i // k) + k].tolist()
        want = (scores[i].item() - statistics.mean(group)) / (statistics.stdev(group) + 1e-4)
        assert adv[i].item() == pytest.approx(want, rel=1e-12)
    assert ppo.grpo_advantages(torch.ones(4, dtype=torch.float64), 2).abs().max() == 0  # a tied group teaches nothing


# ---------------------------------------------------------------- the losses

def ragged_case(seed, moved=0.3):
    """Per-token rollout log-probs, the policy's (moved by `moved`, with grad) and pi_ref's, one advantage per
    row, and a mask of responses of different lengths starting at different positions."""
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 9
    old = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    logp = (old + torch.randn(B, T, generator=g, dtype=torch.float64) * moved).requires_grad_()
    ref = old + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (start, n) in enumerate([(1, 8), (3, 2), (2, 5), (4, 1), (1, 6), (2, 7)]):
        mask[b, start:start + n] = True
    return old, logp, ref, adv, mask


def surrogate(lp, old, a):
    """One token's clipped surrogate in float64, and its derivative in lp."""
    rho = float(np.exp(lp - old))
    bound = min(rho, 1 + ppo.CLIP) if a >= 0 else max(rho, 1 - ppo.CLIP)
    return -a * bound, (-a * rho if bound == rho else 0.0)


def test_rloo_loss_on_a_fresh_rollout_is_reinforce():
    """pi = pi_old: the loss is -mean_i A_i |y_i| (every ratio 1) and its gradient -A_i / B at every response token,
    the gradient of -mean_i A_i log pi(y_i | x)."""
    old, _, _, adv, mask = ragged_case(2)
    logp = old.clone().requires_grad_()
    loss, clipfrac = ppo.rloo_loss(logp, old, adv, mask)
    loss.backward()
    B = len(adv)
    assert loss.item() == pytest.approx(-sum(adv[i].item() * mask[i].sum().item() for i in range(B)) / B, rel=1e-12)
    torch.testing.assert_close(logp.grad, -adv[:, None] / B * mask, rtol=1e-12, atol=0)
    assert clipfrac.item() == 0


def test_rloo_loss_after_the_policy_moved_is_the_clipped_sum_over_each_response():
    old, logp, _, adv, mask = ragged_case(3)
    loss, _ = ppo.rloo_loss(logp, old, adv, mask)
    loss.backward()
    B, want, grad = len(adv), 0.0, torch.zeros_like(old)
    for i, j in mask.nonzero().tolist():
        value, d = surrogate(logp[i, j].item(), old[i, j].item(), adv[i].item())
        want += value / B  # summed over the row's tokens, averaged over rows
        grad[i, j] = d / B
    assert loss.item() == pytest.approx(want, rel=1e-12)
    torch.testing.assert_close(logp.grad, grad, rtol=1e-10, atol=1e-14)
    assert (grad[mask] == 0).any() and (grad[mask] != 0).any()  # some tokens clipped, some not


def test_grpo_loss_is_the_token_mean_of_the_clipped_surrogate_plus_beta_kl():
    old, logp, ref, adv, mask = ragged_case(4)
    beta = 0.2
    loss, clipfrac, kl = ppo.grpo_loss(logp, old, ref, adv, mask, beta)
    loss.backward()
    n, want, want_kl, grad, clipped = mask.sum().item(), 0.0, 0.0, torch.zeros_like(old), 0
    for i, j in mask.nonzero().tolist():
        lp, lq = logp[i, j].item(), ref[i, j].item()
        value, d = surrogate(lp, old[i, j].item(), adv[i].item())
        k3 = np.exp(lq - lp) - (lq - lp) - 1  # pi_ref/pi - log(pi_ref/pi) - 1
        want, want_kl = want + (value + beta * k3) / n, want_kl + k3 / n
        grad[i, j] = (d + beta * (1 - np.exp(lq - lp))) / n
        clipped += d == 0
    assert loss.item() == pytest.approx(want, rel=1e-12) and kl.item() == pytest.approx(want_kl, rel=1e-12)
    torch.testing.assert_close(logp.grad, grad, rtol=1e-10, atol=1e-14)
    assert clipfrac.item() == pytest.approx(clipped / n) and 0 < clipped < n
    # the paper's mean of per-sequence means would differ on these ragged rows
    rows = [[surrogate(logp[i, j].item(), old[i, j].item(), adv[i].item())[0] for j in mask[i].nonzero().flatten().tolist()]
            for i in range(len(adv))]
    token_mean, seq_mean = np.mean(sum(rows, [])), np.mean([np.mean(r) for r in rows])
    assert ppo.grpo_loss(logp, old, ref, adv, mask, 0.0)[0].item() == pytest.approx(token_mean, rel=1e-12)
    assert abs(token_mean - seq_mean) > 1e-3


def test_rollout_tensors_get_no_gradient_in_the_losses():
    old, logp, ref, adv, mask = ragged_case(5)
    old, ref, adv = (x.clone().requires_grad_() for x in (old, ref, adv))
    (ppo.rloo_loss(logp, old, adv, mask)[0] + ppo.grpo_loss(logp, old, ref, adv, mask, 0.5)[0]).backward()
    assert old.grad is None and ref.grad is None and adv.grad is None and logp.grad.abs().sum() > 0


# ---------------------------------------------------------------- a rollout of groups

RAGGED = [[5, 9, EOS], [7], [3, 3, 3, 3, 3, 3, 3, 3], [EOS],  # the 4 responses of the first prompt
          [200, 100, EOS], [12, 13, 14, 15, 16], [1, EOS], [255, 254, 253, 252, 251, 250, EOS]]


def group_rollout_case(tmp_path, monkeypatch, method, beta, ref=None, policy=None):
    """A group rollout of 2 prompts x 4 samples whose responses (set here, of lengths 1 to 8) are ragged within
    each group, and the prompts the sampler was asked for."""
    asked = []

    def fixed_sample(model, prompts, max_new_tokens, eos, seed, device):
        asked.append(prompts)
        return [list(r) for r in RAGGED]
    monkeypatch.setattr(ppo, "sample", fixed_sample)
    args = toy_args(tmp_path, "--runs", f"{method}:{beta}", "--ppo-batch", "8", "--group", "4")
    policy, ref = policy or sharp_gpt(0), ref or sharp_gpt(1)
    data, stats = ppo.group_rollout(policy, ref, toy_score, [[1, 2, 3], [4]], method, beta, 0, args, EOS)
    return policy, ref, data, stats, asked[0]


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_group_rollout_advantages_are_their_float64_values(tmp_path, monkeypatch, method):
    """Each prompt sampled 4 times in consecutive rows; per row, the log-probs under pi and pi_ref over its own
    response tokens only (lengths 1 to 8 in a group), and the advantage of its group's formula, recomputed in
    float64 from unpadded sequences."""
    beta = 0.5
    policy, ref, data, stats, asked = group_rollout_case(tmp_path, monkeypatch, method, beta)
    idx, targets, mask, logp, ref_logp, adv = data[:5] + (data.advantages,)
    assert asked == [[1, 2, 3]] * 4 + [[4]] * 4
    scores, logratios, kls = [], [], []
    for i, (p, r) in enumerate(zip(asked, RAGGED)):
        lp, lq = f64_dists(policy, p, r, EOS), f64_dists(ref, p, r, EOS)
        t = torch.arange(len(r))
        on = mask[i]
        assert on.sum() == len(r) and targets[i][on].tolist() == r
        torch.testing.assert_close(logp[i][on].double(), lp[t, torch.tensor(r)], rtol=0, atol=2e-5)
        torch.testing.assert_close(ref_logp[i][on].double(), lq[t, torch.tensor(r)], rtol=0, atol=2e-5)
        scores.append(toy_score([p], [r]).item())
        logratios.append((lp[t, torch.tensor(r)] - lq[t, torch.tensor(r)]).sum().item())
        kls.append((lp.exp() * (lp - lq)).sum().item())
    for i in range(8):
        group = range(4 * (i // 4), 4 * (i // 4) + 4)
        if method == "rloo":
            R = [scores[j] - beta * logratios[j] for j in group]
            want = scores[i] - beta * logratios[i] - (sum(R) - (scores[i] - beta * logratios[i])) / 3
        else:
            s = [scores[j] for j in group]
            want = (scores[i] - statistics.mean(s)) / (statistics.stdev(s) + 1e-4)
        assert adv[i].item() == pytest.approx(want, abs=1e-4)
    assert stats["rollout_kl"] == pytest.approx(np.mean(kls), rel=1e-5) and stats["score"] == pytest.approx(np.mean(scores))


def test_the_reference_moves_rloo_advantages_and_grpo_kl_term_only(tmp_path, monkeypatch):
    """pi_ref enters RLOO through the reward (beta * log-ratio) and GRPO through its loss term, not its advantage."""
    adv = {}
    for method, beta in [("rloo", 0.5), ("rloo", 0.0), ("grpo", 0.5)]:
        for seed in (1, 2):
            _, _, data, _, _ = group_rollout_case(tmp_path, monkeypatch, method, beta, sharp_gpt(seed))
            adv[method, beta, seed] = data.advantages
    assert (adv["rloo", 0.5, 1] - adv["rloo", 0.5, 2]).abs().max() > 1e-2
    assert torch.equal(adv["rloo", 0.0, 1], adv["rloo", 0.0, 2]) and torch.equal(adv["grpo", 0.5, 1], adv["grpo", 0.5, 2])


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_one_update_raises_the_log_probs_of_the_better_samples(tmp_path, monkeypatch, method):
    """One SGD step of critic_free_loss on a rollout, from pi = pi_old: sum_i A_i * (change of log pi(y_i | x)) > 0,
    and the samples with the highest and lowest advantage move up and down."""
    policy, ref, data, _, _ = group_rollout_case(tmp_path, monkeypatch, method, 0.0)
    seq_logp = lambda: common.logprobs(policy, None, *data[:3], "reference").seq_pol.detach().double()
    before = seq_logp()
    opt = torch.optim.SGD(policy.parameters(), lr=1e-3)
    ppo.critic_free_loss(policy, data, method, 0.0, "reference")[0].backward()
    opt.step()
    change, adv = seq_logp() - before, data.advantages.double()
    assert (adv * change).sum() > 0
    assert change[adv.argmax()] > 0 > change[adv.argmin()]


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_rloo_and_grpo_raise_a_known_reward(tmp_path, method):
    prompts = [np.random.default_rng(100 + i).integers(0, 256, 3).tolist() for i in range(64)]
    mean_reward = lambda m: low_bytes(None, sampling.sample(m, prompts, 8, EOS, 0, "cpu")).mean().item() / 4
    sft_model = tiny_gpt(3)
    train_prompts = [np.random.default_rng(i).integers(0, 256, 3).tolist() for i in range(32)]
    args = toy_args(tmp_path, "--runs", f"{method}:0.01", "--ppo-iters", "20")
    policy = ppo.run(method, 0.01, sft_model, tiny_gpt(3).requires_grad_(False), low_bytes, train_prompts,
                     lambda m: dict(kl=0.0), {}, args, EOS)
    before, after = mean_reward(sft_model), mean_reward(policy)
    assert 0.35 < before < 0.65 and after > before + 0.15, (before, after)
    assert policy.score_head is None  # no value head


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_fused_kernel_gives_the_reference_rloo_and_grpo_losses(tmp_path, monkeypatch, method):
    # near-uniform models, as PPO's test: the sharp ones' gradients (up to ~60) leave fp32 sums 1e-5 apart
    policy, _, data, _, _ = group_rollout_case(tmp_path, monkeypatch, method, 0.5, tiny_gpt(1), tiny_gpt(0))
    data, policy = data.to(DEVICE), policy.to(DEVICE)
    with torch.no_grad():  # move the policy away from the rollout's so that ratios, the clip and the KL term matter
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert_fused_matches_reference(policy, lambda impl: ppo.critic_free_loss(policy, data, method, 0.5, impl)[0])


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("flags, env, message", [
    (["--runs", "rloo:0.1", "--group", "1"], {}, "--group 1: rloo and grpo need at least 2 samples per prompt"),
    (["--runs", "grpo:0.1", "--group", "3", "--ppo-batch", "64"], {}, "--ppo-batch 64 a multiple of it"),
    (["--runs", "rloo:-1"], {}, "'rloo:-1': rloo needs beta >= 0, e.g. rloo:0.05"),
    (["--runs", "grpo"], {}, "'grpo': grpo needs beta >= 0, e.g. grpo:0.05"),
    (["--runs", "rloo:0.1", "--ppo-batch", "256", "--group", "2", "--n-prompts", "100"], {},
     "--ppo-batch 256 / --group 2 is more than --n-prompts 100: a rollout of rloo draws 128 different"),
    (["--runs", "grpo:0.1", "--ppo-batch", "8", "--group", "4"], {"WORLD_SIZE": "4"},
     "--ppo-batch 8 / --group 4: a rollout of grpo draws 2 prompts, fewer than the 4 torchrun processes"),
    # 4 prompts over 3 ranks: the smallest share is 1 prompt x 4 samples, fewer than 5 minibatches (16 / 3 is not)
    (["--runs", "rloo:0.1", "--ppo-batch", "16", "--group", "4", "--ppo-minibatches", "5"], {"WORLD_SIZE": "3"},
     "--ppo-minibatches 5 is more than --ppo-batch 16 / 3 processes (at least 4 samples each)"),
])
def test_bad_group_settings_are_one_line(flags, env, message, capsys, monkeypatch):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit):
        settings.get_args(["--preset", "tiny", "--device", "cpu", *flags])
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_the_settings_record_of_rloo_and_grpo_runs(tmp_path):
    """Their runs depend on the reward model's normalised score and --group, not on PPO's controller horizon."""
    args = settings.get_args(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path), "--runs", "rloo:0.1,ppo:3"])
    plan = record.stage_plan(args, "digest")
    assert plan["runs/rloo_0.1"]["group"] == 4 and "kl_horizon" not in plan["runs/rloo_0.1"]
    assert "group" not in plan["runs/ppo_3"] and plan["runs/ppo_3"]["kl_horizon"] == args.kl_horizon
    assert set(plan["score_norm_rm.json"].items()) <= set(plan["runs/rloo_0.1"].items())
