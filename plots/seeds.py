"""Several seeds of one experiment: every seed's frontier on one figure, and the last step of each run as
mean and range over the seeds.

    for s in 1337 1 2 3 4; do python dpo.py --seed $s --out out/seed_$s; done
    python plots/seeds.py out/seed_{1337,1,2,3,4} --figure plots/tiny_seeds.png --at 1,2,5,10

One panel per method family (DPO, PPO, PPO-GT, the baselines). In each, a run's upper envelope per seed: the
best reward reached at or below each KL, over that run's evaluations, drawn as a step line, one line style per
seed, so that the spread between seeds is seen beside the spread between methods. Each panel's legend names
its runs; the legend beside the panels names the seeds' line styles.
"""
import argparse
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from data.corpus import write_atomic  # noqa: E402
from plots.frontier import read_runs, run_style  # noqa: E402

FAMILIES = {"DPO and its variants": ("dpo", "ipo", "cdpo"), "DPO's successors": ("simpo", "orpo", "kto"),
            "PPO": ("ppo",), "PPO-GT": ("ppo-gt",), "RLOO and GRPO": ("rloo", "grpo"),
            "Preferred-FT, Unlikelihood": ("ft", "ul")}
DASHES = ["-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))]  # five seeds apart


def envelope(records):
    """(KL, best reward so far) over evaluations sorted by KL: the run's frontier."""
    pts = sorted((r["kl"], r["reward"]) for r in records)
    return [k for k, _ in pts], list(np.maximum.accumulate([r for _, r in pts]))


def summary(out_dirs, keys=("reward", "kl")):
    """{run: [(its last evaluation's keys), one per seed]} for the runs every seed has; nan where
    a record has no such key (reward_exact: only where the data knows the truth)."""
    per_seed = [read_runs(d) for d in out_dirs]
    common = set(per_seed[0]).intersection(*per_seed[1:])
    return {name: [tuple(runs[name][-1].get(k, np.nan) for k in keys) for runs in per_seed]
            for name in sorted(common)}


def binned(out_dirs, edges):
    """{family: [[mean reward of its evaluations after step 0 with KL in [edges[b], edges[b+1]) for each bin b]
    for each seed]}, None where a bin is empty: methods compared at matched KL, within each seed."""
    table = {}
    for title, methods in FAMILIES.items():
        rows = []
        for runs in map(read_runs, out_dirs):
            pts = [(r["kl"], r["reward"]) for name, recs in runs.items() if name.partition("_")[0] in methods
                   for r in recs if r["step"] > 0]
            rows.append([np.mean([w for k, w in pts if lo <= k < hi]) if any(lo <= k < hi for k, _ in pts) else None
                         for lo, hi in zip(edges, edges[1:])])
        if any(v is not None for row in rows for v in row):
            table[title] = rows
    return table


def frontier_at(out_dirs, kls):
    """{family: [[the best reward of its evaluations with KL <= k, for each k] for each seed]}: the
    family's frontier read at those KLs (pi_ref's step 0 counts, at KL 0), None where it has no
    evaluation that close."""
    table = {}
    for title, methods in FAMILIES.items():
        rows = []
        for runs in map(read_runs, out_dirs):
            pts = [(r["kl"], r["reward"]) for name, recs in runs.items()
                   if name.partition("_")[0] in methods for r in recs]
            rows.append([max((w for k, w in pts if k <= at), default=None) for at in kls])
        if any(v is not None for row in rows for v in row):
            table[title] = rows
    return table


def seeds_figure(out_dirs):
    """The figure, not yet saved: a panel per family, its legend naming the runs (colours), and one legend
    beside the panels naming the seeds' run folders (line styles)."""
    per_seed = [read_runs(d) for d in out_dirs]
    fig, axes = plt.subplots(1, len(FAMILIES), figsize=(5 * len(FAMILIES), 4.6), sharey=True, layout="constrained")
    for ax, (title, methods) in zip(axes, FAMILIES.items()):
        for s, runs in enumerate(per_seed):
            for name, recs in runs.items():
                if name.partition("_")[0] not in methods:
                    continue
                colour, _, label = run_style(name, runs)
                kl, best = envelope(recs)
                drawn = label in ax.get_legend_handles_labels()[1]  # one entry per run, whatever the seeds
                ax.step(kl, best, where="post", color=colour, ls=DASHES[s % len(DASHES)], alpha=0.85,
                        label="_" + label if drawn else label)
        ax.set(title=title, xlabel="KL(pi || pi_ref)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a family none of the folders ran stays empty
            ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("best mean reward r* at or below this KL")
    styles = [Line2D([], [], color="black", ls=DASHES[s % len(DASHES)]) for s in range(len(out_dirs))]
    fig.legend(styles, [os.path.basename(os.path.normpath(d)) for d in out_dirs], loc="outside right center",
               fontsize=8, title="seed (run folder)")
    return fig


def plot_seeds(out_dirs, png_path):
    fig = seeds_figure(out_dirs)
    write_atomic(png_path, lambda f: fig.savefig(f, dpi=110, format="png"))
    plt.close(fig)
    return png_path


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dirs", nargs="+", help="run folders of dpo.py, one per seed")
    p.add_argument("--figure", default="seeds.png")
    p.add_argument("--at", help="KLs, e.g. 1,2.5,5,10: also print each family's frontier there "
                   "(its best reward at or below each KL), one value per seed")
    p.add_argument("--bins", help="KL bin edges, e.g. 0,2.5,5,11: also print each family's mean reward per bin and seed")
    a = p.parse_args()
    keys = ("reward", "kl", "length", "reward_exact")
    print("last evaluation of every run, mean (min - max) over the seeds:")
    print("| run | " + " | ".join(keys) + " |\n" + "|---" * (len(keys) + 1) + "|")
    for name, vals in summary(a.out_dirs, keys).items():
        cells = [f"{v.mean():.{d}f} ({v.min():.{d}f} - {v.max():.{d}f})" if not np.isnan(v).any()
                 else "-" for v, d in zip(np.array(vals).T, (3, 1, 1, 3))]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if a.bins:
        edges = [float(x) for x in a.bins.split(",")]
        print("mean reward of the evaluations (after step 0) in each KL bin, one column per seed:")
        for title, rows in binned(a.out_dirs, edges).items():
            cells = ["/".join("  -  " if row[b] is None else f"{row[b]:.3f}" for row in rows) for b in range(len(edges) - 1)]
            print(f"  {title:28}" + "  ".join(f"[{lo:g}, {hi:g}): {c}" for lo, hi, c in zip(edges, edges[1:], cells)))
    if a.at:
        kls = [float(x) for x in a.at.split(",")]
        print("| family | " + " | ".join(f"KL <= {k:g}" for k in kls) + " |\n"
              + "|---" * (len(kls) + 1) + "|")
        for title, rows in frontier_at(a.out_dirs, kls).items():
            cells = [" / ".join("-" if row[i] is None else f"{row[i]:.3f}" for row in rows)
                     for i in range(len(kls))]
            print(f"| {title} | " + " | ".join(cells) + " |")
    print(f"wrote {plot_seeds(a.out_dirs, a.figure)}")


if __name__ == "__main__":
    main()
