"""scikit-learn's 8x8 handwritten digits (UCI optdigits), embedded."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np

from benchmark.data.build import RawSplits, _unit_scale
from benchmark.errors import DataUnavailable


def optdigits() -> tuple[np.ndarray, np.ndarray]:
    """(images (1 797, 8, 8) of 0..16 grey levels as float64, labels as int): what `sklearn.datasets.load_digits`
    returns, read as it reads it from the file inside the installed scikit-learn, but without importing
    scikit-learn (~0.9 s with the SciPy it pulls in; tests/test_data.py checks the arrays are load_digits')."""
    spec = importlib.util.find_spec("sklearn")          # finds the package without running its __init__
    path = Path(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz") if spec else None
    if path is None or not path.is_file():
        raise DataUnavailable(f"the digits dataset ships inside scikit-learn, but {path or 'scikit-learn'} is "
                              f"missing; reinstall exitbench's dependencies (pip install -e .)")
    with gzip.open(path, "rt", encoding="utf-8") as text:
        table = np.loadtxt(text, delimiter=",")
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(int)


def _read_digits(root: Path, download: bool) -> RawSplits:
    images, labels = optdigits()
    return _unit_scale(images[:, None], 16), labels, None, None
