"""Information flow: mutual information between each block's representation T and the input X and the label Y.

Why: the information plane (Shwartz-Ziv & Tishby 2017) asks whether training first fits (I(T;Y) grows) and then
compresses (I(X;T) shrinks), and a multi-exit network adds the question of how an exit head's loss reshapes the
blocks before it. Every number here is in bits and is an *estimate* whose value depends on its parameters, which
are therefore reported in every row; compare numbers only across rows with the same estimator and parameters.

Estimators
- ``"renyi"`` (primary): matrix-based Rényi alpha-order entropy (Sanchez Giraldo, Rao & Principe 2015), as used
  for DNN information planes by Yu et al. (2019) and Wickstrøm et al. (2019). For N samples, a Gaussian Gram
  matrix K is normalised to unit trace, A = K / tr(K), and S_alpha(A) = log2(sum_i lambda_i(A)^alpha) / (1 - alpha);
  joint entropies use the Hadamard product A o B / tr(A o B); I(X;T) = S(A) + S(B) - S(A, B).
  Kernel width: Silverman's rule sigma = gamma * N^(-1/(4+d)) with gamma = sqrt(trace Cov(T)), the root of the
  total variance (= sqrt(d) times the RMS per-feature std). Why sqrt(d): with gamma = the mean per-feature std, a
  d = 12 544-wide representation has typical squared distances ~ 2 d gamma^2, every off-diagonal kernel entry is
  ~exp(-d) = 0 and every block reads log2 N bits; Tapia & Estévez (2020) add the same sqrt(d) factor.
  ``sigma_scale`` multiplies the rule (their fixed gamma = 0.8 on unit-variance features is sigma_scale=0.8).
  Labels use the delta kernel K_ij = [y_i = y_j] (a Gaussian kernel on one-hot labels as sigma -> 0), so S_alpha(Y)
  is exactly the Rényi entropy of the sample's class frequencies.
- ``"binning"`` (Shwartz-Ziv & Tishby 2017; Saxe et al. 2018): every activation of a block is put in one of
  ``bins`` equal-width bins over the block's range [min, max] on the sample, each sample's binned vector is one
  discrete symbol, I(X;T) = H(T) (T is a deterministic function of X) and I(T;Y) = H(T) - H(T|Y). With wide
  representations every sample is its own symbol and the estimate saturates at I(X;T) = log2 N, I(T;Y) = H(Y);
  that is a property of the estimator, reported as such.

``exit_bound_table`` adds, per exit, the variational lower bound I(T;Y) >= H(Y) - CE, CE the exit head's
cross-entropy in bits (a decoder's cross-entropy upper-bounds H(Y|T)); it is negative for a poor head. The bound
is about Shannon information: matrix-based values are a different functional on their own scale (a trained
small_cnn on digits reads ~2.4 bits there against a bound of ~3.2), so compare each with itself, not the two.

Segmentation (label maps (N, H, W)): I(X;T) is measured as for classification, on the block's flattened maps.
I(T;Y) is not: both estimators need one label symbol per sample, and a label map is a structured object (the same
digits at other places are another symbol), so every image would be its own class and I(T;Y) would read H(T); the
columns are NaN. The exit bound carries over per pixel — Y a labelled pixel's class, CE the pixel-averaged
cross-entropy over the labelled pixels — and bounds what the exit's output at a pixel tells about its label.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from analysis.style import (BASELINE, new_figure, place_legend, regime_handles, regime_order, regime_style, save,
                            schedule_groups)
from benchmark.data.dataset import IGNORE_INDEX
from benchmark.data.stratify import stratified_sample
from benchmark.models.eval_mode import evaluating
from benchmark.models.multi_exit import Hidden, coarsest_scale

DEFAULT_N_SAMPLES = 500   # cifar_resnet8 on 28 px MNIST: ~1.8 s per model on 1 thread, the float64 Gram matmuls most
DEFAULT_ALPHA = 1.01      # close to Shannon (alpha -> 1) while keeping the closed form (Yu et al. 2019)
DEFAULT_BINS = 30         # Shwartz-Ziv & Tishby (2017)
ESTIMATORS = ("renyi", "binning")


# --------------------------------------------------------------------------------------------- sampling

def stratified_indices(y: Tensor | np.ndarray, n_samples: int | None, seed: int = 0) -> np.ndarray:
    """Sorted indices of a fixed, class-stratified subset of size ``n_samples`` (all indices if None or too big).

    The same (y, n_samples, seed) gives the same subset on every call, so every model is measured on the same
    samples. Label maps (N, H, W) have no class per sample to stratify by: their subset is a seeded uniform draw.
    """
    labels = np.asarray(torch.as_tensor(y).cpu())
    if n_samples is None or n_samples >= len(labels):
        return np.arange(len(labels))
    if labels.ndim > 1:
        return np.sort(np.random.default_rng(seed).choice(len(labels), size=n_samples, replace=False))
    return stratified_sample(labels, len(labels) - n_samples, seed)[0]


# ------------------------------------------------------------------------ matrix-based Rényi entropy

def silverman_sigma(t: Tensor, scale: float = 1.0) -> float:
    """Kernel width sigma = scale * sqrt(trace Cov(t)) * N^(-1/(4+d)) for samples ``t`` of shape (N, d)."""
    n, d = t.shape
    gamma = t.double().var(dim=0).sum().sqrt().item()
    if gamma == 0.0:
        return 1.0  # every sample is the same point: any width gives the all-ones Gram matrix
    return scale * gamma * n ** (-1.0 / (4 + d))


def gaussian_gram(t: Tensor, sigma: float) -> Tensor:
    """K_ij = exp(-|t_i - t_j|^2 / (2 sigma^2)) in float64 for samples ``t`` of shape (N, d)."""
    t = t.double()
    t = t - t.mean(dim=0)                        # centring makes coincident points exactly 0 apart below
    norms = (t * t).sum(dim=1)
    squared_distances = (norms[:, None] + norms[None, :] - 2.0 * t @ t.T).clamp_(min=0.0)
    squared_distances.fill_diagonal_(0.0)
    return torch.exp(-squared_distances / (2.0 * sigma ** 2))


def label_gram(y: Tensor) -> Tensor:
    """The delta kernel on class labels: K_ij = 1 if y_i = y_j else 0, float64."""
    return (y[:, None] == y[None, :]).double()


def _eigvalsh(matrix: Tensor) -> Tensor:
    """Eigenvalues of a symmetric matrix; on CPU with one thread. Why: at N = 500 a threaded LAPACK gains nothing,
    and with more busy threads than cores (parallel workers, other jobs) its spin-waits stalled one call from
    0.04 s to 13 s in our measurements."""
    if matrix.device.type != "cpu":
        return torch.linalg.eigvalsh(matrix)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigvalsh(matrix)
    finally:
        torch.set_num_threads(threads)


def renyi_entropy(*grams: Tensor, alpha: float = DEFAULT_ALPHA) -> float:
    """S_alpha in bits of the Hadamard product of one or more Gram matrices, normalised to unit trace.

    One matrix gives a marginal entropy, several give their joint entropy (Yu et al. 2019, eq. 3). ``alpha = 1``
    is the Shannon (von Neumann) limit.
    """
    product = grams[0]
    for gram in grams[1:]:
        product = product * gram
    eigenvalues = _eigvalsh(product / product.trace()).clamp(min=0.0)
    if alpha == 1.0:
        positive = eigenvalues[eigenvalues > 0]
        return -(positive * positive.log2()).sum().item()
    return (torch.log2((eigenvalues ** alpha).sum()) / (1.0 - alpha)).item()


def renyi_mutual_information(gram_a: Tensor, gram_b: Tensor, alpha: float = DEFAULT_ALPHA) -> float:
    """I_alpha(A;B) = S(A) + S(B) - S(A, B) in bits (Sanchez Giraldo et al. 2015)."""
    return (renyi_entropy(gram_a, alpha=alpha) + renyi_entropy(gram_b, alpha=alpha)
            - renyi_entropy(gram_a, gram_b, alpha=alpha))


# ----------------------------------------------------------------------------------------- binning

def binned_symbols(t: Tensor, bins: int = DEFAULT_BINS) -> np.ndarray:
    """One integer symbol per sample: its activations put into ``bins`` equal-width bins over t's range."""
    values = t.double().cpu().numpy()
    low, high = values.min(), values.max()
    width = (high - low) / bins if high > low else 1.0
    codes = np.minimum(((values - low) / width).astype(np.int64), bins - 1).astype(np.min_scalar_type(bins))
    _, symbols = np.unique(codes, axis=0, return_inverse=True)
    return symbols.reshape(-1)


def discrete_entropy(*variables: np.ndarray) -> float:
    """Plug-in Shannon entropy in bits of one discrete variable, or the joint entropy of several (same length)."""
    joint = np.stack([np.asarray(v).reshape(-1) for v in variables], axis=1)
    _, counts = np.unique(joint, axis=0, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def discrete_mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """Plug-in I(A;B) = H(A) + H(B) - H(A,B) in bits."""
    return discrete_entropy(a) + discrete_entropy(b) - discrete_entropy(a, b)


# -------------------------------------------------------------------------------- exit lower bound

def exit_information_lower_bound(logits: Tensor, y: Tensor) -> dict[str, float]:
    """H(Y), the head's cross-entropy and the bound I(T;Y) >= H(Y) - CE, all in bits, on the given samples (on
    their labelled pixels for per-pixel logits (N, C, H, W) and label maps (N, H, W))."""
    y = torch.as_tensor(y).cpu()
    logits = torch.as_tensor(logits)
    if y.dim() > 1:
        counted = y != IGNORE_INDEX
        logits, y = logits.movedim(1, -1)[counted.to(logits.device)], y[counted].long()
    cross_entropy = F.cross_entropy(logits.double().cpu(), y).item() / math.log(2)
    label_entropy = discrete_entropy(y.numpy())
    return {"H_Y_bits": label_entropy, "CE_bits": cross_entropy,
            "I_TY_lower_bound_bits": label_entropy - cross_entropy}


# ------------------------------------------------------------------------------------- model level

def _forward_collect(model: nn.Module, x: Tensor, batch_size: int) -> tuple[list[Tensor], list[Tensor]]:
    """Every block's flattened output and every exit's logits, in eval mode (``evaluating``: every module's mode
    is restored, so a snapshot inside phase P3 leaves the frozen backbone in eval).

    Where a block outputs a list of multi-scale maps (MSDNet), its representation T is the coarsest scale: the one
    its exit reads (the finer scales only feed later layers), so T -> exit is the chain the exit bound is about,
    and the one scale every block keeps. Concatenated scales would put the finest one, with 16x the pixels of the
    coarsest, in charge of the Gaussian kernel's distances.
    """
    device = next(model.parameters()).device
    blocks, exits = [], []
    with evaluating(model):
        for chunk in x.split(batch_size):
            outputs = []

            def keep(block: int, hidden: Hidden) -> None:
                outputs.append(coarsest_scale(hidden).flatten(1).clone())  # a copy: a later block may work in place

            exits.append(model(chunk.to(device), observe=keep))
            blocks.append(outputs)
    return [torch.cat(per_block) for per_block in zip(*blocks)], [torch.cat(per_exit) for per_exit in zip(*exits)]


def information_table(model: nn.Module, x: Tensor, y: Tensor, *, estimator: str = "renyi",
                      n_samples: int | None = DEFAULT_N_SAMPLES, seed: int = 0, alpha: float = DEFAULT_ALPHA,
                      sigma_scale: float = 1.0, bins: int = DEFAULT_BINS, batch_size: int = 256) -> pd.DataFrame:
    """One row per block: I(X;T) and I(T;Y) in bits, with the estimator's parameters.

    Measured on ``stratified_indices(y, n_samples, seed)``; ``alpha`` and ``sigma_scale`` apply to "renyi",
    ``bins`` to "binning". Columns: block, estimator, I_XT_bits, I_TY_bits, H_T_bits, H_Y_bits, n_samples,
    features, and alpha, sigma_T, sigma_X or bins.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, not {estimator!r}")
    index = torch.as_tensor(stratified_indices(y, n_samples, seed))
    x, y = x[index], torch.as_tensor(y)[index]
    representations, _ = _forward_collect(model, x, batch_size)
    per_sample_labels = y.dim() == 1          # label maps: no I(T;Y) (module docstring)
    rows = []
    if estimator == "renyi":
        inputs = x.flatten(1).to(representations[0].device)
        sigma_x = silverman_sigma(inputs, sigma_scale)
        gram_x = gaussian_gram(inputs, sigma_x)
        gram_y = label_gram(y.to(inputs.device)) if per_sample_labels else None
        entropy_x = renyi_entropy(gram_x, alpha=alpha)
        entropy_y = renyi_entropy(gram_y, alpha=alpha) if per_sample_labels else math.nan
        for block, t in enumerate(representations):
            sigma_t = silverman_sigma(t, sigma_scale)
            gram_t = gaussian_gram(t, sigma_t)
            entropy_t = renyi_entropy(gram_t, alpha=alpha)
            rows.append({
                "block": block, "estimator": estimator,
                "I_XT_bits": entropy_x + entropy_t - renyi_entropy(gram_x, gram_t, alpha=alpha),
                "I_TY_bits": (entropy_t + entropy_y - renyi_entropy(gram_t, gram_y, alpha=alpha)
                              if per_sample_labels else math.nan),
                "H_T_bits": entropy_t, "H_Y_bits": entropy_y, "n_samples": len(y), "features": t.shape[1],
                "alpha": alpha, "sigma_T": sigma_t, "sigma_X": sigma_x,
            })
    else:
        labels = y.cpu().numpy()
        for block, t in enumerate(representations):
            symbols = binned_symbols(t, bins)
            entropy_t = discrete_entropy(symbols)
            rows.append({
                "block": block, "estimator": estimator, "I_XT_bits": entropy_t,
                "I_TY_bits": discrete_mutual_information(symbols, labels) if per_sample_labels else math.nan,
                "H_T_bits": entropy_t, "H_Y_bits": discrete_entropy(labels) if per_sample_labels else math.nan,
                "n_samples": len(y), "features": t.shape[1], "bins": bins,
            })
    return pd.DataFrame(rows)


def exit_bound_table(model: nn.Module, x: Tensor, y: Tensor, *, n_samples: int | None = DEFAULT_N_SAMPLES,
                     seed: int = 0, batch_size: int = 256) -> pd.DataFrame:
    """One row per exit: H(Y), the exit's cross-entropy and I(T;Y) >= H(Y) - CE in bits, on the same subset as
    ``information_table`` for the same (n_samples, seed). ``block`` is the block the exit reads."""
    index = torch.as_tensor(stratified_indices(y, n_samples, seed))
    y = torch.as_tensor(y)[index]
    _, logits = _forward_collect(model, x[index], batch_size)
    exit_blocks = [*model.exit_blocks, len(model.blocks) - 1]
    return pd.DataFrame([
        {"exit": k, "block": exit_blocks[k], **exit_information_lower_bound(exit_logits, y), "n_samples": len(y)}
        for k, exit_logits in enumerate(logits)
    ])


# ------------------------------------------------------------------------------------------ figure

DEFAULT_PLANE_BLOCKS = 4
"""Blocks drawn per cell by default: the first, the last and evenly spaced ones between (every block of 15
regimes in one panel is unreadable)."""


def plane_blocks(n_blocks: int, count: int = DEFAULT_PLANE_BLOCKS) -> list[int]:
    """``count`` blocks evenly spaced over 0 .. n_blocks - 1, first and last included."""
    return sorted({int(round(b)) for b in np.linspace(0, n_blocks - 1, max(1, min(count, n_blocks)))})


def label_entropy_text(table: pd.DataFrame) -> str:
    """"H(Y) = 3.32 bits" from the rows' H_Y_bits (one cell's label entropy on its analysis subset), or the range
    if the rows disagree; "" without the column."""
    if "H_Y_bits" not in table or table["H_Y_bits"].isna().all():
        return ""
    low, high = table["H_Y_bits"].min(), table["H_Y_bits"].max()
    return f"H(Y) = {low:.2f} bits" if round(low, 2) == round(high, 2) else f"H(Y) = {low:.2f}-{high:.2f} bits"


def _label_blocks(ax, means: pd.DataFrame) -> None:
    """"block k" under each block's first-snapshot point (the mean over regimes), one label for blocks whose points
    nearly coincide (closer than 4 % of the panel's data range in I(X;T) and 6 % in I(T;Y), where two labels
    would overlap)."""
    first = means[means["epoch"] == means["epoch"].min()].groupby("block")[["I_XT_bits", "I_TY_bits"]].mean()
    near = (means[["I_XT_bits", "I_TY_bits"]].max() - means[["I_XT_bits", "I_TY_bits"]].min()).replace(0, 1) \
        * np.array([0.04, 0.06])
    clusters: list[list[int]] = []
    for block, point in first.iterrows():
        for cluster in clusters:
            if ((first.loc[cluster[0]] - point).abs() <= near).all():
                cluster.append(block)
                break
        else:
            clusters.append([block])
    for cluster in clusters:
        x, y = first.loc[cluster].mean()
        label = f"block {cluster[0]}" if len(cluster) == 1 else "blocks " + ", ".join(map(str, cluster))
        ax.annotate(label, (x, y), xytext=(0, -9), textcoords="offset points", ha="center", va="top",
                    fontsize="small", color="0.25")


def plot_information_plane(table: pd.DataFrame, path, blocks: int | list[int] = DEFAULT_PLANE_BLOCKS) -> None:
    """The information plane: I(X;T) on x, I(T;Y) on y, one trajectory over ``epoch`` per (regime, block).

    One row of panels per (dataset, arch) cell (if the table has those columns), one column per group of
    schedules (analysis.style.schedule_groups: joint's objectives; disjoint and mixed), joint drawn in every
    column as the reference. A trajectory is the seed mean at every snapshot epoch, in the regime's colour and
    line style, from a hollow grey circle (the first snapshot) to the regime's marker (the last). ``blocks``: how
    many blocks per cell, evenly spaced with the first and last (plane_blocks), or a list of block indices; each
    is labelled at its first snapshot. Each row's title gives that cell's H(Y), the label entropy of its analysis
    subset (the ceiling of I(T;Y)). Needs columns regime, block, epoch, I_XT_bits, I_TY_bits, and a single
    estimator.
    """
    if "estimator" in table and table["estimator"].nunique() > 1:
        raise ValueError("one estimator per information plane: filter the table on its 'estimator' column first")
    from matplotlib.lines import Line2D  # not at import: see analysis.style._plotting

    cell_columns = [c for c in ("dataset", "arch") if c in table]
    cells = list(table.groupby(cell_columns, sort=True)) if cell_columns else [((), table)]
    regimes = regime_order(table["regime"].unique())
    groups = schedule_groups(regimes)
    fig, axes = new_figure(ncols=len(groups), nrows=len(cells), width=5.2, height=3.9, layout="constrained",
                           sharex="row", sharey="row")
    for row, (cell, in_cell) in enumerate(cells):
        chosen = (plane_blocks(int(in_cell["block"].max()) + 1, blocks) if isinstance(blocks, int)
                  else [b for b in blocks if b in set(in_cell["block"])])
        means = (in_cell[in_cell["block"].isin(chosen)]
                 .groupby(["regime", "block", "epoch"], as_index=False)[["I_XT_bits", "I_TY_bits"]].mean())
        epochs = np.sort(in_cell["epoch"].unique())
        n = f", N = {int(in_cell['n_samples'].max())}" if "n_samples" in in_cell else ""
        where = " / ".join(map(str, cell)) + ": " if cell else ""
        for col, (group_title, members) in enumerate(groups):
            ax = axes[row, col]
            drawn = ([BASELINE] if BASELINE in regimes and BASELINE not in members else []) + members
            for regime in drawn:
                style = regime_style(regime)
                for _, trajectory in means[means["regime"] == regime].groupby("block"):
                    points = trajectory.sort_values("epoch")[["I_XT_bits", "I_TY_bits"]].to_numpy()
                    ax.plot(points[:, 0], points[:, 1], color=style["color"], linestyle=style["linestyle"],
                            linewidth=1.3, zorder=2)
                    ax.plot(*points[0], marker="o", markersize=4, markerfacecolor="white", markeredgecolor="0.3",
                            zorder=3)   # the first snapshot: shared by regimes that start from the same weights
                    ax.plot(*points[-1], marker=style["marker"], markersize=6, color=style["color"],
                            markeredgecolor="black", markeredgewidth=0.5, zorder=4)
            _label_blocks(ax, means)
            ax.margins(x=0.08, y=0.12)
            ax.set_title(f"{where}{group_title}", fontsize="medium")
            ax.set_xlabel("I(X;T) [bits]")
            if col == 0:
                entropy = label_entropy_text(in_cell)
                ax.set_ylabel("I(T;Y) [bits]" + (f"\n{entropy}{n}" if entropy else ""))
        axes[row, 0].annotate(f"epochs {epochs[0]:g}-{epochs[-1]:g}", (0.02, 0.98), xycoords="axes fraction",
                              ha="left", va="top", fontsize="small", color="0.25")
    handles = regime_handles(regimes)
    handles += [Line2D([], [], linestyle="none", marker="o", markersize=5, markerfacecolor="white",
                       markeredgecolor="0.3", label="first snapshot"),
                Line2D([], [], linestyle="none", marker="o", markersize=6, color="0.5", markeredgecolor="black",
                       markeredgewidth=0.5, label="last snapshot\n(objective's marker)")]
    place_legend(fig, handles, title="regime (mean over seeds)")
    estimator = f", {table['estimator'].iloc[0]} estimator" if "estimator" in table else ""
    fig.suptitle(f"Information plane per block{estimator}: trajectories over training epochs\n"
                 f"H(Y) per cell = label entropy of its analysis subset (the ceiling of I(T;Y))")
    save(fig, path)
