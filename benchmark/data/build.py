"""From a reader's raw arrays to a `Dataset`: the fixed splits, the training statistics, the normalisation — one
rule for every source (the protocol in this package's docstring)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from benchmark.data.dataset import PIXEL_LEVELS, Dataset, eight_bit_pixels
from benchmark.data.stratify import stratified_sample

if TYPE_CHECKING:
    from benchmark.data.registry import _Entry

SPLIT_SEED = 0
TEST_FRACTION = 0.2  # only for datasets without an official test split
VALIDATION_FRACTION = 0.1

# ---------------------------------------------------------------------------------------------
# Readers (one module per source): each returns (x_train, y_train, x_test, y_test) as numpy arrays, images (N, C, H, W)
# with pixel values in [0, 1] (or uint8 pixels) or series (N, C, T) in the sensor's units, labels 0..classes-1 (a
# segmentation task's: uint8 label maps (N, H, W), 255 where no class counts).
# For the embedded image datasets "train" is the whole set (test is carved out later with the fixed seed). A reader
# whose splits must come from disjoint sources (the generated tasks: no source digit in two splits) returns its own
# validation split too, (x_train, y_train, x_test, y_test, x_val, y_val), and nothing is carved.
RawSplits = tuple[np.ndarray | None, ...]


def _unit_scale(pixels: np.ndarray, max_value: int) -> np.ndarray:
    """float32 pixels in [0, 1], divided in place: CIFAR-sized arrays are hundreds of MB."""
    scaled = pixels.astype(np.float32)
    scaled /= max_value
    return scaled


def _build(name: str, entry: _Entry, root: Path, download: bool) -> Dataset:
    x_train, y_train, x_test, y_test, x_val, y_val = (*entry.read(root, download), None, None)[:6]
    # Images whose every value is an 8-bit level (k / 255: MNIST family, CIFAR, SVHN, TinyImageNet; not digits,
    # whose 0..16 scale is not) are held as uint8 from here on — split, counted and normalised per batch, bitwise as
    # normalising the float image would — so no full-size float copy outlives this line. A reader may return uint8.
    if entry.kind == "image":
        given = [x for x in (x_train, x_test, x_val) if x is not None]
        pixels = [x if x.dtype == np.uint8 else eight_bit_pixels(x) for x in given]
        if all(p is not None for p in pixels):
            x_train, x_test, x_val = [pixels.pop(0) if x is not None else None for x in (x_train, x_test, x_val)]
    if x_train.dtype == np.uint8 and any(x is not None and x.dtype != np.uint8 for x in (x_test, x_val)):
        raise ValueError(f"{name}: the reader gave uint8 training pixels but float test or validation images")
    held_out = stratified_split if entry.task == "classification" else seeded_split     # label maps have no strata
    if x_test is None:
        train_index, test_index = held_out(y_train, TEST_FRACTION)
        x_train, y_train, x_test, y_test = x_train[train_index], y_train[train_index], x_train[test_index], y_train[test_index]
    if x_val is None:
        train_index, val_index = held_out(y_train, VALIDATION_FRACTION)
        x_train, y_train, x_val, y_val = (x_train[train_index], y_train[train_index], x_train[val_index],
                                          y_train[val_index])

    mean, std = channel_statistics(x_train)

    def normalise(x: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray((x - mean) / std, dtype=np.float32))

    def labels(y: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64 if entry.task == "classification" else np.uint8))

    if x_train.dtype == np.uint8:
        x_train, x_val, x_test = (torch.from_numpy(np.ascontiguousarray(x)) for x in (x_train, x_val, x_test))
    else:
        x_train, x_val, x_test = normalise(x_train), normalise(x_val), normalise(x_test)

    return Dataset(
        name=name, kind=entry.kind, num_classes=entry.num_classes, input_shape=tuple(x_train.shape[1:]),
        x_train=x_train, y_train=labels(y_train),
        x_val=x_val, y_val=labels(y_val),
        x_test=x_test, y_test=labels(y_test),
        augmentation=entry.augmentation, crop_padding=entry.crop_padding,
        mean=tuple(mean.ravel().tolist()), std=tuple(std.ravel().tolist()), task=entry.task,
    )


def stratified_split(labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out) with ``fraction`` held out per class, fixed by SPLIT_SEED.

    Both index arrays are sorted, so the splits keep the source order. The held-out count is rounded up, as
    scikit-learn's `train_test_split(test_size=fraction)` rounds it (benchmark/data/stratify.py).
    """
    return stratified_sample(labels, math.ceil(fraction * len(labels)), SPLIT_SEED)


def seeded_split(labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out) with ``fraction`` of the examples held out (at least one), drawn with SPLIT_SEED:
    the split of tasks whose labels are maps (segmentation), which have no classes to stratify by.

    Both index arrays are sorted, so the splits keep the source order.
    """
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    count = max(1, round(fraction * len(labels)))
    return np.sort(order[count:]), np.sort(order[:count])


def channel_statistics(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std over every axis but 1, shaped to broadcast against ``x``; uint8
    pixels count as k / 255.

    Works for images (N, C, H, W) and series (N, C, T) alike. Two passes in float64 over chunks of samples, so memory
    stays a few chunks (a whole-array float64 temporary of TinyImageNet would be 10 GB); on every committed dataset
    the float32 results are bitwise those of numpy's whole-array mean and std.
    """
    axes = tuple(axis for axis in range(x.ndim) if axis != 1)
    count = x.size // x.shape[1]

    def chunks():
        for start in range(0, len(x), chunk):
            part = x[start:start + chunk]
            yield _unit_scale(part, PIXEL_LEVELS) if part.dtype == np.uint8 else part

    mean = sum(part.sum(axis=axes, dtype=np.float64, keepdims=True) for part in chunks()) / count
    squares = sum(np.square(part - mean).sum(axis=axes, keepdims=True) for part in chunks())
    return mean.astype(np.float32), np.sqrt(squares / count).astype(np.float32)
