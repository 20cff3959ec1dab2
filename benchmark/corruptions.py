"""Input corruptions at five severities, generated deterministically from the clean test split.

Why: a regime's exits may hold up differently when the inputs drift from what training saw (the consistency-training
paper, arXiv 2109.13192, claims exits that "generalize better when confronted with increasing uncertainty"). The
robustness analysis (analysis/robustness.py) evaluates every run on these corrupted copies of its test split with the
thresholds still fit on clean validation: a deployed model does not know the shift.

- **Same samples for every regime.** Each (corruption, severity) draws its randomness from its own generator, seeded by
  CORRUPTION_SEED and the corruption's place in its kind's table (never by a run seed or by which corruptions a grid
  declares), on the CPU, so every run of a dataset sees the same corrupted inputs on every machine.
- **In the data's own units.** Model inputs are de-normalised with the training statistics (images to the [0, 1]
  pixel scale, where they are clipped after corruption; series to their recorded units), corrupted, and normalised
  again by the same float32 rule as the clean split. Severity 0 is the clean split as held, untouched.
- **Images** follow CIFAR-10-C (Hendrycks & Dietterich, ICLR 2019; hendrycks/robustness, make_cifar_c.py), its
  parameters for 32 px: gaussian_noise, shot_noise, gaussian_blur (scikit-image's `gaussian`: edge padding,
  kernel cut at 4 sigma), contrast (each channel's own mean), pixelate (PIL's BOX resize down and back up). Like the
  CIFAR-10-C files, the results are stored as 8-bit pixels: clipped to [0, 1], then truncated to a multiple of
  1/255 (`np.uint8` of the 0-255 value). Spatial parameters (the blur's sigma) scale with the side for images larger
  than 32 px (TinyImageNet: x2) and keep CIFAR's pixel values for smaller ones, where a pixel is a larger share of
  the object; pixelate's factor is a share of the side at every size. Deviation, stated: pixelate resizes in float
  and truncates once at the end, where PIL on 8-bit images rounds after each of its two resizes (at most 1/255
  apart).
- **Series** follow the sensor-data augmentations of Um et al. (ICMI 2017): jitter (additive Gaussian noise, a
  share of each channel's training std), scaling (one random gain per sample and channel), time_warp (a smooth
  random change of speed through 4 interior knots) and channel_dropout (a share of the channels of each sample
  read 0, a dead sensor).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

CORRUPTION_SEED = 20_190_505
SEVERITIES = (1, 2, 3, 4, 5)

_IMAGE_PARAMETERS = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),      # std of the added noise, pixel scale
    "shot_noise": (500, 250, 100, 75, 50),                  # photons per unit intensity (Poisson rate)
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),             # sigma in pixels at 32 px
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),                # remaining share of the deviation from the image mean
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),              # side of the coarse image as a share of the side
}
_SERIES_PARAMETERS = {
    "jitter": (0.1, 0.2, 0.3, 0.4, 0.5),                    # noise std as a share of the channel's training std
    "scaling": (0.1, 0.2, 0.3, 0.4, 0.5),                   # std of the gain around 1
    "time_warp": (0.05, 0.1, 0.15, 0.2, 0.3),               # std of the speed around 1 at each knot
    "channel_dropout": (0.1, 0.2, 0.3, 0.4, 0.5),           # share of the channels that read 0
}
TIME_WARP_KNOTS = 4


def _gaussian_noise(x, c, g, data):
    return x + c * torch.randn(x.shape, generator=g)


def _shot_noise(x, c, g, data):
    return torch.poisson(x.clamp(min=0) * c, generator=g) / c


def _gaussian_blur(x, sigma, g, data):
    """scipy.ndimage.gaussian_filter as scikit-image calls it (mode 'nearest', truncate 4.0) on each channel."""
    sigma *= max(1.0, x.shape[-1] / 32)
    radius = int(4.0 * sigma + 0.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * offsets ** 2 / sigma ** 2)
    kernel = (kernel / kernel.sum()).to(x.dtype)
    channels = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    rows = F.conv2d(padded, kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1), groups=channels)
    return F.conv2d(rows, kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1), groups=channels)


def _contrast(x, c, g, data):
    mean = x.mean(dim=(2, 3), keepdim=True)          # per image and channel, as make_cifar_c.py
    return (x - mean) * c + mean


def box_resampling(in_size: int, out_size: int) -> torch.Tensor:
    """(out, in) weights of PIL's BOX resize along one axis (Pillow's `precompute_coeffs` with its box filter): output
    pixel i averages, with equal weights, the input pixels whose centres lie in (centre_i − s/2, centre_i + s/2],
    s = max(in/out, 1) input pixels."""
    scale = in_size / out_size
    width = max(scale, 1.0)
    weights = torch.zeros(out_size, in_size, dtype=torch.float64)
    for i in range(out_size):
        centre = (i + 0.5) * scale
        for j in range(max(int(centre - width / 2 + 0.5), 0), min(int(centre + width / 2 + 0.5), in_size)):
            if -0.5 < (j + 0.5 - centre) / width <= 0.5:
                weights[i, j] = 1.0
        weights[i] /= weights[i].sum()
    return weights


def _pixelate(x, c, g, data):
    (height, width), dtype = x.shape[-2:], x.dtype
    coarse = [max(1, int(s * c)) for s in (height, width)]
    down_h, down_w = box_resampling(height, coarse[0]), box_resampling(width, coarse[1])
    up_h, up_w = box_resampling(coarse[0], height), box_resampling(coarse[1], width)
    rows, columns = (up_h @ down_h).to(dtype), (up_w @ down_w).to(dtype)
    return rows @ x @ columns.T


def _to_8_bit(x: torch.Tensor) -> torch.Tensor:
    """Clip to [0, 1] and truncate to a multiple of 1/255, as CIFAR-10-C's uint8 files store a corrupted image. The
    1e-3 (in 0-255 units) keeps a pixel that float32 de-normalisation left a hair below its 8-bit level on it."""
    return torch.floor(x.clamp(0.0, 1.0) * 255 + 1e-3).clamp(max=255) / 255


def _jitter(x, c, g, data):
    std = torch.tensor(data.std, dtype=torch.float32).view(1, -1, 1)
    return x + c * std * torch.randn(x.shape, generator=g)


def _scaling(x, c, g, data):
    return x * (1 + c * torch.randn((x.shape[0], x.shape[1], 1), generator=g))


def _time_warp(x, c, g, data):
    n, _, steps = x.shape
    knots = 1 + c * torch.randn((n, 1, TIME_WARP_KNOTS + 2), generator=g)
    speed = F.interpolate(knots, size=steps, mode="linear", align_corners=True).squeeze(1).clamp(min=0.05)
    elapsed = torch.cumsum(speed, dim=1) - speed[:, :1]
    position = elapsed / elapsed[:, -1:] * (steps - 1)                      # (N, T) in [0, T-1], increasing
    left = position.floor().long().clamp(max=steps - 2)
    weight = (position - left).unsqueeze(1)
    index = left.unsqueeze(1).expand(-1, x.shape[1], -1)
    return x.gather(2, index) * (1 - weight) + x.gather(2, index + 1) * weight


def _channel_dropout(x, c, g, data):
    n, channels, _ = x.shape
    dropped = max(1, round(c * channels))
    order = torch.rand((n, channels), generator=g).argsort(dim=1)
    keep = (order >= dropped).to(x.dtype).unsqueeze(-1)                     # rank < dropped: the dropped channels
    return x * keep


_FUNCTIONS: dict[str, Callable] = {
    "gaussian_noise": _gaussian_noise, "shot_noise": _shot_noise, "gaussian_blur": _gaussian_blur,
    "contrast": _contrast, "pixelate": _pixelate,
    "jitter": _jitter, "scaling": _scaling, "time_warp": _time_warp, "channel_dropout": _channel_dropout,
}
CORRUPTIONS = {"image": tuple(_IMAGE_PARAMETERS), "series": tuple(_SERIES_PARAMETERS)}
"""The corruptions of each dataset kind, in their fixed order (which seeds them)."""
_PARAMETERS = {**_IMAGE_PARAMETERS, **_SERIES_PARAMETERS}


def corruptions_for(kind: str, declared: list[str]) -> tuple[str, ...]:
    """The declared corruptions that apply to a dataset kind, in the kind's fixed order."""
    return tuple(name for name in CORRUPTIONS[kind] if name in declared)


def unknown_corruptions(declared: list[str]) -> list[str]:
    known = set(_FUNCTIONS)
    return [name for name in declared if name not in known]


def corrupted_inputs(data, split: str, corruption: str, severity: int) -> torch.Tensor:
    """Model inputs (normalised float32, on the CPU) of `split` under `corruption` at `severity` (0 = clean: the
    split's own normalised inputs)."""
    clean = getattr(data, f"x_{split}").cpu()
    if severity == 0:
        return clean
    kind = data.kind
    if corruption not in CORRUPTIONS[kind]:
        raise ValueError(f"corruption '{corruption}' is not one of the {kind} corruptions {CORRUPTIONS[kind]}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity must be 0 (clean) or one of {SEVERITIES}, got {severity}")
    shape = (1, -1) + (1,) * (clean.dim() - 2)
    mean = torch.tensor(data.mean, dtype=torch.float32).view(shape)
    std = torch.tensor(data.std, dtype=torch.float32).view(shape)
    generator = torch.Generator().manual_seed(CORRUPTION_SEED + 1000 * CORRUPTIONS[kind].index(corruption) + severity)
    raw = clean * std + mean
    corrupted = _FUNCTIONS[corruption](raw, _PARAMETERS[corruption][severity - 1], generator, data)
    if kind == "image":
        corrupted = _to_8_bit(corrupted)
    return ((corrupted - mean) / std).to(torch.float32).contiguous()


def severity_parameter(corruption: str, severity: int) -> float:
    """The parameter a (corruption, severity) uses, for tables and captions."""
    return float(_PARAMETERS[corruption][severity - 1]) if severity else float("nan")

