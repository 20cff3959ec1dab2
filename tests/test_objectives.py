"""The property that defines each exit objective, checked against a hand computation with autograd."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmark.models.multi_exit import MultiExitNet
from regimes.base import StepContext
from regimes.bdl import exit_groups
from regimes.ge import downstream_exits
from regimes.registry import OBJECTIVES, build_regime, objective_names
from regimes.sdn import sdn_weights


def ctx(epoch=0, epochs=10, num_exits=3):
    return StepContext(phase="P2", epoch=epoch, epochs=epochs, step=0, num_exits=num_exits)


def linear_net(num_blocks=5, exit_blocks=(0, 1, 2, 3), width=6, classes=4, seed=0):
    """Tanh-linear blocks (no BatchNorm) so every gradient is a plain function of the weights."""
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(num_blocks)]
    heads = [nn.Linear(width, classes) for _ in exit_blocks]
    return MultiExitNet(blocks, nn.Linear(width, classes), heads, exit_blocks)


def batch(width=6, classes=4, n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, width, generator=g), torch.randint(0, classes, (n,), generator=g)


def block_grads(model, loss):
    grads = torch.autograd.grad(loss, [b[0].weight for b in model.blocks], retain_graph=True, allow_unused=True)
    return [torch.zeros_like(b[0].weight) if g is None else g for g, b in zip(grads, model.blocks)]


# ---------------------------------------------------------------- declared hyperparameters
@pytest.mark.parametrize("name", objective_names())
def test_every_objective_accepts_its_declared_defaults(name):
    defaults = {key: declared.default for key, declared in OBJECTIVES[name].hparams.items()}
    assert OBJECTIVES[name](**defaults).hp == defaults


@pytest.mark.parametrize("name, key, value, allowed", [
    ("distill", "weight", 1.5, "a number in [0, 1]"),
    ("distill", "temperature", 0, "a number > 0"),
    ("distill", "temperature", "hot", "a number > 0"),
    ("distill", "temperature", float("inf"), "a number > 0"),
    ("distill", "teacher", "oracle", "one of last | next | later"),
    ("sdn", "c_min", -0.1, "a number in [0, 1]"),
    ("sdn", "c_max", True, "a number in [0, 1]"),          # bools are never numbers
    ("bdl", "groups", 0, "an integer >= 1"),
    ("bdl", "groups", 2.0, "an integer >= 1"),             # nor are floats integers
    ("bdl", "overlap", -1, "an integer >= 0"),
    ("cet", "flip", 1.5, "a number in [0, 1]"),
    ("cet", "permutation", -1, "an integer >= 0"),
    ("cet", "target", "teacher", "one of clean | label"),
    ("l2w", "q", 0.0, "a number > 0"),
    ("l2w", "meta_interval", 0, "an integer >= 1"),
    ("l2w", "centring", "row", "one of col | mat"),
])
def test_objectives_refuse_values_outside_their_declaration(name, key, value, allowed):
    with pytest.raises(ValueError) as error:
        OBJECTIVES[name](**{key: value})
    assert str(error.value) == f"{name}.{key} must be {allowed}, got {value!r}"


def test_bounds_are_inclusive_unless_declared_open_and_ints_are_numbers():
    assert OBJECTIVES["distill"](weight=0, temperature=1e-9).hp["weight"] == 0
    assert OBJECTIVES["distill"](weight=1).hp["weight"] == 1
    assert OBJECTIVES["bdl"](groups=1, overlap=0).hp == {"groups": 1, "overlap": 0}


# ---------------------------------------------------------------- sdn
def test_sdn_weights_follow_the_closed_form():
    caps = np.array([0.15, 0.30, 0.45, 0.60, 0.75, 0.90])     # SDN's six internal classifiers
    for epoch in (1, 3, 10, 50, 100):
        expected = np.minimum(caps, 0.01 + epoch * caps / 100)
        np.testing.assert_allclose(sdn_weights(epoch, 100, 6, 0.15, 0.90), expected)
    np.testing.assert_allclose(sdn_weights(100, 100, 6, 0.15, 0.90), caps)     # capped at the end


def test_sdn_loss_weights_internal_exits_by_tau_and_the_last_by_one():
    torch.manual_seed(0)
    logits, y = [torch.randn(8, 5) for _ in range(4)], torch.randint(0, 5, (8,))
    objective = build_regime("joint+sdn").objective
    taus = sdn_weights(3, 10, 3, 0.15, 0.90)
    ces = [F.cross_entropy(z, y) for z in logits]
    expected = ces[3] + sum(t * c for t, c in zip(taus, ces[:3]))
    assert torch.allclose(objective.loss(logits, y, ctx(epoch=2, epochs=10)), expected)


# ---------------------------------------------------------------- distill
def kl_batchmean(p_teacher, log_q):
    return (p_teacher * (p_teacher.log() - log_q)).sum(1).mean()


@pytest.mark.parametrize("c, T", [(0.5, 4.0), (0.2, 1.0), (0.9, 8.0)])
def test_distill_loss_matches_the_formula(c, T):
    torch.manual_seed(1)
    logits, y = [torch.randn(8, 5) for _ in range(3)], torch.randint(0, 5, (8,))
    objective = build_regime("mixed+distill", {"weight": c, "temperature": T}).objective
    teacher = F.softmax(logits[-1] / T, 1)
    expected = (1 - c) * F.cross_entropy(logits[-1], y) + sum(
        (1 - c) * F.cross_entropy(z, y) + c * T * T * kl_batchmean(teacher, F.log_softmax(z / T, 1))
        for z in logits[:-1])
    assert torch.allclose(objective.loss(logits, y, ctx()), expected, atol=1e-6)


def test_distill_teacher_gets_no_gradient_from_the_distillation_term():
    torch.manual_seed(2)
    logits = [torch.randn(8, 5, requires_grad=True) for _ in range(3)]
    y = torch.randint(0, 5, (8,))
    objective = build_regime("joint+distill", {"weight": 1.0}).objective      # distillation term only
    objective.loss(logits, y, ctx()).backward()
    assert torch.count_nonzero(logits[-1].grad) == 0
    assert torch.count_nonzero(logits[0].grad) > 0


def test_distill_next_teacher_chain_is_detached():
    torch.manual_seed(3)
    logits = [torch.randn(8, 5, requires_grad=True) for _ in range(3)]
    y = torch.randint(0, 5, (8,))
    build_regime("joint+distill", {"weight": 1.0, "teacher": "next"}).objective.loss(logits, y, ctx()).backward()
    own = [z.detach().clone().requires_grad_(True) for z in logits]     # exit 1's own term, teacher = exit 2
    T = 4.0
    (T * T * kl_batchmean(F.softmax(own[2] / T, 1), F.log_softmax(own[1] / T, 1))).backward()
    assert torch.allclose(logits[1].grad, own[1].grad, atol=1e-6), "exit 1 must get nothing from teaching exit 0"


def test_distill_rejects_an_unknown_teacher():
    from benchmark.errors import UserError
    with pytest.raises(UserError, match="teacher"):
        build_regime("joint+distill", {"teacher": "oracle"})


# ---------------------------------------------------------------- ge
def test_ge_gives_each_block_the_mean_of_its_downstream_exits_gradients():
    model = linear_net(num_blocks=5, exit_blocks=(0, 2, 3))   # block 1 has no head: n_1 = n_2
    x, y = batch()
    raw = [block_grads(model, F.cross_entropy(z, y)) for z in model(x)]   # per-exit gradients, plain forward
    exit_block = [*model.exit_blocks, len(model.blocks) - 1]
    objective = build_regime("joint+ge").objective
    ge = block_grads(model, objective.loss(objective.forward(model, x), y, ctx(num_exits=4)))
    n = downstream_exits(model.exit_blocks, len(model.blocks))
    assert n == [4, 3, 3, 2, 1]
    for i in range(len(model.blocks)):
        downstream = [k for k, b in enumerate(exit_block) if b >= i]
        expected = sum(raw[k][i] for k in downstream) / len(downstream)
        assert torch.allclose(ge[i], expected, atol=1e-6), f"block {i}"
        plain_sum = sum(raw[k][i] for k in downstream)
        if len(downstream) > 1:
            assert not torch.allclose(ge[i], plain_sum, atol=1e-6)


def test_ge_leaves_head_gradients_and_logits_unchanged():
    model = linear_net()
    x, y = batch()
    objective = build_regime("joint+ge").objective
    logits_ge, logits = objective.forward(model, x), model(x)
    assert all(torch.equal(a, b) for a, b in zip(logits_ge, logits))
    heads = [h.weight for h in model.heads]
    g_ge = torch.autograd.grad(objective.loss(logits_ge, y, ctx()), heads)
    g_plain = torch.autograd.grad(sum(F.cross_entropy(z, y) for z in logits), heads)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(g_ge, g_plain))


# ---------------------------------------------------------------- bdl
def test_exit_groups_are_contiguous_and_cover_every_exit():
    assert exit_groups(5, 2) == [[0, 1, 2], [3, 4]]
    assert exit_groups(4, 4) == [[0], [1], [2], [3]]


@pytest.mark.parametrize("groups, overlap", [(2, 0), (2, 1), (3, 0), (3, 1)])
def test_bdl_blocks_learn_only_from_their_group_and_the_overlap(groups, overlap):
    model = linear_net(num_blocks=5, exit_blocks=(0, 1, 2, 3))           # 5 exits, exit k after block k
    x, y = batch()
    objective = build_regime("joint+bdl", {"groups": groups, "overlap": overlap}).objective
    logits = objective.forward(model, x)
    assert all(torch.allclose(a, b) for a, b in zip(logits, model(x))), "bdl must not change the predictions"
    exit_groups_ = exit_groups(5, groups)
    group_of_block = {}
    for g, members in enumerate(exit_groups_):
        for k in members:
            group_of_block[k] = g                                    # exit k sits after block k here
    for k, z in enumerate(logits):
        grads = block_grads(model, F.cross_entropy(z, y))
        g_k = group_of_block[k]
        is_overlap = g_k > 0 and k in exit_groups_[g_k][:overlap]
        for j, grad in enumerate(grads):
            g_j = group_of_block[j]
            expected = j <= k and (g_j == g_k or (is_overlap and g_j == g_k - 1))
            assert bool(torch.count_nonzero(grad)) == expected, f"exit {k} -> block {j}"


def test_bdl_with_one_group_is_the_uniform_objective():
    model = linear_net()
    x, y = batch()
    bdl = build_regime("joint+bdl", {"groups": 1}).objective
    uniform = build_regime("joint").objective
    a = block_grads(model, bdl.loss(bdl.forward(model, x), y, ctx()))
    b = block_grads(model, uniform.loss(model(x), y, ctx()))
    assert all(torch.allclose(u, v, atol=1e-7) for u, v in zip(a, b))


def test_bdl_overlap_keeps_batchnorm_statistics_of_the_recomputed_blocks():
    torch.manual_seed(0)
    blocks = [nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Tanh()) for _ in range(4)]
    model = MultiExitNet(blocks, nn.Linear(6, 4), [nn.Linear(6, 4) for _ in range(3)], (0, 1, 2))
    x, _ = batch()
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    model(x)                                                            # one plain training forward
    plain = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(reference)
    build_regime("joint+bdl", {"groups": 2, "overlap": 2}).objective.forward(model, x)
    assert all(torch.equal(plain[k], v) for k, v in model.state_dict().items())
