"""Backbone registry (timm-style ``@register_arch``), exit placement, and ``build_model``.

A family module registers a builder that returns the backbone already cut into blocks (stem merged into
block 0) plus its own classifier; ``build_model`` then places heads after the chosen blocks.
"""

from __future__ import annotations

import functools
import numbers
import os
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from benchmark.errors import UnknownName, UserError
from benchmark.flops import profile_flops
from benchmark.models.heads import make_head, resolve_head_kind
from benchmark.models.multi_exit import MultiExitNet

DEFAULT_EXITS = "flops:0.25,0.5,0.75"
INPUT_RANKS = {"image": 3, "series": 2}  # (C, H, W) and (C, L), batch dimension excluded
_TABLE_INPUT = {"image": (3, 32, 32), "series": (6, 100)}  # the shapes arch_table builds at to count blocks
SMALL_IMAGE_MAX_SIDE = 64  # up to here (CIFAR, TinyImageNet, MNIST, digits) backbones get small-image stems


def is_small_image(input_shape: tuple[int, ...]) -> bool:
    return max(input_shape[1:]) <= SMALL_IMAGE_MAX_SIDE


class Backbone(NamedTuple):
    blocks: list[nn.Module]
    classifier: nn.Module


BackboneBuilder = Callable[..., Backbone]  # (num_classes, input_shape, pretrained) -> Backbone


@dataclass(frozen=True)
class ArchSpec:
    name: str
    family: str
    source: str  # torchvision | timm | exitbench
    description: str
    cpu_sized: bool  # cheap enough for the CPU grids (smoke, quick)
    input_kind: str  # "image" or "series"
    tokens: bool  # blocks pass (B, N, D) token sequences (ViT) rather than feature maps
    build: BackboneBuilder

    @property
    def has_pretrained_weights(self) -> bool:
        return self.source in ("torchvision", "timm")


_ARCHS: dict[str, ArchSpec] = {}


def register_arch(
    name: str, *, family: str, source: str, description: str,
    cpu_sized: bool = False, input_kind: str = "image", tokens: bool = False,
) -> Callable[[BackboneBuilder], BackboneBuilder]:
    def register(build: BackboneBuilder) -> BackboneBuilder:
        if name in _ARCHS:
            raise ValueError(f"arch '{name}' is registered twice")
        _ARCHS[name] = ArchSpec(name, family, source, description, cpu_sized, input_kind, tokens, build)
        return build
    return register


def arch_names() -> list[str]:
    return sorted(_ARCHS)


def arch_input_kind(arch: str) -> str:
    """"image" or "series": which datasets this arch can take."""
    if arch not in _ARCHS:
        raise UnknownName("arch", arch, _ARCHS)
    return _ARCHS[arch].input_kind


def arch_table() -> list[dict]:
    """One row per architecture (for ``bench list``); block counts come from building each on the meta device."""
    return [
        {"name": s.name, "family": s.family, "source": s.source, "input": s.input_kind,
         "blocks": _block_count(s.name), "cpu_sized": s.cpu_sized, "description": s.description}
        for s in (_ARCHS[n] for n in arch_names())
    ]


@functools.cache
def _block_count(arch: str) -> int:
    spec = _ARCHS[arch]
    with torch.random.fork_rng(), torch.device("meta"):  # a listing must not move a seeded run's RNG
        return len(spec.build(num_classes=10, input_shape=_TABLE_INPUT[spec.input_kind], pretrained=False).blocks)


def build_model(
    arch: str,
    num_classes: int,
    input_shape: Sequence[int],
    head: str = "auto",
    exits: str | Sequence[int] = DEFAULT_EXITS,
    pretrained: bool = False,
) -> MultiExitNet:
    """A multi-exit network: the backbone ``arch`` cut into blocks, a ``head`` after each block ``exits`` names.

    Deterministic given the global RNG: the backbone is initialised first, then the heads in exit order.
    ``exits``: a list of block indices; ``"flops:f1,f2,..."``, a head after the block whose cumulative
    FLOPs is closest to each fraction of the backbone's FLOPs (duplicates merged); or ``"all"``.
    """
    if arch not in _ARCHS:
        raise UnknownName("arch", arch, _ARCHS)
    spec = _ARCHS[arch]
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != INPUT_RANKS[spec.input_kind]:
        raise UserError(f"{arch} takes {spec.input_kind} inputs of rank {INPUT_RANKS[spec.input_kind]} "
                        f"(channels first, no batch dimension); got input shape {input_shape}")
    head_kind = resolve_head_kind(head, spec.tokens, arch)
    if pretrained and not spec.has_pretrained_weights:
        raise UserError(f"{arch} is defined by exitbench and has no pretrained weights; use pretrained=False")

    backbone = _build_backbone(spec, num_classes, input_shape, pretrained)
    bare = MultiExitNet(backbone.blocks, backbone.classifier)
    try:
        profile = profile_flops(bare, input_shape)
    except RuntimeError as err:  # e.g. a map pooled below 1x1: the input is too small for this backbone
        raise UserError(f"{arch} cannot take inputs of shape {input_shape}: {err}") from err
    exit_blocks = place_exits(exits, profile.blocks, profile.classifier)
    heads = [make_head(head_kind, profile.block_output_shapes[b], num_classes) for b in exit_blocks]
    return MultiExitNet(backbone.blocks, backbone.classifier, heads, exit_blocks)


def _build_backbone(spec: ArchSpec, num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> Backbone:
    """Build, translating a failed weight download into a UserError that names the likely offline cause."""
    try:
        return spec.build(num_classes=num_classes, input_shape=input_shape, pretrained=pretrained)
    except OSError as err:  # urllib's URLError (torchvision), huggingface_hub's LocalEntryNotFoundError (timm)
        if not pretrained:
            raise
        offline = ("HF_HUB_OFFLINE=1 is set, so the Hugging Face Hub was not asked"
                   if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
                   else "the machine looks offline")
        raise UserError(
            f"could not load pretrained {spec.source} weights for {spec.name}: {offline} and the weights are not "
            f"in the local cache ({type(err).__name__}: {err}). Fetch them once on a machine with internet "
            f"(they are cached under TORCH_HOME / HF_HOME), or use pretrained=False."
        ) from err


def place_exits(exits: str | Sequence[int], block_flops: Sequence[float], classifier_flops: float) -> list[int]:
    """Block indices to put internal heads after, in increasing order; never the last block (the classifier's)."""
    candidates = range(len(block_flops) - 1)
    if isinstance(exits, str):
        if exits == "all":
            return list(candidates)
        if exits.startswith("flops:"):
            fractions = _parse_fractions(exits)
            if not candidates:
                raise UserError(f"exits '{exits}': a backbone of one block has no place for an internal head")
            cumulative = list(accumulate(block_flops))
            total = cumulative[-1] + classifier_flops
            return sorted({min(candidates, key=lambda i: abs(cumulative[i] - f * total)) for f in fractions})
        raise UserError(f"exits must be 'all', 'flops:f1,f2,...' (fractions in (0, 1)) or a list of block "
                        f"indices; got '{exits}'")
    indices = list(exits)
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in indices):
        raise UserError(f"exit block indices must be integers; got {indices}")
    indices = [int(i) for i in indices]
    if len(set(indices)) != len(indices):
        raise UserError(f"exit block indices repeat: {indices}")
    if any(i not in candidates for i in indices):
        raise UserError(f"exit block indices must lie in [0, {len(block_flops) - 2}] for a backbone of "
                        f"{len(block_flops)} blocks (the last block feeds the classifier); got {indices}")
    return sorted(indices)


def _parse_fractions(exits: str) -> list[float]:
    try:
        fractions = [float(f) for f in exits.removeprefix("flops:").split(",")]
    except ValueError:
        fractions = []
    if not fractions or not all(0 < f < 1 for f in fractions):
        raise UserError(f"exits '{exits}': expected 'flops:' followed by comma-separated fractions in (0, 1), "
                        "e.g. 'flops:0.25,0.5,0.75'")
    return fractions
