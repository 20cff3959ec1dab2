"""What the folder datasets a user brings with --data-root (TinyImageNet, Pascal VOC, Cityscapes) share: decoding
thousands of image files on threads, and caching the decoded arrays beside the folder.

The cache (<root>/<name>.exitbench.npz) is written atomically (a temporary file renamed into place) and read only
while its fingerprint — of the listing files and of every decoded file's name — matches the folder, so a folder
that changed is decoded again; a data root that is not writable only loses the cache.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from benchmark.errors import DataUnavailable


def folder_unavailable(dataset: str, problem: str, layout: str, fix: str) -> DataUnavailable:
    """The one-line error of a folder dataset that is missing or malformed: what is wrong, the layout expected,
    how to get the data — exitbench never downloads these."""
    return DataUnavailable(f"{dataset} {problem}: exitbench expects {layout}. Fix: {fix}. exitbench does not download "
                           "it, with or without --download.")


def decode_all(files: list[Path], decode: Callable[[Path], np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    """uint8 (len(files), *shape): `decode(path)` of every file, on threads (PIL decodes without the GIL)."""
    decoded = np.empty((len(files), *shape), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, array in enumerate(pool.map(decode, files)):
            decoded[i] = array
    return decoded


def folder_fingerprint(version: str, folder: Path, contents: Iterable[Path], names: Iterable[Path]) -> str:
    """sha256 of a cache version, the bytes of the `contents` files (the listings) and the names of the decoded
    files relative to `folder`."""
    digest = hashlib.sha256(version.encode())
    for path in contents:
        digest.update(path.read_bytes())
    for path in names:
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
    return digest.hexdigest()


def cached_arrays(cache: Path, fingerprint: str, decode: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The arrays stored in `cache` if it reads and carries `fingerprint`; else `decode()`'s, written to `cache`."""
    stored = _read_cache(cache, fingerprint)
    if stored is not None:
        return stored
    arrays = decode()
    _write_cache(cache, fingerprint, arrays)
    return arrays


def _read_cache(cache: Path, fingerprint: str) -> dict[str, np.ndarray] | None:
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as stored:
            if str(stored["fingerprint"]) != fingerprint:
                return None
            return {key: stored[key] for key in stored.files if key != "fingerprint"}
    except (OSError, ValueError, KeyError, EOFError):      # truncated or foreign file: decoded again
        return None


def _write_cache(cache: Path, fingerprint: str, arrays: dict[str, np.ndarray]) -> None:
    from benchmark.store import _atomic

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, fingerprint=np.asarray(fingerprint), **arrays)

    try:
        _atomic(cache, write)
    except OSError:
        pass        # a read-only data root: every read decodes again


def letterboxed(image, side: int, resample: int, fill: int | tuple[int, ...]) -> np.ndarray:
    """A PIL image scaled (aspect kept) so that its longer side is `side`, centred on a side x side canvas of
    `fill`: nothing cropped, nothing stretched; HxW(xC) uint8."""
    from PIL import Image

    width, height = image.size
    scale = side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image.resize(size, resample), ((side - size[0]) // 2, (side - size[1]) // 2))
    return np.asarray(canvas)


def opened_image(path: Path, problem: Callable[[str], Exception]):
    """The PIL image at `path`, decoded; a file PIL cannot decode raises `problem(...)` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(path)
        image.load()
    except (OSError, UnidentifiedImageError) as error:
        raise problem(f"file {path} cannot be decoded ({error})") from error
    return image


def opened_label(path: Path, image_path: Path, problem: Callable[[str], Exception], expected: str,
                 image_noun: str = "image"):
    """The label PNG at `path`, decoded: 8-bit class values ("L" or palette "P" mode, else `problem` names the
    `expected` file) of the same size as its image at `image_path`."""
    from PIL import Image

    label = opened_image(path, problem)
    if label.mode not in ("L", "P"):
        raise problem(f"label {path} is a {label.mode} image, not {expected}")
    with Image.open(image_path) as photo:
        if photo.size != label.size:
            raise problem(f"label {path} is {label.size[0]}x{label.size[1]} pixels but its {image_noun} is "
                          f"{photo.size[0]}x{photo.size[1]}")
    return label


def official_splits(cache: Path, fingerprint: str, listed: dict[str, tuple[list[Path], list[Path]]],
                    decode_pairs: Callable[[list[Path], list[Path]], tuple[np.ndarray, np.ndarray]]) -> tuple:
    """A segmentation folder's reader arrays (x_train, y_train, x_test, y_test): its official train split, and its
    official val split as test (their test labels are not public), decoded once and cached (`cached_arrays`)."""
    def decode() -> dict[str, np.ndarray]:
        (x_train, y_train), (x_test, y_test) = (decode_pairs(*listed[split]) for split in ("train", "val"))
        return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}

    arrays = cached_arrays(cache, fingerprint, decode)
    return arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]
