"""ppo.py: GAE, the per-token rewards, the clipped losses, the KL controller, the Bradley-Terry reward
model, PPO learning a toy reward, the fused kernel against the reference, resume, DDP and bad input.

    python -m pytest tests/test_ppo.py     (CPU; about 40 s)
"""
import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import (DEVICE, EOS, Interrupted, assert_fused_matches_reference, f64_dists, free_port, killed_at,
                      leave_process_group, recording, sharp_gpt, tiny_gpt)

import common
import dpo
import ppo
import sampling
import scores
import settings

GL = ppo.GAMMA * ppo.LAM


# ---------------------------------------------------------------- advantages and rewards

def test_gae_hand_worked():
    # one prompt position, then three response tokens with rewards 0, 0, 1 and values 0.5, 0.2, 0.4, then padding
    rewards = torch.tensor([[0.0, 0.0, 0.0, 1.0, 0.0]])
    values = torch.tensor([[9.0, 0.5, 0.2, 0.4, 9.0]])
    mask = torch.tensor([[False, True, True, True, False]])
    # gamma = 1, lambda = 0.95: delta_3 = 1 - 0.4 = 0.6, delta_2 = 0.4 - 0.2 = 0.2, delta_1 = 0.2 - 0.5 = -0.3
    want = [0.0, -0.3 + 0.95 * (0.2 + 0.95 * 0.6), 0.2 + 0.95 * 0.6, 0.6, 0.0]
    assert ppo.gae(rewards, values, mask)[0].tolist() == pytest.approx(want)


def test_gae_matches_its_definition_on_random_masked_rows():
    """A_t = sum_l (gamma lambda)^l delta_{t+l} over the response tokens of a row, in float64."""
    g = torch.Generator().manual_seed(0)
    B, T = 6, 12
    rewards, values = torch.randn(B, T, generator=g, dtype=torch.float64), torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b in range(B):  # prompts and responses of different lengths, padding after
        start = int(torch.randint(0, 5, (1,), generator=g))
        mask[b, start:start + int(torch.randint(1, T - start + 1, (1,), generator=g))] = True
    adv = ppo.gae(rewards, values, mask)
    for b in range(B):
        pos = mask[b].nonzero().squeeze(1).tolist()
        v = [values[b, t].item() for t in pos] + [0.0]  # the value after the last response token is 0
        deltas = [rewards[b, t].item() + ppo.GAMMA * v[k + 1] - v[k] for k, t in enumerate(pos)]
        want = [sum(GL ** l * deltas[k + l] for l in range(len(pos) - k)) for k in range(len(pos))]
        assert adv[b, pos].tolist() == pytest.approx(want, rel=1e-12)
        assert adv[b][~mask[b]].abs().max() == 0


def test_token_rewards_put_the_score_on_the_last_response_token():
    logratio = torch.tensor([[5.0, 0.5, -0.2, 0.3, 7.0], [9.0, 9.0, 0.4, 0.1, 9.0]])
    mask = torch.tensor([[False, True, True, True, False], [False, False, True, True, False]])
    score = torch.tensor([2.0, -1.0])
    r = ppo.token_rewards(logratio, score, mask, kl_coef=0.1)
    want = [[0.0, -0.05, 0.02, -0.03 + 2.0, 0.0], [0.0, 0.0, -0.04, -0.01 - 1.0, 0.0]]
    assert r.tolist() == [pytest.approx(w) for w in want]


def test_whiten_is_zero_mean_unit_std_on_the_mask():
    x = torch.randn(4, 7) * 3 + 2
    mask = torch.rand(4, 7) > 0.3
    w = ppo.whiten(x, mask)
    assert w[mask].mean().item() == pytest.approx(0, abs=1e-6)
    assert w[mask].var(unbiased=False).item() == pytest.approx(1, abs=1e-4)
    assert w[~mask].abs().max() == 0


# ---------------------------------------------------------------- the clipped losses

def clip_case(seed):
    """Old values, new ones a step away (with grad), a random third tensor (advantages or returns), a mask."""
    torch.manual_seed(seed)
    old = torch.randn(3, 5, dtype=torch.float64)
    new = (old + torch.randn(3, 5, dtype=torch.float64) * 0.4).requires_grad_()
    return old, new, torch.randn(3, 5, dtype=torch.float64), torch.rand(3, 5) > 0.2


def test_policy_loss_matches_the_clipped_objective_values_and_gradients():
    old, logp, adv, mask = clip_case(0)
    loss, clipfrac = ppo.policy_loss(logp, old, adv, mask)
    loss.backward()
    n, eps = mask.sum().item(), ppo.CLIP
    want, grad, clipped = 0.0, torch.zeros_like(old), 0
    for i, j in mask.nonzero().tolist():
        rho, a = float(np.exp(logp[i, j].item() - old[i, j].item())), adv[i, j].item()
        bound = min(rho, 1 + eps) if a >= 0 else max(rho, 1 - eps)  # the pessimistic side of the clip
        want += -a * bound / n
        grad[i, j] = -a * rho / n if bound == rho else 0.0  # no gradient where the clip holds
        clipped += bound != rho  # the clip binds
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert torch.allclose(logp.grad, grad, rtol=1e-10, atol=1e-14)
    assert clipfrac.item() == pytest.approx(clipped / n) and 0 < clipped < n  # the draw clips some, not all


def test_rollout_tensors_are_constants_inside_the_losses():
    old, logp, adv, mask = (x.detach().clone().requires_grad_(x.dtype.is_floating_point) for x in clip_case(0))
    (ppo.policy_loss(logp, old, adv, mask)[0] + ppo.value_loss(logp, old, adv, mask)).backward()
    assert old.grad is None and adv.grad is None and logp.grad.abs().sum() > 0


def test_value_loss_matches_the_clipped_formula_values_and_gradients():
    old, values, returns, mask = clip_case(1)
    loss = ppo.value_loss(values, old, returns, mask)
    loss.backward()
    n, eps = mask.sum().item(), ppo.CLIP
    want, grad = 0.0, torch.zeros_like(old)
    for i, j in mask.nonzero().tolist():
        v, vo, r = values[i, j].item(), old[i, j].item(), returns[i, j].item()
        vc = vo + min(max(v - vo, -eps), eps)
        plain, clipped = (v - r) ** 2, (vc - r) ** 2
        want += 0.5 * max(plain, clipped) / n
        grad[i, j] = (v - r) / n if plain >= clipped or vc == v else 0.0
    assert loss.item() == pytest.approx(want, rel=1e-12)
    assert torch.allclose(values.grad, grad, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- the KL controller

def test_kl_controller_moves_beta_both_ways():
    assert ppo.kl_update(0.2, kl=12.0, target=6.0, n=64, horizon=1000) == pytest.approx(0.2 * (1 + 0.2 * 0.064))
    assert ppo.kl_update(0.2, kl=6.6, target=6.0, n=64, horizon=1000) == pytest.approx(0.2 * (1 + 0.1 * 0.064))
    assert ppo.kl_update(0.2, kl=1.0, target=6.0, n=64, horizon=1000) == pytest.approx(0.2 * (1 - 0.2 * 0.064))
    assert ppo.kl_update(0.2, kl=6.0, target=6.0, n=64, horizon=1000) == 0.2


# ---------------------------------------------------------------- the reward model

def toy_pairs(n, seed):
    """Pairs whose chosen response is made of 'A' (65) and the rejected one of 'B' (66)."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, 256, 3).tolist() for _ in range(n)]
    return dict(prompt=prompts, chosen=[[65] * int(rng.integers(2, 6)) + [EOS] for _ in range(n)],
                rejected=[[66] * int(rng.integers(2, 6)) + [EOS] for _ in range(n)])


def test_bradley_terry_loss_and_reward_model_accuracy(tmp_path):
    rm = tiny_gpt(0, score_head=True)
    batch = scores.pair_score_batch(toy_pairs(4, 0), range(4), EOS, 64)
    loss, metrics = scores.bradley_terry_loss(rm, batch)
    s = rm.score(rm(batch[0]), batch[1]).detach().double()
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(s[:4] - s[4:]).mean().item(), rel=1e-5)
    assert metrics["acc"] == (s[:4] > s[4:]).double().mean().item()
    args = settings.get_args(["--preset", "tiny", "--device", "cpu", "--out", str(tmp_path), "--batch", "8",
                            "--bt-steps", "30", "--bt-lr", "3e-3", "--eval-every", "30", "--warmup", "1",
                            "--block-size", "64", "--max-new-tokens", "8"])
    trained = scores.reward_model(tiny_gpt(1), toy_pairs(32, 1), toy_pairs(16, 2), args, EOS)
    acc = [json.loads(x)["heldout_acc"] for x in open(tmp_path / "reward_model" / "eval.jsonl")]
    assert acc[0] == 0.5 and acc[-1] == 1.0  # a zero head ties every pair (each counts half), then all right
    assert trained.score_head.weight.abs().max() > 0


# ---------------------------------------------------------------- PPO end to end at toy sizes

def low_bytes(prompts, responses):
    """The toy reward: the fraction of response tokens below 128, scaled to about unit spread."""
    return torch.tensor([4.0 * np.mean([t < 128 for t in r]) for r in responses])


def toy_args(out, *extra):
    return settings.get_args(["--preset", "tiny", "--device", "cpu", "--out", str(out), "--max-new-tokens", "8",
                            "--block-size", "64", "--ppo-batch", "16", "--ppo-minibatches", "2", "--ppo-epochs", "2",
                            "--ppo-eval-every", "2", "--ppo-lr", "3e-3", "--warmup", "1", "--runs", "ppo:4", *extra])


def toy_run(args, sft_model, evaluate=None, name="ppo"):
    ref = tiny_gpt(3).requires_grad_(False)
    prompts = [np.random.default_rng(i).integers(0, 256, 3).tolist() for i in range(32)]
    evaluate = evaluate or (lambda m: dict(kl=0.0))
    return ppo.run(name, 4.0, sft_model, ref, low_bytes, prompts, evaluate, evaluate(sft_model), args, EOS)


def test_ppo_raises_a_known_reward_within_20_iterations(tmp_path):
    prompts = [np.random.default_rng(100 + i).integers(0, 256, 3).tolist() for i in range(64)]
    mean_reward = lambda m: low_bytes(None, sampling.sample(m, prompts, 8, EOS, 0, "cpu")).mean().item() / 4
    sft_model = tiny_gpt(3)
    before = mean_reward(sft_model)
    policy = toy_run(toy_args(tmp_path, "--ppo-iters", "20"), sft_model)
    after = mean_reward(policy)
    assert 0.35 < before < 0.65 and after > before + 0.15, (before, after)
    # its curves: every 10th of the 80 updates and the last, under the names of its log line
    metrics = [json.loads(x) for x in open(tmp_path / "runs" / "ppo_4" / "metrics.jsonl")]
    assert [m["step"] for m in metrics] == [*range(0, 80, 10), 79]
    assert {"lr", "loss", "rollout_kl", "beta_kl", "clipfrac", "grad"} <= set(metrics[-1])


def test_fused_kernel_gives_the_reference_ppo_loss_and_gradients(tmp_path):
    args = toy_args(tmp_path)
    policy, ref = tiny_gpt(0, score_head=True), tiny_gpt(1).requires_grad_(False)
    prompts = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
    data, _ = ppo.ppo_rollout(policy, ref, low_bytes, prompts, 0.1, 0, args, EOS)  # on the CPU (args.device)
    data, policy = data.to(DEVICE), policy.to(DEVICE)
    with torch.no_grad():  # move the policy away from the rollout's so that ratios and the clip matter
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    assert_fused_matches_reference(policy, lambda impl: ppo.ppo_loss(policy, data, impl)[0])


def test_interrupted_ppo_resumes_to_the_same_numbers(tmp_path, monkeypatch):
    prompts = [[1, 2], [3, 4, 5]]
    fingerprint = lambda samples: float(sum(t * (k + 1) for k, t in enumerate(sum(samples, []))))  # of the tokens
    evaluate = lambda m: dict(kl=0.0, fingerprint=fingerprint(sampling.sample(m, prompts, 8, EOS, 0, "cpu")))
    full = toy_run(toy_args(tmp_path / "a", "--ppo-iters", "4"), tiny_gpt(3), evaluate)
    with pytest.raises(Interrupted), killed_at(ppo, 10):  # in the 3rd iteration
        toy_run(toy_args(tmp_path / "b", "--ppo-iters", "4"), tiny_gpt(3), evaluate)
    resumed = toy_run(toy_args(tmp_path / "b", "--ppo-iters", "4"), tiny_gpt(3), evaluate)
    assert open(tmp_path / "a" / "runs/ppo_4/eval.jsonl").read() == open(tmp_path / "b" / "runs/ppo_4/eval.jsonl").read()
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    saved = [torch.load(tmp_path / d / "runs/ppo_4/model.pt", weights_only=True)["state"] for d in ("a", "b")]
    assert saved[0] == saved[1] and saved[0]["kl_coef"] != ppo.KL_INIT


def global_stats_case():
    """Data for the statistics PPO and KTO take over every rank: rows whose halves (even rows: rank 0, odd rows:
    rank 1) have different means, so that one rank's statistic is not the global one."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64) + torch.tensor([3.0, -1.0] * 4, dtype=torch.float64)[:, None]
    mask = torch.rand(8, 6, generator=g) > 0.3
    mismatched = torch.tensor([2.0, 0.1, 2.5, -0.4, 1.5, 0.3, 2.2, 0.0], dtype=torch.float64)
    logps = [torch.randn(8, generator=g, dtype=torch.float64) * 3 for _ in range(4)]
    prompts = [np.random.default_rng(50 + i).integers(0, 256, 1 + i % 3).tolist() for i in range(8)]
    return x, mask, mismatched, logps, prompts


def toy_score(prompts, responses):
    return torch.tensor([4.0 * np.mean([t < 128 for t in r]) + 0.1 * len(p) for p, r in zip(prompts, responses)])


def _ddp_worker(rank, world, port, out_dir, result):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    common.setup_distributed("cpu")
    policy = toy_run(toy_args(out_dir, "--ppo-iters", "2"), tiny_gpt(3))
    state = torch.load(os.path.join(out_dir, "runs/ppo_4/model.pt"), weights_only=True)["state"] if rank == 0 else None
    # the global statistics, each on this rank's half of the data
    x, mask, mismatched, logps, prompts = global_stats_case()
    mine = slice(rank, None, world)
    white = ppo.whiten(x[mine], mask[mine])
    kto, _, _ = dpo.kto_loss(*(t[mine] for t in logps), mismatched[mine], beta=0.5)
    data, stats = ppo.ppo_rollout(sharp_gpt(0, score_head=True), sharp_gpt(1), toy_score, prompts[mine], 0.1, 7,
                              toy_args(out_dir), EOS)
    torch.save(dict(params=policy.state_dict(), state=state, white=white, kto=kto, stats=stats, batch=data[:3]),
               f"{result}.{rank}")
    leave_process_group()


def test_ppo_under_ddp_global_statistics_are_those_of_one_process(tmp_path):
    """Two processes, each with half of every batch: whitening, KTO's z0 and the rollout's score and KL (which
    the KL controller reads) are the statistics of the whole batch, as one process computes them from both
    halves; PPO's training then keeps both ranks in step (same parameters and beta_kl)."""
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path / "ddp"), str(tmp_path / "ddp.pt")), nprocs=2)
    ranks = [torch.load(tmp_path / f"ddp.pt.{r}", weights_only=True) for r in (0, 1)]
    x, mask, mismatched, logps, prompts = global_stats_case()
    m = x[mask]
    want = (x - m.mean()) / (m.var(unbiased=False) + 1e-8).sqrt() * mask
    for r in (0, 1):
        torch.testing.assert_close(ranks[r]["white"], want[r::2], rtol=0, atol=1e-12)
    z0 = max(0.0, mismatched.mean().item())  # 1.025; rank 0 alone would have 2.05, rank 1 none
    sig = lambda t: 1 / (1 + torch.exp(-t))
    pc, pr, rc, rr = logps
    want = torch.cat([1 - sig(0.5 * (pc - rc - z0)), 1 - sig(0.5 * (z0 - (pr - rr)))])
    for r in (0, 1):
        n = len(pc[r::2])
        torch.testing.assert_close(ranks[r]["kto"], torch.cat([want[r::2][:n], want[8:][r::2]]), rtol=1e-12, atol=0)
    policy, ref = sharp_gpt(0, score_head=True), sharp_gpt(1)
    kls, scores = [], []
    for r in (0, 1):  # every row's exact KL in float64, from the rows each rank rolled out
        idx, targets, mask_r = ranks[r]["batch"]
        for i in range(len(idx)):
            start = int(mask_r[i].nonzero()[0])
            prompt, response = idx[i, 1:start + 1].tolist(), targets[i][mask_r[i]].tolist()
            lp, lq = f64_dists(policy, prompt, response, EOS), f64_dists(ref, prompt, response, EOS)
            kls.append((lp.exp() * (lp - lq)).sum().item())
            scores.append(toy_score([prompt], [response]).item())
    assert len(kls) == 8 and abs(np.mean(kls[:4]) - np.mean(kls[4:])) > 0.1
    for r in (0, 1):
        assert ranks[r]["stats"]["rollout_kl"] == pytest.approx(np.mean(kls), rel=1e-5)
        assert ranks[r]["stats"]["score"] == pytest.approx(np.mean(scores), rel=1e-6)
    start = tiny_gpt(3).state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in ranks[0]["params"].items() if k in start)
    for k, v in ranks[0]["params"].items():
        assert torch.equal(v, ranks[1]["params"][k]), k
    assert ranks[0]["state"]["kl_coef"] != ppo.KL_INIT


def test_bad_ppo_input(tmp_path, capsys):
    with pytest.raises(ValueError, match="--ppo-batch 16: a rollout of ppo draws 16 prompts, more than the 4 training"):
        ppo.run("ppo", 4.0, tiny_gpt(3), tiny_gpt(3), low_bytes, [[1]] * 4, None, None, toy_args(tmp_path), EOS)
    for flags, message in [(["--ppo-batch", "0"], "--ppo-batch"), (["--ppo-minibatches", "100"], "--ppo-minibatches 100 is more than --ppo-batch")]:
        with pytest.raises(SystemExit):
            settings.get_args(["--preset", "tiny", "--device", "cpu", "--runs", "ppo:6", *flags])
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------- a rollout and an update against float64

def f64_rollout_case(tmp_path, monkeypatch):
    """A rollout of a policy with a value head (not zero) against a different reference, and the float64
    recomputation of every tensor it returns: per-token log-probs, values, rewards with the KL penalty, GAE by
    its definition, whitening over the rollout, returns = advantages + values."""
    policy, ref = sharp_gpt(0, score_head=True), sharp_gpt(1)
    prompts = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
    calls = recording(monkeypatch, ppo)
    kl_coef = 0.3
    data, stats = ppo.ppo_rollout(policy, ref, toy_score, prompts, kl_coef, 0, toy_args(tmp_path), EOS)
    (_, _, responses), = calls
    m = copy.deepcopy(policy).double()
    rows = []
    for p, r in zip(prompts, responses):
        lp, lq = f64_dists(policy, p, r, EOS), f64_dists(ref, p, r, EOS)
        t = torch.arange(len(r))
        logp, logq = lp[t, torch.tensor(r)], lq[t, torch.tensor(r)]
        with torch.no_grad():
            values = m.score_head(m(torch.tensor([[EOS] + p + r]))[0, len(p):len(p) + len(r)]).squeeze(-1)
        rewards = -kl_coef * (logp - logq)
        rewards[-1] += toy_score([p], [r]).item()
        v = values.tolist() + [0.0]
        deltas = [rewards[k].item() + ppo.GAMMA * v[k + 1] - v[k] for k in range(len(r))]
        adv = [sum(GL ** l * deltas[k + l] for l in range(len(r) - k)) for k in range(len(r))]
        rows.append(dict(logp=logp, ref_logp=logq, values=values, adv=torch.tensor(adv, dtype=torch.float64),
                         kl=(lp.exp() * (lp - lq)).sum().item(), score=toy_score([p], [r]).item()))
    every = torch.cat([row["adv"] for row in rows])
    for row in rows:
        row["white"] = (row["adv"] - every.mean()) / (every.var(unbiased=False) + 1e-8).sqrt()
    return policy, data, stats, rows


def test_rollout_tensors_are_their_float64_values(tmp_path, monkeypatch):
    _, data, stats, rows = f64_rollout_case(tmp_path, monkeypatch)
    idx, targets, mask, logp, ref_logp, values, adv, returns = data  # the Rollout's fields, in order
    for i, row in enumerate(rows):
        on = mask[i]
        torch.testing.assert_close(logp[i][on].double(), row["logp"], rtol=0, atol=2e-5)
        torch.testing.assert_close(ref_logp[i][on].double(), row["ref_logp"], rtol=0, atol=2e-5)
        torch.testing.assert_close(values[i][on].double(), row["values"], rtol=0, atol=2e-5)
        torch.testing.assert_close(adv[i][on].double(), row["white"], rtol=0, atol=2e-5)
        torch.testing.assert_close(returns[i][on].double(), row["adv"] + row["values"], rtol=0, atol=2e-5)
        assert adv[i][~on].abs().max() == 0
    kl = stats["rollout_kl"]
    assert kl == pytest.approx(np.mean([r["kl"] for r in rows]), rel=1e-5) and kl > 0.1
    assert stats["score"] == pytest.approx(np.mean([r["score"] for r in rows]), rel=1e-6)


def test_ppo_loss_is_the_clipped_objective_plus_the_value_loss(tmp_path, monkeypatch):
    """ppo_loss on a rollout's minibatch after the policy moved: pg + VF_COEF * vf, each recomputed in float64
    from the moved policy's log-probs and values (a loss that maximised the value error would differ)."""
    policy, data, _, rows = f64_rollout_case(tmp_path, monkeypatch)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(9)) * 0.02)
    idx, targets, mask, old_logp, _, old_values, adv, returns = data
    loss, metrics = ppo.ppo_loss(policy, data, "reference")
    m = copy.deepcopy(policy).double()
    pg, vf, n = 0.0, 0.0, int(mask.sum())
    for i in range(len(idx)):
        start = int(mask[i].nonzero()[0])
        prompt, response = idx[i, 1:start + 1].tolist(), targets[i][mask[i]].tolist()
        lp = f64_dists(policy, prompt, response, EOS)[torch.arange(len(response)), torch.tensor(response)]
        with torch.no_grad():
            v = m.score_head(m(torch.tensor([[EOS] + prompt + response]))[0, start:start + len(response)]).squeeze(-1)
        a, ratio = adv[i][mask[i]].double(), (lp - old_logp[i][mask[i]].double()).exp()
        pg += torch.max(-a * ratio, -a * ratio.clamp(1 - ppo.CLIP, 1 + ppo.CLIP)).sum().item() / n
        vo, ret = old_values[i][mask[i]].double(), returns[i][mask[i]].double()
        vc = vo + (v - vo).clamp(-ppo.CLIP, ppo.CLIP)
        vf += 0.5 * torch.max((v - ret) ** 2, (vc - ret) ** 2).sum().item() / n
    assert metrics["pg"] == pytest.approx(pg, rel=1e-4, abs=1e-5) and metrics["vf"] == pytest.approx(vf, rel=1e-4)
    assert loss.item() == pytest.approx(pg + ppo.VF_COEF * vf, rel=1e-4, abs=1e-5) and vf > 0.01


def test_values_are_fp32_under_bf16_autocast(tmp_path, monkeypatch):
    """The value head, like every scalar head, runs in fp32 under bf16 autocast (common.amp on CUDA;
    CPU autocast stands in for it): the rollout's values and the update's are the fp32 head on the
    hidden states the step computed (bf16 would round values of about 10 by steps of 0.06)."""
    policy, ref = sharp_gpt(0, score_head=True), sharp_gpt(1)
    hidden = []
    policy.transformer.ln_f.register_forward_hook(lambda mod, args, out: hidden.append(out))
    weight, bias = policy.score_head.weight, policy.score_head.bias
    monkeypatch.setattr(ppo, "amp", lambda device: torch.autocast("cpu", torch.bfloat16))
    prompts = [[1, 2, 3], [4], [5, 6]]
    samples, _ = ppo.ppo_rollout(policy, ref, toy_score, prompts, 0.3, 0, toy_args(tmp_path), EOS)
    with torch.no_grad():
        # the rollout's forward is the policy's last
        want = torch.nn.functional.linear(hidden[-1].float(), weight, bias)[..., 0] * samples.mask
        assert samples.values.dtype == torch.float32 and torch.equal(samples.values, want)
        assert want.abs().max() > 5
        with torch.autocast("cpu", torch.bfloat16):
            h = policy(samples.idx, lengths=common.real_lengths(samples.mask))
        want = torch.nn.functional.linear(h.float(), weight, bias)[..., 0]
        with torch.autocast("cpu", torch.bfloat16):
            batch = samples._replace(values=want, returns=want)
            _, metrics = ppo.ppo_loss(policy, batch, "reference")
    assert metrics["vf"] == 0.0  # values - returns = 0 exactly: the update's values are the fp32 head


def labelled_rollouts(monkeypatch):
    """ppo.run on rollouts of labelled rows (row k of the n-th rollout holds 100 n + k) and a loss that trains
    nothing: returns the rollouts made (prompts, seed, kl_coef) and the rows of every minibatch, in order."""
    rollouts, minibatches = [], []

    def fake_rollout(policy, ref, score_fn, prompts, kl_coef, seed, args, eos):
        rollouts.append((prompts, seed, kl_coef))
        rows = (torch.arange(len(prompts)) + 100 * len(rollouts))[:, None].expand(-1, 3).clone()
        return ppo.Rollout(*[rows] * 8), dict(score=0.0, rollout_kl=12.0)

    def fake_loss(model, batch, impl):
        minibatches.append(batch.idx[:, 0].tolist())
        return sum(p.sum() for p in model.parameters()) * 0.0, {}
    monkeypatch.setattr(ppo, "ppo_rollout", fake_rollout)
    monkeypatch.setattr(ppo, "ppo_loss", fake_loss)
    return rollouts, minibatches


def test_each_epoch_hands_out_every_row_of_the_rollout_once(tmp_path, monkeypatch):
    """ppo.run's loops: a new rollout (of different prompts, another seed) every epochs * minibatches steps;
    within each epoch the minibatches are disjoint and cover the rollout."""
    args = toy_args(tmp_path, "--ppo-batch", "6", "--ppo-minibatches", "3", "--ppo-epochs", "2", "--ppo-iters", "2")
    rollouts, minibatches = labelled_rollouts(monkeypatch)
    ppo.run("ppo", 6.0, tiny_gpt(3), None, None, [[i] for i in range(10)], lambda m: {}, {}, args, EOS)
    assert len(minibatches) == 2 * 2 * 3
    for it in range(2):
        for epoch in range(2):
            seen = minibatches[it * 6 + epoch * 3:][:3]
            assert sorted(sum(seen, [])) == [100 * (it + 1) + k for k in range(6)] and all(len(x) == 2 for x in seen)
    assert len(rollouts) == 2 and rollouts[0][1] != rollouts[1][1] and rollouts[0][0] != rollouts[1][0]
    assert all(len(p) == 6 and len({tuple(x) for x in p}) == 6 for p, _, _ in rollouts)


def test_the_kl_controller_reads_each_rollout_and_sets_the_next_ones_beta(tmp_path, monkeypatch):
    """PPO's run: the first rollout is made at KL_INIT, and the next at kl_update(KL_INIT, the first's KL)."""
    args = toy_args(tmp_path, "--ppo-batch", "6", "--ppo-minibatches", "3", "--ppo-epochs", "2", "--ppo-iters", "2")
    rollouts, _ = labelled_rollouts(monkeypatch)
    ppo.run("ppo", 6.0, tiny_gpt(3), None, None, [[i] for i in range(10)], lambda m: {}, {}, args, EOS)
    made = [kl_coef for _, _, kl_coef in rollouts]
    assert made[0] == ppo.KL_INIT and made[1] == pytest.approx(ppo.kl_update(ppo.KL_INIT, 12.0, 6.0, 6, args.kl_horizon))
    assert made[1] != made[0]


@pytest.mark.parametrize("method", ["ppo", "ppo-gt", "rloo", "grpo"])
def test_online_runs_train_with_the_optimizer_asked_for(tmp_path, monkeypatch, method):
    """--optimizer reaches every online run (the imdb preset's RMSprop; they trained with AdamW whatever it said)."""
    got = {}

    def make_optimizer(model, name, lr):
        got.update(name=name)
        raise Interrupted("stop before any work")
    monkeypatch.setattr(ppo, "make_optimizer", make_optimizer)
    args = toy_args(tmp_path, "--optimizer", "rmsprop", "--runs", f"{method}:3")
    with pytest.raises(Interrupted):
        ppo.run(method, 3.0, tiny_gpt(3), None, None, [[i] for i in range(40)], None, None, args, EOS)
    assert got["name"] == "rmsprop"


def test_score_normalisation_gives_sft_samples_mean_0_std_1(tmp_path, monkeypatch):
    """normalised(score_fn): on the SFT samples it was fitted on, the normalised scores have mean 0 and std 1
    (scores spread by ~5, so dividing by the std and multiplying by it differ)."""
    sft = tiny_gpt(0)
    prompts = [[i, i + 1] for i in range(24)]
    score_fn = lambda p, r: torch.tensor([50.0 * np.mean(x) / 256 + len(q) for q, x in zip(p, r)])
    prompts = [p[: 1 + i % 2] for i, p in enumerate(prompts)]  # the score reads the prompt too
    calls = recording(monkeypatch, sampling)
    f = scores.normalised(score_fn, sft, prompts, toy_args(tmp_path), EOS, "test")
    (args, _, samples), = calls
    raw = score_fn(args[1], samples)
    z = f(args[1], samples)
    assert args[1] == prompts and (tmp_path / "score_norm_test.json").exists()
    assert len(samples) == 24 and raw.std() > 2
    assert z.mean().item() == pytest.approx(0, abs=1e-5) and z.std().item() == pytest.approx(1, abs=1e-5)


# ---------------------------------------------------------------- the copies, the wiring of the runs

def test_with_zero_head_is_a_copy_with_its_own_weights():
    """The policy and the reward model start as copies of the SFT model: changing the copy leaves the original
    (pi_ref) as it was; the copy's head is zero, the original keeps none."""
    model = tiny_gpt(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copied = scores.with_zero_head(model, "cpu")
    assert all(torch.equal(v, copied.state_dict()[k]) for k, v in before.items())
    with torch.no_grad():
        for p in copied.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and model.score_head is None
    assert copied.score_head.weight.abs().max() == 1 and copied.score_head.bias.item() == 1  # 0, then + 1


def test_whitening_equal_advantages_gives_zeros_not_nan():
    """Every advantage of the rollout equal (variance 0): whitened to 0, where 1e-8 keeps the square root real."""
    x = torch.full((2, 4), 0.5)
    mask = torch.tensor([[False, True, True, True], [False, False, True, False]])
    white = ppo.whiten(x, mask)
    assert white.dtype == torch.float32 and torch.equal(white, torch.zeros(2, 4))  # real, not complex


def test_the_impl_asked_for_reaches_the_kernel(tmp_path):
    """--impl goes from ppo_loss to the kernel: an unknown one is refused there, not replaced by the default."""
    policy = tiny_gpt(0, score_head=True)
    data, _ = ppo.ppo_rollout(policy, tiny_gpt(1), low_bytes, [[1, 2], [3]], 0.1, 0, toy_args(tmp_path), EOS)
    with pytest.raises(ValueError, match="impl must be 'auto', 'triton' or 'reference', got 'fused'"):
        ppo.ppo_loss(policy, data, "fused")


def test_the_reward_model_steps_at_its_warmup_rate_evaluates_every_eval_every_and_repeats(tmp_path):
    """reward_model: its first step at --bt-lr / --warmup (AdamW's first step moves each weight of the zero head
    that has a gradient by the learning rate); held-out accuracy at steps 0, 2 and 3 of 3 with --eval-every 2;
    the same settings give the same weights (the batches are seeded)."""
    pairs, heldout = toy_pairs(32, 1), toy_pairs(8, 2)
    flags = ["--preset", "tiny", "--batch", "8", "--bt-lr", "1e-2", "--block-size", "64", "--max-new-tokens", "8"]
    args = settings.get_args(["--device", "cpu", *flags, "--out", str(tmp_path / "one"), "--bt-steps", "1",
                              "--warmup", "4"])
    rm = scores.reward_model(tiny_gpt(1), pairs, heldout, args, EOS)
    assert rm.score_head.weight.abs().max().item() == pytest.approx(1e-2 / 4, rel=1e-3)
    models = []
    for out in ("a", "b"):
        args = settings.get_args(["--device", "cpu", *flags, "--out", str(tmp_path / out), "--bt-steps", "3",
                                  "--eval-every", "2", "--warmup", "1"])
        models.append(scores.reward_model(tiny_gpt(1), pairs, heldout, args, EOS))
        steps = [json.loads(x)["step"] for x in open(tmp_path / out / "reward_model" / "eval.jsonl")]
        assert steps == [0, 2, 3]
    assert all(torch.equal(a, b) for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()))


def test_a_ppo_run_on_exactly_ppo_batch_prompts(tmp_path, monkeypatch):
    """ppo.run with as many training prompts as --ppo-batch (allowed): every rollout holds each prompt once;
    evaluations every --ppo-eval-every iterations and at the end; the first step at --ppo-lr / --warmup (the
    zero value head's bias, which the value loss moves, moves by the learning rate on AdamW's first step)."""
    prompts = [[i + 1, 2 * i + 3] for i in range(8)]
    rollouts = recording(monkeypatch, ppo, "rollout")
    evaluate = lambda m: dict(kl=0.0)
    flags = ["--ppo-batch", "8", "--ppo-minibatches", "1", "--ppo-epochs", "1", "--ppo-lr", "1e-2"]
    args = toy_args(tmp_path / "a", *flags, "--ppo-iters", "3", "--ppo-eval-every", "2")
    ppo.run("ppo", 4.0, tiny_gpt(3), tiny_gpt(3).requires_grad_(False), low_bytes, prompts, evaluate, {}, args, EOS)
    assert [json.loads(x)["step"] for x in open(tmp_path / "a" / "runs/ppo_4/eval.jsonl")] == [0, 2, 3]
    assert len(rollouts) == 3 and all(sorted(call[0][3]) == sorted(prompts) for call in rollouts)
    args = toy_args(tmp_path / "b", *flags, "--ppo-iters", "1", "--warmup", "4")
    policy = ppo.run("ppo", 4.0, tiny_gpt(3), tiny_gpt(3).requires_grad_(False), low_bytes, prompts, evaluate,
                     {}, args, EOS)
    assert abs(policy.score_head.bias.item()) == pytest.approx(1e-2 / 4, rel=1e-3)


def test_rollout_runs_the_policy_in_eval_mode_and_hands_it_back_in_train_mode(tmp_path, monkeypatch):
    """ppo.rollout of a policy with dropout 0.5 (on cpu; the pipeline's models have none, a user's may): the log-probs
    and values it records are those of the policy without dropout (float64, eval mode), and the policy comes back
    in train mode for the update."""
    from model import GPT, GPTConfig
    torch.manual_seed(0)
    policy = GPT(GPTConfig(block_size=64, vocab_size=257, n_layer=1, n_head=2, n_embd=32, score_head=True,
                           dropout=0.5)).train()
    prompts = [[1, 2, 3], [4], [5, 6]]
    calls = recording(monkeypatch, ppo)
    data, _, _ = ppo.rollout(policy, sharp_gpt(1), toy_score, prompts, 0, toy_args(tmp_path), EOS)
    (_, _, responses), = calls
    assert policy.training
    m = copy.deepcopy(policy).double().eval()
    for i, (p, r) in enumerate(zip(prompts, responses)):
        on = data.mask[i]
        want = f64_dists(policy, p, r, EOS)[torch.arange(len(r)), torch.tensor(r)]
        torch.testing.assert_close(data.logp[i][on].double(), want, rtol=0, atol=2e-5)
        with torch.no_grad():
            v = m.score_head(m(torch.tensor([[EOS] + p + r]))[0, len(p):len(p) + len(r)]).squeeze(-1)
        torch.testing.assert_close(data.values[i][on].double(), v, rtol=0, atol=2e-5)
