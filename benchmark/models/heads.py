"""Internal exit heads. The head type is a grid axis: ``pool`` (SDN), ``conv``, ``cls`` (ViT CLS token) and
``msdnet`` (MSDNet's own classifier) for classification; ``seg_linear`` and ``seg_aspp`` for segmentation.

Conv heads read feature maps (B, C, H, W) or, for series backbones, (B, C, L); the ``cls`` head reads
token sequences (B, N, D) whose first token is the class token; the ``msdnet`` head reads the list of
multi-scale feature maps a multi-scale backbone (MSDNet) passes between blocks, and uses its coarsest scale.

Segmentation heads (issue 23) read feature maps and output logits (B, C, H, W) at the input's size, so every exit
predicts every pixel:
- ``seg_linear``: a 1x1 convolution to the classes, bilinear upsampling — the lightest head, an FCN-32s-style
  readout of the block's features;
- ``seg_aspp``: a small atrous spatial pyramid (Chen et al., DeepLabV3 2017; the exit heads of MESS networks,
  Kouris et al. 2022, are searched among such): a 1x1 branch, three 3x3 branches dilated 1, 2 and 3, and an
  image-pooling branch, concatenated, projected by a 1x1 convolution, then a 1x1 convolution to the classes and
  bilinear upsampling.
Bilinear upsampling costs 4 multiply-adds per output value (`benchmark.flops` counts it), so an exit is charged for
producing a full-resolution map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.errors import UnknownName, UserError
from benchmark.models.pooling import pool_to

HEAD_KINDS = ("pool", "conv", "cls", "msdnet")
SEG_HEAD_KINDS = ("seg_linear", "seg_aspp")
POOLED_SIZE = 4  # SDN pools every internal feature map to 4x4 before its linear layer
MSDNET_HEAD_WIDTH = 128  # channels of both convolutions of MSDNet's CIFAR classifier


class PoolHead(nn.Module):
    """SDN's internal classifier (Kaya et al., ICML 2019): alpha * maxpool + (1 - alpha) * avgpool, then linear.

    The map is pooled to 4x4 (4 for series), or kept at its size where it is already smaller. alpha is
    learnable, unconstrained and initialised uniformly in [0, 1), as in the SDN code.
    """

    def __init__(self, channels: int, spatial: tuple[int, ...], num_classes: int):
        super().__init__()
        self.pooled = tuple(min(POOLED_SIZE, s) for s in spatial)
        self.alpha = nn.Parameter(torch.rand(1))
        self.linear = nn.Linear(channels * math.prod(self.pooled), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maxed, averaged = pool_to(x, self.pooled, "max"), pool_to(x, self.pooled, "avg")
        mixed = self.alpha * maxed + (1 - self.alpha) * averaged
        return self.linear(mixed.flatten(1))


class ConvHead(nn.Sequential):
    """conv3x3 (same width) + BN + ReLU, global average pool, linear: a head with a little depth of its own."""

    def __init__(self, channels: int, spatial: tuple[int, ...], num_classes: int):
        conv, norm, pool = (
            (nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d) if len(spatial) == 2
            else (nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d)
        )
        super().__init__(
            conv(channels, channels, 3, padding=1, bias=False),
            norm(channels),
            nn.ReLU(inplace=True),
            pool(1),
            nn.Flatten(1),
            nn.Linear(channels, num_classes),
        )


class ClsTokenHead(nn.Module):
    """LayerNorm of the CLS token, then linear: a ViT's own classifier, repeated at an internal block."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(tokens[:, 0]))


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, stride: int = 1) -> list[nn.Module]:
    """A bias-free convolution (same padding), BatchNorm and ReLU: MSDNet's ``ConvBasic``."""
    return [nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]


def init_like_msdnet(module: nn.Module) -> None:
    """MSDNet's initialisation: convolutions N(0, 2 / (k * k * out channels)), i.e. He-normal on the fan-out,
    BatchNorm at identity, linear biases zero (linear weights keep PyTorch's default)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)


class MSDNetHead(nn.Module):
    """MSDNet's classifier for CIFAR (Huang et al., ICLR 2018; kalviny/MSDNet-PyTorch, ClassifierModule built by
    ``_build_classifier_cifar``): on the coarsest scale of the hidden state, two conv3x3-BN-ReLU layers of stride 2
    and 128 channels, average pooling, linear.

    The official code pools with AvgPool2d(2), which at 32 px (8x8 coarsest scale, 2x2 after the two convolutions)
    is the global average pool used here; the global pool also takes other input sizes. Initialised as the official
    code does: convolutions He-normal (fan-out), BatchNorm at identity, linear bias zero.
    """

    def __init__(self, channels: int, num_classes: int, width: int = MSDNET_HEAD_WIDTH):
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(channels, width, 3, stride=2),
            *conv_bn_relu(width, width, 3, stride=2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )
        self.linear = nn.Linear(width, num_classes)
        init_like_msdnet(self)

    def forward(self, scales: list[torch.Tensor]) -> torch.Tensor:
        if isinstance(scales, torch.Tensor):
            raise TypeError("the msdnet head reads the list of multi-scale feature maps of a multi-scale backbone, "
                            f"got one tensor of shape {tuple(scales.shape)}")
        return self.linear(self.features(scales[-1]))


ASPP_RATES = (1, 2, 3)
"""Dilations of the 3x3 branches: DeepLabV3's 6/12/18 are for output stride 16 on 513 px; small maps need small
ones (a rate beyond the map's side only sees padding)."""


class Upsampled(nn.Module):
    """``module``'s logits, bilinearly upsampled to ``size`` (the input's H, W)."""

    def __init__(self, module: nn.Module, size: tuple[int, int]):
        super().__init__()
        self.module, self.size = module, tuple(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(self.module(x), size=self.size, mode="bilinear", align_corners=False)


class SegLinearHead(Upsampled):
    """A 1x1 convolution to the classes, upsampled to the input's size."""

    def __init__(self, channels: int, num_classes: int, size: tuple[int, int]):
        super().__init__(nn.Conv2d(channels, num_classes, 1), size)


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling at ``width`` channels per branch (DeepLabV3), projected back to ``width``."""

    def __init__(self, channels: int, width: int, rates: tuple[int, ...] = ASPP_RATES):
        super().__init__()

        def branch(kernel: int, dilation: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(channels, width, kernel, padding=dilation * (kernel // 2),
                                           dilation=dilation, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))

        self.branches = nn.ModuleList([branch(1, 1), *(branch(3, rate) for rate in rates)])
        self.pooled = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, width, 1, bias=False),
                                    nn.ReLU(inplace=True))    # no BatchNorm on a 1x1 map: batch-1 eval must work
        self.project = nn.Sequential(nn.Conv2d(width * (len(rates) + 2), width, 1, bias=False),
                                     nn.BatchNorm2d(width), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.pooled(x).expand(-1, -1, *x.shape[2:])
        return self.project(torch.cat([*(b(x) for b in self.branches), pooled], dim=1))


class SegASPPHead(Upsampled):
    """ASPP, a 1x1 convolution to the classes, upsampled to the input's size."""

    def __init__(self, channels: int, num_classes: int, size: tuple[int, int], width: int | None = None):
        width = width or min(channels, 64)
        super().__init__(nn.Sequential(ASPP(channels, width), nn.Conv2d(width, num_classes, 1)), size)


def make_segmentation_head(kind: str, hidden_shape: tuple[int, ...], num_classes: int,
                           input_shape: tuple[int, ...]) -> nn.Module:
    """A segmentation head of ``kind`` for feature maps of ``hidden_shape`` (C, h, w), predicting at the input's
    (H, W)."""
    channels, size = hidden_shape[0], tuple(input_shape[1:])
    return {"seg_linear": SegLinearHead, "seg_aspp": SegASPPHead}[kind](channels, num_classes, size)



def resolve_head_kind(head: str, tokens: bool, arch: str, multi_scale: bool = False,
                      task: str = "classification") -> str:
    """Resolve "auto" ("seg_linear" for segmentation backbones, "cls" for token backbones, "msdnet" for multi-scale
    ones, "pool" otherwise); a head that cannot read the hidden state, or predicts for another task, is a
    UserError."""
    if head == "auto":
        return "seg_linear" if task == "segmentation" else "cls" if tokens else "msdnet" if multi_scale else "pool"
    if head not in (*HEAD_KINDS, *SEG_HEAD_KINDS):
        raise UnknownName("head", head, [*HEAD_KINDS, *SEG_HEAD_KINDS, "auto"])
    if (task == "segmentation") != (head in SEG_HEAD_KINDS):
        wanted = SEG_HEAD_KINDS if task == "segmentation" else ("pool", "conv")
        raise UserError(f"head '{head}' {'predicts per pixel' if head in SEG_HEAD_KINDS else 'predicts one class'}, "
                        f"but {arch} is a {task} backbone; use head {' or '.join(repr(k) for k in wanted)}")
    if multi_scale and head != "msdnet":
        raise UserError(f"head '{head}' reads one hidden tensor, but {arch} passes a list of multi-scale feature maps "
                        "between blocks; use head 'msdnet' (MSDNet's own classifier, on the coarsest scale)")
    if not multi_scale and head == "msdnet":
        raise UserError(f"head 'msdnet' reads a list of multi-scale feature maps, but {arch} passes "
                        f"{'tokens' if tokens else 'one feature map'} between blocks; use head "
                        f"{'cls' if tokens else 'pool or conv'}")
    if tokens and head != "cls":
        raise UserError(f"head '{head}' needs feature maps, but {arch} passes tokens between blocks; use head 'cls'")
    if not tokens and head == "cls":
        raise UserError(f"head 'cls' needs a class token, but {arch} passes feature maps; use head 'pool' or 'conv'")
    return head


def make_head(kind: str, hidden_shape: tuple[int, ...], num_classes: int,
              input_shape: tuple[int, ...] = ()) -> nn.Module:
    """A head of ``kind`` for hidden states of shape ``hidden_shape`` (batch dimension excluded); for a multi-scale
    hidden state, ``hidden_shape`` holds one shape per scale, finest first. Segmentation heads predict at the
    (H, W) of ``input_shape`` (C, H, W)."""
    if kind in SEG_HEAD_KINDS:
        return make_segmentation_head(kind, hidden_shape, num_classes, input_shape)
    multi_scale = bool(hidden_shape) and not isinstance(hidden_shape[0], int)
    if (kind == "msdnet") != multi_scale:
        raise UserError(f"head '{kind}' cannot read a hidden state of shape {hidden_shape}")
    if kind == "msdnet":
        return MSDNetHead(hidden_shape[-1][0], num_classes)
    if kind == "cls":
        return ClsTokenHead(hidden_shape[-1], num_classes)
    channels, *spatial = hidden_shape
    return {"pool": PoolHead, "conv": ConvHead}[kind](channels, tuple(spatial), num_classes)
