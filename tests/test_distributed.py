"""torchrun's path as far as a CPU shows it: gloo processes stand in for the GPUs, monkeypatched calls for
what only CUDA has (NCCL's device rule, torch.cuda.set_device).

    python -m pytest tests/test_distributed.py     (CPU; about 30 s)
"""
import datetime
import json
import os
import time
from argparse import Namespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch.cuda._utils import _get_device_index
from conftest import EOS, free_port, leave_process_group, tiny_gpt

import common
import dpo
import ppo
import sampling
import scores
import settings
import stages
from data.corpus import Split, write_atomic


# ---------------------------------------------------------------- one process, CUDA's calls stood in for
def test_global_mean_all_reduces_on_the_device_it_is_given(monkeypatch):
    """NCCL takes tensors on the rank's CUDA device only; meta stands in for that device here."""
    seen = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t: seen.append(t.device))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: [0.0] * t.numel())  # a meta tensor holds no values
    common.global_mean(1.0, 3.0, device="meta")
    assert seen == [torch.device("meta")]


def test_a_cuda_device_becomes_the_current_one(monkeypatch):
    """Triton launches on the current device: --device cuda:1 must make cuda:1 current, with or without torchrun."""
    current, groups = [], []
    # set_device's own argument rule (it refuses a device without an index), then the device it would make current
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(f"cuda:{_get_device_index(d)}"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.distributed, "init_process_group", groups.append)
    monkeypatch.setattr(torch.distributed, "new_group",
                        lambda backend, timeout: groups.append(backend))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert common.setup_distributed("cuda:1") == "cuda:1" and current == ["cuda:1"] and groups == []
    assert common.setup_distributed("cuda") == "cuda:0" and current == ["cuda:1", "cuda:0"]  # the default --device
    current.clear()
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert common.setup_distributed("cuda") == "cuda:3" and current == ["cuda:3"]
    assert groups == ["nccl", "gloo"]


def test_seeds_of_different_purposes_differ():
    assert len({common.derive_seed(5, p, 0) for p in ("pairs.pt", "pairs_heldout.pt", "best_of_n", "rollout")}) == 4
    assert common.derive_seed(5, "rollout", 0, 1) != common.derive_seed(5, "rollout", 0, 0) != \
        common.derive_seed(6, "rollout", 0, 0)


@pytest.mark.parametrize("world", [2, 4])
def test_a_rows_batch_and_crop_do_not_depend_on_the_ranks(monkeypatch, world):
    """The classifier's batches under torchrun: rank r holds rows r, r + world, ... of the one-process batch,
    each with the same crop (and SFT's too); and KTO's mismatched rows come from the whole batch."""
    lengths = np.arange(20, 80)
    split = data_split(lengths)
    whole = stages.ReviewBatches(split, 8, 64, EOS, 3, scored_len=20)(0)
    for rank in range(world):
        monkeypatch.setattr(stages, "rank_world", lambda: (rank, world))
        share = stages.ReviewBatches(split, 8, 64, EOS, 3, scored_len=20)(0)
        for i, j in enumerate(range(rank, 8, world)):
            n = int(whole[2][j].sum())
            assert int(share[2][i].sum()) == n and torch.equal(share[1][i, :n], whole[1][j, :n]) \
                and share[3][i] == whole[3][j]
    pairs = dict(prompt=[[i] for i in range(10)], chosen=[[100 + i, EOS] for i in range(10)],
                 rejected=[[200 + i, EOS] for i in range(10)])
    monkeypatch.setattr(dpo, "rank_world", lambda: (0, 1))
    idx, targets, mask = dpo.pair_batch(pairs, 0, world, 64, EOS, 0, mismatched=True)
    prompts = idx[:world, 1].tolist()
    for rank in range(world):  # one pair per rank: its mismatched row holds the next rank's chosen response
        monkeypatch.setattr(dpo, "rank_world", lambda: (rank, world))
        idx, targets, mask = dpo.pair_batch(pairs, 0, world, 64, EOS, 0, mismatched=True)
        assert idx[2, 1] == prompts[rank] and targets[2][mask[2]].tolist() == [100 + prompts[(rank + 1) % world], EOS]


def data_split(lengths):
    """A split of reviews of the given lengths in tokens, alternately labelled."""
    tokens = (np.arange(lengths.sum()) % 170).astype(np.uint16)
    return Split(tokens, np.concatenate([[0], np.cumsum(lengths)]), (np.arange(len(lengths)) % 2).astype(np.uint8),
                 (lengths * 5).astype(np.int32))


def test_writers_of_one_path_each_rename_a_whole_file(tmp_path):
    """Another process writing the same path while this one writes (here: nested, so that it is certain)."""
    path = str(tmp_path / "x.json")

    def outer(f):
        f.write(b"outer ")
        write_atomic(path, lambda g: g.write(b"inner"))
        f.write(b"done")
    write_atomic(path, outer)
    assert open(path).read() == "outer done" and os.listdir(tmp_path) == ["x.json"]


# ---------------------------------------------------------------- gloo processes
def _run(rank, world, port, job, tmp, timeout):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # the process group's own timeout for its collectives (NCCL's: 10 minutes)
    if timeout is not None:
        init = torch.distributed.init_process_group
        torch.distributed.init_process_group = lambda backend: init(backend, timeout=timeout)
    common.setup_distributed("cpu")
    try:
        result = job(rank, tmp)
    except Exception as e:  # every rank reports what it raised; one that hangs fails the test by its timeout
        result = f"{type(e).__name__}: {e}"
    torch.save(result, os.path.join(tmp, f"result.{rank}"))
    leave_process_group()


def spawn(job, world, tmp, timeout=None):
    mp.spawn(_run, args=(world, free_port(), job, str(tmp), timeout), nprocs=world)
    return [torch.load(os.path.join(tmp, f"result.{r}"), weights_only=False) for r in range(world)]


def sampling_args(out):
    return Namespace(out=out, max_new_tokens=4, block_size=64, seed=5, device="cpu")


PROMPTS = [np.random.default_rng(i).integers(0, 256, 3).tolist() for i in range(256)]  # x4 = 4 chunks of 256


def _cold_start_and_sampling(rank, tmp):
    """Every rank loads the tiny data from an empty folder, then makes the pairs and a score normalisation."""
    prepared = []
    original = stages.prepare_tiny
    stages.prepare_tiny = lambda folder: prepared.append(rank) or original(folder)
    torch.distributed.barrier()  # all at once, as torchrun starts them
    data = stages.load_data(os.path.join(tmp, "data"), "tiny")
    draws = []
    sample = sampling.sample  # what make_pairs and scores.normalised draw with
    sampling.sample = lambda *a: draws.append(len(a[1])) or sample(*a)
    args = sampling_args(os.path.join(tmp, "out"))
    pairs = stages.make_pairs(tiny_gpt(1), tiny_gpt(2, score_head=True), PROMPTS, args, EOS)
    scores.normalised(lambda p, r: torch.tensor([float(len(x)) for x in r]), tiny_gpt(1), PROMPTS * 4, args, EOS, "gt")
    return dict(prepared=prepared, reviews=len(data["train"]), draws=draws, pairs=len(pairs["prompt"]))


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("four")
    return spawn(_cold_start_and_sampling, 4, tmp), tmp


def test_one_rank_per_machine_prepares_the_data(four_ranks):
    ranks, _ = four_ranks
    assert all(isinstance(r, dict) for r in ranks), ranks
    # every rank reads the whole train split of the tiny generator (data/tiny/prepare.py: 12,000)
    assert [r["prepared"] for r in ranks] == [[0], [], [], []] and {r["reviews"] for r in ranks} == {12000}


def test_every_rank_samples_a_share_and_the_result_does_not_depend_on_the_ranks(four_ranks, tmp_path):
    ranks, tmp = four_ranks
    assert all(isinstance(r, dict) for r in ranks), ranks
    assert [r["draws"] for r in ranks] == [[256, 256]] * 4  # one chunk of the pairs, one of the normalisation
    args = sampling_args(str(tmp_path))  # one process: the same pairs and normalisation
    stages.make_pairs(tiny_gpt(1), tiny_gpt(2, score_head=True), PROMPTS, args, EOS)
    scores.normalised(lambda p, r: torch.tensor([float(len(x)) for x in r]), tiny_gpt(1), PROMPTS * 4, args, EOS, "gt")
    one, four = (torch.load(os.path.join(d, "pairs.pt"), weights_only=True) for d in (tmp_path, tmp / "out"))
    assert one == four and len(one["prompt"]) == ranks[0]["pairs"] > 0
    assert json.load(open(tmp_path / "score_norm_gt.json")) == json.load(open(tmp / "out" / "score_norm_gt.json"))


def _rollout_seeds_and_a_nan(rank, tmp):
    """The seeds of one PPO rollout on each rank, then a loss that is NaN on rank 1 only at step 1."""
    seeds = []
    sample = ppo.sample
    ppo.sample = lambda *a: seeds.append(a[4]) or sample(*a)
    args = settings.get_args(["--preset", "tiny", "--device", "cpu", "--out", tmp, "--max-new-tokens", "4",
                            "--block-size", "64", "--ppo-batch", "8", "--ppo-minibatches", "2"])
    score = lambda p, r: torch.zeros(len(r))
    policy, ref = tiny_gpt(1, score_head=True), tiny_gpt(2)
    prompts, seed = ppo.draw_prompts(PROMPTS[:16], 8, 0, args.seed)  # ppo.run's first rollout
    ppo.ppo_rollout(policy, ref, score, prompts, 0.1, seed, args, EOS)
    batch = lambda step: common.pack([[1, 2]], [[3, EOS]], 64, EOS)
    steps = []

    def loss_fn(m, b):
        steps.append(len(steps))
        value = m(b[0]).float().mean()
        return value * (float("nan") if rank == 1 and len(steps) == 2 else 1.0), {}
    try:
        common.fit("nan", tiny_gpt(), loss_fn, batch, 4, 1e-3, args)
        raised = "nothing"
    except FloatingPointError as e:
        raised = str(e)
    return dict(seeds=seeds, raised=raised)


def test_ranks_roll_out_with_their_own_seeds_and_stop_together_on_a_nan(tmp_path):
    ranks = spawn(_rollout_seeds_and_a_nan, 2, tmp_path)
    assert all(isinstance(r, dict) for r in ranks), ranks
    assert len(ranks[0]["seeds"]) == len(ranks[1]["seeds"]) == 1 and ranks[0]["seeds"] != ranks[1]["seeds"]
    assert "[nan] loss is not finite on another rank at step 1" in ranks[0]["raised"]
    assert "[nan] loss is nan at step 1" in ranks[1]["raised"]


def _whiten_unequal_shares(rank, tmp):
    """Rank 0 holds 3 response tokens of the rollout, rank 1 holds 10: whitened over all 13."""
    x, mask = WHITEN_CASE[rank]
    return ppo.whiten(x, mask)


WHITEN_CASE = [(torch.tensor([[1.0, 2.0, 3.0, 9.0]], dtype=torch.float64), torch.tensor([[True, True, True, False]])),
               (torch.arange(10.0, dtype=torch.float64).view(2, 5) * 0.5 - 4, torch.ones(2, 5, dtype=torch.bool))]


def test_whitening_is_over_every_token_of_the_rollout_not_a_mean_of_ranks(tmp_path):
    ranks = spawn(_whiten_unequal_shares, 2, tmp_path)
    assert all(isinstance(r, torch.Tensor) for r in ranks), ranks
    values = torch.cat([r[m] for r, (_, m) in zip(ranks, WHITEN_CASE)])
    raw = torch.cat([x[m] for x, m in WHITEN_CASE])
    want = (raw - raw.mean()) / raw.std(unbiased=False)  # float64, one process over the same 13 tokens
    torch.testing.assert_close(values, want, rtol=0, atol=1e-6)
    assert ranks[0][0, 3] == 0  # off the mask


def _grpo_unequal_shares(rank, tmp):
    """GRPO's loss and its gradient on one rank's share: rank 0 holds 3 response tokens, rank 1
    holds 10."""
    logp, old, ref, adv, mask = (x.clone() for x in GRPO_CASE[rank])
    logp.requires_grad_()
    loss = ppo.grpo_loss(logp, old, ref, adv, mask, 0.1)[0]
    loss.backward()
    return loss.detach(), logp.grad


def grpo_share(seed, B, T, n_real):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    moved = lambda s: logp + torch.randn(B, T, generator=g, dtype=torch.float64) * s
    mask = (torch.arange(T) < n_real)[None].expand(B, T)
    return logp, moved(0.1), moved(0.5), torch.randn(B, generator=g, dtype=torch.float64), mask


GRPO_CASE = [grpo_share(0, 1, 5, 3), grpo_share(1, 2, 5, 5)]


def test_grpo_loss_is_one_token_mean_over_every_rank(tmp_path):
    """DDP averages the ranks' gradients: under two gloo ranks with 3 and 10 tokens, the mean of
    their losses and of their gradients is GRPO's loss and gradient of one process over all 13
    tokens (a mean of the ranks' token means would weigh each of rank 0's tokens 10/3 times as much
    as one of rank 1's)."""
    ranks = spawn(_grpo_unequal_shares, 2, tmp_path)
    assert all(isinstance(r, tuple) for r in ranks), ranks
    whole = [torch.cat(xs) for xs in zip(*GRPO_CASE)]
    logp = whole[0].clone().requires_grad_()
    loss = ppo.grpo_loss(logp, *whole[1:], 0.1)[0]
    loss.backward()
    torch.testing.assert_close((ranks[0][0] + ranks[1][0]) / 2, loss.detach(), rtol=1e-12, atol=0)
    grads = torch.cat([r[1] for r in ranks]) / 2
    torch.testing.assert_close(grads, logp.grad, rtol=1e-12, atol=1e-15)


def _a_long_first_block(rank, tmp):
    """Local rank 0 runs its block for 5 s (a download) while rank 1 waits for it."""
    t0 = time.time()
    with common.local_rank_first():
        if rank == 0:
            time.sleep(5)
    return round(time.time() - t0)


def test_ranks_wait_for_local_rank_0_past_the_process_groups_timeout(tmp_path):
    """A process group whose collectives time out after 2 s stands in for NCCL's 10 minutes, rank
    0's 5 s block for a download of gpt2-xl: the waiting rank waits it out (barrier waits in a gloo
    group of WAIT_TIMEOUT)."""
    ranks = spawn(_a_long_first_block, 2, tmp_path, timeout=datetime.timedelta(seconds=2))
    assert ranks == [5, 5], ranks
