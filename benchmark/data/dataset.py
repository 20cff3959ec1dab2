"""The in-memory dataset: three splits as tensors (normalised float32, or raw 8-bit pixels normalised per batch) and
the batched augmentation of training batches."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import Tensor

AUGMENTATIONS = ("none", "crop", "crop+flip")
TASKS = ("classification", "segmentation")
IGNORE_INDEX = 255
"""A segmentation label that no loss or metric counts: object borders (Pascal VOC), void (Cityscapes), padding."""


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

    ``task`` "classification": ``y_*`` are int64 class indices (N,). "segmentation": ``y_*`` are per-pixel class
    indices (N, H, W), held as uint8 (a quarter of VOC's labels as int64 would be 0.8 GB) with ``IGNORE_INDEX``
    where no class counts; a loss casts its batch.
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
    task: str = "classification"  # one of TASKS

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, not {self.task!r}")
        if self.task == "segmentation":
            for split in SPLITS:
                x, y = self.stored(split), getattr(self, f"y_{split}")
                if self.kind != "image" or y.dtype != torch.uint8 or tuple(y.shape) != (len(x), *x.shape[2:]):
                    raise ValueError(f"segmentation labels must be uint8 (N, H, W) maps of (N, C, H, W) images; "
                                     f"split {split} has {self.kind} inputs {tuple(x.shape)} and labels "
                                     f"{tuple(y.shape)} {y.dtype}")
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
                f"crop_padding={self.crop_padding}, mean={self.mean}, std={self.std}, task={self.task!r})")

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

    def training_pair(self, index: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Segmentation: training rows ``index`` and their label maps, both cropped and mirrored alike (the labels'
        padding is ``IGNORE_INDEX``), the images normalised."""
        x, y = self.stored("train")[index], self.y_train[index]
        if self.augmentation == "none":
            return self.normalise(x), y
        top, left, flip = self._crop_draws(len(x), generator)
        moved = [t.to(x.device) for t in (top, left, flip)]
        ignore = torch.full((1,), IGNORE_INDEX, dtype=y.dtype, device=y.device)
        return (self.normalise(crop_and_flip(x, *moved, self.crop_padding, self._black(x))),
                crop_and_flip(y[:, None], *moved, self.crop_padding, ignore)[:, 0])

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
        top, left, flip = self._crop_draws(len(x), generator)
        return crop_and_flip(x, top.to(x.device), left.to(x.device), flip.to(x.device), self.crop_padding,
                             self._black(x))

    def _crop_draws(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row crop offsets and mirror flags, drawn from ``generator`` in a fixed order: top, left, flip."""
        span = 2 * self.crop_padding + 1
        top = torch.randint(0, span, (n,), generator=generator)
        left = torch.randint(0, span, (n,), generator=generator)
        if self.augmentation == "crop+flip":
            flip = torch.rand(n, generator=generator) < 0.5
        else:
            flip = torch.zeros(n, dtype=torch.bool)
        return top, left, flip

    def _black(self, x: Tensor) -> Tensor:
        """The per-channel padding of a crop of ``x``, as ``x`` holds values: raw 0 or the normalised black."""
        if x.dtype == torch.uint8:
            return torch.zeros(len(self.mean), dtype=torch.uint8, device=x.device)
        return (-torch.tensor(self.mean) / torch.tensor(self.std)).to(x.device)

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
