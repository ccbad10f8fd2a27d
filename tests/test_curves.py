"""plots/curves.py and the metrics.jsonl it draws, which common.log_step writes: a line per step,
under a resume (common.resume) and over gloo ranks (their mean), and the figure drawn from it.

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

import common
from common import Clock, log_step
from plots.curves import NAMES, PANELS, curves_figure, plot_curves

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lines(path):
    return [json.loads(x) for x in open(path)]


def fake_steps(run_dir, steps):
    """What a DPO run logs where both log-probs fall and the rejected faster: the chosen reward
    falls too, the margin rises; as the loop logs it, into run_dir/metrics.jsonl."""
    os.makedirs(run_dir, exist_ok=True)
    for s in steps:
        c, r = -0.01 * s, -0.03 * s
        log_step(os.path.basename(run_dir), s, {
            "loss": 0.69 - 0.01 * s, "rewards/chosen": c, "rewards/rejected": r,
            "rewards/margins": c - r, "rewards/accuracies": 0.5 + 0.04 * s,
            "logps/chosen": -20 + c * 10, "logps/rejected": -22 + r * 10},
            Clock(0, 100), "cpu", os.path.dirname(run_dir), lr=1e-4)


def test_one_line_per_step_in_the_order_given(tmp_path):
    (tmp_path / "run").mkdir()  # as resume makes it
    log_step("run", 0, dict(loss=1.25, **{"rewards/chosen": 2}), Clock(0, 1), "cpu", str(tmp_path), 0.5)
    assert open(tmp_path / "run" / "metrics.jsonl").read() == \
        '{"step": 0, "lr": 0.5, "loss": 1.25, "rewards/chosen": 2.0}\n'
    log_step("run", 1, dict(loss=1.0), Clock(0, 1), "cpu")  # without out (SFT, the classifier): none
    assert len(lines(tmp_path / "run" / "metrics.jsonl")) == 1


def test_a_resumed_run_neither_duplicates_nor_loses_a_step(tmp_path):
    run, path = str(tmp_path / "run"), tmp_path / "run" / "metrics.jsonl"
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    fake_steps(run, range(0, 10))  # killed after step 9; its last checkpoint was at step 6
    common.save("run", 6, model, opt, str(tmp_path))
    with open(path, "a") as f:
        f.write('{"step": 10, "lo')  # torn by the kill
    assert common.resume("run", model, opt, str(tmp_path))[0] == 6
    fake_steps(run, range(6, 12))  # resumed from that checkpoint
    records = lines(path)
    assert [r["step"] for r in records] == list(range(12))
    assert records[7]["rewards/chosen"] == pytest.approx(-0.07)
    os.remove(tmp_path / "run" / "ckpt.pt")
    assert common.resume("run", model, opt, str(tmp_path))[0] == 0  # a fresh start: a fresh file
    fake_steps(run, range(0, 2))
    assert [r["step"] for r in lines(path)] == [0, 1]


def _rank(rank, world, port, tmp):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    for step in range(3):  # rank r's share: loss r + step, accuracy 1 on rank 0 only
        mine = dict(loss=rank + step, **{"rewards/accuracies": float(rank == 0)})
        log_step("run", step, mine, Clock(0, 3), "cpu", tmp, lr=0.1)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_ranks_write_their_mean_once(tmp_path):
    (tmp_path / "run").mkdir()
    mp.spawn(_rank, args=(2, free_port(), str(tmp_path)), nprocs=2)
    want = [dict(step=s, lr=0.1, loss=0.5 + s, **{"rewards/accuracies": 0.5}) for s in range(3)]
    assert lines(tmp_path / "run" / "metrics.jsonl") == want


def test_the_figure_draws_each_name_against_the_step(tmp_path):
    fake_steps(str(tmp_path / "run"), range(0, 50, 10))
    fig = curves_figure(str(tmp_path / "run"))
    assert [ax.get_title() for ax in fig.axes] == [t for t, _ in PANELS]
    drawn = {line.get_label(): line for ax in fig.axes for line in ax.lines
             if not line.get_label().startswith("_")}  # not the reference lines at 0 and 0.5
    assert set(drawn) == set(NAMES) | {"loss"}
    assert drawn["rewards/chosen"].get_xdata().tolist() == [0, 10, 20, 30, 40]
    assert drawn["rewards/chosen"].get_ydata().tolist() == pytest.approx([0, -0.1, -0.2, -0.3, -0.4])
    assert drawn["rewards/margins"].get_ydata().tolist() == pytest.approx([0, 0.2, 0.4, 0.6, 0.8])
    assert drawn["logps/rejected"] in fig.axes[2].lines and drawn["loss"] in fig.axes[3].lines


def test_a_run_without_pair_metrics_says_so(tmp_path):
    (tmp_path / "ft").mkdir()
    log_step("ft", 0, dict(loss=2.0), Clock(0, 1), "cpu", str(tmp_path), 1e-3)  # its loss only
    fig = curves_figure(str(tmp_path / "ft"))
    assert [t.get_text() for t in fig.axes[0].texts] == ["not logged by this method"]
    assert [line.get_label() for line in fig.axes[3].lines] == ["loss"]


def test_the_command_draws_every_run_of_a_folder_and_mistakes_are_one_line(tmp_path):
    for run in ("dpo_0.1", "ipo_0.5"):
        fake_steps(str(tmp_path / "runs" / run), range(3))
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
