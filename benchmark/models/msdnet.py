"""MSDNet (Huang et al., ICLR 2018, "Multi-Scale Dense Networks for Resource Efficient Image Classification") in its
CIFAR configuration, cut into its blocks: each block ends where the paper puts a classifier.

Written from the official PyTorch code (kalviny/MSDNet-PyTorch, models/msdnet.py) with the options of its README's
CIFAR-100 anytime-prediction command (--nBlocks 7 --stepmode even --step 2 --base 4 --nChannels 16) and the
defaults of its args.py for the rest (growthRate 6, grFactor 1-2-4, bnFactor 1-2-4, bottleneck, prune max,
reduction 0.5); the same network is the CIFAR MSDNet of IMTA (Li et al., ICCV 2019) and L2W (Han et al., ECCV 2022).

- The first layer maps the image to 3 scales: conv3x3-BN-ReLU at full size, then one stride-2 conv3x3-BN-ReLU per
  coarser scale (32, 16, 8 px at 32 px; 16, 32, 64 channels: 16 times the growth factors 1, 2, 4).
- 16 layers follow, 4 in block 0 and 2 in each later block. A layer adds 6 x factor(s) channels to every scale s it
  keeps (DenseNet-style concatenation): at the finest kept scale from that scale alone (bottleneck conv1x1, conv3x3),
  at the others half from the same scale and half from the finer one (bottleneck conv1x1, conv3x3 of stride 2).
  Every bottleneck is at most bnFactor(s) times as wide as its conv3x3's output.
- Scales are dropped as depth grows ("prune max"): the 16 layers fall into intervals of ceil(16 / 3) = 6; layers 7
  and 13 drop the finest remaining scale, and each is followed by a transition (conv1x1-BN-ReLU per scale) that
  halves the channels (reduction 0.5). The blocks therefore pass on 3, 3, 2, 2, 2, 1, 1 scales.
- Every block's classifier (``heads.MSDNetHead``) reads the coarsest scale; the last block's is the backbone's own.

The hidden state between blocks is the list of the scales' feature maps, finest first; block 0 holds the first
layer (the stem).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from benchmark.errors import UserError
from benchmark.models.heads import MSDNetHead, conv_bn_relu, init_like_msdnet
from benchmark.models.registry import Backbone, is_small_image, register_arch


@dataclass(frozen=True)
class MSDNetConfig:
    blocks: int = 7
    base: int = 4                       # layers in block 0 (after the first layer)
    step: int = 2                       # layers in every later block (stepmode "even")
    channels: int = 16                  # channels of the first layer's finest scale, before the growth factor
    growth: int = 6                     # channels a layer adds to a scale, before the growth factor
    growth_factor: tuple[int, ...] = (1, 2, 4)      # per scale, finest first; its length is the number of scales
    bottleneck_factor: tuple[int, ...] = (1, 2, 4)  # per scale: a bottleneck is at most this x its conv's output
    reduction: float = 0.5              # a transition keeps this share of the channels

    @property
    def scales(self) -> int:
        return len(self.growth_factor)

    @property
    def layers_per_block(self) -> list[int]:
        return [self.base] + [self.step] * (self.blocks - 1)


MSDNET_CIFAR = MSDNetConfig()


def scales_in_and_out(layer: int, layers: int, scales: int) -> tuple[int, int]:
    """How many scales layer ``layer`` (1-based, of ``layers``) reads and writes under "prune max": every
    ceil(layers / scales) layers the finest scale is dropped."""
    interval = math.ceil(layers / scales)
    return scales - max(0, layer - 2) // interval, scales - (layer - 1) // interval


class DenseConv(nn.Sequential):
    """Bottleneck conv1x1-BN-ReLU, then conv3x3-BN-ReLU (stride 1, or 2 from the finer scale): MSDNet's ConvBN."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, bottleneck_factor: int):
        inner = min(in_channels, bottleneck_factor * out_channels)
        super().__init__(*conv_bn_relu(in_channels, inner, 1), *conv_bn_relu(inner, out_channels, 3, stride=stride))


class FirstLayer(nn.Module):
    """The image to one feature map per scale: a stride-1 conv3x3-BN-ReLU, then a stride-2 one per coarser scale."""

    def __init__(self, in_channels: int, widths: list[int]):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Sequential(*conv_bn_relu(c_in, c_out, 3, stride=1 if s == 0 else 2))
            for s, (c_in, c_out) in enumerate(zip([in_channels, *widths], widths))
        )

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        scales = []
        for conv in self.convs:
            image = conv(image)
            scales.append(image)
        return scales


class ScaleUnit(nn.Module):
    """One scale of an MSDNet layer: the scale's map, concatenated with new features from it and, unless it is the
    finest scale the layer reads, from the finer scale (half the new features each)."""

    def __init__(self, channels: int, growth: int, bottleneck: int, finer: tuple[int, int] | None):
        """``finer``: the finer scale's channels and bottleneck factor, or None at the finest scale read."""
        super().__init__()
        if finer is None:
            self.down, self.same = None, DenseConv(channels, growth, 1, bottleneck)
        else:
            self.down = DenseConv(finer[0], growth // 2, 2, finer[1])
            self.same = DenseConv(channels, growth // 2, 1, bottleneck)

    def forward(self, x: torch.Tensor, finer: torch.Tensor | None) -> torch.Tensor:
        if self.down is None:
            return torch.cat([x, self.same(x)], dim=1)
        return torch.cat([x, self.down(finer), self.same(x)], dim=1)


class MSDLayer(nn.Module):
    """Reads the ``in_scales`` coarsest scales and writes the ``out_scales`` coarsest ones (``in_scales - 1`` or
    ``in_scales``), each ``growth x factor`` channels wider. ``channels`` is the width before the growth factor."""

    def __init__(self, channels: int, config: MSDNetConfig, in_scales: int, out_scales: int):
        super().__init__()
        factor, bottleneck = config.growth_factor, config.bottleneck_factor
        finest_in = config.scales - in_scales
        self.units = nn.ModuleList(
            ScaleUnit(channels * factor[s], config.growth * factor[s], bottleneck[s],
                      (channels * factor[s - 1], bottleneck[s - 1]) if s > finest_in else None)
            for s in range(config.scales - out_scales, config.scales)
        )

    def forward(self, scales: list[torch.Tensor]) -> list[torch.Tensor]:
        dropped = len(scales) - len(self.units)  # 0 or 1: the finest input scale only feeds the next one
        return [unit(scales[dropped + j], scales[dropped + j - 1] if unit.down is not None else None)
                for j, unit in enumerate(self.units)]


class Transition(nn.Module):
    """conv1x1-BN-ReLU on every scale from ``first_scale`` on, from ``channels`` to ``reduced`` (before the growth
    factor): where a layer drops a scale, the channels are compressed."""

    def __init__(self, channels: int, reduced: int, first_scale: int, config: MSDNetConfig):
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Sequential(*conv_bn_relu(channels * factor, reduced * factor, 1))
            for factor in config.growth_factor[first_scale:]
        )

    def forward(self, scales: list[torch.Tensor]) -> list[torch.Tensor]:
        return [conv(x) for conv, x in zip(self.convs, scales, strict=True)]


class MSDNetBlock(nn.Sequential):
    """The layers between two classifiers; block 0 starts with the first layer and reads the image, the others read
    and every block writes the list of scales."""

    def __init__(self, index: int, layers: list[nn.Module]):
        super().__init__(*layers)
        self.index = index

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
        if self.index > 0 and isinstance(x, torch.Tensor):
            raise TypeError(f"MSDNet block {self.index} reads the list of multi-scale feature maps block "
                            f"{self.index - 1} wrote, got one tensor of shape {tuple(x.shape)} (a hook that keeps "
                            f"one tensor of the hidden state cannot replay an MSDNet block)")
        return super().forward(x)


def msdnet_backbone(num_classes: int, in_channels: int, config: MSDNetConfig = MSDNET_CIFAR) -> Backbone:
    """The blocks (block 0 with the first layer) and the last block's classifier of the MSDNet ``config``."""
    layers_per_block = config.layers_per_block
    layers = sum(layers_per_block)
    channels = config.channels
    modules: list[nn.Module] = [FirstLayer(in_channels, [channels * f for f in config.growth_factor])]
    blocks, layer = [], 0
    for index, count in enumerate(layers_per_block):
        for _ in range(count):
            layer += 1
            in_scales, out_scales = scales_in_and_out(layer, layers, config.scales)
            modules.append(MSDLayer(channels, config, in_scales, out_scales))
            channels += config.growth
            if in_scales > out_scales and config.reduction > 0:
                reduced = math.floor(config.reduction * channels)
                modules.append(Transition(channels, reduced, config.scales - out_scales, config))
                channels = reduced
        blocks.append(MSDNetBlock(index, modules))
        modules = []
    for block in blocks:
        init_like_msdnet(block)
    classifier = MSDNetHead(channels * config.growth_factor[-1], num_classes)
    return Backbone(blocks, classifier)


@register_arch("msdnet", family="msdnet", source="exitbench", multi_scale=True,
               description="MSDNet (Huang et al., ICLR 2018), CIFAR configuration of the official code: 7 blocks "
                           "(4 layers, then 2 each), 3 scales, 16 channels, growth 6 (x1-2-4 per scale), bottleneck "
                           "x1-2-4, prune max, reduction 0.5; every exit MSDNet's classifier on the coarsest scale")
def msdnet(num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> Backbone:
    if not is_small_image(input_shape):
        raise UserError(f"msdnet is MSDNet's CIFAR configuration (stride-1 first layer) and takes images of at most "
                        f"64 px; got input shape {input_shape}")
    return msdnet_backbone(num_classes, input_shape[0])
