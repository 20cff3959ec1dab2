"""timm backbones (ViT-Tiny/Small, MobileNetV3-Small, EfficientNet-B0), adapted to small images and cut into blocks.

ViTs take a patch size that keeps a grid of about 8x8 tokens on small images (4 px patches at 32 px); the
conv nets get a stride-1 stem and a stride-1 first downsampling stage at <=64 px, so 32 px ends on 4x4.
"""

from __future__ import annotations

import torch
from torch import nn

from benchmark.models.registry import Backbone, is_small_image, register_arch


def _timm_model(name: str, num_classes: int, input_shape: tuple[int, ...], pretrained: bool, **kwargs) -> nn.Module:
    import timm  # imported on first use: it costs ~1.5 s, and most commands never build a timm model

    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=input_shape[0], **kwargs)


# ---------------------------------------------------------------- ViT

VIT_MODELS = {"vit_tiny": "vit_tiny_patch16_224", "vit_small": "vit_small_patch16_224"}


def vit_patch_size(input_shape: tuple[int, ...]) -> int:
    side = max(input_shape[1:])
    return 4 if side <= 32 else 8 if side <= 64 else 16


def adapted_vit(arch: str, num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> nn.Module:
    return _timm_model(VIT_MODELS[arch], num_classes, input_shape, pretrained,
                       img_size=tuple(input_shape[1:]), patch_size=vit_patch_size(input_shape))


class ViTEmbedding(nn.Module):
    """Patch embedding, CLS token, position embedding: a ViT's stem, which becomes part of block 0.

    Written out for the original ViT layout only (one class token, position embedding over it too,
    fixed image size) — the layout of the registered models; other layouts are refused.
    """

    def __init__(self, vit: nn.Module):
        super().__init__()
        if vit.cls_token is None or vit.reg_token is not None or vit.no_embed_class or vit.dynamic_img_size:
            raise ValueError("ViTEmbedding supports ViTs with one class token and a fixed-size position embedding")
        self.patch_embed, self.cls_token, self.pos_embed = vit.patch_embed, vit.cls_token, vit.pos_embed
        self.pos_drop, self.patch_drop, self.norm_pre = vit.pos_drop, vit.patch_drop, vit.norm_pre

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm_pre(self.patch_drop(self.pos_drop(x)))


class ViTClassifier(nn.Module):
    """Final norm, then the CLS token through the linear head: timm's forward_head with global_pool='token'."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        if vit.global_pool != "token" or vit.attn_pool is not None:
            raise ValueError("ViTClassifier supports CLS-token pooling only")
        self.norm, self.fc_norm, self.head_drop, self.head = vit.norm, vit.fc_norm, vit.head_drop, vit.head

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_drop(self.fc_norm(self.norm(tokens)[:, 0])))


def vit_backbone(vit: nn.Module) -> Backbone:
    """Every transformer block is a block; the embedding goes into block 0."""
    blocks = list(vit.blocks)
    return Backbone([nn.Sequential(ViTEmbedding(vit), blocks[0]), *blocks[1:]], ViTClassifier(vit))


def _register_vit(arch: str, description: str) -> None:
    @register_arch(arch, family="vit", source="timm", tokens=True, description=description)
    def build(num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> Backbone:
        return vit_backbone(adapted_vit(arch, num_classes, input_shape, pretrained))


_register_vit("vit_tiny", "timm ViT-Tiny (D=192), 12 transformer blocks; patch 4 at 32 px, 8 at 64 px, 16 above")
_register_vit("vit_small", "timm ViT-Small (D=384), 12 transformer blocks; patch 4 at 32 px, 8 at 64 px, 16 above")


# ---------------------------------------------------------------- MobileNetV3 / EfficientNet (timm's MBConv nets)

TIMM_CONVNETS = {"mobilenetv3_small": "mobilenetv3_small_100", "efficientnet_b0": "efficientnet_b0"}


def adapted_timm_convnet(arch: str, num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> nn.Module:
    """At <=64 px the stem and the first strided depthwise conv keep stride 1 (their padding does not depend on it)."""
    model = _timm_model(TIMM_CONVNETS[arch], num_classes, input_shape, pretrained)
    if is_small_image(input_shape):
        model.conv_stem.stride = (1, 1)
        depthwise = [block.conv_dw for stage in model.blocks for block in stage if hasattr(block, "conv_dw")]
        next(conv for conv in depthwise if conv.stride == (2, 2)).stride = (1, 1)
    return model


def timm_convnet_backbone(model: nn.Module) -> Backbone:
    """Every block of every stage is a block; the stem joins block 0. EfficientNet's 1x1 head conv joins the
    last block; MobileNetV3 applies its head conv after global pooling, so there it belongs to the classifier."""
    blocks = [block for stage in model.blocks for block in stage]
    blocks[0] = nn.Sequential(model.conv_stem, model.bn1, blocks[0])
    if hasattr(model, "bn2"):  # EfficientNet: conv_head + bn2 on the feature map, then pool + linear
        blocks[-1] = nn.Sequential(blocks[-1], model.conv_head, model.bn2)
        classifier = nn.Sequential(model.global_pool, nn.Dropout(model.drop_rate), model.classifier)
    else:  # MobileNetV3: pool, then conv_head + norm + act on the 1x1 map, then linear
        classifier = nn.Sequential(model.global_pool, model.conv_head, model.norm_head, model.act2, model.flatten,
                                   nn.Dropout(model.drop_rate), model.classifier)
    return Backbone(blocks, classifier)


def _register_timm_convnet(arch: str, description: str) -> None:
    @register_arch(arch, family=arch.split("_")[0], source="timm", description=description)
    def build(num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> Backbone:
        return timm_convnet_backbone(adapted_timm_convnet(arch, num_classes, input_shape, pretrained))


_register_timm_convnet("mobilenetv3_small", "timm MobileNetV3-Small 1.0, one block per inverted residual; "
                                            "stride-1 stem and first stage at <=64 px")
_register_timm_convnet("efficientnet_b0", "timm EfficientNet-B0, one block per MBConv; "
                                          "stride-1 stem and first strided stage at <=64 px")
