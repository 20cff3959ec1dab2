"""Digit addition: two digits side by side, labelled with their sum (19 classes, 0..18) — the "MNIST addition" task
of Manhaeve et al., "DeepProbLog: Neural Probabilistic Logic Programming" (NeurIPS 2018), generated here at CPU
scale from the embedded digits:

- `optdigits_addition`: two of scikit-learn's 8x8 optdigits, an 8x16 image;
- `mnist_addition`: two MNIST digits averaged down to 10x10 (`area_downscaled`), a 10x20 image.

Why (issue 21): the answer needs both digits read and combined; an exit that sees strokes but not digits cannot
add them, so early exits cost accuracy (unlike two digits read as 100 classes, `mnist_pairs`, where a shallow exit
scores each half on its own and fails the difficulty screen).

Construction, per split, from that split's own sources only (`digit_sources`): pick two different source digits at
random and place them left and right; the label is their sum. Deterministic: one NumPy generator per split, seeded
by the task's generation seed and the split's name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmark.data.build import RawSplits
from benchmark.data.digit_sources import mnist_sources, optdigits_sources, reader_splits, split_seed

SUM_CLASSES = 19
OPTDIGITS_ADDITION = {"seed": 2018, "images": {"train": 3000, "val": 1000, "test": 2000}}
MNIST_ADDITION = {"digit": 10, "seed": 2019, "images": {"train": 3000, "val": 1000, "test": 2000}}


def digit_sums(digits: np.ndarray, labels: np.ndarray, count: int, seed: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`count` images (uint8, (count, 1, d, 2d)) of two different source `digits` (uint8 (n, d, d)) side by side,
    their labels left + right, and the sources' indices (left, right) into `digits`."""
    rng = np.random.default_rng(seed)
    n = len(digits)
    left = rng.integers(0, n, count)
    right = (left + rng.integers(1, n, count)) % n
    images = np.concatenate([digits[left], digits[right]], axis=2)[:, None]
    return images, labels[left] + labels[right], left, right


def addition_splits(sources: dict[str, tuple[np.ndarray, np.ndarray]], task: dict) -> RawSplits:
    made = {split: digit_sums(*sources[split], count, split_seed(task["seed"], split))[:2]
            for split, count in task["images"].items()}
    return reader_splits(made)


def _read_optdigits_addition(root: Path, download: bool) -> RawSplits:
    return addition_splits(optdigits_sources(), OPTDIGITS_ADDITION)


def _read_mnist_addition(root: Path, download: bool) -> RawSplits:
    return addition_splits(mnist_sources(MNIST_ADDITION["digit"]), MNIST_ADDITION)
