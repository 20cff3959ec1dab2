"""The gradient-combination objectives (pcgrad, cagrad, nash): each against the property that defines it, on
constructed gradients with known answers, and the per-exit gradient machinery on a real model and real data."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmark.data import load_dataset
from benchmark.errors import UserError
from benchmark.pipeline import initial_model
from benchmark.spec import RunSpec
from benchmark.train import held
from regimes.base import StepContext
from regimes.cagrad import cagrad_direction, simplex_weights
from regimes.exit_gradients import exit_gradients
from regimes.nash import bargaining_weights
from regimes.pcgrad import project_conflicting
from regimes.registry import build_regime, regime_names

GRADIENT_OBJECTIVES = ("pcgrad", "cagrad", "nash")


def official_pcgrad(grads, orders):
    """A transcription of the PyTorch port's loop (Pytorch-PCGrad `_project_conflicting`, one task at a time,
    projected against the other tasks' original gradients in the given order), summed."""
    projected = []
    for i, g_i in enumerate(grads):
        g = g_i.clone()
        for j in orders[i].tolist():
            if j == i:
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


@pytest.fixture(scope="module")
def batch():
    data = load_dataset("digits", "/nonexistent")
    spec = RunSpec(dataset="digits", arch="small_cnn", regime="joint", seed=0,
                   train={"epochs": 1, "p1_epochs": None, "batch_size": 64, "optimizer": "sgd", "lr": 0.05,
                          "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "eval_every": 1},
                   model={"head": "pool", "exits": "flops:0.25,0.5,0.75"})
    model = initial_model(spec, data, torch.device("cpu"))
    x_train, prepare = held(data, "train")
    return model, prepare(x_train[:64]), data.y_train[:64]


def test_exit_gradients_are_each_exits_own_backward(batch):
    model, x, y = batch
    model.train()
    logits = model(x)
    losses = torch.stack([F.cross_entropy(z, y) for z in logits])
    grads = exit_gradients(model, losses)
    assert grads.shared.shape == (model.num_exits, sum(p.numel() for p in model.blocks.parameters()))
    for k in range(model.num_exits):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x)[k], y).backward()
        expected = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in model.blocks.parameters()])
        assert torch.allclose(grads.shared[k], expected, atol=1e-6)
    # the plain sum, written back through `apply`, is the summed loss's gradient on every parameter
    model.zero_grad(set_to_none=True)
    grads.apply(grads.shared.sum(0), torch.ones(model.num_exits))
    applied = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.stack([F.cross_entropy(z, y) for z in model(x)]).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(applied[n], p.grad, atol=1e-6), n


@pytest.mark.parametrize("objective", GRADIENT_OBJECTIVES)
def test_heads_get_their_own_exits_gradient_weighted(objective, batch):
    """A head's update is its own exit's gradient times the method's weight for that exit (1 for pcgrad and cagrad,
    α_k for nash), never another exit's."""
    model, x, y = batch
    model.train()
    built = build_regime(f"joint+{objective}").objective
    ctx = StepContext(phase="P2", epoch=0, epochs=1, step=0, num_exits=model.num_exits,
                      generator=torch.Generator().manual_seed(0))
    losses = torch.stack([F.cross_entropy(z, y) for z in model(x)])
    grads = exit_gradients(model, losses)
    direction, weights = built.combine(grads.shared, ctx)
    grads.apply(direction, weights)
    head = model.heads[0].linear.weight
    own = head.grad.clone()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x)[0], y).backward()
    assert torch.allclose(own, weights[0] * head.grad, atol=1e-6)
    if objective == "nash":
        assert float(direction.norm()) <= built.hp["max_norm"] + 1e-5
