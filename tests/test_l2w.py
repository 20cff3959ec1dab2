"""l2w: the budgeted-batch meta allocation, the weight centring, the differentiable pseudo-step and the two-level
update, each checked against a known answer on real digits data and a real small_cnn."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmark.budgeted import budget_shares
from benchmark.data import load_dataset
from benchmark.evaluate import BUDGET_Q, exit_decisions, fit_budgeted_thresholds
from benchmark.models import build_model
from benchmark.train import set_train_mode, set_trainable
from regimes.base import StepContext
from regimes.l2w import L2W, allocate_to_exits, centre_weights, sgd_lookahead

SGD = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "/tmp")


@pytest.fixture(params=["small_cnn", "msdnet"])
def model(request):
    """A single-scale backbone, and MSDNet (a list of scales between blocks, its own classifier after each)."""
    torch.manual_seed(0)
    net = build_model(request.param, 10, (1, 8, 8), **({"exits": "all"} if request.param == "msdnet" else {}))
    net.train()
    return net


def batch(digits, start=0, n=64):
    return digits.x_train[start:start + n], digits.y_train[start:start + n]


def context(model, step=0):
    return StepContext(phase="P2", epoch=0, epochs=1, step=step, num_exits=model.num_exits)


def snapshot(module):
    return {name: t.detach().clone() for name, t in module.state_dict().items()}


def changed(before, module):
    after = module.state_dict()
    return {name for name in before if not torch.equal(before[name], after[name])}


def official_allocation(confidences, q):
    """The official code's loop: exit k sorts by its confidence and takes the first floor(n p_k) not yet taken."""
    num_exits, n = confidences.shape
    shares, taken, exit_of = budget_shares(q, num_exits), [], [None] * n
    for k in range(num_exits):
        free = [i for i in confidences[k].argsort(descending=True).tolist() if i not in taken]
        chosen = free[:math.floor(n * shares[k])] if k < num_exits - 1 else free
        for i in chosen:
            exit_of[i] = k
        taken += chosen
    return torch.tensor(exit_of)


def test_exit_shares_decay_geometrically_and_sum_to_one():
    shares = budget_shares(0.75, 4)
    assert sum(shares) == pytest.approx(1.0)
    assert all(b / a == pytest.approx(0.75) for a, b in zip(shares, shares[1:]))


@pytest.mark.parametrize("layout", ["random", "same_order_at_every_exit"])
def test_allocation_gives_each_sample_one_exit_with_the_budgeted_shares(layout):
    num_exits, n, q = 4, 37, 0.75
    generator = torch.Generator().manual_seed(0)
    confidences = torch.rand(num_exits, n, generator=generator)
    if layout == "same_order_at_every_exit":         # a forgotten `taken` update would hand samples out twice
        confidences = confidences[:1].expand(num_exits, n).clone()
    exit_of = allocate_to_exits(confidences, q)
    counts = torch.bincount(exit_of, minlength=num_exits).tolist()
    expected = [math.floor(n * p) for p in budget_shares(q, num_exits)[:-1]]
    assert counts[:-1] == expected and counts[-1] == n - sum(expected)
    assert torch.equal(exit_of, official_allocation(confidences, q))
    if layout == "same_order_at_every_exit":         # then the exits take consecutive blocks of the ranking
        ranked = exit_of[confidences[0].argsort(descending=True)]
        assert torch.equal(ranked, ranked.sort().values)


def test_meta_allocation_is_the_allocation_the_evaluation_fits_its_thresholds_to(digits, model):
    """g is trained for the policy the run is evaluated with: on the same confidences (a real net's, on the
    validation split), the thresholds evaluation fits send every sample to the exit l2w allocates it, at every q
    of the budgeted-batch curve."""
    with torch.no_grad():
        logits = model.eval()(digits.x_val)
    confidences = torch.stack([z.float().softmax(dim=1).amax(dim=1) for z in logits])   # as budgeted_exit_loss
    assert all(len(c.unique()) == len(c) for c in confidences), "this test needs tie-free confidences"
    as_numpy = confidences.numpy()
    for q in BUDGET_Q:
        thresholds = fit_budgeted_thresholds(as_numpy, budget_shares(q, model.num_exits))
        l2w_exits = allocate_to_exits(confidences, q).numpy()
        np.testing.assert_array_equal(exit_decisions(as_numpy, thresholds), l2w_exits, err_msg=f"q = {q}")
        taken_by = [as_numpy[k, l2w_exits == k] for k in range(model.num_exits - 1)]
        np.testing.assert_array_equal(thresholds, [t.min() if len(t) else np.inf for t in taken_by])


def test_centring_zeroes_the_mean_per_sample_or_over_the_batch():
    raw = torch.randn(6, 3, generator=torch.Generator().manual_seed(1))
    col, mat = centre_weights(raw, "col"), centre_weights(raw, "mat")
    torch.testing.assert_close(col.sum(dim=1), torch.zeros(6))
    torch.testing.assert_close(mat.mean(), torch.tensor(0.0))
    assert not torch.allclose(mat.sum(dim=1), torch.zeros(6))    # `mat` keeps between-sample differences
    torch.testing.assert_close(col - mat, -(raw.mean(dim=1, keepdim=True) - raw.mean()).expand(6, 3))
    with pytest.raises(ValueError, match="centring"):
        centre_weights(raw, "row")
    with pytest.raises(ValueError, match="centring"):
        L2W(centring="row")
    with pytest.raises(ValueError, match="meta_interval"):
        L2W(meta_interval=0)


@pytest.mark.parametrize("nesterov, dampening, warm", [(True, 0.0, True), (False, 0.1, True), (False, 0.0, False)])
def test_pseudo_step_is_the_optimizers_own_sgd_step(nesterov, dampening, warm):
    """θ' from `sgd_lookahead` equals what torch.optim.SGD does with the same gradient and momentum buffer."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(3, 2)
    optimizer = torch.optim.SGD(linear.parameters(), lr=0.1, momentum=0.9, dampening=dampening, nesterov=nesterov,
                                weight_decay=0.01)
    x, y = torch.randn(5, 3), torch.randn(5, 2)
    if warm:                                         # give the optimizer a momentum buffer
        F.mse_loss(linear(x), y).backward()
        optimizer.step()
    params = dict(linear.named_parameters())
    grads = torch.autograd.grad(F.mse_loss(linear(2 * x), y), tuple(params.values()))
    stepped = sgd_lookahead(params, grads, optimizer)
    if nesterov:                                     # the update written out by hand
        w, g, buf = params["weight"], grads[0], optimizer.state[params["weight"]]["momentum_buffer"]
        d = g + 0.01 * w
        torch.testing.assert_close(stepped["weight"], w - 0.1 * (d + 0.9 * (0.9 * buf + d)))
    for p, g in zip(params.values(), grads):
        p.grad = g
    optimizer.step()
    for name, p in linear.named_parameters():
        torch.testing.assert_close(stepped[name], p)


def test_meta_gradient_reaches_g_only_through_the_pseudo_step(digits, model):
    """The meta half never sees g: g's gradient is zero when the weights ignore it (delta = 0) or when the
    pseudo-step does not move (lr = 0), and non-zero otherwise."""
    x, y = batch(digits)
    halves = (x[:32], y[:32], x[32:], y[32:])

    def meta_grads(delta, lr):
        objective = L2W(delta=delta)
        weight_net = objective.ensure_weight_net(model.num_exits, x.device)
        optimizer = torch.optim.SGD(model.parameters(), **{**SGD, "lr": lr})
        loss = objective.meta_loss(model, *halves, optimizer)
        return torch.autograd.grad(loss, tuple(weight_net.parameters()))

    assert all(g.abs().sum() > 0 for g in meta_grads(0.8, 0.05))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in meta_grads(0.0, 0.05))
    assert all(torch.equal(g, torch.zeros_like(g)) for g in meta_grads(0.8, 0.0))


def test_meta_update_moves_g_but_not_the_model_or_its_batchnorm_statistics(digits, model):
    x, y = batch(digits)
    objective = L2W()
    weight_net = objective.ensure_weight_net(model.num_exits, x.device)
    optimizer = torch.optim.SGD(model.parameters(), **SGD)
    torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.25)   # the real schedule at a quarter of its lr
    model_before, g_before = snapshot(model), snapshot(weight_net)
    assert any("running_mean" in name for name in model_before), "the test needs BatchNorm"
    objective.meta_update(model, x[:32], y[:32], x[32:], y[32:], optimizer)
    assert changed(model_before, model) == set(), "parameters, running stats and counters must stay put"
    assert all(p.grad is None for p in model.parameters())
    assert changed(g_before, weight_net) == set(g_before)
    assert objective.meta_optimizer.param_groups[0]["lr"] == pytest.approx(0.25 * objective.hp["meta_lr"])


def test_step_trains_the_network_twice_and_g_every_meta_interval(digits, model):
    objective = L2W(meta_interval=2)
    optimizer = torch.optim.SGD(model.parameters(), **SGD)
    model_before = snapshot(model)
    out = objective.step(model, *batch(digits), optimizer, context(model, step=0))
    assert out["optimizer_steps"] == 2 and out["exit_ce"].shape == (model.num_exits,)
    assert changed(model_before, model) == set(model_before)          # every weight and BN statistic moved
    first_norm = next(m for m in model.blocks[0].modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert int(first_norm.num_batches_tracked) == 2                   # two real forwards, no pseudo ones
    g_before = snapshot(objective.weight_net)
    objective.step(model, *batch(digits, 64), optimizer, context(model, step=1))
    assert changed(g_before, objective.weight_net) == set(), "step 1 is off the meta interval"
    objective.step(model, *batch(digits, 128), optimizer, context(model, step=2))
    assert changed(g_before, objective.weight_net) == set(g_before)


def test_with_delta_zero_the_real_update_is_two_plain_sum_of_exit_ce_steps(digits, model):
    """w = 1 exactly, so l2w's step is Σ_k CE_k on half A, then on half B — BatchNorm statistics included,
    which they would not be if the pseudo forwards touched them."""
    x, y = batch(digits)
    plain = copy.deepcopy(model)
    plain_optimizer = torch.optim.SGD(plain.parameters(), **SGD)
    plain_losses = []
    for xs, ys in zip(x.chunk(2), y.chunk(2)):
        loss = sum(F.cross_entropy(z, ys) for z in plain(xs))
        plain_optimizer.zero_grad()
        loss.backward()
        plain_optimizer.step()
        plain_losses.append(loss.detach())
    out = L2W(delta=0.0).step(model, x, y, torch.optim.SGD(model.parameters(), **SGD), context(model))
    for name, tensor in plain.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, msg=name)
    torch.testing.assert_close(out["loss"], torch.stack(plain_losses).mean())


def test_phase_p3_trains_only_the_heads(digits, model):
    trained = set_trainable(model, "heads")
    set_train_mode(model, "heads")
    backbone = {name for name in snapshot(model) if name.split(".")[0] in ("blocks", "classifier")}
    before = snapshot(model)
    L2W().step(model, *batch(digits), torch.optim.SGD(trained, **SGD), context(model))
    assert changed(before, model) == set(before) - backbone
