"""Tiny ImageNet (CS231n), read from --data-root, its decoded pixels cached beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmark.data.build import RawSplits
from benchmark.data.folders import cached_arrays, decode_all, folder_fingerprint, folder_unavailable, opened_image
from benchmark.errors import DataUnavailable


TINY_IMAGENET_FOLDER = "tiny-imagenet-200"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_SIDE = 64
TINY_IMAGENET_CLASSES = 200
TINY_IMAGENET_LAYOUT = (
    "{root}/tiny-imagenet-200/wnids.txt (one WordNet id per line: the class order), "
    "{root}/tiny-imagenet-200/train/<wnid>/images/*.JPEG (the training images of each class) and "
    "{root}/tiny-imagenet-200/val/images/*.JPEG with {root}/tiny-imagenet-200/val/val_annotations.txt "
    "(tab-separated: file name, wnid, box): the official zip's layout"
)
TINY_IMAGENET_CACHE_VERSION = 1


def _tiny_imagenet_problem(root: Path, problem: str) -> DataUnavailable:
    return folder_unavailable("TinyImageNet", problem, TINY_IMAGENET_LAYOUT.format(root=root),
                              f"download {TINY_IMAGENET_URL} and unzip it into {root} (it unpacks to "
                              f"{TINY_IMAGENET_FOLDER}/)")


def _tiny_imagenet_files(root: Path) -> tuple[list[str], list[Path], np.ndarray, list[Path], np.ndarray]:
    """The layout checked and listed: (wnids, train files, train labels, val files, val labels); labels index
    wnids.txt's order, training files are sorted by name within each class, validation files keep the order of
    val_annotations.txt."""
    folder = root / TINY_IMAGENET_FOLDER
    if not folder.is_dir():
        raise _tiny_imagenet_problem(root, f"folder {folder} does not exist")
    wnids_file, annotations = folder / "wnids.txt", folder / "val" / "val_annotations.txt"
    for needed in (wnids_file, annotations):
        if not needed.is_file():
            raise _tiny_imagenet_problem(root, f"file {needed} is missing")
    wnids = wnids_file.read_text().split()
    if len(wnids) != TINY_IMAGENET_CLASSES or len(set(wnids)) != len(wnids):
        raise _tiny_imagenet_problem(root, f"{wnids_file} must list {TINY_IMAGENET_CLASSES} distinct WordNet ids, "
                                           f"one per line; found {len(wnids)} ids, {len(set(wnids))} distinct")
    label_of = {wnid: k for k, wnid in enumerate(wnids)}
    train_files, train_labels = [], []
    for wnid in wnids:
        images = folder / "train" / wnid / "images"
        files = sorted(images.glob("*.JPEG")) if images.is_dir() else []
        if not files:
            raise _tiny_imagenet_problem(root, f"class {wnid} of wnids.txt has no images in {images}")
        train_files += files
        train_labels += [label_of[wnid]] * len(files)
    val_files, val_labels = [], []
    for number, line in enumerate(annotations.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise _tiny_imagenet_problem(root, f"line {number} of {annotations} must be 'file<TAB>wnid<TAB>...' "
                                               f"with a wnid of wnids.txt; got {line!r}")
        val_files.append(folder / "val" / "images" / fields[0])
        val_labels.append(label_of[fields[1]])
    if not val_files:
        raise _tiny_imagenet_problem(root, f"{annotations} lists no images")
    missing = next((path for path in val_files if not path.is_file()), None)
    if missing is not None:
        raise _tiny_imagenet_problem(root, f"image {missing}, listed in {annotations}, is missing")
    return wnids, train_files, np.asarray(train_labels), val_files, np.asarray(val_labels)


def _decode_images(root: Path, files: list[Path]) -> np.ndarray:
    """uint8 (N, 3, 64, 64) from JPEG files; greyscale files (a few hundred in TinyImageNet) become RGB."""
    def decode(path: Path) -> np.ndarray:
        pixels = np.asarray(opened_image(path, lambda problem: _tiny_imagenet_problem(root, problem)).convert("RGB"))
        if pixels.shape != (TINY_IMAGENET_SIDE, TINY_IMAGENET_SIDE, 3):
            raise _tiny_imagenet_problem(root, f"image {path} is {pixels.shape[1]}x{pixels.shape[0]} pixels, "
                                               f"not {TINY_IMAGENET_SIDE}x{TINY_IMAGENET_SIDE}")
        return pixels

    return decode_all(files, decode, (TINY_IMAGENET_SIDE, TINY_IMAGENET_SIDE, 3)).transpose(0, 3, 1, 2)


def _read_tiny_imagenet(root: Path, download: bool) -> RawSplits:
    """Tiny ImageNet (CS231n, Stanford): 200 ImageNet classes, 64x64 colour, 500 training and 50 validation images
    per class. Its test images carry no labels, so exitbench's test split is the official *val* split (10 000
    images, labels from val_annotations.txt), and its validation split is carved from the 100 000 training images
    as for every dataset. Classes are numbered in wnids.txt's order.

    Decoding 110 000 JPEGs takes a while, so the first read writes the decoded uint8 pixels to
    <root>/tiny-imagenet-200.exitbench.npz (atomically: a temporary file renamed into place) and later reads load
    that file while its fingerprint — wnids.txt, val_annotations.txt and every image's name — matches the folder.
    A data root that is not writable only loses the cache.
    """
    wnids, train_files, y_train, val_files, y_test = _tiny_imagenet_files(root)
    folder = root / TINY_IMAGENET_FOLDER
    fingerprint = folder_fingerprint(f"v{TINY_IMAGENET_CACHE_VERSION}", folder,
                                     [folder / "wnids.txt", folder / "val" / "val_annotations.txt"],
                                     [*train_files, *val_files])
    pixels = cached_arrays(root / f"{TINY_IMAGENET_FOLDER}.exitbench.npz", fingerprint,
                           lambda: {"x_train": _decode_images(root, train_files),
                                    "x_test": _decode_images(root, val_files)})
    return pixels["x_train"], y_train, pixels["x_test"], y_test       # uint8 pixels: `_build` holds them as they are
