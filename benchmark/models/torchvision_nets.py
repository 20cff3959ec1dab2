"""torchvision backbones (ResNet, VGG-BN, MobileNetV2), adapted to small images and cut into blocks.

Inputs of at most 64 px get a stride-1 stem without max-pool (an ImageNet stem would shrink a 32 px image
to 1x1 in ResNet's last stage). A new first convolution (small images, or inputs that are not RGB) is
initialised as torchvision initialises its own; with ``pretrained=True`` it therefore starts from scratch.

torchvision is imported by the builders, not here: it costs ~1 s (torchvision.ops pulls in torch._dynamo), and
registering these archs (for listing, grid validation) must not pay it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from benchmark.models.registry import Backbone, is_small_image, register_arch

if TYPE_CHECKING:
    from torchvision import models as tvm


def _torchvision_model(name: str, num_classes: int, pretrained: bool) -> nn.Module:
    """``name`` from torchvision, with ImageNet weights when asked (the caller then replaces the last linear layer)."""
    from torchvision import models as tvm

    if not pretrained:
        return tvm.get_model(name, weights=None, num_classes=num_classes)
    return tvm.get_model(name, weights="DEFAULT")


def _fresh_linear(old: nn.Linear, num_classes: int) -> nn.Linear:
    return old if old.out_features == num_classes else nn.Linear(old.in_features, num_classes)


def _fresh_conv(in_channels: int, out_channels: int, kernel_size: int, stride: int) -> nn.Conv2d:
    """A bias-free convolution, He-normal (fan-out) as torchvision initialises ResNet and MobileNetV2."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


# ---------------------------------------------------------------- ResNet


def adapted_resnet(name: str, num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> tvm.ResNet:
    model = _torchvision_model(name, num_classes, pretrained)
    model.fc = _fresh_linear(model.fc, num_classes)
    if is_small_image(input_shape):
        model.conv1 = _fresh_conv(input_shape[0], model.conv1.out_channels, 3, stride=1)
        model.maxpool = nn.Identity()
    elif input_shape[0] != model.conv1.in_channels:
        model.conv1 = _fresh_conv(input_shape[0], model.conv1.out_channels, 7, stride=2)
    return model


def resnet_backbone(model: tvm.ResNet) -> Backbone:
    """Every residual block is a block; the stem goes into block 0; avgpool + fc is the classifier."""
    residual = [block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
    classifier = nn.Sequential(model.avgpool, nn.Flatten(1), model.fc)
    return Backbone([nn.Sequential(stem, residual[0]), *residual[1:]], classifier)


def _register_resnet(name: str, description: str) -> None:
    @register_arch(name, family="resnet", source="torchvision", description=description)
    def build(num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> Backbone:
        return resnet_backbone(adapted_resnet(name, num_classes, input_shape, pretrained))


_register_resnet("resnet18", "torchvision ResNet-18, 8 BasicBlocks; 3x3 stride-1 stem, no max-pool at <=64 px")
_register_resnet("resnet34", "torchvision ResNet-34, 16 BasicBlocks; 3x3 stride-1 stem, no max-pool at <=64 px")
_register_resnet("resnet50", "torchvision ResNet-50, 16 Bottlenecks; 3x3 stride-1 stem, no max-pool at <=64 px")


# ---------------------------------------------------------------- VGG with BatchNorm

VGG_CONFIGS = {"vgg11_bn": "A", "vgg16_bn": "D"}


def _vgg_features_from_scratch(name: str) -> nn.Sequential:
    """torchvision's VGG feature layers and weight init, without building the 120 M-parameter MLP we discard."""
    from torchvision.models import vgg as tv_vgg

    features = tv_vgg.make_layers(tv_vgg.cfgs[VGG_CONFIGS[name]], batch_norm=True)
    for m in features.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return features


def vgg_backbone(name: str, num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> Backbone:
    """Each conv-BN-ReLU unit (with the max-pool that follows it) is a block.

    Small images: the last max-pool is dropped (28 px MNIST-family inputs fit, 32 px ends on a 2x2 map;
    it follows the last convolution, so no FLOPs move) and the classifier is global average pool + linear
    instead of the 4096-wide MLP. Larger images keep torchvision's avgpool + MLP.
    """
    if not is_small_image(input_shape):
        model = _torchvision_model(name, num_classes, pretrained)
        model.classifier[-1] = _fresh_linear(model.classifier[-1], num_classes)
        features, classifier = model.features, nn.Sequential(model.avgpool, nn.Flatten(1), model.classifier)
    else:
        features = (_torchvision_model(name, num_classes, pretrained).features if pretrained
                    else _vgg_features_from_scratch(name))
        features = features[:-1]
        width = [m for m in features if isinstance(m, nn.Conv2d)][-1].out_channels
        linear = nn.Linear(width, num_classes)
        nn.init.normal_(linear.weight, 0, 0.01)  # torchvision's init for VGG's linear layers
        nn.init.zeros_(linear.bias)
        classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), linear)
    if input_shape[0] != features[0].in_channels:
        features[0] = nn.Conv2d(input_shape[0], features[0].out_channels, 3, padding=1)
        nn.init.kaiming_normal_(features[0].weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(features[0].bias)
    blocks: list[list[nn.Module]] = []
    for layer in features:
        if isinstance(layer, nn.Conv2d):
            blocks.append([])
        blocks[-1].append(layer)
    return Backbone([nn.Sequential(*layers) for layers in blocks], classifier)


def _register_vgg(name: str, description: str) -> None:
    @register_arch(name, family="vgg", source="torchvision", description=description)
    def build(num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> Backbone:
        return vgg_backbone(name, num_classes, input_shape, pretrained)


_register_vgg("vgg11_bn", "torchvision VGG-11-BN, 8 conv units; GAP + linear classifier at <=64 px")
_register_vgg("vgg16_bn", "torchvision VGG-16-BN, 13 conv units; GAP + linear classifier at <=64 px")


# ---------------------------------------------------------------- MobileNetV2


def adapted_mobilenet_v2(num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> tvm.MobileNetV2:
    """At <=64 px the stem and the first stride-2 inverted residual keep stride 1: 32 px ends on 4x4, not 1x1."""
    model = _torchvision_model("mobilenet_v2", num_classes, pretrained)
    model.classifier[-1] = _fresh_linear(model.classifier[-1], num_classes)
    stem_conv = model.features[0][0]
    small = is_small_image(input_shape)
    if input_shape[0] != stem_conv.in_channels:
        model.features[0][0] = _fresh_conv(input_shape[0], stem_conv.out_channels, 3, stride=stem_conv.stride[0])
    if small:
        model.features[0][0].stride = (1, 1)
        model.features[2].conv[1][0].stride = (1, 1)  # depthwise conv of the first 24-channel block
    return model


def mobilenet_v2_backbone(model: tvm.MobileNetV2) -> Backbone:
    """Each inverted residual is a block; the stem joins block 0 and the final 1x1 conv (to 1280) the last."""
    f = model.features
    blocks = [nn.Sequential(f[0], f[1]), *f[2:-2], nn.Sequential(f[-2], f[-1])]
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.classifier)
    return Backbone(blocks, classifier)


@register_arch("mobilenet_v2", family="mobilenet", source="torchvision",
               description="torchvision MobileNetV2, 17 inverted-residual blocks; "
                           "stride-1 stem and 2nd stage at <=64 px")
def mobilenet_v2(num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> Backbone:
    return mobilenet_v2_backbone(adapted_mobilenet_v2(num_classes, input_shape, pretrained))
