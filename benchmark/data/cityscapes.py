"""Cityscapes semantic segmentation (fine annotations), read from --data-root in the official layout, its decoded
pixels cached beside it."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmark.data.build import RawSplits
from benchmark.data.dataset import IGNORE_INDEX
from benchmark.data.folders import (decode_all, folder_fingerprint, folder_unavailable, official_splits, opened_image,
                                    opened_label)
from benchmark.errors import DataUnavailable

CITYSCAPES_URL = "https://www.cityscapes-dataset.com/downloads/"
CITYSCAPES_SIZE = (256, 512)
"""(H, W): the 1024x2048 frames at a quarter of their side (pixels bilinear, labels nearest), so that the 3 475
labelled frames fit in memory as one tensor."""
TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12, 26: 13,
             27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
"""labelId -> trainId of the 19 evaluated classes (cityscapesScripts' labels.py: road, sidewalk, building, wall,
fence, pole, traffic light, traffic sign, vegetation, terrain, sky, person, rider, car, truck, bus, train,
motorcycle, bicycle); every other labelId (void, unlabelled, the classes ignored in evaluation) is IGNORE_INDEX."""
CITYSCAPES_CLASSES = len(TRAIN_IDS)
CITYSCAPES_LAYOUT = (
    "{root}/leftImg8bit/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png with "
    "{root}/gtFine/<split>/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png for the splits train and val: the layout "
    "of the official leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip"
)
CITYSCAPES_CACHE_VERSION = 1


def _cityscapes_problem(root: Path, problem: str) -> DataUnavailable:
    return folder_unavailable("Cityscapes", problem, CITYSCAPES_LAYOUT.format(root=root),
                              f"download leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from "
                              f"{CITYSCAPES_URL} (an account is needed) and unzip both into {root}")


def _cityscapes_files(root: Path) -> dict[str, tuple[list[Path], list[Path]]]:
    """The layout checked and listed: split ("train", "val") -> (frames, their labelIds files), sorted by path."""
    listed = {}
    for split in ("train", "val"):
        frames_folder = root / "leftImg8bit" / split
        if not frames_folder.is_dir():
            raise _cityscapes_problem(root, f"folder {frames_folder} does not exist")
        frames = sorted(frames_folder.glob("*/*_leftImg8bit.png"))
        if not frames:
            raise _cityscapes_problem(root, f"folder {frames_folder} holds no <city>/*_leftImg8bit.png frames")
        labels = [root / "gtFine" / split / frame.parent.name /
                  frame.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png") for frame in frames]
        missing = next((label for label in labels if not label.is_file()), None)
        if missing is not None:
            raise _cityscapes_problem(root, f"label file {missing} is missing")
        listed[split] = (frames, labels)
    return listed


def _decode_pairs(root: Path, frames: list[Path], labels: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """uint8 frames (N, 3, H, W) and trainId maps (N, H, W) at `CITYSCAPES_SIZE`."""
    from PIL import Image

    height, width = CITYSCAPES_SIZE
    train_id = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    train_id[list(TRAIN_IDS)] = list(TRAIN_IDS.values())
    frame_of = dict(zip(labels, frames))

    def problem(text: str) -> Exception:
        return _cityscapes_problem(root, text)

    def twice_as_wide(image, path: Path):
        if image.size[0] != 2 * image.size[1]:
            raise problem(f"file {path} is {image.size[0]}x{image.size[1]} pixels; Cityscapes frames are twice as "
                          "wide as high (2048x1024)")
        return image

    def frame(path: Path) -> np.ndarray:
        image = twice_as_wide(opened_image(path, problem), path)
        return np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.BILINEAR))

    def label(path: Path) -> np.ndarray:
        ids = twice_as_wide(opened_label(path, frame_of[path], problem, "the 8-bit labelIds PNG", "frame"), path)
        return train_id[np.asarray(ids.resize((width, height), Image.Resampling.NEAREST))]

    return (decode_all(frames, frame, (height, width, 3)).transpose(0, 3, 1, 2),
            decode_all(labels, label, (height, width)))


def _read_cityscapes(root: Path, download: bool) -> RawSplits:
    """Cityscapes (Cordts et al., CVPR 2016), fine annotations: 2 975 training and 500 validation frames of 50
    cities, the 19 evaluated classes as trainIds, everything else IGNORE_INDEX. Its test labels are not public, so
    exitbench's test split is the official *val* split and its validation split is carved from the training frames
    (10 %, `SPLIT_SEED`). The first read caches the decoded pixels in <root>/cityscapes.exitbench.npz
    (`folders.cached_arrays`)."""
    listed = _cityscapes_files(root)
    fingerprint = folder_fingerprint(f"v{CITYSCAPES_CACHE_VERSION} size {CITYSCAPES_SIZE}", root, [],
                                     [path for split in ("train", "val") for files in listed[split] for path in files])

    return official_splits(root / "cityscapes.exitbench.npz", fingerprint, listed,
                           lambda frames, labels: _decode_pairs(root, frames, labels))
