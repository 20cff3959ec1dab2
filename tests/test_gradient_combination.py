"""The gradient-combination objectives (pcgrad, cagrad, nash): each against the property that defines it, on
constructed gradients with known answers, and the per-exit gradient machinery on real models and real data."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmark.data import load_dataset
from benchmark.errors import UserError
from benchmark.pipeline import initial_model
from benchmark.spec import RunSpec
from benchmark.train import held, make_optimizer
from regimes.base import StepContext
from regimes.cagrad import cagrad_direction, simplex_weights
from regimes.exit_gradients import exit_gradients
from regimes.nash import bargaining_weights
from regimes.pcgrad import project_conflicting
from regimes.registry import build_regime, regime_names

GRADIENT_OBJECTIVES = ("pcgrad", "cagrad", "nash")


def official_pcgrad(grads, orders, skip_own=False):
    """A transcription of the PyTorch port's loop (Pytorch-PCGrad `_project_conflicting`, one task at a time,
    projected against every task's original gradient, its own included, in the given order); `skip_own`: exitbench's
    rule before protocol 5."""
    projected = []
    for i, g_i in enumerate(grads):
        g = g_i.clone()
        for j in orders[i].tolist():
            if j == i and skip_own:
                continue
            inner = torch.dot(g, grads[j])
            if inner < 0:
                g = g - inner * grads[j] / grads[j].norm() ** 2
        projected.append(g)
    return torch.stack(projected)


def test_pcgrad_on_a_two_exit_conflict_agrees_with_both_exits():
    g1, g2 = torch.tensor([1.0, 0.0, 0.5]), torch.tensor([-2.0, 1.0, 0.0])
    assert torch.dot(g1, g2) < 0                                  # the exits conflict
    grads = torch.stack([g1, g2])
    combined = project_conflicting(grads, torch.tensor([[0, 1], [1, 0]])).sum(0)
    assert torch.dot(combined, g1) >= 0 and torch.dot(combined, g2) >= 0
    assert torch.dot(grads.sum(0), g1) < 0                        # the plain sum would have hurt exit 0
    # each projected gradient is orthogonal to the other exit's gradient
    projected = project_conflicting(grads, torch.tensor([[0, 1], [1, 0]]))
    assert torch.dot(projected[0], g2).abs() < 1e-6 and torch.dot(projected[1], g1).abs() < 1e-6


def test_pcgrad_matches_the_official_loop_and_leaves_agreeing_gradients_alone():
    generator = torch.Generator().manual_seed(0)
    grads = torch.randn(5, 40, generator=generator, dtype=torch.float64)
    orders = torch.rand(5, 5, generator=generator).argsort(1)
    assert torch.allclose(project_conflicting(grads, orders), official_pcgrad(grads, orders), atol=1e-12)
    agreeing = torch.rand(4, 30, generator=generator, dtype=torch.float64)       # all inner products > 0
    assert torch.equal(project_conflicting(agreeing, orders[:4, :4].argsort(1)), agreeing)


def test_pcgrad_projects_a_gradient_that_turned_against_its_own_original():
    """With three or more exits, projections can turn g_i against its own original g_i; the official loops then
    project it off g_i too. Search small random cases (own gradient last in the order) for one where that happens:
    the result is the official loop's, not the one that skips its own gradient."""
    for seed in range(200):
        generator = torch.Generator().manual_seed(seed)
        grads = torch.randn(5, 3, generator=generator, dtype=torch.float64)
        orders = torch.stack([torch.tensor([*(j for j in torch.randperm(5, generator=generator).tolist() if j != i), i])
                              for i in range(5)])
        skipping = official_pcgrad(grads, orders, skip_own=True)
        if not torch.allclose(skipping, official_pcgrad(grads, orders)):
            break
    else:
        pytest.fail("no case among 200 where the own projection matters")
    projected = project_conflicting(grads, orders)
    torch.testing.assert_close(projected, official_pcgrad(grads, orders), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(projected, skipping)
    assert ((projected * grads).sum(1) >= -1e-12).all()           # no exit's update opposes its own gradient


def test_cagrad_with_c_zero_is_the_mean_gradient():
    grads = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    assert torch.equal(cagrad_direction(grads, 0.0), grads.mean(0))


def test_cagrad_stays_in_its_ball_and_improves_the_worst_exit_over_the_mean():
    generator = torch.Generator().manual_seed(2)
    grads = torch.randn(3, 20, generator=generator, dtype=torch.float64)
    grads[1] = -0.8 * grads[0] + 0.3 * torch.randn(20, generator=generator, dtype=torch.float64)   # a conflict
    c = 0.5
    mean = grads.mean(0)
    d = cagrad_direction(grads, c) * (1 + c ** 2)                 # undo the official rescale
    assert float((d - mean).norm()) == pytest.approx(c * float(mean.norm()), rel=1e-6)
    assert (grads @ d).min() > (grads @ mean).min()
    w = simplex_weights((grads @ grads.T).numpy(), c)
    assert w.min() >= -1e-9 and w.sum() == pytest.approx(1.0)


def test_cagrad_dual_is_unchanged_by_the_gradient_scale():
    grads = torch.randn(3, 20, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    gram = (grads @ grads.T).numpy()
    assert np.allclose(simplex_weights(gram, 0.4), simplex_weights(gram * 1e-8, 0.4), atol=1e-5)


def test_nash_weights_solve_the_bargaining_equations():
    generator = torch.Generator().manual_seed(4)
    grads = torch.randn(4, 30, generator=generator, dtype=torch.float64) * torch.tensor([[1.0], [0.1], [3.0], [1e-3]],
                                                                                         dtype=torch.float64)
    gram = (grads @ grads.T).numpy()
    alpha = bargaining_weights(gram)
    assert (alpha > 0).all()
    assert np.allclose(gram @ alpha, 1 / alpha, rtol=1e-7)
    d = alpha @ grads.numpy()
    assert d @ d == pytest.approx(len(alpha))                      # Σ α_i (GGᵀα)_i = Σ α_i / α_i = K


def test_nash_weights_of_orthogonal_gradients_are_their_inverse_norms():
    grads = np.diag([2.0, 0.5, 10.0])
    assert np.allclose(bargaining_weights(grads @ grads.T), [0.5, 2.0, 0.1])


def test_gradient_objectives_compose_with_joint_and_mixed_only():
    names = regime_names()
    for objective in GRADIENT_OBJECTIVES:
        assert f"joint+{objective}" in names and f"mixed+{objective}" in names
        assert f"disjoint+{objective}" not in names
        with pytest.raises(UserError, match=f"use joint\\+{objective} or mixed\\+{objective}"):
            build_regime(f"disjoint+{objective}")


TRAIN = {"epochs": 1, "p1_epochs": None, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
         "nesterov": True, "weight_decay": 5e-4, "eval_every": 1}
# Each architecture as the grids build it: pool heads at 25/50/75 % of the FLOPs; MSDNet its own classifier after each
# of its 7 blocks, with a list of multi-scale feature maps between blocks (the full grid's override).
MODELS = {"small_cnn": {"head": "pool", "exits": "flops:0.25,0.5,0.75"},
          "cifar_resnet32": {"head": "pool", "exits": "flops:0.25,0.5,0.75"},
          "msdnet": {"head": "msdnet", "exits": "all"}}


def build(arch: str, data, regime: str = "joint"):
    spec = RunSpec(dataset="digits", arch=arch, regime=regime, seed=0, train=dict(TRAIN), model=MODELS[arch])
    return initial_model(spec, data, torch.device("cpu"))


@pytest.fixture(scope="module")
def data():
    return load_dataset("digits", "/nonexistent")


@pytest.fixture(scope="module")
def batch(data):
    x_train, prepare = held(data, "train")
    return build("small_cnn", data), prepare(x_train[:64]), data.y_train[:64]


def split_parameters(model):
    shared = [p for p in model.blocks.parameters() if p.requires_grad]
    return shared, [p for p in model.parameters() if p.requires_grad and all(p is not q for q in shared)]


def k_pass_reference(model, x, y):
    """The per-exit gradients the K-pass way, independently of `exit_gradients`: for each exit k its own forward and
    one backward of CE_k alone, so that autograd's None marks exactly the parameters exit k does not reach.
    Returns (per exit, the gradients on the shared parameters) and (per exit, on the others); BatchNorm's buffers
    are put back afterwards (train mode normalises with the batch's statistics: the K forwards compute the same)."""
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    shared, own = split_parameters(model)
    shared_rows, own_rows = [], []
    for k in range(model.num_exits):
        grads = torch.autograd.grad(F.cross_entropy(model(x)[k], y), shared + own, allow_unused=True)
        shared_rows.append(grads[:len(shared)])
        own_rows.append(grads[len(shared):])
    model.load_state_dict(buffers, strict=False)
    return shared_rows, own_rows


def batched_reference(model, x, y):
    """The same gradients from one backward batched over the K exits (`is_grads_batched`, vmap over the backward):
    the formulation `exit_gradients` measured slower on CPU (its docstring). Rows of every gradient, (K, ...)."""
    shared, own = split_parameters(model)
    losses = torch.stack([F.cross_entropy(z, y) for z in model(x)])
    return torch.autograd.grad(losses, shared + own, grad_outputs=torch.eye(len(losses)), is_grads_batched=True,
                               allow_unused=True)


# The reference runs the same kernels on the same inputs (its own forward per exit, each exit's backward alone, as
# `exit_gradients`): on CPU the gradients are equal bit for bit, and are asserted so. The batched backward is also
# bit-equal on CPU today (torch 2.14's legacy vmap has no batching rule for convolution, batch-norm, pooling or
# cross-entropy backward and loops over the rows, same kernels), but a batching rule or another device may sum in
# another order: float32 rounding, bounded by rtol 1e-5 / atol 1e-6 (gradients here reach ~4 in size); a wrong exit,
# a missing term or the summed loss's gradient differ by orders more.
EXACT = {"rtol": 0.0, "atol": 0.0}
TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.parametrize("arch", list(MODELS))
def test_exit_gradients_equal_each_exits_own_backward_and_reach_what_it_reaches(arch, data):
    model = build(arch, data)
    model.train()
    x_train, prepare = held(data, "train")
    x, y = prepare(x_train[:32]), data.y_train[:32]
    expected_shared, expected_own = k_pass_reference(model, x, y)
    grads = exit_gradients(model, [F.cross_entropy(z, y) for z in model(x)])
    assert grads.shared.shape == (model.num_exits, sum(p.numel() for p in model.blocks.parameters()))
    owner = {id(p): k for k, module in enumerate([*model.heads, model.classifier]) for p in module.parameters()}
    for k in range(model.num_exits):
        offset = 0
        for p, expected in zip(grads.shared_parameters, expected_shared[k]):
            row = grads.shared[k, offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if expected is None:                           # exit k does not reach p: exact zeros
                assert torch.equal(row, torch.zeros_like(row))
            else:
                torch.testing.assert_close(row, expected, **EXACT)
        # None exactly where exit k does not reach: on a head or the classifier, every exit but its owner
        assert [g is None for g in grads.own[k]] == [g is None for g in expected_own[k]] \
            == [owner[id(p)] != k for p in grads.own_parameters]
        for g, expected in zip(grads.own[k], expected_own[k]):
            if g is not None:
                torch.testing.assert_close(g, expected, **EXACT)
    # `reach` is where autograd gives exit k a gradient: the blocks up to its own and no further; on MSDNet not all
    # of those (exit k reads the coarsest scale: the finer scales of its own block feed later blocks only)
    assert torch.equal(grads.reach, torch.tensor([[g is not None for g in row] for row in expected_shared]))
    last_block = [*model.exit_blocks, len(model.blocks) - 1]
    block_of = {id(p): b for b, block in enumerate(model.blocks) for p in block.parameters()}
    structural = torch.tensor([[block_of[id(p)] <= last_block[k] for p in grads.shared_parameters]
                               for k in range(model.num_exits)])
    if arch == "msdnet":
        assert (grads.reach <= structural).all() and not torch.equal(grads.reach, structural)
    else:
        assert torch.equal(grads.reach, structural)
    # the batched formulation gives the same numbers (zeros, not None, where exit k does not reach)
    batched = batched_reference(model, x, y)
    shared_count = len(grads.shared_parameters)
    flat = torch.cat([g.reshape(model.num_exits, -1) for g in batched[:shared_count]], 1)
    torch.testing.assert_close(flat, grads.shared, **TOLERANCE)
    for i, rows in enumerate(batched[shared_count:]):
        for k in range(model.num_exits):
            own = grads.own[k][i]
            torch.testing.assert_close(rows[k], own if own is not None else torch.zeros_like(rows[k]), **TOLERANCE)


def test_exit_gradients_refuse_a_stacked_loss_vector(batch):
    """A row of a stacked vector backpropagates through the stack into every exit's graph (the whole network, each
    time) and gives zeros, not None, where exit k does not reach: the losses must come as separate scalars."""
    model, x, y = batch
    with pytest.raises(TypeError, match="separate scalars"):
        exit_gradients(model, torch.stack([F.cross_entropy(z, y) for z in model(x)]))


def test_applying_the_plain_sum_gives_the_summed_loss_gradient(batch):
    model, x, y = batch
    model.train()
    grads = exit_gradients(model, [F.cross_entropy(z, y) for z in model(x)])
    model.zero_grad(set_to_none=True)
    grads.apply(grads.shared.sum(0), torch.ones(model.num_exits))
    applied = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.stack([F.cross_entropy(z, y) for z in model(x)]).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(applied[n], p.grad, **TOLERANCE)


@pytest.mark.parametrize("objective", [*GRADIENT_OBJECTIVES, "metagf"])
def test_a_step_moves_batchnorm_statistics_exactly_as_one_forward(objective, data):
    """The K backward passes run on one forward's graph and re-run nothing: after a step, BatchNorm's running
    statistics (and its batch counter) are those of one training forward of the batch, bit for bit."""
    model = build("small_cnn", data, f"joint+{objective}")
    x_train, prepare = held(data, "train")
    x, y = prepare(x_train[:64]), data.y_train[:64]
    once = copy.deepcopy(model).train()
    with torch.no_grad():
        once(x)
    model.train()
    built = build_regime(f"joint+{objective}").objective
    ctx = StepContext(phase="P2", epoch=0, epochs=1, step=0, num_exits=model.num_exits,
                      generator=torch.Generator().manual_seed(0))
    built.step(model, x, y, make_optimizer(list(model.parameters()), TRAIN), ctx)
    buffers = dict(once.named_buffers())
    assert any("num_batches_tracked" in n for n in buffers)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n


@pytest.mark.parametrize("objective", GRADIENT_OBJECTIVES)
def test_heads_get_their_own_exits_gradient_weighted(objective, batch):
    """A head's update is its own exit's gradient times the method's weight for that exit (1 for pcgrad and cagrad,
    α_k for nash), never another exit's."""
    model, x, y = batch
    model.train()
    built = build_regime(f"joint+{objective}").objective
    ctx = StepContext(phase="P2", epoch=0, epochs=1, step=0, num_exits=model.num_exits,
                      generator=torch.Generator().manual_seed(0))
    grads = exit_gradients(model, [F.cross_entropy(z, y) for z in model(x)])
    direction, weights = built.combine(grads.shared, ctx)
    grads.apply(direction, weights)
    head = model.heads[0].linear.weight
    own = head.grad.clone()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x)[0], y).backward()
    torch.testing.assert_close(own, weights[0] * head.grad, **TOLERANCE)
    if objective == "nash":
        assert float(direction.norm()) <= built.hp["max_norm"] + 1e-5


def reference_update(objective, shared, generator):
    """Each method's shared-block update and head weights written from its definition, on gradients `shared` (K, P):
    pcgrad the official loop summed (orders drawn as the step draws them; in float64), cagrad K times the official formula
    (test_cagrad_weights_minimise_the_dual checks its weights), nash Σ α_k g_k clipped to max_norm."""
    k = len(shared)
    if objective == "pcgrad":
        orders = torch.rand(k, k, generator=generator).argsort(1)
        return official_pcgrad(shared.double(), orders).sum(0).to(shared.dtype), torch.ones(k)   # float64: the
        # loop's float32 dot products over ~1e5 entries drift ~1e-5 (MSDNet), ours are closer to exact
    if objective == "cagrad":
        return k * cagrad_direction(shared, 0.4), torch.ones(k)
    alpha = torch.as_tensor(bargaining_weights((shared.double() @ shared.double().T).numpy()), dtype=shared.dtype)
    direction = alpha @ shared
    return direction * min(1.0, 1.0 / (float(direction.norm()) + 1e-6)), alpha


@pytest.mark.parametrize("arch", ["small_cnn", "msdnet"])
@pytest.mark.parametrize("objective", GRADIENT_OBJECTIVES)
def test_a_whole_step_through_the_optimizer_applies_the_methods_update(objective, arch, data):
    """`step` end to end — one forward, the K backward passes, the combination, `.grad`, SGD with momentum, Nesterov
    and weight decay — against a replay on a copy: the per-exit gradients of K separate forwards and backwards, the
    method's update from its definition, each head's own exit's gradient times the method's weight, torch's SGD."""
    model = build(arch, data, f"joint+{objective}")
    replay = copy.deepcopy(model)
    x_train, prepare = held(data, "train")
    x, y = prepare(x_train[:32]), data.y_train[:32]
    model.train()
    replay.train()
    ctx = StepContext(phase="P2", epoch=0, epochs=1, step=0, num_exits=model.num_exits,
                      generator=torch.Generator().manual_seed(7))
    build_regime(f"joint+{objective}").objective.step(model, x, y, make_optimizer(list(model.parameters()), TRAIN),
                                                       ctx)

    shared_rows, own_rows = k_pass_reference(replay, x, y)
    shared, own = split_parameters(replay)
    grads = torch.stack([torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                    for g, p in zip(row, shared)]) for row in shared_rows])
    direction, weights = reference_update(objective, grads, torch.Generator().manual_seed(7))
    offset = 0
    for p in shared:
        p.grad = direction[offset:offset + p.numel()].view_as(p).clone()
        offset += p.numel()
    for i, p in enumerate(own):
        [(k, g)] = [(k, row[i]) for k, row in enumerate(own_rows) if row[i] is not None]
        p.grad = weights[k] * g
    make_optimizer(list(replay.parameters()), TRAIN).step()
    for (name, a), b in zip(model.named_parameters(), replay.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def cagrad_dual(w, gram, c):
    """The official CAGrad dual: wᵀ(GGᵀ)1/K + c·sqrt(mean(GGᵀ))·sqrt(wᵀ(GGᵀ)w)."""
    k = len(gram)
    return w @ gram @ np.full(k, 1 / k) + c * np.sqrt(gram.mean() + 1e-8) * np.sqrt(w @ gram @ w + 1e-8)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_cagrad_weights_minimise_the_dual_and_the_step_is_k_times_the_official_update(seed):
    """On three conflicting exits the solver's weights reach the dual's minimum over a grid of the simplex (steps of
    1/300); the combined update is K times the official `cagrad(..., rescale=1)` built from those weights, so c = 0
    gives the summed loss's gradient."""
    generator = torch.Generator().manual_seed(seed)
    grads = torch.randn(3, 12, generator=generator, dtype=torch.float64)
    grads[2] = -0.7 * grads[0] + 0.4 * torch.randn(12, generator=generator, dtype=torch.float64)
    gram = (grads @ grads.T).numpy()
    c = 0.4
    w = simplex_weights(gram, c)
    steps = np.arange(301) / 300
    grid = np.array([(a, b, 1 - a - b) for a in steps for b in steps if a + b <= 1 + 1e-12])
    values = np.array([cagrad_dual(v, gram, c) for v in grid])
    assert cagrad_dual(w, gram, c) <= values.min() + 1e-6 * abs(values.min())
    assert cagrad_dual(w, gram, c) < cagrad_dual(np.full(3, 1 / 3), gram, c)
    g_w = torch.as_tensor(w) @ grads
    official = (grads.mean(0) + c * np.sqrt(gram.mean() + 1e-8) / (float(g_w.norm()) + 1e-8) * g_w) / (1 + c ** 2)
    ctx = StepContext(phase="P2", epoch=0, epochs=1, step=0, num_exits=3)
    direction, weights = build_regime("joint+cagrad").objective.combine(grads, ctx)
    torch.testing.assert_close(direction, 3 * official)
    assert torch.equal(weights, torch.ones(3))
    plain, _ = build_regime("joint+cagrad", {"c": 0.0}).objective.combine(grads, ctx)
    torch.testing.assert_close(plain, grads.sum(0))
