"""A run's training curves: every logged step in runs/<run>/metrics.jsonl (common.log_step writes
it during training), drawn beside the frontier as runs/<run>/curves.png.

    python plots/curves.py out/tiny/runs/dpo_0.1     # that run's figure
    python plots/curves.py out/tiny                  # every run of the folder that logged its steps

metrics.jsonl holds one JSON object a line: step, lr, loss, and for the pair losses the names TRL
users know (NAMES), each the mean over the step's batch and over every rank. docs/design.md ("The
training curves") says what they mean, and why the chosen reward can fall while the margin rises.
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.corpus import OneLineParser, UsageError, read_jsonl, write_atomic  # noqa: E402

NAMES = {  # the pair losses' metrics under TRL's names
    "rewards/chosen": "beta * (log pi - log pi_ref) of the chosen response, the implicit reward",
    "rewards/rejected": "the same of the rejected response",
    "rewards/margins": "rewards/chosen - rewards/rejected",
    "rewards/accuracies": "the share of pairs whose margin is above 0 (a tie counts half)",
    "logps/chosen": "log pi(y_w | x), summed over the chosen response's tokens",
    "logps/rejected": "log pi(y_l | x), summed over the rejected response's tokens",
}
PANELS = [("implicit rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
          ("preference accuracy", ["rewards/accuracies"]),
          ("log-probs of the policy", ["logps/chosen", "logps/rejected"]), ("loss", ["loss"])]


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise UsageError(f"{run_dir}: no metrics.jsonl there; expected a run of dpo.py (runs/<run>)")
    return read_jsonl(path)


def curves_figure(run_dir):
    """The figure, not yet saved: a panel per group of PANELS against the step, a line per name
    logged."""
    records = read_metrics(run_dir)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4), layout="constrained")
    for ax, (title, names) in zip(axes, PANELS):
        drawn = False
        for name in names:
            pts = [(r["step"], r[name]) for r in records if name in r]
            if pts:
                ax.plot(*zip(*pts), label=name, lw=1.4)
                drawn = True
        if title == "implicit rewards":
            ax.axhline(0.0, color="grey", lw=0.6, label="_zero")  # pi = pi_ref: every reward 0
        if title == "preference accuracy":
            ax.axhline(0.5, color="grey", lw=0.6, ls=":", label="_chance")  # chance
        ax.set_title(title)
        ax.set_xlabel("step")
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not logged by this method", ha="center", va="center",
                    transform=ax.transAxes)
    fig.suptitle(os.path.basename(os.path.normpath(run_dir)))
    return fig


def plot_curves(run_dir, png_path=None):
    png_path = png_path or os.path.join(run_dir, "curves.png")
    fig = curves_figure(run_dir)
    write_atomic(png_path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
    return png_path


def run_dirs(path):
    """The run folders a path names: itself (it holds metrics.jsonl), or those of a folder's
    runs/."""
    if os.path.exists(os.path.join(path, "metrics.jsonl")):
        return [path]
    runs = os.path.join(path, "runs")
    found = sorted(os.path.join(runs, d) for d in (os.listdir(runs) if os.path.isdir(runs) else ())
                   if os.path.exists(os.path.join(runs, d, "metrics.jsonl")))
    if not found:
        raise UsageError(f"{path}: no metrics.jsonl there nor in runs/<run>/; "
                         f"expected a run or a run folder")
    return found


def main(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="a run (out/tiny/runs/dpo_0.1) or run folder (out/tiny)")
    for path in p.parse_args(argv).paths:
        for run in run_dirs(path):
            print(f"wrote {plot_curves(run)}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        sys.exit(f"{os.path.basename(sys.argv[0])}: error: {e}")
