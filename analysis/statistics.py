"""Statistics over seeds: mean, spread and 95 % confidence interval per regime, paired tests against a baseline
regime, and average ranks across (dataset, arch) cells for the leaderboard.

Choices (the design names the tests, not which one leads):
- The 95 % CI is Student's t interval, mean +- t_{0.975, n-1} * std / sqrt(n), std with ddof=1: with 3 seeds
  the normal approximation would understate it (t_{0.975, 2} = 4.30, not 1.96).
- Tests pair runs by seed. Within a (dataset, arch) cell every regime's seed s shares its data splits, its
  initialisation and (for disjoint/mixed) its P1 backbone, so pairing removes the seed's effect. The primary
  test is the two-sided paired t-test (``test`` = "paired t"; scipy.stats.ttest_rel). The two-sided Wilcoxon
  signed-rank test (scipy.stats.wilcoxon, exact distribution) is reported beside it, but with n pairs its
  smallest possible p-value is 2 / 2^n: 0.25 for 3 seeds, so it can reject at 0.05 only from 6 seeds on.
- Missing values (e.g. accuracy_at_25pct where no point fits the budget) are dropped, a pair needs both values.
  A p-value is NaN for the baseline itself and below 2 pairs.
- Zero-variance differences are decided before any test, because the t statistic mean / (std / sqrt(n)) divides
  by zero there (scipy returns p = 0, or ~1e-70 when float rounding leaves a 1e-16 spread). Differences count as
  equal when their spread is at most EQUAL_RTOL x the largest |value| (rounding leaves ~1e-16; real differences
  are far larger: accuracies move in steps of 1 / N_test). All equal to zero: p_value = wilcoxon_p = 1 (no evidence of any difference). All equal
  and non-zero: p_value = NaN (undefined; n_pairs >= 2 tells it from too few pairs), wilcoxon_p as computed
  (every sign agrees: 2 / 2^n, the smallest it can be), and mean_difference says by how much.
- No multiple-comparison correction is applied; the table gives raw p-values for the reader to correct.
- Average rank (Demšar 2006, JMLR 7): in each cell, regimes are ranked by their mean over seeds (1 = best, ties
  get the average rank), and ranks are averaged over the cells where the regime has a value.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.style import cell_panels, regime_order, regime_style, save

CELL = ["dataset", "arch"]
CONFIDENCE = 0.95
PRIMARY_TEST = "paired t"
EQUAL_RTOL = 1e-12
"""Paired differences whose spread is at most this x the largest |value| are equal (module docstring)."""


def confidence_interval(values, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Student's t interval for the mean of ``values`` (NaN, NaN below two values)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n < 2:
        return np.nan, np.nan
    from scipy import stats  # ~0.4 s, so not at import: `bench run` imports every analysis module

    half_width = stats.t.ppf(0.5 + confidence / 2, n - 1) * values.std(ddof=1) / np.sqrt(n)
    return values.mean() - half_width, values.mean() + half_width


def paired_tests(values: pd.Series, baseline_values: pd.Series) -> dict:
    """Paired t-test and Wilcoxon signed-rank test of values vs baseline_values, both indexed by seed.

    Keys: n_pairs, mean_difference (regime - baseline), p_value (paired t), wilcoxon_p. Zero-variance differences
    follow the module docstring's rule: all zero -> both p = 1; all equal and non-zero -> p_value NaN.
    """
    from scipy import stats

    pairs = pd.concat({"regime": values, "baseline": baseline_values}, axis=1, join="inner").dropna()
    result = {"n_pairs": len(pairs), "mean_difference": np.nan, "p_value": np.nan, "wilcoxon_p": np.nan}
    if len(pairs) == 0:
        return result
    differences = (pairs["regime"] - pairs["baseline"]).to_numpy(dtype=np.float64)
    result["mean_difference"] = float(differences.mean())
    if len(pairs) < 2:
        return result
    tolerance = EQUAL_RTOL * np.abs(pairs.to_numpy(dtype=np.float64)).max()
    constant = np.ptp(differences) <= tolerance                  # zero variance, up to rounding
    if constant and np.abs(differences).max() <= tolerance:
        result.update(p_value=1.0, wilcoxon_p=1.0)               # no difference at all
        return result
    if not constant:                                             # else t = mean / 0: p_value stays NaN
        result["p_value"] = float(stats.ttest_rel(pairs["regime"], pairs["baseline"]).pvalue)
    result["wilcoxon_p"] = float(stats.wilcoxon(differences).pvalue)
    return result


def summary_table(runs: pd.DataFrame, metrics: list[str], baseline: str = "joint") -> pd.DataFrame:
    """Per (dataset, arch, regime, metric): mean, std (ddof=1), n, 95 % t-interval, and paired tests against
    ``baseline`` over seeds (see the module docstring).

    runs: one row per run with columns dataset, arch, regime, seed and the metrics (the tidy runs.csv).
    Columns: dataset, arch, regime, metric, n, mean, std, ci95_low, ci95_high, baseline, n_pairs,
    mean_difference, test, p_value, wilcoxon_p (comparison columns are NaN on the baseline's own rows).
    """
    if baseline not in set(runs["regime"]):
        raise ValueError(f"baseline regime {baseline!r} is not in the table; regimes: {sorted(set(runs['regime']))}")
    duplicated = runs.duplicated([*CELL, "regime", "seed"])
    if duplicated.any():
        raise ValueError(f"{duplicated.sum()} runs repeat a (dataset, arch, regime, seed); pairing by seed needs one")
    rows = []
    for (dataset, arch), cell in runs.groupby(CELL, sort=True):
        by_regime = {regime: group.set_index("seed") for regime, group in cell.groupby("regime")}
        for regime in regime_order(by_regime):
            for metric in metrics:
                values = by_regime[regime][metric].dropna()
                low, high = confidence_interval(values)
                row = {"dataset": dataset, "arch": arch, "regime": regime, "metric": metric, "n": len(values),
                       "mean": values.mean(), "std": values.std(ddof=1), "ci95_low": low, "ci95_high": high,
                       "baseline": baseline}
                if regime == baseline:
                    row.update(n_pairs=np.nan, mean_difference=np.nan, test=None, p_value=np.nan, wilcoxon_p=np.nan)
                else:
                    baseline_values = by_regime[baseline][metric] if baseline in by_regime else pd.Series(dtype=float)
                    row.update(test=PRIMARY_TEST, **paired_tests(by_regime[regime][metric], baseline_values))
                rows.append(row)
    return pd.DataFrame(rows)


def cell_ranks(runs: pd.DataFrame, metric: str, higher_is_better: bool = True) -> pd.DataFrame:
    """Rank of each regime in each (dataset, arch) cell by its mean ``metric`` over seeds (1 = best, ties
    averaged). Columns: dataset, arch, regime, mean, rank. Regimes without a value in a cell get no row."""
    means = runs.groupby([*CELL, "regime"])[metric].mean().dropna().rename("mean").reset_index()
    means["rank"] = means.groupby(CELL)["mean"].rank(ascending=not higher_is_better, method="average")
    return means


def average_ranks(runs: pd.DataFrame, metric: str, higher_is_better: bool = True) -> pd.DataFrame:
    """The leaderboard: each regime's rank (cell_ranks) averaged over cells, best first.

    Columns: regime, average_rank, n_cells. Ties in average rank keep regime_order.
    """
    ranks = cell_ranks(runs, metric, higher_is_better)
    board = ranks.groupby("regime").agg(average_rank=("rank", "mean"), n_cells=("rank", "size"))
    board = board.loc[regime_order(board.index)].reset_index()
    return board.sort_values("average_rank", kind="stable").reset_index(drop=True)


def plot_confidence_intervals(summary: pd.DataFrame, metric: str, path, alpha: float = 0.05) -> None:
    """Mean and 95 % CI of ``metric`` per regime, one panel per (dataset, arch); a star marks p < alpha against
    the baseline (paired t). Colour and marker: the regime's objective; line: its schedule (analysis.style)."""
    table = summary[summary["metric"] == metric]
    cells = list(table.groupby(CELL, sort=True))
    n_regimes = table["regime"].nunique()
    fig, axes = cell_panels(cells, 4, width=max(3.4, 0.27 * n_regimes + 0.8), height=3.6)
    for panel, (ax, ((dataset, arch), cell)) in enumerate(zip(axes, cells)):
        regimes = regime_order(cell["regime"])
        cell = cell.set_index("regime").loc[regimes]
        for i, (regime, row) in enumerate(cell.iterrows()):
            style = regime_style(regime)
            error = [[row["mean"] - row["ci95_low"]], [row["ci95_high"] - row["mean"]]]
            bars = ax.errorbar(i, row["mean"], yerr=error, fmt=style["marker"], color=style["color"], capsize=4,
                               markersize=6, markeredgecolor="black", markeredgewidth=0.5)
            bars.lines[2][0].set_linestyle(style["linestyle"])          # the interval in the schedule's style
            if row["p_value"] < alpha:
                ax.annotate("*", (i, row["ci95_high"]), ha="center", va="bottom", fontsize=14)
        ax.set_xticks(range(len(regimes)), regimes, rotation=45, ha="right", rotation_mode="anchor")
        ax.set_xlim(-0.6, len(regimes) - 0.4)
        low, high = cell["ci95_low"].min(), cell["ci95_high"].max()
        if np.isfinite(low) and np.isfinite(high) and high > low:
            ax.set_ylim(low - 0.05 * (high - low), high + 0.12 * (high - low))   # room for the stars
        if panel % 4 == 0:                                   # first column
            ax.set_ylabel(f"{metric} (mean, 95 % CI)")
        ax.set_title(f"{dataset} / {arch}")
    baseline = table["baseline"].iloc[0]
    fig.suptitle(f"{metric} over {int(table['n'].max())} seeds; * p < {alpha} vs {baseline} (paired t-test)\n"
                 f"colour and marker: objective, line: schedule")
    save(fig, path)
