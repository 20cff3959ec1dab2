"""MSDNet (CIFAR configuration) against the official code's own counts, and the list hidden state it passes between
blocks going through the multi-exit contract: hooks, regimes, FLOPs profiling and analyses."""
import copy

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


def test_bdl_overlap_replays_every_scale_of_an_msdnet_block(net):
    """bdl's overlap on MSDNet (groups [[0..3], [4..6]], overlap 1): exit 4 also sends its gradient into the first
    group through a replay of block 4 on every scale of the attached boundary; the other exits stay in their group;
    the predictions are the model's own."""
    objective = build_regime("joint+bdl", {"groups": 2, "overlap": 1}).objective
    x, y = batch()
    net.train()
    state = copy.deepcopy(net.state_dict())
    logits = objective.forward(net, x)
    net.load_state_dict(state)
    for a, b in zip(logits, net(x)):
        torch.testing.assert_close(a, b)
    net.load_state_dict(state)
    reached = blocks_reached(net, objective.forward(net, x), y)
    group = [0] * 4 + [1] * 3
    for k, row in enumerate(reached):
        assert row == [i <= k and (group[i] == group[k] or k == 4) for i in range(7)], (k, row)


def scaled_backward(h, scale):
    """Identity forward, gradient times `scale` backward: written here apart from `ge`'s ScaleGradient."""
    return h * scale + h.detach() * (1 - scale)


def official_ge_forward(model, x, every_scale=False):
    """The official `msdnet_ge` forward (kalviny/IMTA, models/msdnet_ge.py) on exitbench's blocks and heads: after
    block i, x[-1] gets 1/(n - i) before the classifier reads it and n - i - 1 on its way on; with `every_scale`
    every scale instead (exitbench before protocol 5)."""
    n = len(model.blocks)
    scales = (lambda h: range(len(h))) if every_scale else (lambda h: [len(h) - 1])
    logits = []
    for i, block in enumerate(model.blocks):
        h = list(block(x))
        for s in scales(h):
            h[s] = scaled_backward(h[s], 1.0 / (n - i))
        logits.append((model.heads[i] if i < n - 1 else model.classifier)(h))
        for s in scales(h):
            h[s] = scaled_backward(h[s], float(n - i - 1))
        x = h
    return logits


@pytest.mark.parametrize("regime", ["joint+ge", "joint+boosted"])
def test_ge_rescales_only_the_coarsest_scale_as_the_official_msdnet_ge(net, regime):
    """Gradient equilibrium on MSDNet: the gradients of every block equal those of the official forward, which
    rescales x[-1] only (boosted inherits the rule: the official forward's logits go through the same ensemble). The
    every-scale rule is far from it (at block 0 the finest path compounds to about 1/K). Float64, so summation order
    does not blur the comparison."""
    x, y = batch()
    model = copy.deepcopy(net).double().eval()
    objective = build_regime(regime).objective
    model.combiner = objective.exit_combiner(model, CLASSES)
    params = [p for b in model.blocks for p in b.parameters()]

    def grads(logits):
        return torch.autograd.grad(sum(F.cross_entropy(z, y) for z in logits), params)

    combine = model.combined if model.combiner is not None else (lambda logits: logits)
    ours = grads(objective.forward(model, x.double()))
    official = grads(combine(official_ge_forward(model, x.double())))
    every = grads(combine(official_ge_forward(model, x.double(), every_scale=True)))
    for a, b in zip(ours, official):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    first_block = len(list(model.blocks[0].parameters()))
    relative = [float((a - b).norm() / b.norm()) for a, b in zip(every[:first_block], official[:first_block])]
    assert max(relative) > 0.1, relative


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
