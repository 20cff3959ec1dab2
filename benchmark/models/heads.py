"""Internal exit heads. The head type is a grid axis: ``pool`` (SDN), ``conv``, ``cls`` (ViT CLS token) and
``msdnet`` (MSDNet's own classifier).

Conv heads read feature maps (B, C, H, W) or, for series backbones, (B, C, L); the ``cls`` head reads
token sequences (B, N, D) whose first token is the class token; the ``msdnet`` head reads the list of
multi-scale feature maps a multi-scale backbone (MSDNet) passes between blocks, and uses its coarsest scale.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.errors import UnknownName, UserError

HEAD_KINDS = ("pool", "conv", "cls", "msdnet")
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
        if x.dim() == 4:
            maxed, averaged = F.adaptive_max_pool2d(x, self.pooled), F.adaptive_avg_pool2d(x, self.pooled)
        else:
            maxed, averaged = F.adaptive_max_pool1d(x, self.pooled), F.adaptive_avg_pool1d(x, self.pooled)
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


def resolve_head_kind(head: str, tokens: bool, arch: str, multi_scale: bool = False) -> str:
    """Resolve "auto" ("cls" for token backbones, "msdnet" for multi-scale ones, "pool" otherwise); a head that
    cannot read the hidden state is a UserError."""
    if head == "auto":
        return "cls" if tokens else "msdnet" if multi_scale else "pool"
    if head not in HEAD_KINDS:
        raise UnknownName("head", head, [*HEAD_KINDS, "auto"])
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


def make_head(kind: str, hidden_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A head of ``kind`` for hidden states of shape ``hidden_shape`` (batch dimension excluded); for a multi-scale
    hidden state, ``hidden_shape`` holds one shape per scale, finest first."""
    multi_scale = bool(hidden_shape) and not isinstance(hidden_shape[0], int)
    if (kind == "msdnet") != multi_scale:
        raise UserError(f"head '{kind}' cannot read a hidden state of shape {hidden_shape}")
    if kind == "msdnet":
        return MSDNetHead(hidden_shape[-1][0], num_classes)
    if kind == "cls":
        return ClsTokenHead(hidden_shape[-1], num_classes)
    channels, *spatial = hidden_shape
    return {"pool": PoolHead, "conv": ConvHead}[kind](channels, tuple(spatial), num_classes)
