"""FLOPs counting against hand counts (1 multiply-add = 2 FLOPs) and the exit-cost rule of REGIMES.md."""

import pytest
import torch
from torch import nn

from benchmark.flops import (backbone_flops, block_flops, classifier_flops, counting_flops, exit_costs, head_flops,
                             without_batch_norm)
from benchmark.models import build_model
from benchmark.models.multi_exit import MultiExitNet

INPUT = (1, 8, 8)
# Hand counts, per sample: a conv layer does (output pixels x out channels x in channels x k x k) multiply-adds,
# a linear layer in x out; biases, ReLU and pooling are not counted.
BLOCK_FLOPS = [2 * 8 * 8 * 4 * 1 * 9, 2 * 4 * 4 * 8 * 4 * 9, 2 * 4 * 4 * 8 * 8 * 9]
HEAD_FLOPS = [2 * (4 * 8 * 8) * 10, 2 * (8 * 4 * 4) * 10]
CLASSIFIER_FLOPS = 2 * 8 * 10


def hand_made_net() -> MultiExitNet:
    """3 conv blocks on 1x8x8 (maps 4x8x8, 8x4x4, 8x4x4), linear heads after blocks 0 and 1, GAP + linear last."""
    blocks = [
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1, bias=False), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU()),
    ]
    heads = [nn.Sequential(nn.Flatten(1), nn.Linear(4 * 8 * 8, 10)),
             nn.Sequential(nn.Flatten(1), nn.Linear(8 * 4 * 4, 10))]
    classifier = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, 10))
    return MultiExitNet(blocks, classifier, heads, exit_blocks=[0, 1])


def test_parts_match_hand_counts():
    net = hand_made_net()
    assert block_flops(net, INPUT) == BLOCK_FLOPS
    assert head_flops(net, INPUT) == HEAD_FLOPS
    assert classifier_flops(net, INPUT) == CLASSIFIER_FLOPS
    assert backbone_flops(net, INPUT) == sum(BLOCK_FLOPS) + CLASSIFIER_FLOPS


def test_batch_norm_counts_nothing_so_the_meta_copy_leaves_it_out():
    """Counting skips batch norm on its meta-device copy (`without_batch_norm`, for speed): right only because the
    counter gives it 0 FLOPs, checked here on the real layer; the hand counts hold with batch norms in the net."""
    with counting_flops() as counter:
        nn.BatchNorm2d(4).train()(torch.randn(2, 4, 8, 8)).sum().backward()
    assert counter.get_total_flops() == 0
    net = hand_made_net()
    for block, channels in zip(net.blocks, (4, 8, 8)):
        block.append(nn.BatchNorm2d(channels))
    net.heads[0].insert(1, nn.BatchNorm1d(4 * 8 * 8))
    assert block_flops(net, INPUT) == BLOCK_FLOPS and head_flops(net, INPUT) == HEAD_FLOPS
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()) == 4     # the net keeps them
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in without_batch_norm(net).modules())


def test_exit_costs_charge_every_earlier_head():
    b, h, c = BLOCK_FLOPS, HEAD_FLOPS, CLASSIFIER_FLOPS
    assert exit_costs(hand_made_net(), INPUT) == [
        b[0] + h[0],
        b[0] + b[1] + h[0] + h[1],  # exit 2 also paid for head 1, which declined the sample
        b[0] + b[1] + b[2] + h[0] + h[1] + c,
    ]


def test_exit_costs_of_registered_archs_increase_and_end_at_backbone_plus_heads():
    for arch in ["small_cnn", "cifar_resnet20"]:
        net = build_model(arch, 10, (1, 28, 28), exits="all")
        costs = exit_costs(net, (1, 28, 28))
        assert len(costs) == net.num_exits
        assert all(a < b for a, b in zip(costs, costs[1:]))
        assert costs[-1] == backbone_flops(net, (1, 28, 28)) + sum(head_flops(net, (1, 28, 28)))


def test_attention_is_counted():
    """ViT-Tiny, patch 4 at 32 px: 64 patches + CLS = 65 tokens of width 192, 12 blocks, MLP ratio 4.

    On CPU the fused attention kernel escapes the counter; on the meta device it is counted.
    """
    n, d = 65, 192
    qkv, proj, mlp, attention = 2 * n * d * 3 * d, 2 * n * d * d, 2 * 2 * n * d * 4 * d, 2 * 2 * n * n * d  # QK^T, AV
    per_block = qkv + proj + mlp + attention
    patch_embed = 2 * 64 * (3 * 4 * 4) * d
    net = build_model("vit_tiny", 10, (3, 32, 32))
    assert backbone_flops(net, (3, 32, 32)) == patch_embed + 12 * per_block + 2 * d * 10


def test_counting_leaves_the_model_as_it_was():
    torch.manual_seed(0)
    net = build_model("small_cnn", 10, (1, 28, 28)).train()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    exit_costs(net, (1, 28, 28))
    assert net.state_dict().keys() == before.keys()                  # its batch norms too
    assert all(m.training for m in net.modules())
    assert all(torch.equal(before[k], v) and v.device.type == "cpu" for k, v in net.state_dict().items())


@pytest.mark.parametrize("channels, groups, stride, transposed", [
    (16, 1, 1, False), (16, 1, 2, False), (8, 1, 2, True), (32, 32, 1, False), (32, 4, 2, False), (16, 16, 2, True),
])
def test_a_convolution_backward_costs_twice_its_forward_whatever_its_groups(channels, groups, stride, transposed):
    """Known answer: grad-input and grad-weight each cost one forward, so forward + backward = 3 x forward, also for
    depthwise convolutions, where PyTorch's own formula ignores groups; for groups = 1 it agrees with PyTorch's."""
    from torch.utils.flop_counter import FlopCounterMode
    from benchmark.flops import counting_flops
    make = torch.nn.ConvTranspose2d if transposed else torch.nn.Conv2d
    conv = make(channels, channels, 3, stride=stride, padding=1, groups=groups, bias=False)
    x = torch.randn(2, channels, 9, 9, requires_grad=True)
    with counting_flops() as forward:
        conv(x)
    with counting_flops() as both, FlopCounterMode(display=False) as torch_counter:
        conv(x).sum().backward()
    out = conv(x)
    spatial = (x if transposed else out).shape[2:].numel()
    expected_forward = 2 * 2 * conv.weight.numel() * spatial          # 2 FLOPs per multiply-add, batch 2
    assert forward.get_total_flops() == expected_forward
    assert both.get_total_flops() == 3 * expected_forward
    if groups == 1:
        assert torch_counter.get_total_flops() == both.get_total_flops()
    else:
        assert torch_counter.get_total_flops() > both.get_total_flops()      # the upstream over-count this fixes
