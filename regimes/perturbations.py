"""Batched input perturbations for consistency training (`cet`): x̃ = a randomly perturbed copy of a batch x.

Images (N, C, H, W): random crop (shift with edge padding), horizontal flip, Gaussian noise, cutout.
Series (N, C, T): jitter, scaling, time-warp, permutation — the sensor augmentations of Um et al., "Data
Augmentation of Wearable Sensor Data for Parkinson's Disease Monitoring using CNNs", ICMI 2017, which Saeed et
al.'s sensor self-supervision work also uses.

Every function acts on the whole batch at once (one gather or one mask; no per-sample Python) and draws its
random numbers on the CPU from the caller's ``torch.Generator`` before moving them to ``x.device``, so a CPU and
a GPU run perturb the same batch identically. A strength of 0 returns ``x`` itself and draws nothing. Inputs
are assumed normalised per channel (mean 0, std 1), so noise strengths are in units of the channel's std and
the fill value 0 is the channel's training mean.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from benchmark.data.dataset import IGNORE_INDEX
from regimes.base import HParam

# kind -> strength name -> declaration. The only place these live: `cet` declares them as its hyperparameters, and
# `perturb` fills in the defaults of the ones a caller leaves out. Applied in this order.
STRENGTHS: dict[str, dict[str, HParam]] = {
    "image": {
        "crop": HParam(0.125, "max shift of the random crop, as a fraction of the side (4 px on 32 px, 1 px on 8 px); "
                              "borders are padded by repeating the edge", low=0, high=1),
        "flip": HParam(0.0, "probability of a horizontal flip (0: a mirrored digit is another glyph; 0.5 for CIFAR)",
                       low=0, high=1),
        "cutout": HParam(0.25, "side of the zeroed square, as a fraction of the image side (DeVries & Taylor 2017)",
                         low=0, high=1),
        "noise": HParam(0.1, "std of additive Gaussian noise, in units of the normalised input", low=0),
    },
    "series": {
        "time_warp": HParam(0.2, "std of the random speed of time at 6 knots (Um et al.: 0.2); endpoints stay fixed",
                            low=0),
        "permutation": HParam(4, "number of segments cut at random points and shuffled (Um et al.: 4); 0 or 1: off",
                              kind=int, low=0),
        "scaling": HParam(0.1, "std of a per-sample, per-channel factor around 1 (Um et al.: 0.1)", low=0),
        "jitter": HParam(0.1, "std of additive Gaussian noise, in units of the normalised input", low=0),
    },
}
INPUT_RANKS = {"image": 4, "series": 3}
TIME_WARP_KNOTS = 4  # interior knots of the speed curve, as in Um et al.; 2 more sit at the ends


def perturb(x: Tensor, kind: str, generator: torch.Generator, **strengths: float) -> Tensor:
    """x̃ for a batch of ``kind`` ("image" or "series"); strengths left out take their defaults in STRENGTHS."""
    return perturb_with_shift(x, kind, generator, **strengths)[0]


def perturb_with_shift(x: Tensor, kind: str, generator: torch.Generator,
                       **strengths: float) -> tuple[Tensor, Shift | None]:
    """`perturb`, and the geometric part of an image perturbation (None: none, or a series), which a segmentation
    objective applies to the labels and the clean prediction too; the same draws as `perturb`, so the same x̃."""
    if kind not in STRENGTHS:
        raise ValueError(f"unknown input kind {kind!r}; expected one of {sorted(STRENGTHS)}")
    unknown = set(strengths) - set(STRENGTHS[kind])
    if unknown:
        raise KeyError(f"{kind} perturbations have no strength(s) {sorted(unknown)}; they have {list(STRENGTHS[kind])}")
    if x.dim() != INPUT_RANKS[kind]:
        raise ValueError(f"{kind} batches have rank {INPUT_RANKS[kind]}, got shape {tuple(x.shape)}")
    s = {name: strengths.get(name, declared.default) for name, declared in STRENGTHS[kind].items()}
    if kind == "image":
        shift = draw_shift(x, generator, s["crop"], s["flip"])
        out = x if shift is None else shift.move(x)
        out = cutout(out, generator, s["cutout"])
        out = additive_noise(out, generator, s["noise"])
        if out is not x and x.is_contiguous(memory_format=torch.channels_last):
            out = out.contiguous(memory_format=torch.channels_last)  # keep the trainer's GPU layout
        return out, shift
    out = time_warp(x, generator, s["time_warp"])
    out = permute_segments(out, generator, int(s["permutation"]))
    out = scale_channels(out, generator, s["scaling"])
    return additive_noise(out, generator, s["jitter"]), None


def _draw(draw, *args, generator: torch.Generator, like: Tensor, **kwargs) -> Tensor:
    """A CPU draw from ``generator``, moved to ``like``'s device: the same numbers on every device."""
    return draw(*args, generator=generator, **kwargs).to(like.device)


# --- images and series alike -------------------------------------------------------------------------------


def additive_noise(x: Tensor, generator: torch.Generator, sigma: float) -> Tensor:
    """x + sigma * N(0, 1), elementwise (image noise; Um et al.'s "jitter" for series)."""
    if sigma == 0:
        return x
    return x + sigma * _draw(torch.randn, x.shape, generator=generator, like=x).to(x.dtype)


# --- images (N, C, H, W) ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shift:
    """One batch's random shift (and mirror): where each output pixel reads from, (n, h*w) flat indices into its
    own image, and whether that source lies inside the image (False: the edge repeated in). Applying it to the
    label maps and to the clean prediction lets a segmentation objective compare x̃'s pixels with their sources."""

    index: Tensor
    inside: Tensor

    def move(self, t: Tensor) -> Tensor:
        """``t`` (n, c, h, w) with every image moved as its input was. One gather."""
        n, c, h, w = t.shape
        return t.reshape(n, c, h * w).gather(2, self.index[:, None].expand(n, c, h * w)).view(n, c, h, w)

    def move_labels(self, y: Tensor) -> Tensor:
        """Label maps (n, h, w) moved likewise; a pixel whose source lies outside the image gets IGNORE_INDEX."""
        moved = self.move(y[:, None])[:, 0]
        return moved.masked_fill(~self.inside.view_as(moved), IGNORE_INDEX)


def draw_shift(x: Tensor, generator: torch.Generator, crop: float, flip: float) -> Shift | None:
    """Every image's own offset in [-int(crop*H), int(crop*H)] x [-int(crop*W), int(crop*W)], then a mirror with
    probability ``flip``; pixels shifted in from outside repeat the edge (a random crop of the edge-padded image):
    for digits the edge is background, and no constant seam is invented for photos. None when both are off."""
    if crop == 0 and flip == 0:
        return None
    n, _, h, w = x.shape
    max_dy, max_dx = int(crop * h), int(crop * w)
    dy = _draw(torch.randint, -max_dy, max_dy + 1, (n, 1), generator=generator, like=x)
    dx = _draw(torch.randint, -max_dx, max_dx + 1, (n, 1), generator=generator, like=x)
    mirrored = _draw(torch.rand, (n, 1), generator=generator, like=x) < flip
    rows = torch.arange(h, device=x.device) + dy                                      # (n, h)
    columns = torch.arange(w, device=x.device).expand(n, w)
    columns = torch.where(mirrored, w - 1 - columns, columns) + dx                    # (n, w)
    inside = ((rows >= 0) & (rows < h))[:, :, None] & ((columns >= 0) & (columns < w))[:, None, :]
    index = rows.clamp(0, h - 1)[:, :, None] * w + columns.clamp(0, w - 1)[:, None, :]
    return Shift(index.view(n, h * w), inside.view(n, h * w))


def shift_and_flip(x: Tensor, generator: torch.Generator, crop: float, flip: float) -> Tensor:
    """``x`` shifted and mirrored by `draw_shift`'s draw."""
    shift = draw_shift(x, generator, crop, flip)
    return x if shift is None else shift.move(x)


def cutout(x: Tensor, generator: torch.Generator, size: float) -> Tensor:
    """Zero (the channel mean) a square of side int(size*H) x int(size*W) centred at a uniform random pixel;
    the square is clipped at the border, as in DeVries & Taylor, "Improved Regularization of CNNs with Cutout",
    2017."""
    n, _, h, w = x.shape
    side_h, side_w = int(size * h), int(size * w)
    if side_h == 0 or side_w == 0:
        return x
    top = _draw(torch.randint, 0, h, (n, 1), generator=generator, like=x) - side_h // 2
    left = _draw(torch.randint, 0, w, (n, 1), generator=generator, like=x) - side_w // 2
    rows, columns = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_rows = (rows >= top) & (rows < top + side_h)                # (n, h)
    in_columns = (columns >= left) & (columns < left + side_w)     # (n, w)
    return x.masked_fill((in_rows[:, :, None] & in_columns[:, None, :])[:, None], 0.0)


# --- series (N, C, T) --------------------------------------------------------------------------------------


def scale_channels(x: Tensor, generator: torch.Generator, sigma: float) -> Tensor:
    """Multiply each channel of each sample by its own factor ~ N(1, sigma^2) (Um et al.'s "scaling")."""
    if sigma == 0:
        return x
    factor = 1 + sigma * _draw(torch.randn, (x.shape[0], x.shape[1], 1), generator=generator, like=x)
    return x * factor.to(x.dtype)


def time_warp(x: Tensor, generator: torch.Generator, sigma: float) -> Tensor:
    """Resample each series along a smooth random time axis (Um et al.'s "time-warping").

    The speed of time is drawn ~ N(1, sigma^2) at TIME_WARP_KNOTS + 2 evenly spaced knots and interpolated
    linearly between them; its running sum, rescaled to end at T - 1, is the warped time phi(t), monotone with
    phi(0) = 0 and phi(T-1) = T-1, so both endpoints are kept. Output step t is x at phi(t), linearly
    interpolated. One warp per sample, shared by its channels: they come from one clock.
    """
    if sigma == 0:
        return x
    n, c, t = x.shape
    # The warp itself is (N, T), small: computed on the CPU, so every device gets the same one to the last bit.
    knots = 1 + sigma * torch.randn(n, 1, TIME_WARP_KNOTS + 2, generator=generator)
    speed = F.interpolate(knots, size=t, mode="linear", align_corners=True)[:, 0].clamp_min(0.05)  # never backwards
    elapsed = speed.cumsum(1) - speed[:, :1]
    warped = elapsed / elapsed[:, -1:] * (t - 1)       # a / a is exactly 1: the last step lands on T - 1
    left = warped.floor().long().clamp(max=t - 2)
    weight = (warped - left).to(x.device, x.dtype)[:, None].expand(n, c, t)
    left = left.to(x.device)[:, None].expand(n, c, t)
    return torch.lerp(x.gather(2, left), x.gather(2, left + 1), weight)  # lerp is exact at weight 0 and 1


def permute_segments(x: Tensor, generator: torch.Generator, segments: int) -> Tensor:
    """Cut each series into ``segments`` pieces at random points and put them back in random order (Um et al.'s
    "permutation"). Pieces are at least T // (2 * segments) steps long; one permutation per sample, shared by
    its channels, so each channel's values are only reordered in time."""
    if segments <= 1:
        return x
    n, c, t = x.shape
    if segments > t:
        raise ValueError(f"cannot cut a series of {t} steps into {segments} segments")
    min_length = t // (2 * segments)
    slack = t - segments * min_length
    cuts = _draw(torch.randint, 0, slack + 1, (n, segments - 1), generator=generator, like=x).sort(1).values
    ends = torch.cat([cuts, torch.full((n, 1), slack, device=x.device)], 1)
    lengths = min_length + ends - F.pad(cuts, (1, 0))                             # (n, segments), sums to t
    order = _draw(torch.rand, (n, segments), generator=generator, like=x).argsort(1)  # slot j holds piece order[j]
    source_starts = (lengths.cumsum(1) - lengths).gather(1, order)
    slot_lengths = lengths.gather(1, order)
    slot_starts = (slot_lengths.cumsum(1) - slot_lengths).contiguous()
    steps = torch.arange(t, device=x.device).expand(n, t).contiguous()
    slot = torch.searchsorted(slot_starts, steps, right=True) - 1                  # the slot each step lies in
    source = source_starts.gather(1, slot) + steps - slot_starts.gather(1, slot)
    return x.gather(2, source[:, None].expand(n, c, t))
