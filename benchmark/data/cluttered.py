"""Cluttered digits: one digit at a random place on a larger canvas strewn with fragments cut from other digits —
the construction of Mnih et al., "Recurrent Models of Visual Attention" (NeurIPS 2014: a 28 px MNIST digit on a
60x60 canvas with 8x8 fragments) and Jaderberg et al., "Spatial Transformer Networks" (NeurIPS 2015), generated
here at CPU scale from the embedded digits:

- `cluttered_mnist`: MNIST digits averaged down to 10x10 (`area_downscaled`) on a 16x16 canvas with four 4x4
  fragments (Mnih's digit : canvas : fragment proportions of 28 : 60 : 8 are 10 : 21 : 3; a tighter canvas and
  larger fragments, so the canvas costs a quarter of Mnih's pixels at 2.7x the clutter per pixel);
- `cluttered_optdigits`: scikit-learn's 8x8 optdigits on a 16x16 canvas with eight 3x3 fragments.

Why (issue 21): on the embedded digit sets the first exit is as good as the last. Telling the digit from
digit-like strokes around it needs context a shallow exit does not have, so early exits cost accuracy here and
the question of how to train them arises; the sizes are chosen for what the 2-core machine can train to a plateau
(BENCHMARK.md, "Leaderboard tasks").

Construction, per split, from that split's own sources only (`digit_sources`): a black canvas, `fragments`
fragments of `fragment` x `fragment` pixels, each cut at a random place from a random source digit other than the
target and pasted at a random place, then the whole target digit at a random place (fully inside the canvas);
overlaps keep the brighter pixel (max), so every pixel stays an 8-bit value. The label is the target's.
Deterministic: one NumPy generator per split, seeded by the task's generation seed and the split's name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmark.data.build import RawSplits
from benchmark.data.digit_sources import mnist_sources, optdigits_sources, reader_splits, split_seed

CLUTTERED_MNIST = {"digit": 10, "canvas": 16, "fragments": 4, "fragment": 4, "seed": 2014,
                   "canvases": {"train": 3000, "val": 1000, "test": 2000}}
CLUTTERED_OPTDIGITS = {"canvas": 16, "fragments": 8, "fragment": 3, "seed": 2016,
                       "canvases": {"train": 3000, "val": 1000, "test": 2000}}


def clutter_canvases(digits: np.ndarray, labels: np.ndarray, count: int, seed: int, canvas: int, fragments: int,
                     fragment: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`count` cluttered canvases (uint8, (count, 1, canvas, canvas)), their labels, and which sources went into
    each — the target's index (count,) and the fragments' (count, fragments) into `digits` — from the square source
    `digits` (uint8 (n, d, d)) and `labels`: the construction of the module docstring."""
    side = digits.shape[1]
    if canvas < side or fragment > side:
        raise ValueError(f"a {side}x{side} digit needs a canvas of at least {side} px and fragments of at most "
                         f"{side} px; got canvas {canvas}, fragment {fragment}")
    rng = np.random.default_rng(seed)
    n = len(digits)
    target = rng.integers(0, n, count)
    images = np.zeros((count, canvas, canvas), dtype=np.uint8)
    rows = np.arange(count)[:, None, None]
    used = np.empty((count, fragments), dtype=np.int64)
    for f in range(fragments):
        source = used[:, f] = (target + rng.integers(1, n, count)) % n        # any digit but the target
        cut_y, cut_x = rng.integers(0, side - fragment + 1, (2, count))
        put_y, put_x = rng.integers(0, canvas - fragment + 1, (2, count))
        offsets = np.arange(fragment)
        pieces = digits[source[:, None, None], (cut_y[:, None] + offsets)[:, :, None],
                        (cut_x[:, None] + offsets)[:, None, :]]
        ys, xs = (put_y[:, None] + offsets)[:, :, None], (put_x[:, None] + offsets)[:, None, :]
        images[rows, ys, xs] = np.maximum(images[rows, ys, xs], pieces)
    top, left = rng.integers(0, canvas - side + 1, (2, count))
    offsets = np.arange(side)
    ys, xs = (top[:, None] + offsets)[:, :, None], (left[:, None] + offsets)[:, None, :]
    images[rows, ys, xs] = np.maximum(images[rows, ys, xs], digits[target])
    return images[:, None], labels[target], target, used


def cluttered_splits(sources: dict[str, tuple[np.ndarray, np.ndarray]], task: dict) -> RawSplits:
    """The reader's (train, test, val) arrays of a cluttered task (`CLUTTERED_MNIST`, `CLUTTERED_OPTDIGITS`) from its
    source digits, each split from its own."""
    made = {split: clutter_canvases(*sources[split], count, split_seed(task["seed"], split), task["canvas"],
                                    task["fragments"], task["fragment"])[:2]
            for split, count in task["canvases"].items()}
    return reader_splits(made)


def _read_cluttered_mnist(root: Path, download: bool) -> RawSplits:
    return cluttered_splits(mnist_sources(CLUTTERED_MNIST["digit"]), CLUTTERED_MNIST)


def _read_cluttered_optdigits(root: Path, download: bool) -> RawSplits:
    return cluttered_splits(optdigits_sources(), CLUTTERED_OPTDIGITS)
