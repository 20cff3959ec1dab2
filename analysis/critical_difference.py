"""Are the regimes' average ranks different beyond chance? Friedman test plus Nemenyi critical difference
(Demšar 2006, JMLR 7, section 3.2.2), and the critical-difference diagram.

Blocks are the (dataset, arch) cells, as in Demšar's comparison over data sets: a regime's value in a cell is its
mean over seeds, and only cells where every compared regime has a value enter (the test needs complete blocks).
Ranks: 1 = best, ties averaged. Nemenyi: two regimes differ at level alpha when their average ranks differ by more
than CD = q_alpha * sqrt(k (k + 1) / (6 N)), q_alpha the studentized range quantile for k groups and infinite
degrees of freedom divided by sqrt 2 (Demšar's table 5: k = 3 -> 2.343, k = 10 -> 3.164). With few cells CD is
large: the diagram then shows, honestly, that few differences are resolved.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from analysis.style import new_figure, regime_style, save

CELL = ["dataset", "arch"]


@dataclass(frozen=True)
class RankTest:
    ranks: pd.Series           # regime -> average rank over the complete cells, best first
    n_cells: int
    friedman_statistic: float  # Friedman's chi-square (NaN below 2 cells or 3 regimes)
    friedman_p: float
    critical_difference: float
    alpha: float

    def groups(self) -> list[tuple[str, ...]]:
        """Maximal runs of regimes (in rank order) whose ranks lie within CD of each other: not resolved apart."""
        names, values = list(self.ranks.index), self.ranks.to_numpy()
        cliques = []
        for i in range(len(names)):
            j = i
            while j + 1 < len(names) and values[j + 1] - values[i] <= self.critical_difference:
                j += 1
            if j > i and not any(c[0] <= i and j <= c[1] for c in cliques):
                cliques.append((i, j))
        return [tuple(names[i:j + 1]) for i, j in cliques]


    def resolved_pairs(self) -> list[tuple[str, str]]:
        """(better, worse) pairs whose average ranks differ by more than CD: resolved apart at alpha (Nemenyi);
        none without a finite CD."""
        if not np.isfinite(self.critical_difference):
            return []
        names, values = list(self.ranks.index), self.ranks.to_numpy()
        return [(names[i], names[j]) for i in range(len(names)) for j in range(i + 1, len(names))
                if values[j] - values[i] > self.critical_difference]


def nemenyi_q(k: int, alpha: float = 0.05) -> float:
    from scipy import stats
    return float(stats.studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2))


def rank_test(runs: pd.DataFrame, metric: str, alpha: float = 0.05, higher_is_better: bool = True) -> RankTest:
    """Friedman + Nemenyi over the cells where every regime of `runs` has a seed-mean `metric`."""
    from scipy import stats
    means = runs.groupby([*CELL, "regime"])[metric].mean().unstack("regime").dropna(axis=0, how="any")
    ranks = means.rank(axis=1, ascending=not higher_is_better, method="average")
    n, k = ranks.shape
    average = ranks.mean().sort_values(kind="stable")
    statistic = p = np.nan
    if n >= 2 and k >= 3:
        statistic, p = stats.friedmanchisquare(*(means[c].to_numpy() for c in means.columns))
        if not np.isfinite(statistic):         # every cell ranks the regimes alike with ties: no evidence
            statistic, p = np.nan, np.nan
    cd = nemenyi_q(k, alpha) * np.sqrt(k * (k + 1) / (6 * n)) if n and k >= 2 else np.nan
    return RankTest(average, n, float(statistic), float(p), float(cd), alpha)


def plot_critical_difference(test: RankTest, path, title: str) -> None:
    """Demšar's diagram: the rank axis on top, each regime at its average rank, a thick bar joining regimes
    within CD of each other (differences not resolved at alpha), the CD as a scale bar."""
    half, top = _label_rows(test)
    fig, axes = new_figure(width=8.0, height=1.4 + 0.32 * (half + top))
    draw_critical_difference(axes[0][0], test, title)
    save(fig, path)


def _label_rows(test: RankTest) -> tuple[int, float]:
    """(label rows on each side, where they start below the axis): what sizes the diagram."""
    return (len(test.ranks) + 1) // 2, 1.0 + 0.25 * len(test.groups())


def draw_critical_difference(ax, test: RankTest, title: str = "") -> None:
    """`plot_critical_difference`'s diagram on the matplotlib axis `ax` (give it ~8 inches of width)."""
    names, ranks = list(test.ranks.index), test.ranks.to_numpy()
    k = len(names)
    half, top = _label_rows(test)
    cliques = test.groups()
    low, high = 1, max(k, 2)
    margin = 1.0 + 0.3 * k                         # room for the labels beyond both ends of the rank axis
    ax.set_xlim(low - margin, high + margin)
    ax.set_ylim(-(half + top + 0.8), 1.8)
    ax.axis("off")
    ax.hlines(0, low, high, color="black", lw=1)
    for r in range(low, high + 1):
        ax.vlines(r, 0, 0.15, color="black", lw=1)
        ax.text(r, 0.3, str(r), ha="center", va="bottom", fontsize=9)
    for i, (name, rank) in enumerate(zip(names, ranks)):
        left = i < half
        row = -top - (i if left else k - 1 - i)
        end = low - 0.3 if left else high + 0.3
        style = regime_style(name)
        ax.plot([rank, rank, end], [0, row, row], color=style["color"], linestyle=style["linestyle"], lw=1.4)
        ax.text(end + (-0.1 if left else 0.1), row, f"{name} ({rank:.2f})", ha="right" if left else "left",
                va="center", fontsize=8.5, color="black")
    for depth, group in enumerate(cliques):
        lo, hi = test.ranks[list(group)].min(), test.ranks[list(group)].max()
        ax.hlines(-0.35 - 0.25 * depth, lo - 0.03, hi + 0.03, color="black", lw=3.5)
    if np.isfinite(test.critical_difference):
        cd = test.critical_difference
        wider = cd > high - low                     # no two regimes can be resolved: say so, not a clipped bar
        ax.hlines(1.25, low, min(low + cd, high), color="black", lw=1.5)
        resolved = len(test.resolved_pairs())
        label = f"CD = {cd:.2f}" + (" (wider than the whole rank range: no pair is resolved)" if wider else
                                    ": no pair is resolved" if not resolved else
                                    f": {resolved} of {k * (k - 1) // 2} pairs resolved")
        ax.text(low + min(cd, high - low) / 2, 1.35, label, ha="center", va="bottom", fontsize=9)
    p = "n/a" if not np.isfinite(test.friedman_p) else f"{test.friedman_p:.3g}"
    ax.set_title(f"{title}\nFriedman p = {p} over {test.n_cells} cells; Nemenyi α = {test.alpha:g}", fontsize=10,
                 pad=14)
