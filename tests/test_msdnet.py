"""MSDNet (CIFAR configuration) against the official code's own counts, and the list hidden state it passes between
blocks going through the multi-exit contract: hooks, regimes, FLOPs profiling and analyses."""
import copy
from itertools import accumulate

import pytest
import torch
import torch.nn.functional as F

from analysis.rank import block_activations
from benchmark.data import Dataset
from benchmark.errors import UserError
from benchmark.flops import exit_costs, profile_flops
from benchmark.models import arch_table, build_model
from benchmark.models.heads import MSDNetHead
from benchmark.train import run_phase
from regimes.base import Phase
from regimes.registry import build_regime

CIFAR = (3, 32, 32)
CLASSES = 100
BATCH = 4

# The official op counter (kalviny/MSDNet-PyTorch at f654595, op_counter.measure_model, called by main.py) on the
# README's CIFAR-100 anytime model (--data cifar100 --nBlocks 7 --stepmode even --step 2 --base 4 --nChannels 16,
# args.py defaults otherwise) prints, at each classifier, the cumulative count of everything run so far (every
# earlier classifier included, as exitbench's exit_costs charges it):
OFFICIAL_PRINTED_MFLOPS = [15.14, 25.51, 37.10, 46.33, 57.34, 66.96, 75.94]
OFFICIAL_PRINTED_MPARAMS = [0.43, 0.88, 1.27, 1.70, 2.18, 2.60, 3.07]
# Its "FLOPs" are multiply-adds counted once (multi_add = 1), plus one op per ReLU output element, per pooled input
# element and per linear bias, all of which exitbench counts as 0 (benchmark/flops.py: 1 multiply-add = 2 FLOPs).
# Those extras are 0.6-1.2 % of each printed figure, so exitbench / 2 must lie a little below it:
EXTRAS_AT_MOST = 0.015
# The same counter's Conv2d and Linear-weight terms alone (its total minus the ReLU, pooling and bias terms, taken
# from measure_layer per layer type on the same model): the multiply-adds exitbench counts, exactly.
OFFICIAL_CONV_LINEAR_MACS = [14_967_296, 25_259_008, 36_780_544, 45_972_480, 56_933_888, 66_529_280, 75_487_744]
# sum(p.numel() for p in MSDNet(args).parameters()) of the same official model: 3.07 M, its last "Params" line.
OFFICIAL_PARAMETERS = 3_067_960


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return build_model("msdnet", CLASSES, CIFAR, exits="all")


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, *CIFAR, generator=g), torch.randint(0, CLASSES, (BATCH,), generator=g)


def test_exits_all_gives_the_papers_seven_exits_each_an_msdnet_classifier(net):
    assert net.num_exits == 7 and net.exit_blocks == [0, 1, 2, 3, 4, 5] and len(net.blocks) == 7
    assert all(isinstance(h, MSDNetHead) for h in [*net.heads, net.classifier])
    x, _ = batch()
    net.eval()
    with torch.no_grad():
        logits = net(x)
        final = net.forward_final(x)
    assert len(logits) == 7
    assert all(z.shape == (BATCH, CLASSES) and torch.isfinite(z).all() for z in logits)
    torch.testing.assert_close(final, logits[-1], rtol=0, atol=0)


def test_blocks_pass_the_scales_the_official_layout_keeps(net):
    """16 channels + 6 per layer (times 1, 2, 4 per scale); layers 7 and 13 drop the finest scale and are followed by
    a transition that halves the channels: 16 + 6 * 7 = 58 -> 29, 29 + 6 * 6 = 65 -> 32."""
    def scales(c, sizes):
        factors = [1, 2, 4][3 - len(sizes):]
        return tuple((c * f, s, s) for f, s in zip(factors, sizes))
    expected = [scales(40, [32, 16, 8]), scales(52, [32, 16, 8]), scales(35, [16, 8]), scales(47, [16, 8]),
                scales(59, [16, 8]), scales(38, [8]), scales(50, [8])]
    assert profile_flops(net, CIFAR).block_output_shapes == expected
    assert [h.features[0].in_channels for h in net.heads] + [net.classifier.features[0].in_channels] == [
        4 * c for c in [40, 52, 35, 47, 59, 38, 50]]


def test_per_exit_flops_match_the_official_op_counter(net):
    costs = exit_costs(net, CIFAR)
    assert costs == [2 * macs for macs in OFFICIAL_CONV_LINEAR_MACS]
    for ours, printed in zip(costs, OFFICIAL_PRINTED_MFLOPS):
        multiply_adds = ours / 2 / 1e6
        assert printed * (1 - EXTRAS_AT_MOST) <= multiply_adds <= printed + 0.005  # printed to 2 decimals


def test_parameter_count_matches_the_official_cifar100_model(net):
    assert sum(p.numel() for p in net.parameters()) == OFFICIAL_PARAMETERS
    count = lambda modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    up_to_exit = [count([*net.blocks[:k + 1], *net.heads[:k + 1]]) for k in range(6)] + [count([net])]
    assert [round(n / 1e6, 2) for n in up_to_exit] == OFFICIAL_PRINTED_MPARAMS


# ---------------------------------------------------------------- regimes on a list hidden state

def tiny_cifar() -> Dataset:
    x, y = batch(seed=1)
    return Dataset(name="tiny", kind="image", num_classes=CLASSES, input_shape=CIFAR, x_train=x, y_train=y,
                   x_val=x, y_val=y, x_test=x, y_test=y, augmentation="none")


TRAIN = {"batch_size": BATCH, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
         "weight_decay": 5e-4, "eval_every": 1}


@pytest.mark.parametrize("regime", ["joint", "joint+bdl", "joint+ge"])
def test_a_training_step_runs(regime):
    torch.manual_seed(0)
    model = build_model("msdnet", CLASSES, CIFAR, exits="all")
    before = [p.detach().clone() for p in model.parameters()]
    result = run_phase(model, Phase("P2", "all", 1), build_regime(regime).objective, tiny_cifar(), TRAIN,
                       pairing_seed=0, epoch_offset=0, device=torch.device("cpu"))
    assert result.cost.optimizer_steps == 1 and len(result.history) == 7
    assert all(torch.isfinite(torch.tensor(row["train_exit_ce"])) for row in result.history)
    moved = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert all(moved[:5]) and sum(moved) > 0.9 * len(moved)   # weight decay moves even gradient-free parameters


def blocks_reached(model, logits, y) -> list[list[bool]]:
    """Per exit, which blocks its cross-entropy sends a gradient into."""
    reached = []
    for z in logits:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(z, y).backward(retain_graph=True)
        reached.append([any(p.grad is not None and p.grad.abs().sum() > 0 for p in b.parameters())
                        for b in model.blocks])
    return reached


@pytest.mark.parametrize("groups", [2, 7])
def test_bdl_detaches_every_scale_at_a_group_boundary(net, groups):
    """bdl detaches the hidden state entering each group of exits: no exit's loss reaches a block of an earlier
    group, through any scale (one scale left attached would carry it)."""
    objective = build_regime("joint+bdl", {"groups": groups}).objective
    x, y = batch()
    net.train()
    reached = blocks_reached(net, objective.forward(net, x), y)
    group_of_block = {2: [0] * 4 + [1] * 3, 7: list(range(7))}[groups]   # exits [[0..3], [4..6]] or one each
    for k, row in enumerate(reached):
        assert row == [group_of_block[i] == group_of_block[k] and i <= k for i in range(7)], (k, row)


def test_without_bdl_the_last_exit_reaches_the_first_block(net):
    """The control for the bdl test: the path it cuts exists."""
    x, y = batch()
    net.train()
    reached = blocks_reached(net, build_regime("joint").objective.forward(net, x), y)
    assert reached[-1] == [True] * 7 and reached[0] == [True] + [False] * 6


def test_bdl_overlap_cannot_replay_an_msdnet_block_and_says_so(net):
    with pytest.raises(TypeError, match="MSDNet block 4 reads the list of multi-scale feature maps"):
        build_regime("joint+bdl", {"groups": 2, "overlap": 1}).objective.forward(net, batch()[0])


def test_ge_gives_every_block_the_mean_of_its_exits_gradients(net):
    """Gradient equilibrium rescales each scale of the list: block i (with n_i = 7 - i exits at or after it) gets
    1 / n_i times the gradient of sum_k CE_k. In float64, so that summation order does not blur the comparison."""
    x, y = batch()
    model = copy.deepcopy(net).double().eval()
    params = [list(b.parameters()) for b in model.blocks]

    def block_grads(objective):
        loss = sum(F.cross_entropy(z, y) for z in objective.forward(model, x.double()))
        grads = torch.autograd.grad(loss, [p for ps in params for p in ps])
        bounds = [0, *accumulate(len(ps) for ps in params)]
        return [grads[a:b] for a, b in zip(bounds, bounds[1:])]

    plain, ge = block_grads(build_regime("joint").objective), block_grads(build_regime("joint+ge").objective)
    for i, (g_plain, g_ge) in enumerate(zip(plain, ge)):
        for a, b in zip(g_plain, g_ge):
            torch.testing.assert_close(b, a / (7 - i), rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------- registration, heads, analyses

def test_registered_and_listed_as_a_non_cpu_exitbench_net():
    [row] = [r for r in arch_table() if r["name"] == "msdnet"]
    assert row["family"] == "msdnet" and row["source"] == "exitbench" and not row["cpu_sized"]
    assert "Huang et al., ICLR 2018" in row["description"] and "7 blocks" in row["description"]


def test_heads_that_cannot_read_a_list_of_scales_are_user_errors():
    with pytest.raises(UserError, match="head 'pool' reads one hidden tensor, but msdnet passes a list"):
        build_model("msdnet", CLASSES, CIFAR, head="pool")
    with pytest.raises(UserError, match="head 'msdnet' reads a list of multi-scale feature maps, but small_cnn"):
        build_model("small_cnn", CLASSES, (1, 8, 8), head="msdnet")
    with pytest.raises(UserError, match="at most 64 px"):
        build_model("msdnet", CLASSES, (3, 96, 96))


def test_rank_analysis_reads_the_coarsest_scale_of_every_block(net):
    x, _ = batch()
    activations = block_activations(net, x, batch_size=3)
    shapes = profile_flops(net, CIFAR).block_output_shapes
    assert [tuple(a.shape) for a in activations] == [(BATCH, c * h * w) for *_, (c, h, w) in shapes]
    net.eval()
    with torch.no_grad():
        hidden = net.blocks[0](x)
    torch.testing.assert_close(activations[0], hidden[-1].flatten(1))  # other batch split: not bitwise
