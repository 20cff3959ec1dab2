"""Cluttered MNIST: one MNIST digit at a random place on a larger canvas strewn with fragments cut from other
digits — the construction of Mnih et al., "Recurrent Models of Visual Attention" (NeurIPS 2014; 60x60 canvases with
8x8 fragments) and Jaderberg et al., "Spatial Transformer Networks" (NeurIPS 2015), generated here from the embedded
5 000 digits at a CPU-sized scale.

Why: on digits and mnist5k the first exit is as good as the last (issue 21); locating a digit among digit-like
strokes needs depth, so shallow exits fall behind and the question of how to train them arises.

Construction, per split, from that split's own sources only (`mnist_sources`): a `CANVAS`x`CANVAS` black canvas,
`FRAGMENTS` fragments of `FRAGMENT`x`FRAGMENT` pixels, each cut at a random place from a random source digit other
than the target and pasted at a random place, then the 28x28 target digit at a random place (fully inside the
canvas); overlaps keep the brighter pixel (max), so every pixel stays an 8-bit value. The label is the target's.
Deterministic: one NumPy generator per split, seeded by `GENERATION_SEED` and the split's name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmark.data.build import RawSplits
from benchmark.data.mnist_sources import mnist_sources

CANVAS = 40
FRAGMENTS = 4
FRAGMENT = 8
CANVASES = {"train": 6000, "val": 1000, "test": 1000}
GENERATION_SEED = 2014
DIGIT = 28


def clutter_canvases(digits: np.ndarray, labels: np.ndarray, count: int, seed: int,
                     canvas: int = CANVAS, fragments: int = FRAGMENTS, fragment: int = FRAGMENT
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """`count` cluttered canvases (uint8, (count, 1, canvas, canvas)), their labels, and which sources went into
    each — the target's index (count,) and the fragments' (count, fragments) into `digits` — from the source
    `digits` (uint8 (n, 28, 28)) and `labels`: the construction of the module docstring."""
    if canvas < DIGIT or fragment > DIGIT:
        raise ValueError(f"a {DIGIT}x{DIGIT} digit needs a canvas of at least {DIGIT} px and fragments of at most "
                         f"{DIGIT} px; got canvas {canvas}, fragment {fragment}")
    rng = np.random.default_rng(seed)
    n = len(digits)
    target = rng.integers(0, n, count)
    images = np.zeros((count, canvas, canvas), dtype=np.uint8)
    rows = np.arange(count)[:, None, None]
    used = np.empty((count, fragments), dtype=np.int64)
    for f in range(fragments):
        source = used[:, f] = (target + rng.integers(1, n, count)) % n        # any digit but the target
        cut_y, cut_x = rng.integers(0, DIGIT - fragment + 1, (2, count))
        put_y, put_x = rng.integers(0, canvas - fragment + 1, (2, count))
        offsets = np.arange(fragment)
        pieces = digits[source[:, None, None], (cut_y[:, None] + offsets)[:, :, None],
                        (cut_x[:, None] + offsets)[:, None, :]]
        ys, xs = (put_y[:, None] + offsets)[:, :, None], (put_x[:, None] + offsets)[:, None, :]
        images[rows, ys, xs] = np.maximum(images[rows, ys, xs], pieces)
    top, left = rng.integers(0, canvas - DIGIT + 1, (2, count))
    offsets = np.arange(DIGIT)
    ys, xs = (top[:, None] + offsets)[:, :, None], (left[:, None] + offsets)[:, None, :]
    images[rows, ys, xs] = np.maximum(images[rows, ys, xs], digits[target])
    return images[:, None], labels[target], target, used


def _split_seed(split: str) -> int:
    return GENERATION_SEED * 10 + ("train", "val", "test").index(split)


def _read_cluttered_mnist(root: Path, download: bool) -> RawSplits:
    sources = mnist_sources()
    made = {split: clutter_canvases(*sources[split], CANVASES[split], _split_seed(split))[:2] for split in CANVASES}
    return (*made["train"], *made["test"], *made["val"])
