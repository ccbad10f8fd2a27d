"""plots/: the frontier of one run folder and the seed figure of several, from fabricated evaluations.

    python -m pytest tests/test_plots.py     (CPU; a few seconds)
"""
import json

import matplotlib.pyplot as plt
import numpy as np
import pytest

from plots.frontier import plot_frontier, read_runs, run_style
from plots.seeds import envelope, plot_seeds, summary


def fake_out(folder, rewards, kls):
    """An out folder with runs dpo_0.1 and ppo-gt_6 whose evaluations have the given rewards and KLs."""
    for name, shift in (("dpo_0.1", 0.0), ("ppo-gt_6", 0.1)):
        run = folder / "runs" / name
        run.mkdir(parents=True)
        run.joinpath("eval.jsonl").write_text("".join(
            json.dumps(dict(step=20 * i, reward=r + shift, kl=k)) + "\n" for i, (r, k) in enumerate(zip(rewards, kls))))
    (folder / "best_of_n.jsonl").write_text(json.dumps(dict(n=1, reward=0.5, kl_bound=0.0)) + "\n")


def test_envelope_is_the_best_reward_at_or_below_each_kl():
    records = [dict(kl=3.0, reward=0.7), dict(kl=1.0, reward=0.6), dict(kl=2.0, reward=0.5), dict(kl=4.0, reward=0.65)]
    assert envelope(records) == ([1.0, 2.0, 3.0, 4.0], [0.6, 0.6, 0.7, 0.7])


def test_seed_summary_and_figures(tmp_path):
    fake_out(tmp_path / "s1", [0.5, 0.6, 0.7], [0.0, 2.0, 4.0])
    fake_out(tmp_path / "s2", [0.5, 0.62, 0.8], [0.0, 3.0, 6.0])
    table = summary([str(tmp_path / "s1"), str(tmp_path / "s2")])
    assert table["dpo_0.1"] == [(0.7, 4.0), (0.8, 6.0)] and table["ppo-gt_6"][1] == (pytest.approx(0.9), 6.0)
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
