"""scikit-learn's 8x8 handwritten digits (UCI optdigits), embedded."""

from __future__ import annotations

from pathlib import Path

from benchmark.data.build import RawSplits, _unit_scale


def _read_digits(root: Path, download: bool) -> RawSplits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _unit_scale(digits.images[:, None], 16), digits.target, None, None
