"""Segmentation backbones (issue 23): every exit predicts every pixel — the internal exits through the segmentation
heads of `heads.py` (``seg_linear``, ``seg_aspp``), the last through the network's own decoder or head, upsampled to
the input's size.
"""

from __future__ import annotations

from torch import nn

from benchmark.models.heads import SegLinearHead, Upsampled
from benchmark.models.registry import Backbone, register_arch
from benchmark.models.small import _init_like_torchvision

# ---------------------------------------------------------------- a small encoder-decoder for the CPU grids

SEG_CNN_ENCODER = ((16, 3), (32, 3), (64, 2))
"""(width, 3x3 conv-BN-ReLU layers) per encoder stage; the first layer of each stage has stride 2 (the stem's
layer is the first stage's first): output stride 8."""
SEG_CNN_DECODER = (32, 16)
"""Widths of the decoder's blocks, each a 2x bilinear upsampling then a 3x3 conv-BN-ReLU: back to output stride 2."""


def _seg_cnn(num_classes: int, input_shape: tuple[int, ...]) -> Backbone:
    """Encoder blocks (one conv layer each, so exits can sit between any two), decoder blocks, and a 1x1 readout
    upsampled to the input's size as the last exit. No skip connections: a block passes one feature map, as every
    backbone of the suite does, and a pixel's class must come through the depth of the network — which is what
    makes early exits cost mIoU."""
    def layer(width_in: int, width: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(width_in, width, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(width),
                nn.ReLU(inplace=True)]

    blocks, width_in = [], input_shape[0]
    for width, depth in SEG_CNN_ENCODER:
        for i in range(depth):
            blocks.append(nn.Sequential(*layer(width_in, width, 2 if i == 0 else 1)))
            width_in = width
    for width in SEG_CNN_DECODER:
        blocks.append(nn.Sequential(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                                    *layer(width_in, width, 1)))
        width_in = width
    for block in blocks:
        _init_like_torchvision(block)
    return Backbone(blocks, SegLinearHead(width_in, num_classes, tuple(input_shape[1:])))


@register_arch("seg_cnn", family="seg_cnn", source="exitbench", cpu_sized=True, task="segmentation",
               description="encoder-decoder for segmentation: 8 conv3x3-BN-ReLU encoder blocks (widths 16-32-64, "
                           "stride 2 at each stage's first: output stride 8), 2 decoder blocks (2x bilinear + "
                           "conv3x3, widths 32-16), a 1x1 readout upsampled to the input")
def seg_cnn(num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> Backbone:
    return _seg_cnn(num_classes, input_shape)


# ---------------------------------------------------------------- torchvision's segmentation networks (the full grid)

TORCHVISION_SEGMENTATION = {
    "fcn_resnet50": "FCN (Long et al. 2015) on a dilated ResNet-50 (output stride 8): 16 Bottlenecks, FCN head",
    "deeplabv3_resnet50": "DeepLabV3 (Chen et al. 2017) on a dilated ResNet-50 (output stride 8): 16 Bottlenecks, "
                          "ASPP head",
    "deeplabv3_mobilenet_v3_large": "DeepLabV3 on a dilated MobileNetV3-Large (output stride 16): its 17 feature "
                                    "blocks, ASPP head",
}
"""torchvision's segmentation networks, without their auxiliary heads (the suite's exits take that role)."""


def torchvision_segmentation(name: str, num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> Backbone:
    """torchvision's ``name`` cut into blocks — the backbone's stem joins its first block, every residual or inverted
    residual block is a block — with its own head, upsampled to the input's size, as the last exit. ``pretrained``
    loads the ImageNet weights of the backbone (as torchvision's training recipes start), never the segmentation
    weights (trained on COCO with VOC's classes: they would leak another dataset into the comparison). A first
    convolution for inputs that are not RGB is new, initialised as torchvision initialises it."""
    from torchvision.models import get_model

    from benchmark.models.torchvision_nets import _fresh_conv

    model = get_model(name, weights=None, weights_backbone="DEFAULT" if pretrained else None, num_classes=num_classes,
                      aux_loss=False)
    features = model.backbone
    size = tuple(input_shape[1:])
    if name.startswith(("fcn_resnet", "deeplabv3_resnet")):
        if input_shape[0] != features.conv1.in_channels:
            features.conv1 = _fresh_conv(input_shape[0], features.conv1.out_channels, 7, stride=2)
        stem = nn.Sequential(features.conv1, features.bn1, features.relu, features.maxpool)
        residual = [block for layer in (features.layer1, features.layer2, features.layer3, features.layer4)
                    for block in layer]
        blocks = [nn.Sequential(stem, residual[0]), *residual[1:]]
    else:
        layers = list(features.values())
        first = layers[0][0]
        if input_shape[0] != first.in_channels:
            layers[0][0] = _fresh_conv(input_shape[0], first.out_channels, 3, stride=2)
        blocks = [nn.Sequential(layers[0], layers[1]), *layers[2:]]
    return Backbone(blocks, Upsampled(model.classifier, size))


def _register_torchvision_segmentation(name: str, description: str) -> None:
    @register_arch(name, family=name.split("_")[0], source="torchvision", task="segmentation", description=description)
    def build(num_classes: int, input_shape: tuple[int, ...], pretrained: bool) -> Backbone:
        return torchvision_segmentation(name, num_classes, input_shape, pretrained)


for _name, _description in TORCHVISION_SEGMENTATION.items():
    _register_torchvision_segmentation(_name, _description)
