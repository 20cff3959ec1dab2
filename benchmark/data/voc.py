"""Pascal VOC 2012 semantic segmentation, read from --data-root in the official layout (the one torchvision's
`VOCSegmentation` reads), its decoded pixels cached beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmark.data.build import RawSplits
from benchmark.data.dataset import IGNORE_INDEX
from benchmark.data.folders import (decode_all, folder_fingerprint, folder_unavailable, letterboxed, official_splits,
                                    opened_image, opened_label)
from benchmark.errors import DataUnavailable

VOC_FOLDER = "VOCdevkit/VOC2012"
VOC_URL = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar"
VOC_CLASSES = 21
"""Background and the 20 object classes, numbered as the palette PNGs number them."""
VOC_SIDE = 256
"""Images are scaled so that their longer side is 256 px (VOC's are at most 500) and centred on a 256x256 canvas:
in-memory tensors need one shape; nothing is cropped or stretched, and the padding is labelled IGNORE_INDEX."""
VOC_LAYOUT = (
    "{root}/VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt and val.txt (one image id per line), "
    "{root}/VOCdevkit/VOC2012/JPEGImages/<id>.jpg and {root}/VOCdevkit/VOC2012/SegmentationClass/<id>.png (palette "
    "PNG: the class index of every pixel, 255 on object borders): the official tar's layout"
)
VOC_CACHE_VERSION = 1


def _voc_problem(root: Path, problem: str) -> DataUnavailable:
    return folder_unavailable("Pascal VOC 2012", problem, VOC_LAYOUT.format(root=root),
                              f"download {VOC_URL} and untar it into {root} (it unpacks to VOCdevkit/VOC2012/)")


def _voc_files(root: Path) -> dict[str, tuple[list[Path], list[Path]]]:
    """The layout checked and listed: split ("train", "val") -> (image files, label files), in the order of the
    split's ImageSets file."""
    folder = root / VOC_FOLDER
    if not folder.is_dir():
        raise _voc_problem(root, f"folder {folder} does not exist")
    listed = {}
    for split in ("train", "val"):
        ids_file = folder / "ImageSets" / "Segmentation" / f"{split}.txt"
        if not ids_file.is_file():
            raise _voc_problem(root, f"file {ids_file} is missing")
        ids = ids_file.read_text().split()
        if not ids:
            raise _voc_problem(root, f"{ids_file} lists no images")
        images = [folder / "JPEGImages" / f"{i}.jpg" for i in ids]
        labels = [folder / "SegmentationClass" / f"{i}.png" for i in ids]
        missing = next((path for path in (*images, *labels) if not path.is_file()), None)
        if missing is not None:
            raise _voc_problem(root, f"file {missing}, listed in {ids_file}, is missing")
        listed[split] = (images, labels)
    return listed


def _decode_pairs(root: Path, images: list[Path], labels: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, 3, side, side) and label maps (N, side, side), letterboxed alike (bilinear for pixels,
    nearest for labels)."""
    from PIL import Image

    image_of = dict(zip(labels, images))

    def opened(path: Path):
        return opened_image(path, lambda problem: _voc_problem(root, problem))

    def image(path: Path) -> np.ndarray:
        return letterboxed(opened(path).convert("RGB"), VOC_SIDE, Image.Resampling.BILINEAR, (0, 0, 0))

    def label(path: Path) -> np.ndarray:
        classes = np.asarray(opened_label(path, image_of[path], lambda problem: _voc_problem(root, problem),
                                          "the official palette PNG of class indices"))
        unknown = sorted(set(np.unique(classes).tolist()) - {*range(VOC_CLASSES), IGNORE_INDEX})
        if unknown:
            raise _voc_problem(root, f"label {path} holds values {unknown[:5]}, which are neither a class "
                                     f"(0..{VOC_CLASSES - 1}) nor the border {IGNORE_INDEX}")
        return letterboxed(Image.fromarray(classes), VOC_SIDE, Image.Resampling.NEAREST, IGNORE_INDEX)

    return (decode_all(images, image, (VOC_SIDE, VOC_SIDE, 3)).transpose(0, 3, 1, 2),
            decode_all(labels, label, (VOC_SIDE, VOC_SIDE)))


def _read_voc2012(root: Path, download: bool) -> RawSplits:
    """Pascal VOC 2012 segmentation (Everingham et al., IJCV 2010): 1 464 training and 1 449 validation images with
    per-pixel labels of 20 object classes and background, 255 on object borders. Its test labels are not public, so
    exitbench's test split is the official *val* split and its validation split is carved from the training images
    (10 %, `SPLIT_SEED`), as for every dataset with an official test split. The first read caches the decoded
    pixels in <root>/voc2012.exitbench.npz (`folders.cached_arrays`)."""
    listed = _voc_files(root)
    folder = root / VOC_FOLDER
    sets = folder / "ImageSets" / "Segmentation"
    fingerprint = folder_fingerprint(f"v{VOC_CACHE_VERSION} side {VOC_SIDE}", folder,
                                     [sets / "train.txt", sets / "val.txt"],
                                     [path for split in ("train", "val") for files in listed[split] for path in files])
    return official_splits(root / "voc2012.exitbench.npz", fingerprint, listed,
                           lambda images, labels: _decode_pairs(root, images, labels))
