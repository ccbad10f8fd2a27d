"""plots/curves.py and common.MetricsLog: metrics.jsonl under a resume and over gloo ranks (the
mean of common.log_step), and the figure drawn from it.

    python -m pytest tests/test_curves.py      (CPU; about 20 s: two gloo processes)
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port

from common import Clock, MetricsLog, log_step
from plots.curves import NAMES, PANELS, curves_figure, plot_curves

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lines(path):
    return [json.loads(x) for x in open(path)]


def fake_steps(log, steps):
    """What a DPO run logs where both log-probs fall and the rejected faster: the chosen reward
    falls too, the margin rises."""
    for s in steps:
        c, r = -0.01 * s, -0.03 * s
        log.write(s, lr=1e-4, loss=0.69 - 0.01 * s, **{
            "rewards/chosen": c, "rewards/rejected": r, "rewards/margins": c - r,
            "rewards/accuracies": 0.5 + 0.04 * s, "logps/chosen": -20 + c * 10,
            "logps/rejected": -22 + r * 10})


def test_one_line_per_step_in_the_order_given(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    MetricsLog(path).write(0, lr=0.5, loss=torch.tensor(1.25), **{"rewards/chosen": 2})
    assert open(path).read() == '{"step": 0, "lr": 0.5, "loss": 1.25, "rewards/chosen": 2.0}\n'


def test_a_resumed_run_neither_duplicates_nor_loses_a_step(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    fake_steps(MetricsLog(path), range(0, 10))  # killed after step 9; its last checkpoint was at step 6
    with open(path, "a") as f:
        f.write('{"step": 10, "lo')  # torn by the kill
    fake_steps(MetricsLog(path, start=6), range(6, 12))  # resumed from that checkpoint
    records = lines(path)
    assert [r["step"] for r in records] == list(range(12))
    assert records[7]["rewards/chosen"] == pytest.approx(-0.07)
    fake_steps(MetricsLog(path, start=0), range(0, 2))  # a fresh start begins a fresh file
    assert [r["step"] for r in lines(path)] == [0, 1]


def _rank(rank, world, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    log = MetricsLog(os.path.join(tmp, "metrics.jsonl"))
    for step in range(3):  # rank r's share: loss r + step, accuracy 1 on rank 0 only
        mine = dict(loss=rank + step, **{"rewards/accuracies": float(rank == 0), "lr": 0.1})
        log.write(step, **log_step("run", step, mine, Clock(0, 3), "cpu"))  # as the loops do
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_ranks_write_their_mean_once(tmp_path):
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2)
    want = [dict(step=s, loss=0.5 + s, **{"rewards/accuracies": 0.5}, lr=0.1) for s in range(3)]
    assert lines(tmp_path / "metrics.jsonl") == want


def test_the_figure_draws_each_name_against_the_step(tmp_path):
    fake_steps(MetricsLog(str(tmp_path / "metrics.jsonl")), range(0, 50, 10))
    fig = curves_figure(str(tmp_path))
    assert [ax.get_title() for ax in fig.axes] == [t for t, _ in PANELS]
    drawn = {line.get_label(): line for ax in fig.axes for line in ax.lines
             if not line.get_label().startswith("_")}  # not the reference lines at 0 and 0.5
    assert set(drawn) == set(NAMES) | {"loss"}
    assert drawn["rewards/chosen"].get_xdata().tolist() == [0, 10, 20, 30, 40]
    assert drawn["rewards/chosen"].get_ydata().tolist() == pytest.approx([0, -0.1, -0.2, -0.3, -0.4])
    assert drawn["rewards/margins"].get_ydata().tolist() == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    assert drawn["logps/rejected"] in fig.axes[2].lines and drawn["loss"] in fig.axes[3].lines


def test_a_run_without_pair_metrics_says_so(tmp_path):
    log = MetricsLog(str(tmp_path / "metrics.jsonl"))
    log.write(0, loss=2.0, lr=1e-3)  # Preferred-FT logs its loss only
    fig = curves_figure(str(tmp_path))
    assert [t.get_text() for t in fig.axes[0].texts] == ["not logged by this method"]
    assert [line.get_label() for line in fig.axes[3].lines] == ["loss"]


def test_the_command_draws_every_run_of_a_folder_and_mistakes_are_one_line(tmp_path):
    for run in ("dpo_0.1", "ipo_0.5"):
        (tmp_path / "runs" / run).mkdir(parents=True)
        fake_steps(MetricsLog(str(tmp_path / "runs" / run / "metrics.jsonl")), range(3))
    (tmp_path / "runs" / "sft_only").mkdir()  # no metrics: left out
    script = os.path.join(REPO, "plots", "curves.py")
    res = subprocess.run([sys.executable, script, str(tmp_path)], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    for run in ("dpo_0.1", "ipo_0.5"):
        assert (tmp_path / "runs" / run / "curves.png").stat().st_size > 10_000
    assert not (tmp_path / "runs" / "sft_only" / "curves.png").exists()
    png = str(tmp_path / "x.png")
    assert plot_curves(str(tmp_path / "runs" / "dpo_0.1"), png) == png
    res = subprocess.run([sys.executable, script, str(tmp_path / "runs" / "sft_only")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "no metrics.jsonl" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
