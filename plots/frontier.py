"""The reward-vs-KL frontier (Fig. 2 left of the DPO paper) from a run folder of dpo.py.

    python plots/frontier.py out/tiny plots/tiny_frontier.png

Left, the frontier: one point per evaluation of every run (out/<preset>/runs/<run>/eval.jsonl), the KL to
the reference on x and the mean reward on y, a colour per method (shades of it for its parameters), the
SFT reference pi_ref at KL 0 (a star: where every run starts) and Best-of-N at its KL bound. Right, reward
and KL during training against the training examples seen, one unit for every run: preference pairs for
the DPO family (steps x --dpo-batch), sampled responses for the online runs, PPO, RLOO and GRPO (rollouts x
--ppo-batch), read from the run folder's settings.json.
"""
import glob
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.corpus import OneLineParser, read_jsonl, write_atomic  # noqa: E402
from errors import UsageError  # noqa: E402

# hues far apart between methods (checked in tests/test_plots.py); shades of one hue within a method, darker for
# a larger parameter
COLOURS = {"ipo": "tab:pink", "cdpo": "darkmagenta", "ft": "tab:olive", "simpo": "tab:purple", "orpo": "tab:brown",
           "kto": "gold", "rloo": "turquoise", "grpo": "deeppink"}  # one colour, a marker per parameter
SHADES = {"dpo": "Reds", "ppo": "Blues", "ppo-gt": "Greens", "ul": "Greys"}
LABELS = {"dpo": "DPO beta={}", "ft": "Preferred-FT", "ul": "Unlikelihood alpha={}", "ipo": "IPO beta={}",
          "cdpo": "cDPO beta={}", "ppo": "PPO target KL {}", "ppo-gt": "PPO-GT target KL {}", "simpo": "SimPO beta={}",
          "orpo": "ORPO lambda={}", "kto": "KTO beta={}", "rloo": "RLOO beta={}", "grpo": "GRPO beta={}"}
MARKERS = ["o", "s", "^", "D", "v", "P"]
KL_SHOWN = 12  # nats: the frontier's x axis ends here, so that one run far out does not flatten the rest
SFT_LABEL = "SFT reference pi_ref: every run's start, KL 0"


def read_runs(out_dir, names=None):
    """{run name: [eval records]} for the runs named (default: every run that wrote evaluations), by method,
    then by parameter (dpo_5 after dpo_0.1)."""
    runs = {}
    found = [os.path.basename(os.path.dirname(p)) for p in glob.glob(os.path.join(out_dir, "runs", "*", "eval.jsonl"))]
    for name in sorted(found, key=lambda n: (n.partition("_")[0], float(n.partition("_")[2] or 0))):
        path = os.path.join(out_dir, "runs", name, "eval.jsonl")
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
        colour = plt.get_cmap(SHADES[method])(0.5 + 0.4 * i / (len(order) - 1) if len(order) > 1 else 0.7)
    return colour, MARKERS[i % len(MARKERS)], LABELS[method].format(param) if method in LABELS else name


def examples_seen(name, settings, step):
    """Training examples a run has seen by `step` of its loop: pairs for the DPO family, sampled responses for
    the online runs (an iteration is ppo_epochs x ppo_minibatches steps over one rollout of ppo_batch responses)."""
    s = settings[f"runs/{name}"]
    if "ppo_batch" in s:  # an online run
        return step // (s["ppo_epochs"] * s["ppo_minibatches"]) * s["ppo_batch"]
    return step * s["dpo_batch"]


def read_settings(out_dir, runs):
    """out_dir/settings.json, the record dpo.py keeps of each stage's settings; it must name every run drawn."""
    path = os.path.join(out_dir, "settings.json")
    try:
        with open(path) as f:
            settings = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: cannot read it ({e}); the training panels count examples with its batch sizes")
    missing = [name for name in runs if f"runs/{name}" not in settings]
    if missing:
        raise UsageError(f"{path} has no record of the runs {', '.join(missing)}")
    return settings


def frontier_figure(out_dir, names=None):
    """The figure, not yet saved: the frontier and the two training panels, one legend beside them."""
    runs = read_runs(out_dir, names)
    settings = read_settings(out_dir, runs)
    fig, (ax, ax_r, ax_k) = plt.subplots(1, 3, figsize=(18, 5), layout="constrained")
    for name, recs in runs.items():
        colour, marker, label = run_style(name, runs)
        seen = [examples_seen(name, settings, r["step"]) for r in recs]
        ax.scatter([r["kl"] for r in recs], [r["reward"] for r in recs], color=colour, marker=marker, s=22, alpha=0.8,
                   label=label)
        ax_r.plot(seen, [r["reward"] for r in recs], c=colour, marker=marker, ms=3)
        ax_k.plot(seen, [r["kl"] for r in recs], c=colour, marker=marker, ms=3)
    bon = os.path.join(out_dir, "best_of_n.jsonl")
    if os.path.exists(bon):  # Best-of-N at its KL upper bound log N - (N - 1) / N
        recs = read_jsonl(bon)
        ax.plot([r["kl_bound"] for r in recs], [r["reward"] for r in recs], "--", c="black", marker="x",
                label="Best-of-N of pi_ref, at its KL bound")
        for r in recs:
            ax.annotate(f"N={r['n']}", (r["kl_bound"], r["reward"]), fontsize=7, color="black")
    if runs:  # every run starts as the SFT reference: its step-0 evaluation, at KL 0 by definition
        first = next(iter(runs.values()))[0]
        ax.scatter([0], [first["reward"]], c="black", marker="*", s=160, zorder=3, label=SFT_LABEL)
    beyond = sorted({LABELS.get(n.partition("_")[0], n).format(n.partition("_")[2])
                     for n, recs in runs.items() for r in recs if r["kl"] > KL_SHOWN})
    if beyond:  # said on the panel, not dropped silently
        ax.set_xlim(-0.02 * KL_SHOWN, KL_SHOWN)
        ax.text(0.98, 0.02, f"past KL {KL_SHOWN}, not shown: " + ", ".join(beyond), fontsize=7,
                ha="right", transform=ax.transAxes, wrap=True)
    ax.set(xlabel="KL(pi || pi_ref), summed over the response", ylabel="mean reward r*(x, y)",
           title=f"reward vs KL frontier ({os.path.basename(os.path.normpath(out_dir))})")
    seen = "training examples seen (pairs; online runs: samples)"
    ax_r.set(xlabel=seen, ylabel="mean reward r*(x, y)", title="reward during training")
    ax_k.set(xlabel=seen, ylabel="KL(pi || pi_ref)", title="KL during training")
    for a in (ax, ax_r, ax_k):
        a.grid(alpha=0.3)
    n = len(ax.get_legend_handles_labels()[1])
    fig.legend(loc="outside right center", fontsize=8, ncol=1 + n // 25)  # beside the panels, over no point
    return fig


def plot_frontier(out_dir, png_path, names=None):
    fig = frontier_figure(out_dir, names)
    write_atomic(png_path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
    return png_path


def main(argv=None):
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="a run folder of dpo.py (holding runs/ and settings.json)")
    p.add_argument("figure", nargs="?", help="the PNG to write (default <out_dir>/frontier.png)")
    a = p.parse_args(argv)
    if not glob.glob(os.path.join(a.out_dir, "runs", "*", "eval.jsonl")):
        p.error(f"{a.out_dir}: no runs/<run>/eval.jsonl there; expected a run folder of dpo.py")
    print(plot_frontier(a.out_dir, a.figure or os.path.join(a.out_dir, "frontier.png")))


if __name__ == "__main__":
    try:
        main()
    except UsageError as e:
        sys.exit(f"frontier.py: error: {e}")
