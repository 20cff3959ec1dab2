"""Per-sample FLOPs of a multi-exit network's blocks, heads and classifier, and the cost of leaving at each exit.

Counted with ``torch.utils.flop_counter.FlopCounterMode``: **1 multiply-add = 2 FLOPs** (a conv or linear
layer with M multiply-adds counts 2M); bilinear upsampling counts its 4 multiply-adds per output value (a
segmentation exit upsamples its logits to the input's size: issue 23); BatchNorm, activations, pooling, additions
and biases count 0.
Numbers are per sample (batch 1), in eval mode, on a copy of the model on the meta device: only shapes
matter, the model itself is not touched, and attention is counted (on CPU, PyTorch's fused
scaled-dot-product attention escapes the counter: a ViT-Tiny at 32 px reads 0.69 GFLOPs there instead of 0.73).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from itertools import accumulate
from typing import TYPE_CHECKING

import torch
from torch.utils.flop_counter import FlopCounterMode, conv_flop_count

if TYPE_CHECKING:
    from benchmark.models.multi_exit import MultiExitNet


def convolution_backward_flops(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation, transposed,
                               _output_padding, _groups, output_mask, out_shape=None, **_) -> int:
    """Each gradient of a convolution (of its input, of its weight) costs what its forward costs.

    PyTorch's own formula (torch 2.14) ignores `groups` in the backward, so a depthwise conv's backward reads C times
    its true cost (MobileNetV2: 3.9 GFLOPs per training example for a 0.18 GFLOPs forward); the forward formula is
    right, since the weight's shape already holds in_channels / groups. Equal to PyTorch's for groups = 1."""
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed)
    return forward * (int(bool(output_mask[0])) + int(bool(output_mask[1])))


def without_batch_norm(module: torch.nn.Module) -> torch.nn.Module:
    """`module` with every batch-norm layer replaced by the identity, in place — for meta-device copies that only
    count FLOPs: the counter gives batch norm 0 FLOPs (above) and it keeps shapes, but on the meta device its
    decomposition runs in Python, ~40 % of the time counting the full grid's FLOPs took."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.modules.batchnorm._BatchNorm):
            setattr(module, name, torch.nn.Identity())
        else:
            without_batch_norm(child)
    return module


def bilinear_upsampling_flops(*_, out_shape=None, **__) -> int:
    """Each output value of a bilinear upsampling is a weighted sum of 4 inputs: 4 multiply-adds (PyTorch counts 0)."""
    return 2 * 4 * math.prod(out_shape)


def bilinear_upsampling_backward_flops(grad_out_shape, *_, **__) -> int:
    """The backward spreads each output gradient over its 4 inputs: what the forward costs."""
    return 2 * 4 * math.prod(grad_out_shape)


def counting_flops() -> FlopCounterMode:
    """The FLOP counter of every FLOPs number: PyTorch's, with the grouped-convolution backward corrected and bilinear
    upsampling counted."""
    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten.convolution_backward: convolution_backward_flops,
        torch.ops.aten.upsample_bilinear2d: bilinear_upsampling_flops,
        torch.ops.aten.upsample_bilinear2d_backward: bilinear_upsampling_backward_flops})


@dataclass(frozen=True)
class FlopsProfile:
    """Per-sample FLOPs of every part of a network, and the hidden-state shape after every block.

    A block's shape is without the batch dimension; where the hidden state is a list of multi-scale feature maps
    (MSDNet) it is a tuple of such shapes, one per scale, finest first.
    """

    blocks: list[float]
    heads: list[float]
    classifier: float
    block_output_shapes: list[tuple[int, ...] | tuple[tuple[int, ...], ...]]


def profile_flops(model: MultiExitNet, input_shape: tuple[int, ...]) -> FlopsProfile:
    """Run one sample through a meta-device copy of ``model``, counting each block, head and the classifier.

    Works on a network without heads too, which is how exit placement by FLOPs sees the bare backbone. Counted with
    deterministic algorithms off: under them (every run turns them on) a meta-device bilinear upsampling decomposes
    into indexing and elementwise ops the counter does not see, and a segmentation exit's upsampling read 0 FLOPs;
    on the meta device nothing is computed, so the flag changes nothing else.
    """
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(False)
    try:
        return _profile(model, input_shape)
    finally:
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


def _profile(model: MultiExitNet, input_shape: tuple[int, ...]) -> FlopsProfile:
    shadow = without_batch_norm(copy.deepcopy(model).to("meta").eval())
    head_at = dict(zip(shadow.exit_blocks, shadow.heads))
    blocks, heads, shapes, outputs = [], [], [], []
    x = torch.zeros((1, *input_shape), device="meta")
    with torch.no_grad():
        for i, block in enumerate(shadow.blocks):
            x, flops = _counted(block, x)
            blocks.append(flops)
            shapes.append(hidden_shape(x))
            if i in head_at:
                logits, flops = _counted(head_at[i], x)
                heads.append(flops)
                outputs.append(logits)
        logits, classifier = _counted(shadow.classifier, x)
        if shadow.combiner is not None:             # its work at exit k is charged to head k (ztw's cascades)
            combining = _combiner_flops(shadow.combiner, [*outputs, logits])
            heads = [h + c for h, c in zip(heads, combining)]
            classifier += combining[-1]
    return FlopsProfile(blocks, heads, classifier, shapes)


def _combiner_flops(combiner: torch.nn.Module, head_logits: list[torch.Tensor]) -> list[float]:
    """FLOPs of an exit combiner's step at each exit, fed the heads' logits in order."""
    flops, state = [], None
    for k, logits in enumerate(head_logits):
        with counting_flops() as counter:
            _, state = combiner.step(k, logits, state)
        flops.append(float(counter.get_total_flops()))
    return flops


def hidden_shape(hidden: torch.Tensor | list[torch.Tensor]) -> tuple[int, ...] | tuple[tuple[int, ...], ...]:
    """The shape of a hidden state without the batch dimension; of a list of scales, the tuple of their shapes."""
    if isinstance(hidden, torch.Tensor):
        return tuple(hidden.shape[1:])
    return tuple(tuple(scale.shape[1:]) for scale in hidden)


def _counted(module: torch.nn.Module,
             x: torch.Tensor | list[torch.Tensor]) -> tuple[torch.Tensor | list[torch.Tensor], float]:
    with counting_flops() as counter:
        out = module(x)
    return out, float(counter.get_total_flops())


def block_flops(model: MultiExitNet, input_shape: tuple[int, ...]) -> list[float]:
    """FLOPs of each block, per sample (2 FLOPs per multiply-add)."""
    return profile_flops(model, input_shape).blocks


def head_flops(model: MultiExitNet, input_shape: tuple[int, ...]) -> list[float]:
    """FLOPs of each internal head, per sample (2 FLOPs per multiply-add)."""
    return profile_flops(model, input_shape).heads


def classifier_flops(model: MultiExitNet, input_shape: tuple[int, ...]) -> float:
    """FLOPs of the backbone's own classifier (the last exit), per sample (2 FLOPs per multiply-add)."""
    return profile_flops(model, input_shape).classifier


def backbone_flops(model: MultiExitNet, input_shape: tuple[int, ...]) -> float:
    """All blocks + classifier, no heads: the 100 % reference of budgets like "accuracy at 50 % FLOPs"."""
    profile = profile_flops(model, input_shape)
    return sum(profile.blocks) + profile.classifier


def exit_costs(model: MultiExitNet, input_shape: tuple[int, ...]) -> list[float]:
    """Per-sample cost of a sample leaving at each exit (2 FLOPs per multiply-add).

    Leaving at internal exit k costs the blocks up to exit k's block plus every head up to and including
    head k: the earlier heads were evaluated too, and declined. The last exit costs all blocks, all
    internal heads and the classifier.
    """
    return exit_costs_of(profile_flops(model, input_shape), model.exit_blocks)


def exit_costs_of(profile: FlopsProfile, exit_blocks: list[int]) -> list[float]:
    """`exit_costs` from an existing profile (callers that need several numbers profile once)."""
    blocks_so_far = list(accumulate(profile.blocks))
    heads_so_far = list(accumulate(profile.heads))
    internal = [blocks_so_far[b] + heads_so_far[k] for k, b in enumerate(exit_blocks)]
    return [*internal, blocks_so_far[-1] + sum(profile.heads) + profile.classifier]
