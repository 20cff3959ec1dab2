"""Numerical rank of the activations after every block: how many directions a representation really uses.

Why: a block whose N x D activation matrix (N samples, D = flattened features) has a low rank passes on fewer
independent directions than its width suggests; comparing the rank profile over blocks shows whether an exit
head's loss makes early blocks spread their features (higher rank) or collapse them (lower rank, cf. neural
collapse near the classifier). Three numbers per block, from the singular values sigma_1 >= ... >= sigma_n of the
matrix (n = min(N, D)), all in float64:

- ``rank_numpy_tol``: #{sigma_i > sigma_max * max(N, D) * eps}, numpy.linalg.matrix_rank's default tolerance
  (Press et al., Numerical Recipes): the rank up to floating-point noise. Equals matrix_rank exactly.
- ``rank_rel_1e-3``: #{sigma_i > 1e-3 * sigma_max}: directions with at least 0.1 % of the largest's scale.
- ``effective_rank``: exp(H(p)), p_i = sigma_i / sum_j sigma_j (Roy & Vetterli 2007, "The effective rank: a
  measure of effective dimensionality"). n for a flat spectrum of n equal values, 1 for a rank-1 matrix; it
  weighs directions by their size instead of counting those above a cut-off. 0 for an all-zero matrix.

How the singular values are computed (``spectrum_from`` in every row): an SVD of the N x D matrix costs
O(N D min(N, D)) in memory-bound LAPACK code: 1.2 s of CPU per cifar_resnet8 on 28 px at N = 500 (three blocks,
D = 12 544, 6 272, 3 136, one thread). The eigenvalues of the min(N, D)-square Gram matrix (A A^T or A^T A)
cost one matrix product and a small eigendecomposition: 0.15 s. But the Gram matrix squares the condition
number: it knows each sigma_i^2 only up to an absolute error delta = max(N, D) * eps * trace(Gram) (a bound on
the rounding error of the product, Higham, Accuracy and Stability of Numerical Algorithms, section 3.5, with a
factor 2 to spare for the eigensolver; Weyl's inequality turns it into a bound per eigenvalue), so singular
values below ~sqrt(delta) are noise. Rule: take the Gram eigenvalues, and fall back to the full SVD whenever the
smallest eigenvalue is below ``GRAM_RESOLUTION`` * delta (above it, every sigma is known to 0.05 % and lies far
above numpy's cut-off) or some eigenvalue lies within 2 * delta of the 1e-3 cut-off. Both ranks are therefore
exact on either route, and the effective rank agrees with the SVD's to ~1e-12 relative on real activations
(tests). Full-rank activations (N < D, typical of these nets at N = 500) take the Gram route; rank-deficient
ones (dead units, collapse) take the SVD.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from analysis.style import (BASELINE, new_figure, regime_colour, regime_order, regime_style, save, schedule_groups,
                            split_regime)
from benchmark.models.eval_mode import evaluating
from benchmark.models.multi_exit import Hidden, coarsest_scale

DEFAULT_N_SAMPLES = 500   # ~0.4 s of CPU per cifar_resnet8 on 28 px (forward 0.25 s, spectra 0.15 s); the rank
                          # can reach 500 at most, the information analysis uses the same N
RELATIVE_TOLERANCE = 1e-3
GRAM_RESOLUTION = 1e3     # Gram route only if every eigenvalue exceeds 1e3 x its error bound


# ------------------------------------------------------------------------------------------ activations

def block_activations(model: nn.Module, x: Tensor, batch_size: int = 256) -> list[Tensor]:
    """Every block's output for ``x``, flattened to (N, D) float32 on the CPU, in eval mode (``evaluating``: every
    module's mode restored).

    Read through MultiExitNet.forward's ``observe`` hook, so the model runs exactly as in training and evaluation
    (heads included; they do not change what a block outputs). Where a block outputs a list of multi-scale maps
    (MSDNet), its activation is the coarsest scale: the only one its exit reads, the one scale every block keeps
    (so the rank profile compares like with like across blocks), and concatenating the scales instead would let
    the finest one, with 16x the pixels of the coarsest, dominate the spectrum.
    """
    device = next(model.parameters()).device
    per_batch = []
    with evaluating(model):
        for chunk in x.split(batch_size):
            outputs = []

            def keep(block: int, hidden: Hidden) -> None:
                # a copy: a later block may work in place
                outputs.append(coarsest_scale(hidden).flatten(1).float().cpu().clone())

            model(chunk.to(device), observe=keep)
            per_batch.append(outputs)
    return [torch.cat(per_block) for per_block in zip(*per_batch)]


# ------------------------------------------------------------------------------------------ spectrum

def _effective_rank(singular_values: np.ndarray) -> float:
    total = singular_values.sum()
    if total == 0:
        return 0.0
    p = singular_values[singular_values > 0] / total
    return float(np.exp(-np.sum(p * np.log(p))))


def singular_values(matrix) -> tuple[np.ndarray, str]:
    """Singular values of an (N, D) matrix in float64, descending, and the route taken ("gram" or "svd").

    See the module docstring for when the Gram eigenvalues are trusted and why the rank decisions stay exact.
    """
    a = np.asarray(matrix, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"expected an (N, D) matrix, got shape {a.shape}")
    n_rows, n_cols = a.shape
    if min(n_rows, n_cols) == 0:
        return np.zeros(0), "svd"
    gram = a @ a.T if n_rows <= n_cols else a.T @ a
    eigenvalues = np.linalg.eigvalsh(gram)[::-1]
    error = max(n_rows, n_cols) * np.finfo(np.float64).eps * np.trace(gram)   # bound on |computed - true|
    # Above GRAM_RESOLUTION * error (>= 1e3 * max(N, D) * eps * lambda_max) every eigenvalue is also far above
    # numpy's cut-off (max(N, D) * eps)^2 * lambda_max, so only the relative cut-off needs its own check.
    relative_cutoff = RELATIVE_TOLERANCE ** 2 * eigenvalues[0]
    if (eigenvalues[-1] > GRAM_RESOLUTION * error > 0
            and not np.any(np.abs(eigenvalues - relative_cutoff) <= 2 * error)):
        return np.sqrt(eigenvalues), "gram"
    return np.linalg.svd(a, compute_uv=False), "svd"


def numerical_rank(matrix) -> dict:
    """Ranks and effective rank of an (N, D) matrix (rows = samples, columns = features); see the module docstring.

    Keys: n_samples, features, rank_numpy_tol, rank_rel_1e-3, effective_rank, sigma_max, spectrum_from.
    """
    sigma, route = singular_values(matrix)
    n_rows, n_cols = np.shape(matrix)
    sigma_max = float(sigma.max()) if len(sigma) else 0.0
    numpy_tolerance = sigma_max * max(n_rows, n_cols) * np.finfo(np.float64).eps
    return {
        "n_samples": n_rows, "features": n_cols,
        "rank_numpy_tol": int(np.count_nonzero(sigma > numpy_tolerance)),
        "rank_rel_1e-3": int(np.count_nonzero(sigma > RELATIVE_TOLERANCE * sigma_max)),
        "effective_rank": _effective_rank(sigma),
        "sigma_max": sigma_max,
        "spectrum_from": route,
    }


def rank_table(model: nn.Module, x: Tensor, *, n_samples: int | None = DEFAULT_N_SAMPLES, batch_size: int = 256,
               **labels) -> pd.DataFrame:
    """One row per block of ``model``: the numerical_rank of its activations on the first ``n_samples`` of ``x``.

    Pass a held-out split: the first rows of a shuffled split are a fair sample (the embedded datasets' splits
    are stratified shuffles); for another subset pass x[indices] and n_samples=None, e.g. the indices of
    analysis.information.stratified_indices to measure both analyses on the same samples. The rank can never exceed n_samples: early blocks with D > N read "rank N", so compare their
    effective ranks. ``labels`` (run_id=..., regime=..., dataset=..., arch=..., seed=...) are added as constant
    columns. Columns: labels, block, n_samples, features, rank_numpy_tol, rank_rel_1e-3, effective_rank,
    sigma_max, spectrum_from.
    """
    if n_samples is not None:
        x = x[:n_samples]
    rows = [{**labels, "block": block, **numerical_rank(activations.numpy())}
            for block, activations in enumerate(block_activations(model, x, batch_size))]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------ figure

RANK_LABELS = {
    "effective_rank": "effective rank (Roy & Vetterli 2007)",
    "rank_rel_1e-3": "rank (σ > 1e-3·σ_max)",
    "rank_numpy_tol": "numerical rank (numpy tolerance)",
}


def plot_rank_profiles(table: pd.DataFrame, path, metric: str = "effective_rank") -> None:
    """``metric`` against block, one column per (dataset, arch).

    With a "joint" baseline in the table: the top row shows the absolute profiles of the plain schedules (joint,
    disjoint, mixed: mean over seeds, band = min-max over seeds) under the grey dotted ceiling min(N, D); the rows
    below show every regime *relative to joint*: its seed mean / joint's seed mean, per block, split by schedule
    (analysis.style.schedule_groups) so that no panel holds more than the objectives of about one schedule, 15
    regimes stay distinguishable, and differences of a few percent are visible on blocks whose ranks differ
    tenfold. Without a baseline: one row, every regime absolute. Legends sit outside the panels, one per row.
    """
    if metric not in RANK_LABELS:
        raise ValueError(f"metric must be one of {list(RANK_LABELS)}, not {metric!r}")
    cells = list(table.groupby(["dataset", "arch"], sort=True))
    regimes = regime_order(table["regime"])
    relative = BASELINE in regimes and len(regimes) > 1
    groups = schedule_groups([r for r in regimes if r != BASELINE]) if relative else []
    absolute = [r for r in regimes if split_regime(r)[1] == "uniform"] if relative else regimes
    fig, axes = new_figure(ncols=len(cells), nrows=1 + len(groups), width=4.6, height=3.2, layout="constrained",
                           sharex="col")
    for column, ((dataset, arch), cell) in enumerate(cells):
        ax = axes[0, column]
        for regime in [r for r in absolute if r in set(cell["regime"])]:
            by_block = cell[cell["regime"] == regime].groupby("block")[metric].agg(["mean", "min", "max"])
            style = regime_style(regime)
            ax.plot(by_block.index, by_block["mean"], label=regime, linewidth=1.6, markersize=4, **style)
            ax.fill_between(by_block.index, by_block["min"], by_block["max"], color=style["color"], alpha=0.15,
                            linewidth=0)
        ceiling = cell.assign(cap=np.minimum(cell["n_samples"], cell["features"])).groupby("block")["cap"].max()
        ax.plot(ceiling.index, ceiling.values, color="grey", linestyle=":", label="min(N, D)")
        ax.set_ylim(bottom=0)
        ax.set_title(f"{dataset} / {arch}  (N = {int(cell['n_samples'].max())})")
        for row, (group_title, members) in enumerate(groups, start=1):
            ax = axes[row, column]
            ax.axhline(1.0, color=regime_colour(BASELINE), linewidth=1.2, label=f"{BASELINE} (= 1)")
            means = cell.groupby(["regime", "block"])[metric].mean()
            for regime in [r for r in members if r in set(cell["regime"]) and BASELINE in set(cell["regime"])]:
                ratio = means.loc[regime] / means.loc[BASELINE]
                ax.plot(ratio.index, ratio.values, label=regime, linewidth=1.6, markersize=4,
                        **regime_style(regime))
            ax.set_title(f"{dataset} / {arch}: {group_title}", fontsize="medium")
        axes[-1, column].set_xticks(sorted(cell["block"].unique()))
        axes[-1, column].set_xlabel("block (output of)")
    axes[0, 0].set_ylabel(RANK_LABELS[metric].replace(" (", "\n("))
    for row in range(1, 1 + len(groups)):
        axes[row, 0].set_ylabel(f"ratio to {BASELINE}'s (seed means)")
    for row in range(axes.shape[0]):                       # one legend per row, outside its last panel
        handles, labels = _unique_handles(axes[row])
        title = "regime (band: seed range)" if row == 0 else groups[row - 1][0]
        axes[row, -1].legend(handles, labels, title=title, fontsize="small", title_fontsize="small",
                             loc="upper left", bbox_to_anchor=(1.02, 1))
    what = ("top: absolute, mean over seeds; below: relative to joint per block (ratio of the "
            "seed means)" if groups else "mean over seeds")
    fig.suptitle(f"{RANK_LABELS[metric]} of block activations\n{what}")
    save(fig, path)


def _unique_handles(axes_row) -> tuple[list, list]:
    """The legend entries of every panel of a row, each label once, in order of first appearance."""
    seen = {}
    for ax in axes_row:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    return list(seen.values()), list(seen)
