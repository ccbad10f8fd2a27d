"""kernels/bench.py and bench_step.py run end to end (on a CPU: tiny shapes through the Triton interpreter).

    python -m pytest tests/test_bench.py
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from kernels import bench

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmark is run by hand (minutes)")
def test_bench_runs_and_prints_table(tmp_path):
    out, fig = tmp_path / "bench.json", tmp_path / "bench.png"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "kernels", "bench.py"), "--out", str(out), "--fig", str(fig)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "f+b ms" in res.stdout and "headline triton" in " ".join(res.stdout.split())
    rows = json.load(open(out))["results"]
    head = {r["method"]: r for r in rows if r["part"] == "headline"}
    assert set(head) >= {"eager", "chunked", "triton"}
    assert head["triton"]["rel_err"] < 1e-5 and head["eager"]["rel_err"] < 1e-5  # fp32 against fp64
    assert fig.stat().st_size > 10_000


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the benchmark is run by hand (minutes)")
def test_bench_step_runs(tmp_path):
    out = tmp_path / "step.json"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "bench_step.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr[-2000:]
    assert "step ms" in res.stdout and "generate tiny" in res.stdout
    steps = json.load(open(out))["steps"]
    assert [(r["algo"], r["impl"]) for r in steps] == [(a, i) for a in ("dpo", "ppo", "rloo", "grpo")
                                                       for i in ("triton", "reference")]
    assert all(r["tokens_per_s"] > 0 for r in steps)


def test_bench_keeps_no_autograd_graph_of_what_it_only_compares():
    """The fp64 reference and each method's sums are only compared: a graph behind them would keep the
    logits alive (~7 GB for the fp64 reference at the headline shape)."""
    args = bench.inputs(64, 16, 40, 16, torch.float32, DEVICE)
    assert not bench.fp64_sums(args).requires_grad
    row = bench.measure("eager", bench.make_methods()["eager"], 64, 16, 40, 16, torch.float32, DEVICE, None, 2**30, 1)
    assert not row["_compare"].requires_grad
