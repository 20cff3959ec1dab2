"""Multi-exit segmentation networks (issue 23): every exit predicts every pixel at the input's size, heads are placed
by FLOPs like classification heads, and an exit is charged for its upsampling."""
import pytest
import torch
import torch.nn.functional as F

from benchmark.errors import UserError
from benchmark.flops import counting_flops, exit_costs, profile_flops
from benchmark.models import build_model, exit_placement
from benchmark.models.heads import SegASPPHead, SegLinearHead

SHAPE = (1, 32, 42)        # mnist_scenes' canvas: neither side a power of two


@pytest.mark.parametrize("head", ["seg_linear", "seg_aspp", "auto"])
def test_every_exit_predicts_every_pixel_at_the_input_size(head):
    torch.manual_seed(0)
    model = build_model("seg_cnn", 11, SHAPE, head=head, exits="flops:0.15,0.3,0.5,0.75").eval()
    outputs = model(torch.randn(3, *SHAPE))
    assert len(outputs) == model.num_exits == 5
    assert all(tuple(o.shape) == (3, 11, 32, 42) for o in outputs)
    expected = SegLinearHead if head in ("seg_linear", "auto") else SegASPPHead
    assert all(type(h) is expected for h in model.heads)


def test_segmentation_exits_are_placed_by_flops_within_tolerance():
    placements = exit_placement("seg_cnn", 11, SHAPE, "flops:0.15,0.3,0.5,0.75")
    assert [p.block for p in placements] == build_model("seg_cnn", 11, SHAPE, head="seg_linear",
                                                        exits="flops:0.15,0.3,0.5,0.75").exit_blocks
    assert all(p.within_tolerance for p in placements), placements


@pytest.mark.parametrize("deterministic", [False, True])
def test_a_linear_heads_flops_are_its_convolution_plus_four_multiply_adds_per_upsampled_value(deterministic):
    """Whatever the deterministic-algorithms flag (runs set it; under it a meta-device upsampling decomposes into ops
    the counter does not see)."""
    model = build_model("seg_cnn", 11, SHAPE, head="seg_linear", exits=[2])
    channels, h, w = profile_flops(model, SHAPE).block_output_shapes[2]
    convolution = 2 * channels * 11 * h * w + 0            # a 1x1 conv (its bias counts 0)
    upsampling = 2 * 4 * 11 * 32 * 42
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        assert profile_flops(model, SHAPE).heads == [convolution + upsampling]
        assert torch.are_deterministic_algorithms_enabled() == deterministic          # the flag is left as it was
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
    costs = exit_costs(model, SHAPE)
    assert costs[0] < costs[-1] and costs == sorted(costs)


def test_bilinear_upsampling_is_counted_forward_and_backward():
    x = torch.randn(2, 3, 5, 7, requires_grad=True)
    with counting_flops() as counter:
        out = F.interpolate(x, size=(10, 14), mode="bilinear", align_corners=False)
    assert counter.get_total_flops() == 8 * 2 * 3 * 10 * 14
    with counting_flops() as counter:
        out.sum().backward()
    assert counter.get_total_flops() == 8 * 2 * 3 * 10 * 14


def test_a_head_for_the_other_task_is_refused_naming_the_right_ones():
    with pytest.raises(UserError, match="seg_cnn is a segmentation backbone; use head 'seg_linear' or 'seg_aspp'"):
        build_model("seg_cnn", 11, SHAPE, head="pool")
    with pytest.raises(UserError, match="small_cnn is a classification backbone; use head 'pool' or 'conv'"):
        build_model("small_cnn", 10, (1, 16, 16), head="seg_aspp")


def test_the_aspp_head_evaluates_one_image_in_eval_mode():
    """Its image-pooling branch has no BatchNorm: a 1x1 map of one image must not break eval (or batch-1 latency)."""
    head = SegASPPHead(16, 11, (32, 42)).eval()
    assert tuple(head(torch.randn(1, 16, 4, 6)).shape) == (1, 11, 32, 42)


@pytest.mark.parametrize("arch, blocks", [("fcn_resnet50", 16), ("deeplabv3_resnet50", 16),
                                          ("deeplabv3_mobilenet_v3_large", 16)])
def test_torchvision_segmentation_networks_are_cut_into_blocks_with_their_own_head_last(arch, blocks):
    """Real torchvision networks (no weights: nothing is downloaded), on one-channel scenes: a new first convolution,
    their head upsampled to the input as the last exit, internal exits placed by FLOPs."""
    torch.manual_seed(0)
    model = build_model(arch, 11, SHAPE, head="seg_linear", exits="flops:0.25,0.5").eval()
    assert len(model.blocks) == blocks and model.exit_blocks == [p.block for p in exit_placement(arch, 11, SHAPE,
                                                                                                   "flops:0.25,0.5")]
    with torch.no_grad():
        outputs = model(torch.randn(1, *SHAPE))
    assert all(tuple(o.shape) == (1, 11, 32, 42) for o in outputs)
    assert model.blocks[0][0][0].in_channels == 1        # the stem's (or first layer's) convolution, new


@pytest.mark.parametrize("arch", ["seg_cnn", "deeplabv3_mobilenet_v3_large"])
def test_backbone_and_head_parameters_partition_a_segmentation_net_and_seeds_fix_its_weights(arch):
    def built(seed):
        torch.manual_seed(seed)
        return build_model(arch, 11, SHAPE, head="seg_aspp", exits="flops:0.3")
    net = built(0)
    backbone, heads = {id(p) for p in net.backbone_parameters()}, {id(p) for p in net.head_parameters()}
    assert heads and backbone.isdisjoint(heads) and backbone | heads == {id(p) for p in net.parameters()}
    first, again, other = net.state_dict(), built(0).state_dict(), built(1).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())
