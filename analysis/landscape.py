"""Loss-landscape slices along filter-normalised random directions, linear interpolation between two
solutions, and a sharpness number per exit — all per exit, all from one forward pass per point.

Method (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets", NeurIPS):
- A direction d has one Gaussian tensor per *parameter*. Each filter of a weight (the slice along dim 0: an
  output channel of a convolution, an output unit of a linear layer) is rescaled to the norm of the same
  filter of the weight, so that a step α·d is equally large *relative to each filter*: slices of different
  networks are comparable despite the scale invariance BatchNorm introduces. Every tensor with at most one
  dimension (biases, BatchNorm/LayerNorm affine parameters) gets a zero direction: Li et al.'s default
  ``ignore='biasbn'``. Buffers (BatchNorm running statistics) are not part of a direction.
- 1-D slice: L(θ + αd); 2-D slice: L(θ + αd₁ + βd₂) with two independent directions (nearly orthogonal in
  high dimension, as Li et al. note).
- Every point is measured with the model in eval mode, so BatchNorm normalises with the *trained* running
  statistics, never with the statistics of the perturbed network on this batch; the loss is the mean
  cross-entropy (nats) and the accuracy the fraction correct, per exit, on a fixed stratified subset of the
  non-augmented training split, drawn by the rule of every model analysis (benchmark.snapshots.analysis_subset,
  of size ``landscape_samples``; bench analyze passes it in): a landscape of the training objective.
- Perturbed weights are passed with ``torch.func.functional_call``: the model's own tensors are never
  written and nothing is copied per point. (``vmap`` over 4 grid points at once was slower on CPU than this
  loop, 1.2 s against 0.8 s per point: batching points adds no parallelism the batch of images lacks.)

Linear interpolation (Goodfellow et al. 2015, "Qualitatively characterizing neural network optimization
problems"; mode connectivity as in Frankle et al. 2020): θ(t) = θ_a + t(θ_b − θ_a) for parameters *and*
floating-point buffers — the BatchNorm running statistics are interpolated too rather than recomputed at
every t (the cheap, common choice; recomputing them lowers barriers between unaligned networks, Jordan et al.
2023 "REPAIR"). Outside [0, 1] an extrapolated running variance can turn negative; it is clamped at 0
(BatchNorm adds its own eps). Integer buffers (``num_batches_tracked``) are θ_a's; eval mode never reads them.

Sharpness (``sharpness``): ε-sharpness of Keskar et al. 2017 ("On Large-Batch Training for Deep Learning"),
max over a box of (L(θ + δ) − L(θ)) / (1 + L(θ)), restricted to the points of the filter-normalised slices
already evaluated with |α| ≤ radius, so it costs nothing extra and is scale-invariant like the slices. The
default radius 0.1 (a 10 % change of every filter) keeps it local: on trained cifar_resnet8 / mnist5k models the
slices are still near-symmetric (quadratic) at |α| = 0.1 and already strongly asymmetric at 0.2. More
directions (a ``direction`` column) sample more of the box; ``slice_1d(..., alphas=[-0.1, 0, 0.1])`` per extra
direction is the cheap way to add them.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from analysis.style import new_figure, regime_colour, regime_order, regime_style, save
from benchmark.data.dataset import IGNORE_INDEX
from benchmark.models.eval_mode import evaluating

# Defaults sized for the quick grid on a 2-core CPU. A point costs one forward of the subset (256 images by
# default: accuracy resolution 1/256, cost linear in it): with one torch thread, 0.13 CPU-s for cifar_resnet8 on
# 28x28 MNIST (the grid's dearest cell), 0.05 s for small_cnn, about 0.01 s on 8x8 digits; so per
# cifar_resnet8/mnist5k model: 1-D (21 points) 3 s, 2-D (121) 16 s, interpolation (13) 2 s. One thread per process
# beat two threads by 2-4x on a shared machine: the tensors are small.
DEFAULT_ALPHAS = np.linspace(-1.0, 1.0, 21)       # step 0.1, as in Li et al.'s 1-D plots
DEFAULT_GRID_2D = np.linspace(-1.0, 1.0, 11)      # step 0.2 on each axis: 121 points
DEFAULT_TS = np.linspace(-0.25, 1.25, 13)         # step 0.125: t = 0 and t = 1 are grid points
DEFAULT_RADIUS = 0.1                              # sharpness box: where trained slices are still ~symmetric
DEFAULT_BATCH_SIZE = 256                          # memory bound per forward, not a statistical choice

# Per-exit (mean loss, accuracy) of a model evaluated at the given named tensors.
Measure = Callable[[Mapping[str, Tensor]], Sequence[tuple[float, float]]]


def random_direction(model: nn.Module, generator: torch.Generator) -> dict[str, Tensor]:
    """A filter-normalised Gaussian direction over ``model``'s parameters (Li et al. 2018, ignore='biasbn')."""
    direction = {}
    for name, weight in model.named_parameters():
        if weight.dim() <= 1:
            direction[name] = torch.zeros_like(weight, requires_grad=False)
            continue
        d = torch.randn(weight.shape, generator=generator, device=generator.device).to(weight)
        direction[name] = d * _filter_norms(weight.detach()) / (_filter_norms(d) + 1e-10)
    return direction


def _filter_norms(t: Tensor) -> Tensor:
    """The L2 norm of every slice t[i] (a filter), shaped to broadcast against t."""
    return t.flatten(1).norm(dim=1).view(-1, *[1] * (t.dim() - 1))


def exit_metrics(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = DEFAULT_BATCH_SIZE) -> Measure:
    """The Measure of a multi-exit ``model`` on (x, y): mean cross-entropy (nats) and accuracy per exit.

    For label maps y (N, H, W) (segmentation) both are over the labelled pixels: the pixel-averaged cross-entropy the
    regimes train on (`regimes.losses.cross_entropy`) and pixel accuracy — the landscape of the segmentation loss.
    Tensors not given keep the model's own values (buffers, in a slice). The model is put in eval mode for
    the call and every module is given back the mode it was in (``evaluating``).
    """
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    dense = y.dim() > 1
    counted = int((y != IGNORE_INDEX).sum()) if dense else len(y)

    def measure(tensors: Mapping[str, Tensor]) -> list[tuple[float, float]]:
        loss_sum, correct = None, None
        with evaluating(model):
            for start in range(0, len(y), batch_size):
                xb, yb = x[start:start + batch_size], y[start:start + batch_size]
                logits = torch.stack(functional_call(model, dict(tensors), (xb,))).float()  # (K, B, C[, H, W])
                if dense:
                    batch_loss, batch_correct = _pixel_sums(logits, yb.long())
                else:
                    batch_loss = F.cross_entropy(logits.transpose(1, 2), yb.expand(len(logits), -1),
                                                 reduction="none").double().sum(1)
                    batch_correct = (logits.argmax(2) == yb).sum(1)
                loss_sum = batch_loss if loss_sum is None else loss_sum + batch_loss
                correct = batch_correct if correct is None else correct + batch_correct
        return [(float(l) / counted, float(c) / counted) for l, c in zip(loss_sum.cpu(), correct.cpu())]

    return measure


def _pixel_sums(logits: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per exit, the cross-entropy summed over the labelled pixels of per-pixel logits (K, B, C, H, W) against label
    maps (B, H, W), and the number of those pixels predicted right."""
    target = y.expand(len(logits), *y.shape).flatten(0, 1)
    per_pixel = F.cross_entropy(logits.flatten(0, 1), target, ignore_index=IGNORE_INDEX, reduction="none")
    right = (logits.argmax(2).flatten(0, 1) == target) & (target != IGNORE_INDEX)
    return per_pixel.double().reshape(len(logits), -1).sum(1), right.reshape(len(logits), -1).sum(1)


def sweep(measure: Measure, tensors_at: Callable[[Sequence[float]], Mapping[str, Tensor]],
          points: Sequence[Sequence[float]], names: Sequence[str]) -> pd.DataFrame:
    """Measure at every point of a grid: the loop shared by slices and interpolation, generic over the loss.

    ``tensors_at(point)`` gives the named tensors at a point of coordinates ``names``; the result has one row
    per (point, exit) with columns ``*names, exit, loss, accuracy``.
    """
    rows = []
    for point in points:
        for k, (loss, accuracy) in enumerate(measure(tensors_at(point))):
            rows.append({**dict(zip(names, map(float, point))), "exit": k, "loss": loss, "accuracy": accuracy})
    return pd.DataFrame(rows)


def displaced(centre: Mapping[str, Tensor], directions: Sequence[Mapping[str, Tensor]]):
    """``point -> centre + Σ_i point[i]·directions[i]`` (a direction lacking a tensor leaves it at the centre)."""
    def tensors_at(point: Sequence[float]) -> dict[str, Tensor]:
        moved = dict(centre)
        for coefficient, direction in zip(point, directions):
            for name, d in direction.items():
                moved[name] = moved[name] + float(coefficient) * d
        return moved
    return tensors_at


def _parameters(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.detach() for name, p in model.named_parameters()}


def slice_1d(model: nn.Module, x: Tensor, y: Tensor, direction: Mapping[str, Tensor],
             alphas: Sequence[float] = DEFAULT_ALPHAS, batch_size: int = DEFAULT_BATCH_SIZE) -> pd.DataFrame:
    """Per-exit loss and accuracy at θ + αd for every α: columns ``alpha, exit, loss, accuracy``."""
    return sweep(exit_metrics(model, x, y, batch_size), displaced(_parameters(model), [direction]),
                 [(a,) for a in alphas], ["alpha"])


def slice_2d(model: nn.Module, x: Tensor, y: Tensor, direction_1: Mapping[str, Tensor],
             direction_2: Mapping[str, Tensor], alphas: Sequence[float] = DEFAULT_GRID_2D,
             betas: Sequence[float] = DEFAULT_GRID_2D, batch_size: int = DEFAULT_BATCH_SIZE) -> pd.DataFrame:
    """Per-exit loss and accuracy at θ + αd₁ + βd₂ on the grid: columns ``alpha, beta, exit, loss, accuracy``."""
    return sweep(exit_metrics(model, x, y, batch_size), displaced(_parameters(model), [direction_1, direction_2]),
                 [(a, b) for a in alphas for b in betas], ["alpha", "beta"])


def interpolate(model: nn.Module, state_a: Mapping[str, Tensor], state_b: Mapping[str, Tensor], x: Tensor,
                y: Tensor, ts: Sequence[float] = DEFAULT_TS, batch_size: int = DEFAULT_BATCH_SIZE) -> pd.DataFrame:
    """Per-exit loss and accuracy along θ_a + t(θ_b − θ_a), parameters and BatchNorm statistics alike.

    ``state_a`` and ``state_b`` are state dicts of ``model``'s architecture (``model`` supplies only the code);
    columns ``t, exit, loss, accuracy``. See the module docstring for the buffer choices.
    """
    expected = set(model.state_dict())
    for label, state in (("state_a", state_a), ("state_b", state_b)):
        if set(state) != expected:
            raise ValueError(f"{label} does not match the model: missing {sorted(expected - set(state))}, "
                             f"unexpected {sorted(set(state) - expected)}")
    device = next(model.parameters()).device
    centre = {name: t.to(device) for name, t in state_a.items()}
    direction = {name: state_b[name].to(device) - t for name, t in centre.items() if t.is_floating_point()}
    variances = {f"{name}.running_var" if name else "running_var"
                 for name, m in model.named_modules()
                 if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats}
    along = displaced(centre, [direction])

    def tensors_at(point: Sequence[float]) -> dict[str, Tensor]:
        tensors = along(point)
        return {name: t.clamp(min=0) if name in variances else t for name, t in tensors.items()}

    return sweep(exit_metrics(model, x, y, batch_size), tensors_at, [(t,) for t in ts], ["t"])


def sharpness(slice_table: pd.DataFrame, radius: float = DEFAULT_RADIUS) -> pd.DataFrame:
    """Keskar et al.'s ε-sharpness per exit from 1-D slices: max_{0<|α|≤radius} (L(α) − L(0)) / (1 + L(0)).

    Rows are grouped by every column but ``alpha, loss, accuracy, direction``, so several directions of one
    run (told apart by a ``direction`` column) pool into one max over more points of the box, while extra keys
    such as ``run_id`` or ``regime`` are kept. Columns: the keys (``exit`` …), ``radius``, ``sharpness``.
    """
    keys = [c for c in slice_table.columns if c not in ("alpha", "loss", "accuracy", "direction")]
    rows = []
    for group, rows_of_group in slice_table.groupby(keys, sort=True, dropna=False):   # a NaN key is a key too
        at_centre = np.isclose(rows_of_group["alpha"], 0.0, atol=1e-9)
        inside = ~at_centre & (rows_of_group["alpha"].abs() <= radius + 1e-9)
        if not at_centre.any() or not inside.any():
            raise ValueError(f"sharpness needs α = 0 and at least one α with 0 < |α| ≤ {radius} in every slice "
                             f"(group {dict(zip(keys, group))})")
        centre_loss = rows_of_group.loc[at_centre, "loss"].mean()     # equal across directions: same θ
        worst = rows_of_group.loc[inside, "loss"].max()
        rows.append({**dict(zip(keys, group)), "radius": radius,
                     "sharpness": (worst - centre_loss) / (1.0 + centre_loss)})
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------- figures

_EXTRA_PAIR_STYLES = ({"linestyle": "-.", "marker": "x"}, {"linestyle": (0, (5, 1, 1, 1, 1, 1)), "marker": "+"})
"""Styles of the second, third ... interpolation pair ending in one regime: no schedule's line style, no objective's
marker."""


def _curve_panels(table: pd.DataFrame, x: str, x_label: str, line_key: str, styles: Mapping[str, dict],
                  path, title: str, marks: Sequence[float]) -> None:
    """Rows loss / accuracy, a column per exit; per line the mean over other rows (seeds, directions) and a
    min–max band."""
    exits = sorted(table["exit"].unique())
    fig, axes = new_figure(ncols=len(exits), nrows=2, width=3.6, height=3.0, sharex=True)
    for column, k in enumerate(exits):
        for line, style in styles.items():
            rows = table[(table["exit"] == k) & (table[line_key] == line)]
            for row, metric in enumerate(("loss", "accuracy")):
                stats = rows.groupby(x)[metric].agg(["mean", "min", "max"])
                ax = axes[row, column]
                ax.plot(stats.index, stats["mean"], label=line, markersize=3.5, linewidth=1.4,
                        **{"marker": ".", **style})
                ax.fill_between(stats.index, stats["min"], stats["max"], color=style["color"], alpha=0.15, lw=0)
        axes[0, column].set_title(f"exit {k}" + (" (final)" if k == exits[-1] else ""))
        _log_axis(axes[0, column].yaxis)
        axes[1, column].set_xlabel(x_label)
        for ax in axes[:, column]:
            for mark in marks:
                ax.axvline(mark, color="0.5", lw=0.8, ls=":")
    axes[0, 0].set_ylabel("training loss (cross-entropy, nats)")
    axes[1, 0].set_ylabel("training accuracy (fraction)")
    axes[0, -1].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1))
    fig.suptitle(title)
    save(fig, path)


def _log_axis(axis) -> None:
    """Log scale with plain-number labels at 1, 2, 5 × 10^k while the data span at most 5 decades (losses span
    decades away from the centre); beyond that, matplotlib's own decade ticks and 10^k labels (the 1-2-5 ticks
    would be thinned to none and leave the axis unlabelled)."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter  # see analysis.style._plotting

    axis.axes.set_yscale("log")
    low, high = axis.axes.dataLim.intervaly
    if low > 0 and np.isfinite(high) and np.log10(high / low) <= 5:
        axis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FormatStrFormatter("%g"))
    axis.set_minor_formatter(NullFormatter())


def plot_slices_1d(table: pd.DataFrame, path, title: str = "1-D loss slices (filter-normalised directions)") -> None:
    """1-D slices of several runs, a line per ``regime`` column value in its benchmark colour."""
    styles = {regime: regime_style(regime) for regime in regime_order(table["regime"])}
    _curve_panels(table, "alpha", "α (step along d, filter-normalised)", "regime", styles, path, title, marks=(0,))


def plot_interpolation(table: pd.DataFrame, path, title: str = "Linear interpolation θ_a → θ_b") -> None:
    """Interpolation curves, a line per ``pair`` column value, in the style of the ``regime`` of its θ_b (colour:
    objective and marker, line: schedule).

    Of several pairs ending in the same regime (e.g. "P1 backbone → mixed" and "joint → mixed") the first in
    sorted order keeps the regime's style; the others keep its colour and take a line style and marker no
    schedule uses (_EXTRA_PAIR_STYLES).
    """
    pair_regime = table.drop_duplicates("pair").set_index("pair")["regime"]
    styles = {}
    for regime in regime_order(pair_regime):
        for n, pair in enumerate(sorted(pair_regime.index[pair_regime == regime])):
            extra = {} if n == 0 else _EXTRA_PAIR_STYLES[(n - 1) % len(_EXTRA_PAIR_STYLES)]
            styles[pair] = {**regime_style(regime), **extra}
    _curve_panels(table, "t", "t (0 = θ_a, 1 = θ_b)", "pair", styles, path, title, marks=(0, 1))


def plot_contour_2d(table: pd.DataFrame, path, exit_index: int | None = None,
                    title: str = "2-D loss slice (filter-normalised directions)") -> None:
    """Filled log-spaced contours of one exit's loss (default: the final exit), a panel per ``regime``."""
    exit_index = int(table["exit"].max()) if exit_index is None else exit_index
    table = table[table["exit"] == exit_index]
    regimes = regime_order(table["regime"])
    if table.duplicated(["regime", "alpha", "beta"]).any():
        raise ValueError("plot_contour_2d draws one 2-D slice per regime; filter the table to one run each")
    levels = np.geomspace(table["loss"].min(), table["loss"].max(), 16)
    fig, axes = new_figure(ncols=len(regimes), width=4.0, height=3.6, sharey=True)
    for ax, regime in zip(axes[0], regimes):
        grid = table[table["regime"] == regime].pivot(index="beta", columns="alpha", values="loss")
        filled = ax.contourf(grid.columns, grid.index, grid.to_numpy(), levels=levels, cmap="viridis",
                             norm="log")
        ax.contour(grid.columns, grid.index, grid.to_numpy(), levels=levels, colors="white", linewidths=0.4)
        ax.plot(0, 0, marker="*", color="red", markersize=11, markeredgecolor="white")
        ax.set_title(regime, color=regime_colour(regime))
        ax.set_xlabel("α (along d₁)")
        ax.set_aspect("equal")
    axes[0, 0].set_ylabel("β (along d₂)")
    fig.colorbar(filled, ax=axes[0].tolist(), ticks=levels[::3], format="%.3g",
                 label=f"exit {exit_index} training loss (nats, log scale)")
    fig.suptitle(f"{title}\nred star: the trained weights θ (α = β = 0)")
    save(fig, path)
