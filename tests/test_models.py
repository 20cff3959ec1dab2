"""The multi-exit network contract (exits, between hook, parameter split), the registry, and exit placement."""

import math
from itertools import accumulate

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmark.errors import UnknownName, UserError
from benchmark.flops import backbone_flops, block_flops, profile_flops
from benchmark.models import (
    EXIT_TOLERANCE, ExitPlacement, arch_names, arch_table, build_model, exit_placement, exit_placement_warnings,
)
from benchmark.models.heads import PoolHead
from benchmark.models.registry import place_exits, placement_warnings, placements_from_flops
from benchmark.models.small import cifar_resnet
from benchmark.models.timm_nets import adapted_timm_convnet, adapted_vit, timm_convnet_backbone, vit_backbone
from benchmark.models.torchvision_nets import (
    adapted_mobilenet_v2, adapted_resnet, mobilenet_v2_backbone, resnet_backbone,
)

ARCHS = {row["name"]: row for row in arch_table()}
CLASSES = 7
CLASSIFIERS = [arch for arch in arch_names() if ARCHS[arch]["task"] == "classification"]
"""The archs whose exits give one class's logits per sample (segmentation's: tests/test_segmentation_models.py)."""


def smallest_inputs(arch: str) -> list[tuple[int, ...]]:
    """The CPU-sized nets must take 8x8 digits and 28x28 MNIST; the others are checked at CIFAR size only."""
    row = ARCHS[arch]
    if row["input"] == "series":
        return [(6, 100), (3, 16)]
    return [(1, 8, 8), (1, 28, 28)] if row["cpu_sized"] else [(3, 32, 32)]


@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_every_exit_gives_logits_and_forward_final_is_the_last_exit(arch):
    for shape in smallest_inputs(arch):
        torch.manual_seed(0)
        net = build_model(arch, CLASSES, shape).eval()
        x = torch.randn(2, *shape)
        with torch.no_grad():
            logits = net(x)
            final = net.forward_final(x)
        assert net.num_exits == len(net.heads) + 1 == len(logits) > 1
        assert all(z.shape == (2, CLASSES) and torch.isfinite(z).all() for z in logits)
        torch.testing.assert_close(final, logits[-1], rtol=0, atol=0)


@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_backbone_and_head_parameters_partition_the_model(arch):
    net = build_model(arch, CLASSES, smallest_inputs(arch)[-1])
    backbone = {id(p) for p in net.backbone_parameters()}
    heads = {id(p) for p in net.head_parameters()}
    assert len(backbone) == len(net.backbone_parameters()) and heads
    assert backbone.isdisjoint(heads)
    assert backbone | heads == {id(p) for p in net.parameters()}
    assert {id(p) for m in net.backbone_modules() for p in m.parameters()} == backbone


@pytest.mark.parametrize("arch", CLASSIFIERS)
def test_same_seed_same_weights_other_seed_other_weights(arch):
    shape = smallest_inputs(arch)[-1]

    def weights(seed):
        torch.manual_seed(seed)
        return build_model(arch, CLASSES, shape).state_dict()

    first, again, other = weights(0), weights(0), weights(1)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


def test_between_is_called_after_every_block_but_the_last_and_feeds_the_next_block():
    net = build_model("small_cnn", CLASSES, (1, 28, 28), exits=[1])
    calls, returned, received = [], {}, {}
    for i, block in enumerate(net.blocks):
        block.register_forward_pre_hook(lambda module, args, i=i: received.__setitem__(i, args[0]))

    def between(i, hidden):
        calls.append(i)
        returned[i] = hidden * 2
        return returned[i]

    net(torch.randn(2, 1, 28, 28), between=between)
    assert calls == list(range(len(net.blocks) - 1))
    assert all(received[i + 1] is returned[i] for i in calls)


def test_between_changes_later_exits_but_not_the_head_at_its_block():
    torch.manual_seed(0)
    net = build_model("small_cnn", CLASSES, (1, 28, 28), exits="all").eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        plain = net(x)
        zeroed = net(x, between=lambda i, h: torch.zeros_like(h) if i == 1 else h)
    assert net.exit_blocks == list(range(len(net.blocks) - 1))
    assert torch.equal(plain[0], zeroed[0]) and torch.equal(plain[1], zeroed[1])
    assert not any(torch.equal(a, b) for a, b in zip(plain[2:], zeroed[2:]))


def test_head_reads_the_hidden_state_before_between():
    """With a detaching ``between``, each exit's loss reaches only the block its head (or classifier) sits on."""
    net = build_model("small_cnn", CLASSES, (1, 28, 28), exits="all")
    logits = net(torch.randn(4, 1, 28, 28), between=lambda i, h: h.detach())
    y = torch.tensor([0, 1, 2, 3])
    for k, z in enumerate(logits):
        net.zero_grad(set_to_none=True)
        F.cross_entropy(z, y).backward(retain_graph=True)
        reached = [any(p.grad is not None for p in block.parameters()) for block in net.blocks]
        assert reached == [i == k for i in range(len(net.blocks))]


def test_flops_placement_picks_the_last_block_within_tolerance_below_each_fraction_else_the_closest():
    for arch in ["small_cnn", "cifar_resnet20", "resnet18"]:
        shape = (3, 32, 32)
        net = build_model(arch, CLASSES, shape, exits="flops:0.5")
        fractions = [c / backbone_flops(net, shape) for c in accumulate(block_flops(net, shape))][:-1]
        below = [i for i, f in enumerate(fractions) if 0.45 <= f <= 0.5]
        closest = min(range(len(fractions)), key=lambda i: abs(fractions[i] - 0.5))
        assert net.exit_blocks == [below[-1] if below else closest]


def test_an_exit_asked_for_at_a_budget_fits_that_budget_when_the_tolerance_allows():
    # blocks end at 21, 26 and 100 %: 26 % is closer to 25 %, but 21 % is within 5 points and fits a 25 % budget
    assert place_exits("flops:0.25", [21, 5, 74], classifier_flops=0) == [0]
    # blocks end at 10, 26 and 100 %: nothing within 5 points below 25 %, so the closest block
    assert place_exits("flops:0.25", [10, 16, 74], classifier_flops=0) == [1]


def test_flops_fractions_are_of_the_whole_backbone_classifier_included():
    # blocks cost 1 each and the classifier 4: half of 8 is reached after block 2, not after block 1
    assert place_exits("flops:0.5", [1, 1, 1, 1], classifier_flops=4) == [2]
    assert place_exits("flops:0.5", [1, 1, 1, 1], classifier_flops=0) == [1]


def test_flops_placement_merges_duplicates_and_all_and_lists_are_honoured():
    net = build_model("cifar_resnet8", CLASSES, (1, 28, 28))  # 3 blocks: the three default fractions share 2 places
    assert net.exit_blocks == [0, 1]
    assert build_model("cifar_resnet20", CLASSES, (1, 8, 8), exits="all").exit_blocks == list(range(8))
    assert build_model("cifar_resnet20", CLASSES, (1, 8, 8), exits=[5, 2]).exit_blocks == [2, 5]


@pytest.mark.parametrize("exits", ["flops:1.5", "flops:", "flops:a,b", "half", [8], [0, 0], [1.0], [-1]])
def test_bad_exit_specs_are_user_errors(exits):
    with pytest.raises(UserError, match="exit"):
        build_model("small_cnn", CLASSES, (1, 8, 8), exits=exits)


def test_unknown_names_and_mismatched_heads_are_user_errors():
    with pytest.raises(UnknownName, match="resnet18"):
        build_model("resnet19", CLASSES, (3, 32, 32))
    with pytest.raises(UnknownName, match="conv"):
        build_model("small_cnn", CLASSES, (1, 8, 8), head="mlp")
    with pytest.raises(UserError, match="cls"):
        build_model("vit_tiny", CLASSES, (3, 32, 32), head="pool")
    with pytest.raises(UserError, match="class token"):
        build_model("small_cnn", CLASSES, (1, 8, 8), head="cls")
    with pytest.raises(UserError, match="rank 3"):
        build_model("small_cnn", CLASSES, (6, 100))
    with pytest.raises(UserError, match="cannot take inputs"):
        build_model("vgg11_bn", CLASSES, (3, 8, 8))  # four max-pools shrink 8 px below 1 px


def test_pretrained_weights_offline_are_a_user_error(monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once, at import
    try:
        build_model("vit_tiny", CLASSES, (3, 32, 32), pretrained=True)
    except UserError as err:
        assert "HF_HUB_OFFLINE" in str(err) and "pretrained=False" in str(err)
    else:
        pytest.skip("vit_tiny weights are in the local cache")
    with pytest.raises(UserError, match="no pretrained weights"):
        build_model("small_cnn", CLASSES, (1, 8, 8), pretrained=True)


@pytest.mark.parametrize("arch, final_map", [
    ("resnet18", (512, 4, 4)), ("resnet50", (2048, 4, 4)), ("vgg16_bn", (512, 2, 2)),
    ("mobilenet_v2", (1280, 4, 4)), ("mobilenetv3_small", (576, 4, 4)), ("efficientnet_b0", (1280, 4, 4)),
    ("vit_tiny", (65, 192)),  # 8x8 patches of 4 px + the class token
])
def test_small_images_keep_a_spatial_map_to_the_last_block(arch, final_map):
    net = build_model(arch, CLASSES, (3, 32, 32))
    assert profile_flops(net, (3, 32, 32)).block_output_shapes[-1] == final_map


@pytest.mark.parametrize("adapt, cut", [
    (lambda s: adapted_resnet("resnet18", CLASSES, s, False), resnet_backbone),
    (lambda s: adapted_mobilenet_v2(CLASSES, s, False), mobilenet_v2_backbone),
    (lambda s: adapted_vit("vit_tiny", CLASSES, s, False), vit_backbone),
    (lambda s: adapted_timm_convnet("mobilenetv3_small", CLASSES, s, False), timm_convnet_backbone),
    (lambda s: adapted_timm_convnet("efficientnet_b0", CLASSES, s, False), timm_convnet_backbone),
])
def test_cutting_into_blocks_keeps_the_library_models_function(adapt, cut):
    source = adapt((3, 32, 32)).eval()
    blocks, classifier = cut(source)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(nn.Sequential(*blocks, classifier)(x), source(x))


def test_cifar_resnet20_has_the_papers_parameter_count():
    """He et al. (2016) report 0.27 M; option-A shortcuts add no parameters. Hand count for 3 channels, 10 classes."""
    stem = 3 * 16 * 9 + 2 * 16
    stage1 = 3 * (2 * 16 * 16 * 9 + 2 * 2 * 16)
    stage2 = 16 * 32 * 9 + 5 * 32 * 32 * 9 + 6 * 2 * 32
    stage3 = 32 * 64 * 9 + 5 * 64 * 64 * 9 + 6 * 2 * 64
    blocks, classifier = cifar_resnet(20, 10, in_channels=3)
    count = sum(p.numel() for m in [*blocks, classifier] for p in m.parameters())
    assert count == stem + stage1 + stage2 + stage3 + 64 * 10 + 10 == 269_722


def test_pool_head_mixes_max_and_average_pooling_to_4x4():
    """SDN's head on an 8x8 map pools 2x2 windows; on a 2x2 map it keeps 2x2."""
    head = PoolHead(channels=3, spatial=(8, 8), num_classes=5)
    with torch.no_grad():
        head.alpha.fill_(0.25)
    x = torch.randn(2, 3, 8, 8)
    mixed = 0.25 * F.max_pool2d(x, 2) + 0.75 * F.avg_pool2d(x, 2)
    torch.testing.assert_close(head(x), head.linear(mixed.flatten(1)))
    assert PoolHead(channels=3, spatial=(2, 2), num_classes=5).linear.in_features == 3 * 2 * 2


def test_heads_match_the_hidden_state_they_read():
    net = build_model("small_cnn", CLASSES, (1, 8, 8), exits="all")  # maps 4 x 16x4x4, then 32x2x2 (8 heads)
    assert [h.linear.in_features for h in net.heads] == [16 * 16] * 4 + [32 * 4] * 4
    conv = build_model("small_cnn", CLASSES, (1, 8, 8), head="conv", exits=[5])
    assert isinstance(conv.heads[0][0], nn.Conv2d) and conv.heads[0][0].in_channels == 32
    vit = build_model("vit_tiny", CLASSES, (3, 32, 32), exits=[3])
    assert vit.heads[0].norm.normalized_shape == (192,)


@pytest.mark.parametrize("arch, maps", [
    ("small_cnn", [(16, 14, 14)] * 4 + [(32, 7, 7)] * 5),
    ("small_cnn1d", [(24, 50)] * 3 + [(48, 25)] * 3),
])
def test_small_cnns_are_cut_as_their_descriptions_say(arch, maps):
    shape = (1, 28, 28) if arch == "small_cnn" else (6, 100)
    net = build_model(arch, CLASSES, shape)
    assert profile_flops(net, shape).block_output_shapes == maps and len(net.blocks) == len(maps)
    assert f"{len(maps)} conv" in ARCHS[arch]["description"]


# ---------------------------------------------------------------- where FLOPs-fraction exits land

GRID_EXITS = "flops:0.25,0.5,0.75"
GRID_CASES = [
    *[("small_cnn", s) for s in [(1, 8, 8), (1, 28, 28), (3, 32, 32)]],
    *[("small_cnn1d", s) for s in [(6, 100), (9, 128)]],
    *[(a, s) for a in ["cifar_resnet8", "cifar_resnet20", "cifar_resnet32"]
      for s in [(1, 8, 8), (1, 28, 28), (3, 32, 32)]],
    *[(a, (3, 32, 32)) for a in ["resnet18", "resnet34", "resnet50", "vgg11_bn", "vgg16_bn", "mobilenet_v2",
                                 "mobilenetv3_small", "efficientnet_b0", "vit_tiny", "vit_small"]],
]
# Backbones whose finest cut (a residual unit, a conv layer) ends nowhere near some grid fraction. Cutting inside
# a unit is not an option, so these misses are documented here and must come with a warning.
KNOWN_MISSES = {"cifar_resnet8": {0.25, 0.5}, "cifar_resnet20": {0.5}, "vgg11_bn": {0.75}, "vgg16_bn": {0.25}}


@pytest.mark.parametrize("arch, shape", GRID_CASES)
def test_grid_exits_land_within_tolerance_or_are_warned_about(arch, shape):
    placements = exit_placement(arch, 10, shape, GRID_EXITS)
    warnings = exit_placement_warnings(arch, 10, shape, GRID_EXITS)
    assert sorted(t for p in placements for t in p.targets) == [0.25, 0.5, 0.75]
    missed = {t for p in placements for t in p.targets if abs(t - p.achieved) > EXIT_TOLERANCE}
    assert missed == KNOWN_MISSES.get(arch, set())
    if not missed:
        assert len(placements) == 3 and all(p.within_tolerance for p in placements) and warnings == []
    for t in missed:
        assert [w for w in warnings if f"asked at {t:.0%} " in w and "cut finer than its" in w]


def test_placement_reports_what_build_model_builds():
    for arch, shape in [("small_cnn", (1, 28, 28)), ("small_cnn1d", (9, 128)), ("cifar_resnet20", (1, 8, 8))]:
        net = build_model(arch, CLASSES, shape)
        placements = exit_placement(arch, CLASSES, shape, GRID_EXITS)
        cumulative = list(accumulate(block_flops(net, shape)))
        assert [p.block for p in placements] == net.exit_blocks
        assert [p.achieved for p in placements] == [cumulative[b] / backbone_flops(net, shape) for b in net.exit_blocks]


def test_placement_on_known_block_flops():
    """Blocks of 2, 3, 5, 5, 4 FLOPs and a classifier of 1: blocks end at 10, 25, 50, 75 and 95 % of 20."""
    flops, classifier = [2, 3, 5, 5, 4], 1
    placed = placements_from_flops(GRID_EXITS, flops, classifier)
    assert placed == [ExitPlacement(1, 0.25, (0.25,)), ExitPlacement(2, 0.5, (0.5,)), ExitPlacement(3, 0.75, (0.75,))]
    assert [p.target for p in placed] == [0.25, 0.5, 0.75] and all(p.within_tolerance for p in placed)
    assert placement_warnings(placed, "net", len(flops)) == []
    assert placements_from_flops("flops:0.28", flops, classifier) == [ExitPlacement(1, 0.25, (0.28,))]
    listed = placements_from_flops([3, 0], flops, classifier)
    assert [(p.block, p.achieved, p.targets) for p in listed] == [(0, 0.1, ()), (3, 0.75, ())]
    assert all(math.isnan(p.target) and p.within_tolerance for p in listed)
    assert [p.block for p in placements_from_flops("all", flops, classifier)] == [0, 1, 2, 3]


def test_tolerance_is_five_points_of_backbone_flops():
    assert ExitPlacement(0, 0.21, (0.25,)).within_tolerance and ExitPlacement(0, 0.29, (0.25,)).within_tolerance
    assert not ExitPlacement(0, 0.19, (0.25,)).within_tolerance and not ExitPlacement(0, 0.31, (0.25,)).within_tolerance


def test_an_unmeetable_fraction_is_warned_about():
    """Blocks end at 10, 20 and 100 %: no block but the last comes near 50 %, so that exit sits at 20 %."""
    placed = placements_from_flops("flops:0.12,0.5", [1, 1, 8], classifier_flops=0)
    assert [(p.block, p.achieved, p.target, p.within_tolerance) for p in placed] == [
        (0, 0.1, 0.12, True), (1, 0.2, 0.5, False)]
    [warning] = placement_warnings(placed, "tiny_net", num_blocks=3)
    assert "tiny_net" in warning and "asked at 50% " in warning and "20.0%" in warning and "block 1" in warning
    assert "cannot be cut finer than its 3 blocks" in warning


def test_fractions_merged_into_one_exit_are_warned_about_even_within_tolerance():
    """Blocks end at 40, 80 and 100 %: 40 % and 43 % both pick block 0, leaving one exit where two were asked."""
    placed = placements_from_flops("flops:0.43,0.4,0.8", [4, 4, 2], classifier_flops=0)
    assert [(p.block, p.targets) for p in placed] == [(0, (0.4, 0.43)), (1, (0.8,))]
    assert placed[0].target == 0.4 and all(p.within_tolerance for p in placed)
    [warning] = placement_warnings(placed, "tiny_net", num_blocks=3)
    assert "40%, 43%" in warning and "block 0" in warning and "1 internal exit(s) fewer than asked" in warning


def test_a_three_unit_resnet_warns_that_it_cannot_place_the_grid():
    warnings = exit_placement_warnings("cifar_resnet8", 10, (1, 28, 28), GRID_EXITS)
    assert len(warnings) == 3  # 25 % and 50 % merged into block 0, and both far from its 40.7 %
    assert all("cifar_resnet8" in w and "block 0" in w for w in warnings)
    assert sum("cannot be cut finer than its 3 blocks" in w for w in warnings) == 2


def test_placement_does_not_move_the_global_rng():
    torch.manual_seed(0)
    state = torch.get_rng_state()
    exit_placement("small_cnn", 23, (1, 28, 28), GRID_EXITS)  # 23 classes: no other test has built it (cached)
    exit_placement_warnings("vit_tiny", 23, (3, 32, 32), GRID_EXITS)
    assert torch.equal(torch.get_rng_state(), state)


def test_placement_checks_its_arguments_like_build_model():
    with pytest.raises(UnknownName, match="small_cnn"):
        exit_placement("small_cnm", CLASSES, (1, 8, 8), GRID_EXITS)
    with pytest.raises(UserError, match="rank 2"):
        exit_placement("small_cnn1d", CLASSES, (1, 8, 8), GRID_EXITS)
    with pytest.raises(UserError, match="exit"):
        exit_placement("small_cnn", CLASSES, (1, 8, 8), "flops:1.5")
