"""Figure of kernels/bench.py's results: time and peak memory of one DPO head step per method.

    python plots/kernel_bench.py kernels/bench_cuda.json plots/kernel_bench_cuda.png
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.corpus import write_atomic  # noqa: E402


def plot(json_path, png_path):
    with open(json_path) as f:
        data = json.load(f)
    env, rows = data["env"], [r for r in data["results"] if "error" not in r]
    head = [r for r in rows if r["part"] == "headline"]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    names = [r["method"] for r in head]
    ax[0].bar(names, [r["fwd_ms"] for r in head], label="forward")
    ax[0].bar(names, [r["bwd_ms"] for r in head], bottom=[r["fwd_ms"] for r in head], label="backward")
    ax[0].set(ylabel="ms (median)", title=f"DPO head step, N={head[0]['N']}, C={head[0]['C']}, V={head[0]['V']}")
    ax[0].legend()
    ax[1].bar(names, [r["peak_mb"] for r in head], color="tab:gray")
    ax[1].set(ylabel="MB", title="peak memory above the inputs")
    for name in sorted({r["method"] for r in rows if r["part"] == "sweep"}):
        for C, style in zip(sorted({r["C"] for r in rows}), ("-", "--", ":")):
            pts = sorted((r["N"], r["fwd_bwd_ms"]) for r in rows if r["part"] == "sweep" and r["method"] == name
                         and r["C"] == C)
            if pts:
                ax[2].plot(*zip(*pts), style, marker="o", label=f"{name} C={C}",
                           color={"eager": "tab:red", "chunked": "tab:orange", "triton": "tab:blue"}.get(name))
    ax[2].set(xscale="log", yscale="log", xlabel="tokens N", ylabel="fwd+bwd ms", title="sweep (missing = out of memory)")
    ax[2].legend(fontsize=7)
    fig.suptitle(f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['dtype']}", fontsize=10)
    fig.tight_layout()
    write_atomic(png_path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
    return png_path


if __name__ == "__main__":
    plot(sys.argv[1], sys.argv[2])
