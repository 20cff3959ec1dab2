"""The torchvision datasets (MNIST family, CIFAR, SVHN): read from --data-root, downloaded if asked."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmark.data.build import RawSplits
from benchmark.errors import DataUnavailable


@dataclass(frozen=True)
class _TorchvisionSource:
    """How to read one torchvision dataset and what files it needs (for the error message)."""

    class_name: str
    layout: str  # the files torchvision needs, with "{root}" standing for data_root
    uses_split_argument: bool = False  # SVHN takes split="train"/"test" instead of train=True/False

    def read(self, root: Path, download: bool) -> RawSplits:
        import torchvision.datasets

        dataset_class = getattr(torchvision.datasets, self.class_name)
        splits = []
        for train in (True, False):
            which = {"split": "train" if train else "test"} if self.uses_split_argument else {"train": train}
            try:
                loaded = dataset_class(root=str(root), download=download, **which)
            except _TORCHVISION_READ_ERRORS as error:
                raise DataUnavailable(self._unavailable_message(root, download, error)) from error
            images = np.asarray(loaded.data)
            labels = np.asarray(loaded.labels if self.uses_split_argument else loaded.targets)
            splits += [np.ascontiguousarray(_to_nchw(images), dtype=np.uint8), labels]   # 8-bit pixels, as stored
        return tuple(splits)

    def _unavailable_message(self, root: Path, download: bool, error: Exception) -> str:
        if download:
            problem, fix = (f"download into {root} failed (this machine seems offline, or the server unreachable)",
                            "copy the files there from a machine with internet")
        else:
            problem, fix = f"files missing or unreadable under {root}", \
                "rerun with --download (needs internet) or copy the files there"
        return (f"{self.class_name} {problem}: torchvision expects {self.layout.format(root=root)}. Fix: {fix}. "
                f"(torchvision said: {error})")


# RuntimeError: torchvision's "not found or corrupted"; OSError: a failed download;
# AssertionError/TypeError/ValueError: a malformed IDX file (MNIST family files carry no checksum).
_TORCHVISION_READ_ERRORS = (RuntimeError, OSError, AssertionError, TypeError, ValueError)


def _to_nchw(images: np.ndarray) -> np.ndarray:
    """torchvision stores MNIST as (N, H, W), CIFAR as (N, H, W, C) and SVHN as (N, C, H, W)."""
    if images.ndim == 3:
        return images[:, None]
    if images.shape[-1] == 3:
        return images.transpose(0, 3, 1, 2)
    return images


def _mnist_layout(folder: str) -> str:
    files = "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte"
    return f"{{root}}/{folder}/raw/ with {files} (uncompressed IDX files)"
