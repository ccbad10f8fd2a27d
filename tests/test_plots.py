"""plots/: the frontier of one run folder and the seed figure of several, from fabricated evaluations.

    python -m pytest tests/test_plots.py     (CPU; a few seconds)
"""
import itertools
import json
import os
import subprocess
import sys

import matplotlib.colors
import matplotlib.pyplot as plt
import numpy as np
import pytest

from settings import PRESETS
from plots.frontier import SFT_LABEL, frontier_figure, plot_frontier, read_runs, run_style
from plots.seeds import binned, envelope, frontier_at, plot_seeds, seeds_figure, summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_out(folder, rewards, kls):
    """An out folder with runs dpo_0.1 and ppo-gt_6 whose evaluations have the given rewards and KLs, at steps
    0, 20, 40, ..., and the settings record of their batch sizes."""
    for name, shift in (("dpo_0.1", 0.0), ("ppo-gt_6", 0.1)):
        run = folder / "runs" / name
        run.mkdir(parents=True)
        run.joinpath("eval.jsonl").write_text("".join(
            json.dumps(dict(step=20 * i, reward=r + shift, kl=k)) + "\n" for i, (r, k) in enumerate(zip(rewards, kls))))
    (folder / "best_of_n.jsonl").write_text(json.dumps(dict(n=1, reward=0.5, kl_bound=0.0)) + "\n")
    (folder / "settings.json").write_text(json.dumps({"runs/dpo_0.1": dict(dpo_batch=4), "runs/ppo-gt_6": dict(
        ppo_batch=8, ppo_epochs=2, ppo_minibatches=2)}))


def test_envelope_is_the_best_reward_at_or_below_each_kl():
    records = [dict(kl=3.0, reward=0.7), dict(kl=1.0, reward=0.6), dict(kl=2.0, reward=0.5), dict(kl=4.0, reward=0.65)]
    assert envelope(records) == ([1.0, 2.0, 3.0, 4.0], [0.6, 0.6, 0.7, 0.7])


def test_seed_summary_and_figures(tmp_path):
    fake_out(tmp_path / "s1", [0.5, 0.6, 0.7], [0.0, 2.0, 4.0])
    fake_out(tmp_path / "s2", [0.5, 0.62, 0.8], [0.0, 3.0, 6.0])
    table = summary([str(tmp_path / "s1"), str(tmp_path / "s2")])
    assert table["dpo_0.1"] == [(0.7, 4.0), (0.8, 6.0)] and table["ppo-gt_6"][1] == (pytest.approx(0.9), 6.0)
    exact = summary([str(tmp_path / "s1")], keys=("kl", "reward_exact"))["dpo_0.1"]
    assert exact[0][0] == 4.0 and np.isnan(exact[0][1])  # no truth recorded: nan, not an error
    assert plot_seeds([str(tmp_path / "s1"), str(tmp_path / "s2")], str(tmp_path / "seeds.png")) == str(tmp_path / "seeds.png")
    assert (tmp_path / "seeds.png").stat().st_size > 10_000
    plot_frontier(str(tmp_path / "s1"), str(tmp_path / "f" / "frontier.png"), names=["dpo_0.1"])
    assert (tmp_path / "f" / "frontier.png").stat().st_size > 10_000
    assert list(read_runs(str(tmp_path / "s1"), ["dpo_0.1"])) == ["dpo_0.1"]


def test_run_styles_shade_by_parameter():
    names = ["dpo_0.05", "dpo_5", "ppo_3", "ft"]
    light, dark = run_style("dpo_0.05", names)[0], run_style("dpo_5", names)[0]
    assert sum(dark[:3]) < sum(light[:3])  # a larger beta is darker
    assert run_style("ppo_3", names)[2] == "PPO target KL 3" and run_style("ft", names)[2] == "Preferred-FT"


def test_frontier_draws_kl_on_x_reward_on_y_and_training_against_examples_seen(tmp_path):
    fake_out(tmp_path, [0.5, 0.6, 0.7], [0.0, 2.0, 4.0])
    fig = frontier_figure(str(tmp_path))
    frontier, reward, kl = fig.axes
    points = {c.get_label(): c.get_offsets().tolist() for c in frontier.collections}
    assert points["DPO beta=0.1"] == [[0.0, 0.5], [2.0, 0.6], [4.0, 0.7]]  # (KL, reward)
    assert points["PPO-GT target KL 6"] == [[0.0, 0.6], [2.0, pytest.approx(0.7)], [4.0, pytest.approx(0.8)]]
    assert points[SFT_LABEL] == [[0.0, 0.5]]  # the SFT reference: the first run's step-0 reward, at KL 0
    # one unit on x for every run: DPO steps 0, 20, 40 of 4 pairs; PPO iterations of 2 x 2 steps, 8 responses each
    assert [line.get_xdata().tolist() for line in reward.lines] == [[0, 80, 160], [0, 40, 80]]
    assert [line.get_ydata().tolist() for line in kl.lines] == [[0.0, 2.0, 4.0], [0.0, 2.0, 4.0]]
    assert "examples seen" in reward.get_xlabel() and "KL" in frontier.get_xlabel() and "reward" in frontier.get_ylabel()


def test_the_frontier_legend_is_readable_and_covers_no_panel(tmp_path):
    names = [r.replace(":", "_") for r in PRESETS["imdb"]["runs"].split(",")]  # the longest list, 20 runs
    for i, name in enumerate(names):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "eval.jsonl").write_text(json.dumps(dict(step=0, reward=0.5, kl=0.0)) + "\n"
                                                              + json.dumps(dict(step=8, reward=0.6, kl=i)) + "\n")
    (tmp_path / "settings.json").write_text(json.dumps({f"runs/{n}": dict(dpo_batch=2, ppo_batch=4, ppo_epochs=2,
                                                                          ppo_minibatches=2) for n in names}))
    fig = frontier_figure(str(tmp_path))
    fig.canvas.draw()
    (legend,) = fig.legends
    box, page = legend.get_window_extent(), fig.bbox
    assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1
    assert not any(box.overlaps(ax.get_window_extent()) for ax in fig.axes)
    texts = [t.get_text() for t in legend.get_texts()]
    assert len(texts) == len(names) + 1 and SFT_LABEL in texts and min(t.get_fontsize() for t in legend.get_texts()) >= 8


def cie_lab(colour):
    """CIELAB (D65) of a matplotlib colour: distances there follow how far apart people see colours."""
    rgb = np.array(matplotlib.colors.to_rgb(colour))
    linear = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    xyz = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]) @ linear
    f = np.cbrt(xyz / [0.9505, 1.0, 1.089])  # no colour here is dark enough for the linear segment
    return np.array([116 * f[1] - 16, 500 * (f[0] - f[1]), 200 * (f[1] - f[2])])


def test_colours_separate_methods():
    """Any two runs of different methods, in either preset's list: a colour difference (CIE76) of 25 or more,
    well above what people confuse at a glance (DPO beta=5 and PPO-GT 8 were 16 apart)."""
    for preset in PRESETS.values():
        names = [r.replace(":", "_") for r in preset["runs"].split(",")] + ["ipo_0.1", "cdpo_0.1"]
        for a, b in itertools.combinations(names, 2):
            if a.partition("_")[0] != b.partition("_")[0]:
                gap = np.linalg.norm(cie_lab(run_style(a, names)[0]) - cie_lab(run_style(b, names)[0]))
                assert gap >= 25, (a, b, gap)


def test_seed_figure_names_each_run_once_and_the_seeds_apart(tmp_path):
    fake_out(tmp_path / "s1", [0.5, 0.6, 0.7], [0.0, 2.0, 4.0])
    fake_out(tmp_path / "s2", [0.5, 0.62, 0.8], [0.0, 3.0, 6.0])
    fig = seeds_figure([str(tmp_path / "s1"), str(tmp_path / "s2")])
    legends = {ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()] for ax in fig.axes if ax.get_legend()}
    assert legends == {"DPO and its variants": ["DPO beta=0.1"], "PPO-GT": ["PPO-GT target KL 6"]}
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["s1", "s2"]
    dpo_panel = fig.axes[0]
    assert [line.get_linestyle() for line in dpo_panel.lines] == ["-", "--"]  # one line style per seed


@pytest.mark.parametrize("argv, message", [([], "the following arguments are required: out_dir"),
                                           (["nowhere"], "nowhere: no runs/<run>/eval.jsonl there")])
def test_frontier_command_line_mistakes_are_one_line(argv, message):
    res = subprocess.run([sys.executable, os.path.join(REPO, "plots", "frontier.py"), *argv], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode != 0 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr


def test_binned_means_compare_families_at_matched_kl(tmp_path):
    """Per seed and family, the mean reward of the evaluations after step 0 inside each KL bin, worked by hand."""
    fake_out(tmp_path / "a", [0.5, 0.6, 0.7, 0.8], [0.0, 1.0, 3.0, 4.0])  # dpo_0.1 and ppo-gt_6 (reward + 0.1)
    got = binned([str(tmp_path / "a")], [0, 2, 5, 9])
    assert set(got) == {"DPO and its variants", "PPO-GT"}
    assert got["DPO and its variants"] == [[pytest.approx(0.6), pytest.approx(0.75), None]]  # step 0 left out
    assert got["PPO-GT"] == [[pytest.approx(0.7), pytest.approx(0.85), None]]
def drawn_points(ax):
    """Every (x, y) point an axes draws: scatter offsets and line vertices."""
    pts = [tuple(p) for c in ax.collections for p in np.asarray(c.get_offsets()).tolist()]
    pts += [tuple(p) for line in ax.lines for p in np.asarray(line.get_xydata()).tolist()]
    return {(round(x, 9), round(y, 9)) for x, y in pts}


def test_frontier_draws_reward_against_kl(tmp_path, monkeypatch):
    """The figure itself, read from matplotlib rather than the PNG's size: some axes draws every evaluation of
    every run at x = KL, y = reward (and Best-of-N at its KL bound), labelled so; no axes draws them swapped."""
    rewards, kls = [0.5, 0.6, 0.7], [0.0, 2.5, 4.0]
    fake_out(tmp_path, rewards, kls)
    figures = []
    monkeypatch.setattr(plt, "close", lambda fig=None: figures.append(fig))
    plot_frontier(str(tmp_path), str(tmp_path / "frontier.png"))
    (fig,) = figures
    points = {(round(k, 9), round(r + shift, 9)) for shift in (0.0, 0.1) for r, k in zip(rewards, kls)} | {(0.0, 0.5)}
    swapped = {(y, x) for x, y in points}
    frontier = [ax for ax in fig.axes if points <= drawn_points(ax)]
    assert frontier, "no axes draws the evaluations at (KL, reward)"
    assert "kl" in frontier[0].get_xlabel().lower() and "reward" in frontier[0].get_ylabel().lower()
    assert not any(swapped & drawn_points(ax) - points for ax in fig.axes)


def test_the_frontier_names_the_runs_it_cuts_off_past_its_kl_axis(tmp_path):
    """A run far out (SimPO at 45 nats) would squeeze every other frontier into the first nats: the axis
    ends at KL_SHOWN and the panel names each run with evaluations past it; without one, nothing is cut."""
    from plots.frontier import KL_SHOWN
    fake_out(tmp_path / "near", [0.5, 0.6, 0.7], [0.0, 2.0, 4.0])
    ax = frontier_figure(str(tmp_path / "near")).axes[0]
    assert ax.get_xlim()[1] >= 4.0 and not any("past KL" in t.get_text() for t in ax.texts)
    fake_out(tmp_path / "far", [0.5, 0.6, 0.7], [0.0, 2.0, KL_SHOWN + 30])
    ax = frontier_figure(str(tmp_path / "far")).axes[0]
    assert ax.get_xlim()[1] == KL_SHOWN
    said = [t.get_text() for t in ax.texts if "past KL" in t.get_text()]
    assert said == [f"past KL {KL_SHOWN}, not shown: DPO beta=0.1, PPO-GT target KL 6"]
    plt.close("all")


def test_a_family_frontier_is_its_best_reward_at_or_below_each_kl(tmp_path):
    """Per seed and family: the best reward of any of its runs' evaluations with KL <= k, by hand;
    pi_ref's step 0 counts at KL 0, and a KL no evaluation reaches down to is None."""
    fake_out(tmp_path / "a", [0.5, 0.7, 0.6, 0.8], [0.0, 1.0, 3.0, 4.0])  # ppo-gt_6: reward + 0.1
    fake_out(tmp_path / "b", [0.4, 0.5, 0.6, 0.7], [0.5, 2.0, 3.0, 9.0])
    got = frontier_at([str(tmp_path / "a"), str(tmp_path / "b")], [0.2, 2, 3.5, 10])
    assert set(got) == {"DPO and its variants", "PPO-GT"}
    assert got["DPO and its variants"] == [[0.5, 0.7, 0.7, 0.8], [None, 0.5, 0.6, 0.7]]
    assert got["PPO-GT"][0] == [pytest.approx(v) for v in (0.6, 0.8, 0.8, 0.9)]
