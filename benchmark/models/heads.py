"""Internal exit heads. The head type is a grid axis: ``pool`` (SDN), ``conv`` and ``cls`` (ViT CLS token).

Conv heads read feature maps (B, C, H, W) or, for series backbones, (B, C, L); the ``cls`` head reads
token sequences (B, N, D) whose first token is the class token.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from benchmark.errors import UnknownName, UserError

HEAD_KINDS = ("pool", "conv", "cls")
POOLED_SIZE = 4  # SDN pools every internal feature map to 4x4 before its linear layer


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


def resolve_head_kind(head: str, tokens: bool, arch: str) -> str:
    """Resolve "auto" ("cls" for token backbones, "pool" otherwise); a head that cannot read the hidden state is a
    UserError."""
    if head == "auto":
        return "cls" if tokens else "pool"
    if head not in HEAD_KINDS:
        raise UnknownName("head", head, [*HEAD_KINDS, "auto"])
    if tokens and head != "cls":
        raise UserError(f"head '{head}' needs feature maps, but {arch} passes tokens between blocks; use head 'cls'")
    if not tokens and head == "cls":
        raise UserError(f"head 'cls' needs a class token, but {arch} passes feature maps; use head 'pool' or 'conv'")
    return head


def make_head(kind: str, hidden_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A head of ``kind`` for hidden states of shape ``hidden_shape`` (batch dimension excluded)."""
    if kind == "cls":
        return ClsTokenHead(hidden_shape[-1], num_classes)
    channels, *spatial = hidden_shape
    return {"pool": PoolHead, "conv": ConvHead}[kind](channels, tuple(spatial), num_classes)
