"""MNIST scenes: a semantic-segmentation task of handwritten digits — the M2NIST construction (Farhan Rahman Wasee,
"M2NIST", Kaggle 2018: up to three 28 px MNIST digits pasted without overlap on a 64x84 canvas, one mask per digit
class plus background) generated here at half scale from the embedded digits.

Why (issue 23): a dense-prediction task that a laptop CPU trains in minutes. A pixel's class is the identity of
the digit it belongs to, which a shallow exit, whose receptive field covers a few strokes, cannot see: early exits
should cost mIoU here as they cost accuracy on the cluttered digits (the difficulty screen decides).

Construction, per split, from that split's own source digits only (`digit_sources`: no source digit in two splits):
- the MNIST digits averaged down to 14x14 (`area_downscaled`), the canvas 32x42 (M2NIST's 64x84 halved);
- 1, 2 or 3 digits (uniform), each at a random place fully inside the canvas, its 14x14 box overlapping no other
  digit's box (placed in turn; a digit that finds no free place in 100 draws starts the scene again);
- per-pixel labels: a digit's pixels of intensity >= 128 (of 255) take the digit's class (0..9); its fainter pixels,
  which area averaging made a mix of ink and paper, take the ignore label 255 — as Pascal VOC marks its object
  borders — and are left out of losses and metrics; every other pixel is background, class 10 (M2NIST's last mask).
Deterministic: one NumPy generator per split, seeded by the task's generation seed and the split's name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmark.data.build import RawSplits
from benchmark.data.dataset import IGNORE_INDEX
from benchmark.data.digit_sources import mnist_sources, reader_splits, split_seed

MNIST_SCENES = {"digit": 14, "canvas": (32, 42), "digits": (1, 3), "ink": 128, "seed": 2018,
                "scenes": {"train": 2000, "val": 1000, "test": 1000}}
BACKGROUND = 10
"""The background's class: after the ten digits, as in M2NIST's masks."""
SCENE_CLASSES = 11
PLACEMENT_DRAWS = 100


def digit_scenes(digits: np.ndarray, labels: np.ndarray, count: int, seed: int, canvas: tuple[int, int],
                 per_scene: tuple[int, int], ink: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`count` scenes (uint8 (count, 1, H, W)), their label maps (uint8 (count, H, W): 0..9, `BACKGROUND`,
    `IGNORE_INDEX`) and the sources in each (count, per_scene[1]) indices into `digits`, -1 where a scene has
    fewer digits), from the square source `digits` (uint8 (n, d, d)) and their `labels`: the module's construction."""
    side = digits.shape[1]
    height, width = canvas
    if side > height or side > width:
        raise ValueError(f"a {side}x{side} digit does not fit on a {height}x{width} canvas")
    rng = np.random.default_rng(seed)
    images = np.zeros((count, height, width), dtype=np.uint8)
    label_maps = np.full((count, height, width), BACKGROUND, dtype=np.uint8)
    used = np.full((count, per_scene[1]), -1, dtype=np.int64)
    for scene in range(count):
        boxes = _free_boxes(rng, int(rng.integers(per_scene[0], per_scene[1] + 1)), side, height, width)
        for slot, (top, left) in enumerate(boxes):
            source = used[scene, slot] = rng.integers(0, len(digits))
            digit = digits[source]
            window = (slice(top, top + side), slice(left, left + side))
            images[scene][window] = digit
            label_maps[scene][window] = np.where(digit >= ink, labels[source],
                                                 np.where(digit > 0, IGNORE_INDEX, BACKGROUND))
    return images[:, None], label_maps, used


def _free_boxes(rng: np.random.Generator, count: int, side: int, height: int, width: int) -> list[tuple[int, int]]:
    """Top-left corners of `count` non-overlapping side x side boxes inside the canvas, drawn in turn."""
    while True:
        boxes: list[tuple[int, int]] = []
        for _ in range(count):
            for _ in range(PLACEMENT_DRAWS):
                top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
                if all(abs(top - t) >= side or abs(left - l) >= side for t, l in boxes):
                    boxes.append((top, left))
                    break
            else:
                break                   # no room left for this digit: the scene starts again
        if len(boxes) == count:
            return boxes


def scene_splits(sources: dict[str, tuple[np.ndarray, np.ndarray]], task: dict) -> RawSplits:
    """The reader's (train, test, val) arrays of a scene task (`MNIST_SCENES`) from its source digits, each split
    from its own."""
    made = {split: digit_scenes(*sources[split], count, split_seed(task["seed"], split), task["canvas"],
                                task["digits"], task["ink"])[:2]
            for split, count in task["scenes"].items()}
    return reader_splits(made)


def _read_mnist_scenes(root: Path, download: bool) -> RawSplits:
    return scene_splits(mnist_sources(MNIST_SCENES["digit"]), MNIST_SCENES)
