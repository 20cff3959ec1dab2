"""CPU-sized backbones defined here: a small CNN (2-D, and 1-D for sensor series) and He et al.'s CIFAR ResNets."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from benchmark.models.pooling import AvgPoolTo
from benchmark.models.registry import Backbone, register_arch

# (width, convolutions) per stage; the stem (stride 2) joins the first convolution's block, and the first
# convolution of every later stage has stride 2. Stages are sized so that block boundaries fall near 25, 50
# and 75 % of the FLOPs (see _small_cnn). 28 px -> 14 (stage 1) -> 7 (stage 2); 100 steps -> 50 -> 25.
SMALL_CNN_STAGES = ((16, 4), (32, 5))
SMALL_CNN1D_STAGES = ((24, 3), (48, 3))


def _init_like_torchvision(module: nn.Module) -> None:
    """He-normal convolutions (fan-out), BatchNorm at identity: the scheme torchvision's ResNets use."""
    for m in module.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _small_cnn(num_classes: int, input_shape: tuple[int, ...], dims: int,
               stages: tuple[tuple[int, int], ...]) -> Backbone:
    """A stride-2 stem, then stages of conv-BN-ReLU layers, each layer a block, so exits can sit between any two.

    Block costs follow from the stage sizes. In 2-D a layer on half the side with twice the width costs as much
    as one before it, and the strided layer between them half of that: 4 + 5 layers cost 1,1,1,1 | 1/2,1,1,1,1,
    so blocks end at 24, 47 and 76 % of the FLOPs. In 1-D half the length only halves the cost: 3 + 3 layers
    cost 1,1,1 | 1,2,2, so blocks end at 25, 50 and 75 %. The stem's share (1-2 % in 2-D, 3-5 % in 1-D on 6-9
    channels) moves these up; it is why the 1-D stages are 24 wide, not 16.

    The classifier pools to a small grid (4x4 for images, 8 steps for series) rather than to 1x1: in an earlier,
    4-layer version of this net, whose layers saw only ~15 px, a global-average-pooled final feature left the
    final exit far below the internal exits on MNIST (val accuracy 0.73 vs 0.97 after 12 epochs). This deeper
    one (55 px receptive field) does about as well either way (MNIST-5k, 12 epochs, 2 seeds: 0.99 at 4x4,
    0.985 at 1x1).
    """
    conv, norm = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
    kernel = 3 if dims == 2 else 5

    def layer(width_in: int, width: int, stride: int) -> list[nn.Module]:
        return [conv(width_in, width, kernel, stride=stride, padding=kernel // 2, bias=False), norm(width),
                nn.ReLU(inplace=True)]

    stem = layer(input_shape[0], stages[0][0], stride=2)
    blocks, width_in, final_size = [], stages[0][0], (input_shape[1] - 1) // 2 + 1
    for stage, (width, depth) in enumerate(stages):
        for i in range(depth):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(nn.Sequential(*layer(width_in, width, stride)))
            width_in, final_size = width, (final_size - 1) // stride + 1
    blocks[0] = nn.Sequential(*stem, *blocks[0])
    grid = min(4 if dims == 2 else 8, final_size)
    classifier = nn.Sequential(AvgPoolTo(grid, dims), nn.Flatten(1), nn.Linear(width_in * grid ** dims, num_classes))
    for block in blocks:
        _init_like_torchvision(block)
    return Backbone(blocks, classifier)


@register_arch("small_cnn", family="small_cnn", source="exitbench", cpu_sized=True,
               description="conv3x3-BN-ReLU stem (stride 2), then 9 conv3x3-BN-ReLU blocks (stem in block 0): "
                           "4 of width 16, 5 of width 32 (the first with stride 2); avg-pool to 4x4 + linear")
def small_cnn(num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> Backbone:
    return _small_cnn(num_classes, input_shape, dims=2, stages=SMALL_CNN_STAGES)


@register_arch("small_cnn1d", family="small_cnn", source="exitbench", cpu_sized=True, input_kind="series",
               description="small_cnn for sensor series (C, L): conv1d(k=5) stem (stride 2), then 6 conv1d(k=5)-"
                           "BN-ReLU blocks: 3 of width 24, 3 of width 48 (the first with stride 2); avg-pool to 8 "
                           "+ linear")
def small_cnn1d(num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> Backbone:
    return _small_cnn(num_classes, input_shape, dims=1, stages=SMALL_CNN1D_STAGES)


class CifarBasicBlock(nn.Module):
    """He et al. (2016) CIFAR BasicBlock with the parameter-free option-A shortcut.

    Where the block changes shape, the shortcut subsamples with stride 2 and zero-pads the new channels,
    so ResNet-20 has the paper's 0.27 M parameters.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.stride, self.extra_channels = stride, out_channels - in_channels

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x[:, :, ::self.stride, ::self.stride]
        if self.extra_channels:
            shortcut = F.pad(shortcut, (0, 0, 0, 0, 0, self.extra_channels))
        return F.relu(out + shortcut)


def cifar_resnet(depth: int, num_classes: int, in_channels: int, base_width: int = 16) -> Backbone:
    """ResNet-(6n+2) for CIFAR: a 3x3 stem, 3 stages of n BasicBlocks (widths w, 2w, 4w), GAP + linear.

    Every BasicBlock is a block; the stem is merged into block 0.
    """
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6
    stem = nn.Sequential(
        nn.Conv2d(in_channels, base_width, 3, padding=1, bias=False),
        nn.BatchNorm2d(base_width),
        nn.ReLU(inplace=True),
    )
    blocks, width_in = [], base_width
    for stage in range(3):
        width = base_width * 2**stage
        for i in range(n):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(CifarBasicBlock(width_in, width, stride))
            width_in = width
    blocks[0] = nn.Sequential(stem, blocks[0])
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(width_in, num_classes))
    for block in blocks:
        _init_like_torchvision(block)
    return Backbone(blocks, classifier)


@register_arch("cifar_resnet8", family="cifar_resnet", source="exitbench", cpu_sized=True,
               description="He et al. CIFAR ResNet-8 (1 BasicBlock per stage, widths 16-32-64, option-A shortcuts)")
def cifar_resnet8(num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> Backbone:
    return cifar_resnet(8, num_classes, input_shape[0])


@register_arch("cifar_resnet20", family="cifar_resnet", source="exitbench", cpu_sized=True,
               description="He et al. CIFAR ResNet-20 (3 BasicBlocks per stage, widths 16-32-64, option-A shortcuts)")
def cifar_resnet20(num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> Backbone:
    return cifar_resnet(20, num_classes, input_shape[0])


@register_arch("cifar_resnet32", family="cifar_resnet", source="exitbench", cpu_sized=True,
               description="He et al. CIFAR ResNet-32 (5 BasicBlocks per stage, widths 16-32-64, option-A shortcuts); "
                           "the shallowest one whose units end near 25, 50 and 75 % of its FLOPs")
def cifar_resnet32(num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> Backbone:
    return cifar_resnet(32, num_classes, input_shape[0])
