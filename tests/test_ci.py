""".ci/gpu, read without a GPU: its syntax, its step limits against the 9 minutes it promises (each with its
estimate written beside it), and what it leaves under $OUT when every command is a stand-in that only writes
the files it is asked for: at most 8, what the device machine brings back.

    python -m pytest tests/test_ci.py     (CPU; a few seconds)
"""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, ".ci", "gpu")
BUDGET_S, MAX_FILES = 540, 8


def test_gpu_script_parses():
    run = subprocess.run(["bash", "-n", SCRIPT], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr


def test_step_limits_add_to_at_most_9_minutes_each_with_its_basis():
    text = open(SCRIPT).read()
    limits = dict(re.findall(r"^\s*step (\w+) (\d+) ", text, re.M))
    assert set(limits) == {"tests", "bench", "bench_step", "tiny", "imdb"}, limits
    total = sum(int(s) for s in limits.values())
    assert total <= BUDGET_S, f"the step limits add to {total} s, more than {BUDGET_S}"
    assert f"limits add up to {total} s" in text  # the header says the sum
    for name, s in limits.items():  # the table of estimates names each step with the same limit
        assert re.search(rf"^#   {name} +{s} s  ~?\S", text, re.M), f"no estimate beside {name} {s} s"


STUB_PYTHON = """#!/usr/bin/env bash
# python3 stand-in: no xdist; writes each file named after --out, --fig or --figure that has an extension
case "$*" in *"import xdist"*) exit 1;; esac
prev=
for a in "$@"; do
  case "$prev" in --out|--fig|--figure) case "$a" in *.json|*.png) echo stand-in > "$a";; esac;; esac
  prev=$a
done
"""


@pytest.mark.skipif(shutil.which("timeout") is None or shutil.which("tee") is None, reason="needs coreutils")
def test_gpu_script_writes_at_most_8_files_under_out(tmp_path):
    """A copy of the repository's .ci/gpu in an empty folder, with an IMDb archive (empty) so that every step
    runs, and python3 and nvidia-smi stood in for."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(SCRIPT, tmp_path / ".ci" / "gpu")
    (tmp_path / "imdb_local").mkdir()
    (tmp_path / "imdb_local" / "aclImdb_v1_labelled_repack.tar.gz").write_bytes(b"")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").write_text(STUB_PYTHON)
    (bin_dir / "nvidia-smi").write_text("#!/usr/bin/env bash\necho 'stand-in GPU, 1 MiB, 0'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    out = tmp_path / "result"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "OUT": str(out)}
    run = subprocess.run(["bash", str(tmp_path / ".ci" / "gpu")], capture_output=True, text=True, env=env,
                         timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "== .ci/gpu: ok" in run.stdout and "== imdb: ok" in run.stdout
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert len(files) <= MAX_FILES, files
    assert files == ["bench_cuda.json", "bench_step_cuda.json", "imdb_frontier_cuda.png", "kernel_bench_cuda.png",
                     "steps.log", "summary.log", "tiny_frontier_cuda.png"]
    summary, steps = (open(out / f).read() for f in ("summary.log", "steps.log"))
    assert summary == run.stdout and "stand-in GPU" in steps
    assert all(f"==================== {s}" in steps for s in ("tests", "bench", "bench_step", "tiny", "imdb"))
