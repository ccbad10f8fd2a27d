"""The reward-vs-KL frontier (Fig. 2 left of the DPO paper) from a run folder of dpo.py.

    python plots/frontier.py out/tiny plots/tiny_frontier.png

One point per evaluation of every run (out/<preset>/runs/<run>/eval.jsonl), a colour per method, the
SFT reference at KL 0 (the mean reward of its samples), Best-of-N at its KL bound, and beside it the
training curves.
"""
import glob
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.corpus import read_jsonl, write_atomic  # noqa: E402

COLOURS = {"ipo": "tab:purple", "cdpo": "tab:pink", "ft": "tab:green", "ul": "tab:olive"}
# one colour family per method, darker for a larger parameter
SHADES = {"dpo": "Reds", "ppo": "Blues", "ppo-gt": "YlOrBr", "simpo": "Purples", "orpo": "Greys", "kto": "PuRd"}
LABELS = {"dpo": "DPO beta={}", "ft": "Preferred-FT", "ul": "Unlikelihood alpha={}", "ipo": "IPO beta={}",
          "cdpo": "cDPO beta={}", "ppo": "PPO target KL {}", "ppo-gt": "PPO-GT target KL {}", "simpo": "SimPO beta={}",
          "orpo": "ORPO lambda={}", "kto": "KTO beta={}"}
MARKERS = ["o", "s", "^", "D", "v", "P"]


def read_runs(out_dir, names=None):
    """{run name: [eval records]} for the runs named (default: every run that wrote evaluations)."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(out_dir, "runs", "*", "eval.jsonl"))):
        name = os.path.basename(os.path.dirname(path))
        records = read_jsonl(path) if names is None or name in names else []
        if records:
            runs[name] = records
    return runs


def run_style(name, names):
    """Colour, marker and label of a run; names: every run drawn beside it (a larger parameter, a darker shade)."""
    method, _, param = name.partition("_")
    order = sorted(float(n.partition("_")[2] or 0) for n in names if n.partition("_")[0] == method)
    i = order.index(float(param or 0))
    colour = COLOURS.get(method, "gray")
    if method in SHADES:
        colour = plt.get_cmap(SHADES[method])(0.45 + 0.5 * i / (len(order) - 1) if len(order) > 1 else 0.75)
    return colour, MARKERS[i % len(MARKERS)], LABELS[method].format(param) if method in LABELS else name


def plot_frontier(out_dir, png_path, names=None):
    runs = read_runs(out_dir, names)
    fig, (ax, ax_r, ax_k) = plt.subplots(1, 3, figsize=(16, 4.8))
    for name, recs in runs.items():
        colour, marker, label = run_style(name, runs)
        ax.scatter([r["kl"] for r in recs], [r["reward"] for r in recs], color=colour, marker=marker, s=22, alpha=0.8, label=label)
        ax_r.plot([r["step"] for r in recs], [r["reward"] for r in recs], c=colour, marker=marker, ms=3, label=label)
        ax_k.plot([r["step"] for r in recs], [r["kl"] for r in recs], c=colour, marker=marker, ms=3, label=label)
    bon = os.path.join(out_dir, "best_of_n.jsonl")
    if os.path.exists(bon):  # Best-of-N at its KL upper bound log N - (N - 1) / N
        recs = read_jsonl(bon)
        ax.plot([r["kl_bound"] for r in recs], [r["reward"] for r in recs], "--", c="gray", marker="x",
                label="Best-of-N (at its KL bound)")
        for r in recs:
            ax.annotate(f"N={r['n']}", (r["kl_bound"], r["reward"]), fontsize=6, color="gray")
    if runs:  # every run starts as the SFT reference: its step-0 evaluation, at KL 0 by definition
        first = next(iter(runs.values()))[0]
        ax.scatter([0], [first["reward"]], c="black", marker="*", s=160, zorder=3, label="SFT reference")
    ax.set(xlabel="KL(pi || pi_ref), summed over the response", ylabel="mean reward r*(x, y)",
           title=f"reward vs KL frontier ({os.path.basename(os.path.normpath(out_dir))})")
    ax_r.set(xlabel="step", ylabel="mean reward", title="reward during training")
    ax_k.set(xlabel="step", ylabel="KL", title="KL during training")
    ax.legend(fontsize=6, ncol=2)  # a dozen runs and more: two columns keep the points visible
    ax_r.legend(fontsize=6, ncol=2)
    for a in (ax, ax_r, ax_k):
        a.grid(alpha=0.3)
    fig.tight_layout()
    write_atomic(png_path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
    return png_path


if __name__ == "__main__":
    print(plot_frontier(sys.argv[1], sys.argv[2]))
