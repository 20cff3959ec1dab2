"""Pareto fronts across regimes: which regime and exit policy give the best accuracy at each FLOPs budget.

Why: a regime can win at small budgets and lose at the full model's; the union front over every regime and
policy of a (dataset, arch) cell shows who owns which segment, and the hypervolume (Zitzler & Thiele 1998) sums
a front into one number that rewards both accuracy and cheapness.

Conventions
- Input is the tidy ``curves.csv`` table (benchmark/tables.py): one row per (run, policy, point). Points are
  first averaged over seeds at the same (regime, policy, point) — the same threshold tau, budget ratio q or exit
  k in every seed — so a front is made of mean operating points, not of the luckiest seed's.
- **Which points form a front is decided on validation** (BENCHMARK.md, "nothing is selected on test"): a point is
  on a front if no other point dominates it in seed-mean validation cost and accuracy; the front then reports, and
  the hypervolume integrates, those points' *test* cost (``test_flops_fraction``, mean FLOPs per sample / the plain
  backbone's) and ``test_accuracy``. A point that only looks good on test never joins. Dominance uses
  benchmark.evaluate.pareto_mask: cost <= and accuracy >=, one strictly; exact duplicates (two regimes or policies
  landing on the same point) both stay and share ownership.
- Hypervolume reference point, by default per cell: cost_ref = REFERENCE_COST_MARGIN (1.1) x the largest mean FLOPs
  fraction of any point in the cell (running every exit head and the classifier: the same for every regime, since
  they share architecture and exit placement), acc_ref = 0. Strictly beyond the worst cost, so the most expensive
  points (the final exit) add area too: with cost_ref equal to the largest cost they would add none, and a regime
  could improve its final exit without its hypervolume moving. Every regime of a cell is measured against the
  same reference, and both numbers are in the table (reference_flops_fraction, reference_accuracy).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.style import (comparison_panels, new_figure, place_legend, quality_word, regime_colour, regime_handles,
                            regime_order, regime_style, save)
from benchmark.evaluate import pareto_mask

CELL = ["dataset", "arch"]
POINT = ["dataset", "arch", "regime", "policy", "point"]
UNION = "(all)"
"""The regime label of the hypervolume row for the union of all regimes of a cell."""
REFERENCE_COST_MARGIN = 1.1
"""Default hypervolume reference cost = this x the largest FLOPs fraction in the cell (module docstring)."""


def mean_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Seed-averaged operating points: one row per (dataset, arch, regime, policy, point).

    Columns: the keys, param, val_accuracy, val_flops_fraction, test_accuracy, test_flops, test_flops_fraction
    (means over seeds), n_seeds.
    """
    backbone_flops = curves["test_flops"] / curves["test_flops_fraction"]
    return (curves.assign(val_flops_fraction=curves["val_flops"] / backbone_flops).groupby(POINT, sort=True)
            .agg(param=("param", "first"), val_accuracy=("val_accuracy", "mean"),
                 val_flops_fraction=("val_flops_fraction", "mean"), test_accuracy=("test_accuracy", "mean"),
                 test_flops=("test_flops", "mean"), test_flops_fraction=("test_flops_fraction", "mean"),
                 n_seeds=("seed", "nunique"))
            .reset_index())


def validation_front(points: pd.DataFrame) -> np.ndarray:
    """Mask of the points no other point dominates in seed-mean *validation* cost and accuracy."""
    return pareto_mask(points["val_flops_fraction"].to_numpy(), points["val_accuracy"].to_numpy())


def pareto_table(curves: pd.DataFrame) -> pd.DataFrame:
    """The validation-selected front of every (dataset, arch) across all regimes and policies, with test numbers.

    One row per front point, cheapest on test first, with its owner (regime, policy, point, param). Columns as
    mean_curves.
    """
    points = mean_curves(curves)
    fronts = [cell[validation_front(cell)] for _, cell in points.groupby(CELL, sort=True)]
    return (pd.concat(fronts).sort_values([*CELL, "test_flops_fraction", "regime", "policy"], kind="stable")
            .reset_index(drop=True))


def hypervolume_contributions(costs, accuracies, reference: tuple[float, float]) -> np.ndarray:
    """The area each point owns in the union of rectangles [cost, cost_ref] x [acc_ref, accuracy].

    The union is a staircase through the front: a front point owns the step from its cost to the next front
    point's (or cost_ref), from acc_ref up to its accuracy. Dominated points and points outside the reference box
    own nothing; identical points share their step equally. The contributions sum to the hypervolume.
    """
    costs = np.asarray(costs, dtype=np.float64)
    accuracies = np.asarray(accuracies, dtype=np.float64)
    cost_ref, acc_ref = reference
    owned = np.zeros(len(costs))
    inside = np.flatnonzero((costs < cost_ref) & (accuracies > acc_ref))
    front = inside[pareto_mask(costs[inside], accuracies[inside])]
    if len(front) == 0:
        return owned
    steps, which, sharing = np.unique(np.c_[costs[front], accuracies[front]], axis=0,
                                      return_inverse=True, return_counts=True)  # sorted by cost; accuracy rises
    which = which.reshape(-1)
    step_area = np.diff(np.r_[steps[:, 0], cost_ref]) * (steps[:, 1] - acc_ref)
    owned[front] = step_area[which] / sharing[which]
    return owned


def hypervolume(costs, accuracies, reference: tuple[float, float]) -> float:
    """Area dominated by the (cost, accuracy) points w.r.t. reference (cost_ref, acc_ref), cost minimised and
    accuracy maximised: the area of the union of the rectangles [cost, cost_ref] x [acc_ref, accuracy]."""
    return float(hypervolume_contributions(costs, accuracies, reference).sum())


def hypervolume_table(curves: pd.DataFrame, reference: tuple[float, float] | None = None) -> pd.DataFrame:
    """Per (dataset, arch, regime): the hypervolume of the test points of the regime's own validation-selected front
    (seed-averaged, all policies), and a row with regime="(all)" for the front of every regime's points together.

    reference: (flops fraction, accuracy) for every cell; by default (1.1 x the largest FLOPs fraction in the
    cell, 0), strictly beyond every point so that the final exit's points count too.
    Columns: dataset, arch, regime, hypervolume, hypervolume_normalised (divided by the reference box's area
    cost_ref x (1 - acc_ref), so 1 would be a free, perfect classifier), front_size (validation-front points),
    union_share (the fraction of the union's hypervolume owned by this regime's points; 1 for "(all)"),
    reference_flops_fraction, reference_accuracy.
    """
    rows = []
    for (dataset, arch), cell in mean_curves(curves).groupby(CELL, sort=True):
        cost_ref, acc_ref = (reference if reference is not None
                             else (REFERENCE_COST_MARGIN * cell["test_flops_fraction"].max(), 0.0))
        cell = cell.reset_index(drop=True)
        costs, accuracies = cell["test_flops_fraction"].to_numpy(), cell["test_accuracy"].to_numpy()
        union_front = validation_front(cell)
        off_front_outside_box = np.where(union_front, costs, np.inf)      # only front points may own area
        owned_in_union = hypervolume_contributions(off_front_outside_box, accuracies, (cost_ref, acc_ref))
        union = owned_in_union.sum()
        for regime in [*regime_order(cell["regime"]), UNION]:
            mine = union_front if regime == UNION else _regime_front(cell, regime)
            area = hypervolume(costs[mine], accuracies[mine], (cost_ref, acc_ref))
            rows.append({
                "dataset": dataset, "arch": arch, "regime": regime, "hypervolume": area,
                "hypervolume_normalised": area / (cost_ref * (1.0 - acc_ref)),
                "front_size": int(mine.sum()),
                "union_share": owned_in_union[mine].sum() / union if union > 0 else np.nan,
                "reference_flops_fraction": cost_ref, "reference_accuracy": acc_ref,
            })
    return pd.DataFrame(rows)


def _regime_front(cell: pd.DataFrame, regime: str) -> np.ndarray:
    """Mask over `cell` of the regime's own validation-selected front."""
    mine = (cell["regime"] == regime).to_numpy()
    mask = np.zeros(len(cell), dtype=bool)
    mask[np.flatnonzero(mine)[validation_front(cell[mine])]] = True
    return mask


FRONT_COLOUR, FRONT_LINESTYLE = "0.45", (0, (4, 2))
"""The union front's staircase: grey dashes, so it is never taken for a regime's solid line (cagrad is black)."""


def draw_front_panel(ax, cell: pd.DataFrame, cell_front: pd.DataFrame, regimes, policy: str) -> None:
    """One panel of one cell: the seed-mean curves (`mean_curves` rows) of `regimes` under `policy` as lines, the
    cell's validation-selected union front (`pareto_table` rows) as a grey dashed staircase whose markers take the
    owning regime's colour and marker, on a log-scaled FLOPs axis."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter  # not at import: style._plotting
    for regime in regimes:
        curve = cell[(cell["regime"] == regime) & (cell["policy"] == policy)].sort_values("test_flops_fraction")
        ax.plot(curve["test_flops_fraction"], curve["test_accuracy"], linewidth=1.5,
                **{**regime_style(regime), "marker": None})
    ax.step(np.r_[cell_front["test_flops_fraction"], cell["test_flops_fraction"].max()],
            np.r_[cell_front["test_accuracy"], cell_front["test_accuracy"].iloc[-1]],
            where="post", color=FRONT_COLOUR, linewidth=0.9, linestyle=FRONT_LINESTYLE, zorder=3)
    for regime, owned in cell_front.groupby("regime", sort=False):
        ax.scatter(owned["test_flops_fraction"], owned["test_accuracy"], s=22, zorder=4,
                   color=regime_colour(regime), marker=regime_style(regime)["marker"],
                   edgecolors="black", linewidths=0.5)
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 3.0, 5.0)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def front_legend_handles(regimes) -> list:
    """Legend entries of `draw_front_panel`: a line per regime, then the union front's staircase."""
    from matplotlib.lines import Line2D  # not at import: see analysis.style._plotting
    return [*regime_handles(regime_order(regimes), marker=None),
            Line2D([], [], color=FRONT_COLOUR, linewidth=0.9, linestyle=FRONT_LINESTYLE, marker="o",
                   markerfacecolor="white", markeredgecolor="black",
                   label="union front chosen on\nvalidation (marker:\nowning regime)")]


def plot_pareto_fronts(curves: pd.DataFrame, path, policy: str = "threshold") -> None:
    """Seed-averaged accuracy-FLOPs curves of ``policy`` as small multiples: one row per (dataset, arch), one panel
    per group of at most three regimes drawn beside joint (`comparison_panels`), with the cell's union Pareto front
    over all regimes and policies as a grey dashed staircase whose markers take the owning regime's colour and
    marker. Panels of a row share their axes; the x axis is log-scaled (the exit policies spend most points near
    the first exit's cost) and the y axis spans the row's own accuracies, so panels compare with each other and
    nothing is stretched beyond the data. The legend sits outside on the right.
    """
    points = mean_curves(curves)
    front = pareto_table(curves)
    cells = list(points.groupby(CELL, sort=True))
    panels = comparison_panels(points["regime"].unique())
    fig, axes = new_figure(ncols=len(panels), nrows=len(cells), width=3.4, height=2.7, layout="constrained",
                           sharey="row", sharex="row")
    for row, ((dataset, arch), cell) in enumerate(cells):
        cell_front = front[(front["dataset"] == dataset) & (front["arch"] == arch)]
        for column, group in enumerate(panels):
            ax = axes[row, column]
            draw_front_panel(ax, cell, cell_front, group, policy)
            ax.set_title(f"{dataset} / {arch}" if column == 0 else "", fontsize="medium", loc="left")
            if column == 0:
                ax.set_ylabel(f"test {quality_word([dataset])}")
            if row == len(cells) - 1:
                ax.set_xlabel("test FLOPs ÷ backbone's (log)")
    place_legend(fig, front_legend_handles(points["regime"]), title=f"regime ({policy} policy)")
    fig.suptitle(f"Test {quality_word(points['dataset'])} vs FLOPs per sample, mean over seeds: each panel a "
                 "few regimes beside joint; grey dashes: "
                 "the cell's front\nchosen on validation (all regimes and policies) at its test numbers")
    save(fig, path)


