"""Pareto fronts and hypervolume checked against brute force, hand-computed staircases and hand-made owners."""

import itertools

import numpy as np
import pandas as pd
import pytest

import analysis.pareto
from matplotlib.colors import to_rgb
from analysis.style import comparison_panels, regime_colour
from analysis.pareto import (
    UNION, hypervolume, hypervolume_contributions, hypervolume_table, mean_curves, pareto_table, plot_pareto_fronts,
)


def curves_table(points):
    """A curves.csv-like table from (dataset, arch, regime, seed, policy, point, flops_fraction, accuracy) tuples."""
    frame = pd.DataFrame(points, columns=["dataset", "arch", "regime", "seed", "policy", "point",
                                          "test_flops_fraction", "test_accuracy"])
    return frame.assign(run_id=frame["regime"] + frame["seed"].astype(str), param=frame["point"] / 10.0,
                        test_flops=frame["test_flops_fraction"] * 1e6, val_flops=frame["test_flops_fraction"] * 1e6,
                        val_accuracy=frame["test_accuracy"])   # validation agrees with test unless a test says not


def random_curves(seed, cells=(("d", "a"), ("d", "b")), regimes=("joint", "disjoint", "mixed"), seeds=(0, 1, 2)):
    """Coarse random values so that seed means collide and ties and duplicates occur."""
    rng = np.random.default_rng(seed)
    rows = [(dataset, arch, regime, s, policy, point, rng.integers(1, 8) / 8, rng.integers(0, 6) / 6)
            for (dataset, arch), regime, s, policy, point in
            itertools.product(cells, regimes, seeds, ("threshold", "exit"), range(6))]
    return curves_table(rows)


def brute_force_front(costs, accuracies):
    """Indices of points no other point dominates (cost <= and accuracy >=, one strictly), O(n^2)."""
    return {i for i in range(len(costs))
            if not any(costs[j] <= costs[i] and accuracies[j] >= accuracies[i]
                       and (costs[j] < costs[i] or accuracies[j] > accuracies[i]) for j in range(len(costs)))}


def brute_force_union_area(costs, accuracies, reference):
    """Area of the union of rectangles [c, cost_ref] x [acc_ref, a] on the grid of all their edges: independent of
    any front or staircase logic."""
    cost_ref, acc_ref = reference
    xs = np.unique(np.r_[np.clip(costs, None, cost_ref), cost_ref])
    ys = np.unique(np.r_[np.clip(accuracies, acc_ref, None), acc_ref])
    area = 0.0
    for (x0, x1), (y0, y1) in itertools.product(zip(xs, xs[1:]), zip(ys, ys[1:])):
        if any(c <= x0 and a >= y1 for c, a in zip(costs, accuracies)):
            area += (x1 - x0) * (y1 - y0)
    return area


@pytest.mark.parametrize("seed", range(5))
def test_pareto_table_equals_brute_force_dominance_on_seed_means(seed):
    curves = random_curves(seed)
    points = curves.groupby(["dataset", "arch", "regime", "policy", "point"]).agg(
        c=("test_flops_fraction", "mean"), a=("test_accuracy", "mean")).reset_index()
    expected = set()
    for _, cell in points.groupby(["dataset", "arch"]):
        front = brute_force_front(cell["c"].to_numpy(), cell["a"].to_numpy())
        expected |= {tuple(row) for row in cell.iloc[sorted(front)][["dataset", "arch", "regime", "policy", "point"]]
                     .itertuples(index=False)}
    table = pareto_table(curves)
    got = {tuple(row) for row in table[["dataset", "arch", "regime", "policy", "point"]].itertuples(index=False)}
    assert got == expected and len(table) == len(expected)


def test_points_are_averaged_over_seeds_before_the_front():
    """Seed 0 alone would put regime b's point on the front; the seed means say regime a dominates it."""
    curves = curves_table([
        ("d", "n", "a", 0, "exit", 0, 0.5, 0.80), ("d", "n", "a", 1, "exit", 0, 0.5, 0.90),
        ("d", "n", "b", 0, "exit", 0, 0.6, 0.95), ("d", "n", "b", 1, "exit", 0, 0.6, 0.70),
    ])
    means = mean_curves(curves).set_index("regime")
    assert means.loc["a", "test_accuracy"] == pytest.approx(0.85) and means.loc["b", "n_seeds"] == 2
    assert list(pareto_table(curves)["regime"]) == ["a"]


def test_hypervolume_of_a_staircase_by_hand():
    costs, accuracies = [0.2, 0.5, 0.8], [0.5, 0.8, 0.9]
    assert hypervolume(costs, accuracies, (1.0, 0.0)) == pytest.approx(0.3 * 0.5 + 0.3 * 0.8 + 0.2 * 0.9)
    assert hypervolume(costs, accuracies, (1.0, 0.4)) == pytest.approx(0.3 * 0.1 + 0.3 * 0.4 + 0.2 * 0.5)
    assert hypervolume(costs, accuracies, (0.6, 0.0)) == pytest.approx(0.3 * 0.5 + 0.1 * 0.8)  # 0.8 lies outside


def test_dominated_duplicate_and_outside_points_leave_hypervolume_unchanged():
    costs, accuracies = [0.2, 0.5, 0.8], [0.5, 0.8, 0.9]
    base = hypervolume(costs, accuracies, (1.0, 0.0))
    for cost, accuracy in [(0.6, 0.7), (0.5, 0.8), (0.2, 0.1), (1.2, 0.99), (0.1, 0.0)]:
        assert hypervolume(costs + [cost], accuracies + [accuracy], (1.0, 0.0)) == pytest.approx(base, rel=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_hypervolume_equals_the_area_of_the_union_of_rectangles(seed):
    rng = np.random.default_rng(seed)
    costs, accuracies = rng.integers(0, 12, 30) / 10, rng.integers(0, 10, 30) / 10   # ties, and points outside
    reference = (1.0, 0.2)
    assert hypervolume(costs, accuracies, reference) == pytest.approx(
        brute_force_union_area(costs, accuracies, reference), abs=1e-12)


def test_identical_points_share_their_step():
    owned = hypervolume_contributions([0.2, 0.2, 0.6], [0.5, 0.5, 0.9], (1.0, 0.0))
    np.testing.assert_allclose(owned, [0.4 * 0.5 / 2, 0.4 * 0.5 / 2, 0.4 * 0.9])


def test_owners_of_front_segments_and_hypervolume_table():
    """mixed owns the cheap segment, joint the expensive one; disjoint is dominated everywhere."""
    curves = curves_table([
        ("d", "n", "mixed", 0, "threshold", 0, 0.3, 0.70), ("d", "n", "mixed", 0, "threshold", 1, 0.7, 0.75),
        ("d", "n", "joint", 0, "threshold", 0, 0.5, 0.80), ("d", "n", "joint", 0, "exit", 2, 1.0, 0.90),
        ("d", "n", "disjoint", 0, "threshold", 0, 0.6, 0.60), ("d", "n", "disjoint", 0, "exit", 2, 1.0, 0.85),
    ])
    front = pareto_table(curves)
    assert list(zip(front["regime"], front["policy"], front["test_flops_fraction"])) == [
        ("mixed", "threshold", 0.3), ("joint", "threshold", 0.5), ("joint", "exit", 1.0)]

    table = hypervolume_table(curves).set_index("regime")
    assert (table["reference_flops_fraction"] == 1.1).all() and (table["reference_accuracy"] == 0.0).all()
    union = 0.2 * 0.70 + 0.5 * 0.80 + 0.1 * 0.90          # the exit point at cost 1.0 owns [1.0, 1.1] x [0, 0.9]
    assert table.loc[UNION, "hypervolume"] == pytest.approx(union)
    assert table.loc["mixed", "hypervolume"] == pytest.approx(0.4 * 0.70 + 0.4 * 0.75)
    assert table.loc["joint", "hypervolume"] == pytest.approx(0.5 * 0.80 + 0.1 * 0.90)
    assert table.loc["disjoint", "hypervolume"] == pytest.approx(0.4 * 0.60 + 0.1 * 0.85)
    assert table.loc["mixed", "union_share"] == pytest.approx(0.2 * 0.70 / union)
    assert table.loc["joint", "union_share"] == pytest.approx((0.5 * 0.80 + 0.1 * 0.90) / union)
    assert table.loc["disjoint", "union_share"] == 0.0
    assert table.loc["mixed", "hypervolume_normalised"] == pytest.approx(table.loc["mixed", "hypervolume"] / 1.1)
    assert list(table.index) == ["joint", "disjoint", "mixed", UNION]

    explicit = hypervolume_table(curves, reference=(1.2, 0.5)).set_index("regime")
    assert explicit.loc[UNION, "hypervolume"] == pytest.approx(0.2 * 0.2 + 0.5 * 0.3 + 0.2 * 0.4)
    assert explicit.loc[UNION, "hypervolume_normalised"] == pytest.approx(
        explicit.loc[UNION, "hypervolume"] / (1.2 * 0.5))


def test_a_final_exit_only_front_has_the_area_up_to_the_reference_beyond_it():
    """Two regimes with only their final exit (cost 1.2 x backbone): the reference cost is 1.1 x 1.2 = 1.32, so
    the better final exit owns [1.2, 1.32] x [0, 0.9]; with the reference at the largest cost both would read 0."""
    curves = curves_table([("d", "n", "joint", 0, "exit", 2, 1.2, 0.90), ("d", "n", "joint", 1, "exit", 2, 1.2, 0.90),
                           ("d", "n", "mixed", 0, "exit", 2, 1.2, 0.80)])   # joint's two seeds average to 0.90
    table = hypervolume_table(curves).set_index("regime")
    assert table["reference_flops_fraction"].iloc[0] == pytest.approx(1.32)
    assert table.loc["joint", "hypervolume"] == pytest.approx(0.12 * 0.90)
    assert table.loc["mixed", "hypervolume"] == pytest.approx(0.12 * 0.80)
    assert table.loc[UNION, "hypervolume"] == pytest.approx(0.12 * 0.90)
    assert table.loc["joint", "hypervolume_normalised"] == pytest.approx(0.12 * 0.90 / 1.32)
    assert (table.loc["joint", "union_share"], table.loc["mixed", "union_share"]) == (1.0, 0.0)


def test_pareto_figure_is_written(tmp_path):
    plot_pareto_fronts(random_curves(0), tmp_path / "pareto.png")
    assert (tmp_path / "pareto.png").stat().st_size > 10_000


def test_pareto_figure_is_small_multiples_beside_joint_with_the_legend_off_the_data(monkeypatch):
    """Fifteen curves in one panel are a tangle: each panel holds joint and at most three others, one row per cell,
    and the legend covers no panel."""
    figures = []
    monkeypatch.setattr(analysis.pareto, "save", lambda fig, path: (fig.canvas.draw(), figures.append(fig)))
    regimes = ("joint", "disjoint", "mixed", "joint+sdn", "mixed+sdn", "joint+cet", "mixed+cet", "joint+l2w")
    curves = random_curves(1, cells=(("d", "a"), ("d", "b"), ("e", "a")), regimes=regimes)
    plot_pareto_fronts(curves, "unused.png")
    fig = figures[0]
    panels = [ax for ax in fig.axes if ax.get_visible()]
    groups = comparison_panels(regimes)
    assert groups == [["joint", "disjoint", "mixed", "mixed+sdn"], ["joint", "mixed+cet"],
                      ["joint", "joint+sdn", "joint+cet", "joint+l2w"]]
    assert len(panels) == 3 * len(groups)
    for ax, group in zip(panels, groups * 3):
        assert len(ax.get_lines()) == len(group) + 1            # the group's curves and the front's staircase
        assert to_rgb(ax.get_lines()[0].get_color()) == to_rgb(regime_colour("joint"))   # joint in every panel
    legend = fig.legends[0]
    assert not any(legend.get_window_extent().overlaps(ax.get_window_extent()) for ax in panels)
    assert [t.get_text() for t in legend.get_texts()][:len(regimes)] == list(regimes)


def test_fronts_are_chosen_on_validation_and_report_test_numbers():
    """mixed's point is the best on test but dominated on validation: it joins no front and adds no area."""
    curves = curves_table([("d", "n", "joint", 0, "threshold", 0, 0.5, 0.80), ("d", "n", "joint", 0, "exit", 2, 1.0, 0.90),
                           ("d", "n", "mixed", 0, "threshold", 0, 0.5, 0.95)])
    curves.loc[curves.regime == "mixed", "val_accuracy"] = 0.70          # worse than joint's 0.80 on validation
    front = pareto_table(curves)
    assert list(front["regime"]) == ["joint", "joint"]
    table = hypervolume_table(curves).set_index("regime")
    assert table.loc[UNION, "hypervolume"] == pytest.approx(0.5 * 0.80 + 0.1 * 0.90)   # test values of joint's front
    assert table.loc["mixed", "hypervolume"] == pytest.approx(0.6 * 0.95)             # its own front: its one point
    assert table.loc["mixed", "union_share"] == 0.0 and table.loc[UNION, "front_size"] == 2
