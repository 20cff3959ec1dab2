"""Calibration of every exit, from stored logits (no model needed).

Per exit, on the clean test split:
- ECE: expected calibration error with 15 **equal-width** bins of the max-softmax confidence on [0, 1] (Guo et al.,
  ICML 2017), |accuracy - mean confidence| per bin weighted by the bin's share of the samples. Bins are (lo, hi],
  the first one [0, 1/15].
- KS: the Kolmogorov-Smirnov calibration error (Gupta et al., ICLR 2021), binning-free: the samples sorted by
  confidence, the largest absolute gap between the cumulative sums of confidence and of correctness, divided by N.
- NLL: mean negative log-likelihood of the true class (log-softmax in float64).
- Brier: mean over samples of sum over classes of (p - one-hot)^2 (range [0, 2]): Brier's own multi-class score
  (Brier 1950), 0 for a certain right answer and 2 for a certain wrong one whatever the number of classes. The
  calibration literature's reference code (Gupta et al., spline calibration) averages over classes instead: divide
  by C to compare.
The confidence is `benchmark.evaluate.max_softmax` (float64 from the stored float32 logits), the one rule the
exit policies use, so "confidence" means the same thing everywhere.

Segmentation runs are calibrated over the labelled pixels of the test split (`pixel_calibration`), from the sums
dense.npz stores per (exit, image) (`benchmark.dense.calibration_sums`: the same bins, the same float64 softmax):
ECE, NLL, Brier and accuracy exactly as if every pixel were a sample; KS is NaN (it needs every pixel's confidence).
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from analysis.style import new_figure, place_legend, regime_handles, regime_order, regime_style, save, split_regime
from benchmark.evaluate import log_softmax, max_softmax

N_BINS = 15
LABELS = ["run_id", "dataset", "arch", "regime", "seed"]


def confidence_and_correct(logits: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Max-softmax confidence (float64) and whether the argmax is the label, for (N, C) logits."""
    confidence, prediction = max_softmax(logits)
    return confidence, (prediction == np.asarray(labels)).astype(np.float64)


def _bin_index(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Equal-width bins (lo, hi] on [0, 1]; a confidence of exactly 0 goes to the first bin."""
    return np.clip(np.ceil(np.asarray(confidence, dtype=np.float64) * n_bins).astype(int) - 1, 0, n_bins - 1)


def reliability_bins(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> pd.DataFrame:
    """Per equal-width bin: its edges, sample count, and sums of confidence and correctness (sums, so that bins of
    several runs pool by addition)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    index = _bin_index(confidence, n_bins)
    return _bins_frame(np.bincount(index, minlength=n_bins), np.bincount(index, weights=confidence, minlength=n_bins),
                       np.bincount(index, weights=correct, minlength=n_bins))


def _bins_frame(count, confidence_sum, correct_sum) -> pd.DataFrame:
    n_bins = len(count)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return pd.DataFrame({"bin": np.arange(n_bins), "lo": edges[:-1], "hi": edges[1:], "count": count,
                         "confidence_sum": confidence_sum, "correct_sum": correct_sum})


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = N_BINS) -> float:
    """ECE with `n_bins` equal-width confidence bins (Guo et al. 2017): sum over bins of
    (bin count / N) * |mean correctness - mean confidence|."""
    return binned_calibration_error(reliability_bins(confidence, correct, n_bins))


def binned_calibration_error(bins: pd.DataFrame) -> float:
    """ECE from reliability bins (`reliability_bins`, or pixel bins summed from dense.npz)."""
    total = bins["count"].sum()
    if total == 0:
        return float("nan")
    return float(np.abs(bins["correct_sum"] - bins["confidence_sum"]).sum() / total)


def ks_calibration_error(confidence: np.ndarray, correct: np.ndarray) -> float:
    """KS calibration error (Gupta et al. 2021): max_i |sum_{j<=i} (c_j - y_j)| / N over the samples sorted by
    confidence c (y_j = 1 where sample j is classified correctly)."""
    confidence, correct = np.asarray(confidence, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    if confidence.size == 0:
        return float("nan")
    order = np.argsort(confidence, kind="stable")
    gap = np.cumsum(confidence[order] - correct[order]) / confidence.size
    return float(np.abs(gap).max())


def negative_log_likelihood(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean -log softmax(z)[y] over the samples, in float64."""
    log_p = log_softmax(logits)
    labels = np.asarray(labels)
    return float(-log_p[np.arange(len(labels)), labels].mean())


def brier_score(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean over samples of sum over classes of (softmax(z) - one-hot(y))^2, in float64."""
    p = np.exp(log_softmax(logits))
    labels = np.asarray(labels)
    p[np.arange(len(labels)), labels] -= 1.0
    return float((p ** 2).sum(axis=-1).mean())


def exit_calibration(logits: np.ndarray, labels: np.ndarray, n_bins: int = N_BINS) -> tuple[pd.DataFrame,
                                                                                              pd.DataFrame]:
    """For (K, N, C) logits of K exits: (one row per exit with accuracy, mean confidence, ECE, KS, NLL, Brier and
    samples; the reliability bins of every exit, `exit` column first)."""
    rows, bins = [], []
    for k, exit_logits in enumerate(np.asarray(logits)):
        confidence, correct = confidence_and_correct(exit_logits, labels)
        rows.append({"exit": k, "split": "test", "accuracy": correct.mean(), "mean_confidence": confidence.mean(),
                     "ece": expected_calibration_error(confidence, correct, n_bins),
                     "ks": ks_calibration_error(confidence, correct),
                     "nll": negative_log_likelihood(exit_logits, labels), "brier": brier_score(exit_logits, labels),
                     "samples": len(correct)})
        bins.append(reliability_bins(confidence, correct, n_bins).assign(exit=k, split="test"))
    reliability = pd.concat(bins, ignore_index=True)
    return pd.DataFrame(rows), reliability[["exit", "split", *reliability.columns[:-2]]]


def pixel_calibration(reliability: np.ndarray, likelihood: np.ndarray) -> tuple[pd.DataFrame, pd.DataFrame]:
    """`exit_calibration` of a segmentation run over the labelled pixels of its test split, from dense.npz's
    per-(exit, image) sums: reliability (K, N, bins, 3) [pixels, confidence sum, pixels right] and likelihood
    (K, N, 2) [NLL sum, Brier sum]. `samples` counts pixels; `ks` is NaN: the binning-free KS error needs every
    pixel's confidence, which is not stored."""
    rows, bins = [], []
    for k, (exit_bins, exit_sums) in enumerate(zip(np.asarray(reliability), np.asarray(likelihood))):
        count, confidence_sum, correct_sum = exit_bins.sum(axis=0).T
        nll_sum, brier_sum = exit_sums.sum(axis=0)
        frame = _bins_frame(count.astype(np.int64), confidence_sum, correct_sum)
        pixels = count.sum()
        rows.append({"exit": k, "split": "test", "accuracy": correct_sum.sum() / pixels,
                     "mean_confidence": confidence_sum.sum() / pixels, "ece": binned_calibration_error(frame),
                     "ks": float("nan"), "nll": nll_sum / pixels, "brier": brier_sum / pixels, "samples": int(pixels)})
        bins.append(frame.assign(exit=k, split="test"))
    reliability_frame = pd.concat(bins, ignore_index=True)
    return pd.DataFrame(rows), reliability_frame[["exit", "split", *reliability_frame.columns[:-2]]]


def calibration_table(runs: Iterable[tuple[dict, np.ndarray, np.ndarray]], n_bins: int = N_BINS,
                      dense_runs: Iterable[tuple[dict, np.ndarray, np.ndarray]] = ()) -> tuple[pd.DataFrame,
                                                                                                pd.DataFrame]:
    """`runs`: (labels {run_id, dataset, arch, regime, seed}, test logits (K, N, C), test labels (N,)) per run;
    `dense_runs`: (labels, reliability, likelihood) per segmentation run (`pixel_calibration`).
    Returns the tidy calibration table (run_id, dataset, arch, regime, seed, exit, split, accuracy,
    mean_confidence, ece, ks, nll, brier, samples) and the reliability bins of every (run, exit)."""
    tables, bins = [], []
    computed = [(labels, exit_calibration(logits, y, n_bins)) for labels, logits, y in runs]
    computed += [(labels, pixel_calibration(reliability, likelihood)) for labels, reliability, likelihood in dense_runs]
    for labels, (table, reliability) in computed:
        tags = {key: labels[key] for key in LABELS}
        tables.append(table.assign(**tags)[[*LABELS, *table.columns]])
        bins.append(reliability.assign(**tags)[[*LABELS, *reliability.columns]])
    if not tables:
        return pd.DataFrame(), pd.DataFrame()
    return pd.concat(tables, ignore_index=True), pd.concat(bins, ignore_index=True)


def figure_regimes(regimes: Iterable[str], runs: pd.DataFrame | None, primary: str = "auc_normalised") -> list[str]:
    """joint, mixed and the joint+X objective with the best seed-mean `primary` in `runs` (the cell's rows of
    runs.csv), those that are present, in that order."""
    regimes = set(regimes)
    chosen = [r for r in ("joint", "mixed") if r in regimes]
    objectives = [r for r in regimes if split_regime(r)[0] == "joint" and r != "joint"]
    if objectives and runs is not None and not runs.empty and primary in runs:
        means = runs[runs.regime.isin(objectives)].groupby("regime")[primary].mean().dropna()
        if not means.empty:
            chosen.append(means.sort_values(ascending=False, kind="stable").index[0])
    return chosen


def shown_exits(exits: Iterable[int]) -> list[int]:
    """The first, a middle and the last exit (fewer when there are fewer exits)."""
    exits = sorted(set(int(e) for e in exits))
    return sorted({exits[0], exits[(len(exits) - 1) // 2], exits[-1]})


def plot_reliability(bins: pd.DataFrame, path, runs: pd.DataFrame | None = None, title: str = "") -> list[str]:
    """Reliability diagram of one (dataset, arch): a panel per shown exit (first, middle, last), for joint, mixed
    and the best joint+X objective (`figure_regimes`), seeds pooled: accuracy against mean confidence of each
    non-empty equal-width bin (marker area ∝ its share of the samples), the diagonal being perfect calibration.
    Returns the regimes drawn."""
    regimes = regime_order(figure_regimes(bins["regime"].unique(), runs))
    regimes = [r for r in ("joint", "mixed") if r in regimes] + [r for r in regimes if r not in ("joint", "mixed")]
    exits = shown_exits(bins["exit"])
    pooled = (bins[bins.regime.isin(regimes)].groupby(["regime", "exit", "bin"])
              [["count", "confidence_sum", "correct_sum"]].sum().reset_index())
    fig, axes = new_figure(ncols=len(exits), width=3.6, height=3.6, layout="constrained")
    last = max(exits)
    for ax, k in zip(axes.flat, exits):
        ax.plot([0, 1], [0, 1], color="grey", linewidth=1.0, linestyle=(0, (4, 3)), zorder=1)
        for regime in regimes:
            curve = pooled[(pooled.regime == regime) & (pooled.exit == k) & (pooled["count"] > 0)].sort_values("bin")
            style = regime_style(regime)
            confidence, accuracy = curve.confidence_sum / curve["count"], curve.correct_sum / curve["count"]
            ax.plot(confidence, accuracy, linewidth=1.2, zorder=2, alpha=0.8, **{**style, "marker": None})
            share = curve["count"] / curve["count"].sum()      # a bin of a few samples is a small, noisy point
            ax.scatter(confidence, accuracy, s=6 + 300 * share, marker=style["marker"], color=style["color"],
                       edgecolors="white", linewidths=0.5, zorder=3)
        ax.set_xlim(-0.02, 1.03)                             # room for the big markers at confidence 1
        ax.set_ylim(-0.02, 1.03)
        ax.set_aspect("equal")
        ax.set_xlabel("mean confidence in bin")
        ax.set_title(f"exit {k}" + (" (final)" if k == last else ""), fontsize="medium")
    axes.flat[0].set_ylabel("accuracy in bin")
    from matplotlib.lines import Line2D  # not at import: see analysis.style._plotting
    handles = [*regime_handles(regimes),
               Line2D([], [], color="grey", linewidth=1.0, linestyle=(0, (4, 3)), label="perfect calibration")]
    place_legend(fig, handles)
    if title:
        fig.suptitle(title)
    save(fig, path)
    return regimes


def plot_reliability_diagrams(bins: pd.DataFrame, figures: Path, runs: pd.DataFrame | None = None) -> list[Path]:
    """figures/reliability_<dataset>_<arch>.png for every cell in `bins`."""
    written = []
    for (dataset, arch), cell in bins.groupby(["dataset", "arch"], sort=True):
        cell_runs = None if runs is None else runs[(runs.dataset == dataset) & (runs.arch == arch)]
        path = Path(figures) / f"reliability_{dataset}_{arch}.png"
        plot_reliability(cell, path, cell_runs, title=f"Reliability — {dataset} / {arch}: test split, 15 equal-width "
                                                      f"bins, seeds pooled; marker area ∝ samples in the bin")
        written.append(path)
    return written
