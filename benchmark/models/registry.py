"""Backbone registry (timm-style ``@register_arch``), exit placement, and ``build_model``.

A family module registers a builder that returns the backbone already cut into blocks (stem merged into
block 0) plus its own classifier; ``build_model`` then places heads after the chosen blocks. Exits asked for
as fractions of the backbone's FLOPs land on block boundaries; ``exit_placement`` reports where they landed
and ``exit_placement_warnings`` says where that is further than ``EXIT_TOLERANCE`` from what was asked.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn

from benchmark.errors import UnknownName, UserError
from benchmark.flops import FlopsProfile, profile_flops
from benchmark.models.heads import make_head, resolve_head_kind
from benchmark.models.multi_exit import MultiExitNet

DEFAULT_EXITS = "flops:0.25,0.5,0.75"
INPUT_RANKS = {"image": 3, "series": 2}  # (C, H, W) and (C, L), batch dimension excluded
SMALL_IMAGE_MAX_SIDE = 64  # up to here (CIFAR, TinyImageNet, MNIST, digits) backbones get small-image stems
# An exit asked for at fraction f of the backbone's FLOPs should end up within f +- this: otherwise a metric like
# "accuracy at 25 % FLOPs" reads an exit that sits elsewhere, or none.
EXIT_TOLERANCE = 0.05


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
    multi_scale: bool  # blocks pass a list of feature maps, finest scale first (MSDNet), rather than one
    build: BackboneBuilder
    task: str = "classification"  # the datasets' task it predicts (benchmark.data.TASKS)

    @property
    def has_pretrained_weights(self) -> bool:
        return self.source in ("torchvision", "timm")


_ARCHS: dict[str, ArchSpec] = {}


def register_arch(
    name: str, *, family: str, source: str, description: str,
    cpu_sized: bool = False, input_kind: str = "image", tokens: bool = False, multi_scale: bool = False,
    task: str = "classification",
) -> Callable[[BackboneBuilder], BackboneBuilder]:
    def register(build: BackboneBuilder) -> BackboneBuilder:
        if name in _ARCHS:
            raise ValueError(f"arch '{name}' is registered twice")
        _ARCHS[name] = ArchSpec(name, family, source, description, cpu_sized, input_kind, tokens, multi_scale, build,
                                task)
        return build
    return register


def arch_names() -> list[str]:
    return sorted(_ARCHS)


def arch_input_kind(arch: str) -> str:
    """"image" or "series": which datasets this arch can take."""
    if arch not in _ARCHS:
        raise UnknownName("arch", arch, _ARCHS)
    return _ARCHS[arch].input_kind


def arch_task(arch: str) -> str:
    """"classification" or "segmentation": which datasets' labels this arch predicts."""
    if arch not in _ARCHS:
        raise UnknownName("arch", arch, _ARCHS)
    return _ARCHS[arch].task


def arch_table() -> list[dict]:
    """One row per architecture (for ``bench list``), from the registration alone: nothing is built, so listing
    imports neither torchvision nor timm (a block count would need every backbone built)."""
    return [
        {"name": s.name, "family": s.family, "source": s.source, "input": s.input_kind, "task": s.task,
         "cpu_sized": s.cpu_sized, "description": s.description}
        for s in (_ARCHS[n] for n in arch_names())
    ]


def _build_on_meta(spec: ArchSpec, num_classes: int, input_shape: tuple[int, ...]) -> Backbone:
    """The backbone without weights, for counting blocks and FLOPs; counting must not move a seeded run's RNG."""
    with torch.random.fork_rng(), torch.device("meta"):
        return spec.build(num_classes=num_classes, input_shape=input_shape, pretrained=False)


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
    spec, input_shape = _checked_spec(arch, input_shape)
    head_kind = resolve_head_kind(head, spec.tokens, arch, multi_scale=spec.multi_scale, task=spec.task)
    if pretrained and not spec.has_pretrained_weights:
        raise UserError(f"{arch} is defined by exitbench and has no pretrained weights; use pretrained=False")

    backbone = _build_backbone(spec, num_classes, input_shape, pretrained)
    profile = _meta_profile(spec.name, int(num_classes), input_shape)     # what exit_placement counts, counted once
    exit_blocks = place_exits(exits, profile.blocks, profile.classifier)
    heads = [make_head(head_kind, profile.block_output_shapes[b], num_classes, input_shape) for b in exit_blocks]
    return MultiExitNet(backbone.blocks, backbone.classifier, heads, exit_blocks, multi_scale=spec.multi_scale)


def _checked_spec(arch: str, input_shape: Sequence[int]) -> tuple[ArchSpec, tuple[int, ...]]:
    if arch not in _ARCHS:
        raise UnknownName("arch", arch, _ARCHS)
    spec = _ARCHS[arch]
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != INPUT_RANKS[spec.input_kind]:
        raise UserError(f"{arch} takes {spec.input_kind} inputs of rank {INPUT_RANKS[spec.input_kind]} "
                        f"(channels first, no batch dimension); got input shape {input_shape}")
    return spec, input_shape


def _profile_backbone(spec: ArchSpec, backbone: Backbone, input_shape: tuple[int, ...]) -> FlopsProfile:
    try:
        return profile_flops(MultiExitNet(backbone.blocks, backbone.classifier), input_shape)
    except RuntimeError as err:  # e.g. a map pooled below 1x1: the input is too small for this backbone
        raise UserError(f"{spec.name} cannot take inputs of shape {input_shape}: {err}") from err


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


@dataclass(frozen=True)
class ExitPlacement:
    """Where one internal exit sits: after ``block``, at ``achieved`` of the backbone's FLOPs.

    ``achieved`` is the FLOPs of blocks 0..``block`` over those of all blocks plus the classifier. ``targets``
    are the fractions of a ``"flops:..."`` spec that snapped to this block: two or more means exits were
    merged; none means exits were given as block indices or ``"all"``.
    """

    block: int
    achieved: float
    targets: tuple[float, ...] = ()

    @property
    def target(self) -> float:
        """The asked-for fraction closest to the achieved one; NaN for exits given as indices or "all"."""
        return min(self.targets, key=lambda t: abs(t - self.achieved), default=math.nan)

    @property
    def within_tolerance(self) -> bool:
        """Every fraction asked of this exit is within EXIT_TOLERANCE of the achieved one (exits given as indices
        ask for none)."""
        return all(abs(t - self.achieved) <= EXIT_TOLERANCE for t in self.targets)


def exit_placement(arch: str, num_classes: int, input_shape: Sequence[int],
                   exits: str | Sequence[int]) -> list[ExitPlacement]:
    """Where ``build_model(arch, num_classes, input_shape, exits=exits)`` puts its internal exits, without building it.

    Counted on a weightless copy of the backbone (cached per arch, classes and shape), so it is cheap and leaves
    the global RNG where it was. Heads do not move exits, so the head type is not an argument.
    """
    spec, input_shape = _checked_spec(arch, input_shape)
    profile = _meta_profile(spec.name, int(num_classes), input_shape)
    return placements_from_flops(exits, profile.blocks, profile.classifier)


def exit_placement_warnings(arch: str, num_classes: int, input_shape: Sequence[int],
                            exits: str | Sequence[int]) -> list[str]:
    """One sentence per asked-for FLOPs fraction that ``arch`` misses by more than EXIT_TOLERANCE, and per block
    that several fractions snapped to (the model then has fewer exits than asked); empty when all is as asked."""
    spec, input_shape = _checked_spec(arch, input_shape)
    profile = _meta_profile(spec.name, int(num_classes), input_shape)
    placements = placements_from_flops(exits, profile.blocks, profile.classifier)
    return placement_warnings(placements, arch, len(profile.blocks))


@functools.cache
def _meta_profile(arch: str, num_classes: int, input_shape: tuple[int, ...]) -> FlopsProfile:
    spec = _ARCHS[arch]
    return _profile_backbone(spec, _build_on_meta(spec, num_classes, input_shape), input_shape)


def placement_warnings(placements: Sequence[ExitPlacement], backbone: str, num_blocks: int) -> list[str]:
    """``exit_placement_warnings`` for placements already computed; ``backbone`` names the net in the sentences."""
    warnings = []
    for p in placements:
        if len(p.targets) > 1:
            asked = ", ".join(_percent(t) for t in p.targets)
            warnings.append(f"{backbone}: the exits asked at {asked} of the backbone's FLOPs all go after block "
                            f"{p.block} (at {p.achieved:.1%}): the model has {len(p.targets) - 1} internal exit(s) "
                            f"fewer than asked")
        warnings.extend(
            f"{backbone}: the exit asked at {_percent(t)} of the backbone's FLOPs sits at {p.achieved:.1%} (after "
            f"block {p.block}): no block but the last ends within ±{EXIT_TOLERANCE * 100:g} points of {_percent(t)}, "
            f"and {backbone} cannot be cut finer than its {num_blocks} blocks; ask for other fractions or for a "
            f"backbone cut into more blocks"
            for t in p.targets if abs(t - p.achieved) > EXIT_TOLERANCE
        )
    return warnings


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


def place_exits(exits: str | Sequence[int], block_flops: Sequence[float], classifier_flops: float) -> list[int]:
    """Block indices to put internal heads after, in increasing order; never the last block (the classifier's)."""
    return [p.block for p in placements_from_flops(exits, block_flops, classifier_flops)]


def placements_from_flops(exits: str | Sequence[int], block_flops: Sequence[float],
                    classifier_flops: float) -> list[ExitPlacement]:
    """The internal exits ``exits`` asks for, in block order, given each block's FLOPs and the classifier's.

    A fraction f of ``"flops:f1,f2,..."`` goes after the last block whose cumulative FLOPs (over all blocks plus
    the classifier) is at most f, if that block is within EXIT_TOLERANCE of f — so an exit asked for at 25 % is
    usable at a 25 % budget (accuracy_at_25pct) — and otherwise after the block closest to f. Fractions that pick
    the same block share one exit.
    """
    candidates = range(len(block_flops) - 1)
    cumulative = list(accumulate(block_flops))
    total = cumulative[-1] + classifier_flops
    targets_at: dict[int, tuple[float, ...]]
    if isinstance(exits, str) and exits.startswith("flops:"):
        fractions = _parse_fractions(exits)
        if not candidates:
            raise UserError(f"exits '{exits}': a backbone of one block has no place for an internal head")
        targets_at = {}
        for f in sorted(fractions):
            below = [i for i in candidates if f - EXIT_TOLERANCE <= cumulative[i] / total <= f]
            block = below[-1] if below else min(candidates, key=lambda i: abs(cumulative[i] - f * total))
            targets_at[block] = (*targets_at.get(block, ()), f)
    else:
        targets_at = {block: () for block in _listed_blocks(exits, len(block_flops))}
    return [ExitPlacement(block, cumulative[block] / total, targets_at[block]) for block in sorted(targets_at)]


def _listed_blocks(exits: str | Sequence[int], num_blocks: int) -> list[int]:
    """The blocks of ``"all"`` or of a list of block indices, checked."""
    candidates = range(num_blocks - 1)
    if isinstance(exits, str):
        if exits == "all":
            return list(candidates)
        raise UserError(f"exits must be 'all', 'flops:f1,f2,...' (fractions in (0, 1)) or a list of block "
                        f"indices; got '{exits}'")
    indices = list(exits)
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in indices):
        raise UserError(f"exit block indices must be integers; got {indices}")
    indices = [int(i) for i in indices]
    if len(set(indices)) != len(indices):
        raise UserError(f"exit block indices repeat: {indices}")
    if any(i not in candidates for i in indices):
        raise UserError(f"exit block indices must lie in [0, {num_blocks - 2}] for a backbone of "
                        f"{num_blocks} blocks (the last block feeds the classifier); got {indices}")
    return indices


def _parse_fractions(exits: str) -> list[float]:
    try:
        fractions = [float(f) for f in exits.removeprefix("flops:").split(",")]
    except ValueError:
        fractions = []
    if not fractions or not all(0 < f < 1 for f in fractions):
        raise UserError(f"exits '{exits}': expected 'flops:' followed by comma-separated fractions in (0, 1), "
                        "e.g. 'flops:0.25,0.5,0.75'")
    return fractions
