"""`metagf`: the exits' task updates fused tensor by tensor with meta-learned weights, over the exits that reach the
tensor — on constructed gradients with known answers, and one real step on a real model and real data."""
import pytest
import torch
import torch.nn.functional as F

from benchmark.data import load_dataset
from benchmark.errors import UserError
from benchmark.pipeline import initial_model
from benchmark.spec import RunSpec
from benchmark.train import held, make_optimizer
from regimes.base import StepContext
from regimes.exit_gradients import exit_gradients
from regimes.metagf import AUXILIARY_EXIT_WEIGHTS, auxiliary_exit_weights, fuse, task_directions
from regimes.registry import build_regime

TRAIN = {"epochs": 1, "p1_epochs": None, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.0,
         "nesterov": False, "weight_decay": 0.0, "eval_every": 1}


@pytest.fixture(scope="module")
def batch():
    data = load_dataset("digits", "/nonexistent")
    spec = RunSpec(dataset="digits", arch="small_cnn", regime="joint+metagf", seed=0, train=dict(TRAIN),
                   model={"head": "pool", "exits": "flops:0.25,0.5,0.75"})
    x_train, prepare = held(data, "train")
    return spec, data, prepare(x_train[:64]), data.y_train[:64]


def test_task_directions_are_the_gradients_of_the_official_task_losses():
    """d_k = s_k (g_k + a sum_{j != k} w_j g_j), written as loops over the official task loss's terms."""
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0], [-1.0, 4.0]])
    w = auxiliary_exit_weights(4)
    s = torch.tensor([0.2, 0.5, 0.7, 1.0])
    expected = torch.stack([s[k] * (g[k] + sum(0.1 * w[j] * g[j] for j in range(4) if j != k)) for k in range(4)])
    torch.testing.assert_close(task_directions(g, 0.1, w, s), expected)
    assert torch.equal(task_directions(g, 0.0, w, torch.ones(4)), g)


def test_auxiliary_weights_are_the_official_list_then_one():
    assert auxiliary_exit_weights(4).tolist() == pytest.approx([1.0, 1.0, 0.6, 0.6])
    assert auxiliary_exit_weights(7).tolist() == pytest.approx(list(AUXILIARY_EXIT_WEIGHTS))
    assert auxiliary_exit_weights(9).tolist()[7:] == [1.0, 1.0]


@pytest.mark.parametrize("arch, ramp", [("small_cnn", True), ("msdnet", False)])
def test_task_ramp_auto_follows_the_official_scripts_and_reads_the_zero_based_epoch(arch, ramp):
    """usingsdn 1 (ResNet/VGG scripts) on single-scale backbones, 0 (MSDNet script) on multi-scale ones; the ramp
    at the official 0-based epoch e is min(C_k, 0.01 + e C_k / E)."""
    from benchmark.models import build_model
    model = build_model(arch, 10, (3, 32, 32), exits="all" if arch == "msdnet" else "flops:0.25,0.5,0.75")
    objective = build_regime("joint+metagf").objective
    k = model.num_exits
    caps = torch.linspace(0.15, 0.9, k - 1)
    for epoch in (0, 3):
        ctx = StepContext(phase="P2", epoch=epoch, epochs=10, step=0, num_exits=k)
        tau = torch.minimum(caps, 0.01 + epoch * caps / 10)
        torch.testing.assert_close(objective.meta_loss_weights(ctx), torch.cat([tau, torch.ones(1)]))
        expected = objective.meta_loss_weights(ctx) if ramp else torch.ones(k)
        torch.testing.assert_close(objective.task_scales(model, ctx), expected)
    forced = build_regime("joint+metagf", {"task_ramp": "sdn" if not ramp else "none"}).objective
    assert not torch.equal(forced.task_scales(model, ctx), objective.task_scales(model, ctx))


def test_fusion_averages_the_exits_that_reach_each_tensor():
    directions = torch.tensor([[1.0, 1.0, 5.0], [3.0, 3.0, 7.0], [5.0, 5.0, 9.0]])     # tensors of sizes 2 and 1
    reach = torch.tensor([[True, False], [True, False], [True, True]])                  # tensor 1: the last exit only
    equal = torch.zeros(3, 2)
    assert torch.allclose(fuse(directions, equal, reach, [2, 1]), torch.tensor([3.0, 3.0, 9.0]))
    meta = torch.tensor([[5.0, 0.0], [-5.0, 0.0], [-5.0, 0.0]])                         # exit 0 dominates tensor 0
    fused = fuse(directions, meta, reach, [2, 1])
    s = torch.sigmoid(torch.tensor([5.0, -5.0, -5.0]))
    assert torch.allclose(fused[:2], (s @ directions[:, :2]) / s.sum())
    assert fused[2] == 9.0                                                              # the unreached exits weigh 0
    unreached = torch.tensor([[True, False]] * 3)                                       # tensor 1: no exit reaches it
    assert fuse(directions, equal, unreached, [2, 1])[2] == 0.0                         # 0, not 0/0


def test_exits_reach_the_blocks_up_to_their_own_and_heads_only_their_own_exit(batch):
    spec, data, x, y = batch
    model = initial_model(spec, data, torch.device("cpu"))
    model.train()
    grads = exit_gradients(model, [F.cross_entropy(z, y) for z in model(x)])
    last_block = [*model.exit_blocks, len(model.blocks) - 1]
    block_of = {id(p): b for b, block in enumerate(model.blocks) for p in block.parameters()}
    offset = 0
    for t, p in enumerate(grads.shared_parameters):
        reached = grads.shared[:, offset:offset + p.numel()].abs().sum(1) > 0
        offset += p.numel()
        assert torch.equal(grads.reach[:, t], reached), t                   # reach = where gradients arrive
        assert grads.reach[:, t].tolist() == [block_of[id(p)] <= b for b in last_block], t   # = the blocks before
    # a head's (or the classifier's) gradient comes from its own exit only: what the look-ahead moves it by
    owner = {id(p): k for k, module in enumerate([*model.heads, model.classifier]) for p in module.parameters()}
    for i, p in enumerate(grads.own_parameters):
        assert [k for k in range(model.num_exits) if grads.own[k][i] is not None] == [owner[id(p)]]


@pytest.mark.parametrize("arch", ["small_cnn", "msdnet"])
def test_one_step_applies_the_fused_update_and_the_meta_step_lowers_the_look_ahead_loss(arch, batch):
    """On a single-scale backbone (the tasks carry the SDN ramp) and on MSDNet (no ramp; exits reach only part of
    their own block): the update is the fusion of the official task updates over the exits that reach each tensor."""
    spec, data, x, y = batch
    if arch == "msdnet":
        spec = RunSpec(dataset="digits", arch="msdnet", regime="joint+metagf", seed=0, train=dict(TRAIN),
                       model={"head": "msdnet", "exits": "all"})
    model = initial_model(spec, data, torch.device("cpu"))
    model.train()
    objective = build_regime("joint+metagf", {"ema": 0.0}).objective
    optimizer = make_optimizer(list(model.parameters()), TRAIN)
    ctx = StepContext(phase="P2", epoch=2, epochs=4, step=0, num_exits=model.num_exits)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    objective.step(model, x, y, optimizer, ctx)
    assert objective.meta_weights.shape == (model.num_exits, len(list(model.blocks.parameters())))
    assert not torch.equal(objective.meta_weights, torch.ones_like(objective.meta_weights))

    # replay: with meta-weights 1 (the initial ones) the update is the equal-weight fusion, applied by plain SGD
    replay = initial_model(spec, data, torch.device("cpu"))
    replay.load_state_dict({**before, **buffers})
    replay.train()
    grads = exit_gradients(replay, [F.cross_entropy(z, y) for z in replay(x)])
    reach = grads.reach
    assert torch.equal(objective.reach, reach)
    sizes = [p.numel() for p in grads.shared_parameters]
    scales = objective.meta_loss_weights(ctx) if arch == "small_cnn" else torch.ones(model.num_exits)
    directions = task_directions(grads.shared, 0.1, auxiliary_exit_weights(model.num_exits), scales)
    fused = fuse(directions, torch.ones(reach.shape), reach, sizes)
    names = {id(p): n for n, p in replay.named_parameters()}
    offset = 0
    after = dict(model.named_parameters())
    for p, size in zip(grads.shared_parameters, sizes):
        expected = before[names[id(p)]] - TRAIN["lr"] * fused[offset:offset + size].view_as(p)
        offset += size
        assert torch.allclose(after[names[id(p)]], expected, atol=1e-6), names[id(p)]
    head = model.heads[0].linear.weight                               # exit 0's task gradient s_0 g_0
    head_grad = torch.autograd.grad(F.cross_entropy(replay(x)[0], y), replay.heads[0].linear.weight)[0]
    assert torch.allclose(head, before["heads.0.linear.weight"] - TRAIN["lr"] * scales[0] * head_grad, atol=1e-6)

    # the meta step moved the weights downhill on the look-ahead loss (a small step of its own direction)
    def look_ahead_loss(meta):
        update = fuse(directions, meta, reach, sizes)
        state, offset = {}, 0
        for p, size in zip(grads.shared_parameters, sizes):
            state[names[id(p)]] = p.detach() - TRAIN["lr"] * update[offset:offset + size].view_as(p)
            offset += size
        for i, p in enumerate(grads.own_parameters):                # heads: their own exit's task gradient
            k, own = next((k, g[i]) for k, g in enumerate(grads.own) if g[i] is not None)
            state[names[id(p)]] = p.detach() - TRAIN["lr"] * scales[k] * own
        logits = torch.func.functional_call(replay, {**state, **{n: b.clone() for n, b in replay.named_buffers()}},
                                            (x,))
        weights = objective.meta_loss_weights(ctx)
        return float((weights * torch.stack([F.cross_entropy(z, y) for z in logits])).sum())

    start = torch.ones(reach.shape)
    moved = objective.meta_weights.detach()
    small = start + 0.05 * (moved - start) / (moved - start).abs().max()
    assert look_ahead_loss(small) < look_ahead_loss(start)


def test_meta_weights_keep_an_ema_of_their_adam_steps(batch):
    """With ema = 0.9 the meta-weights after a step are 0.1 m_new + 0.9 m_old, m_new those of the ema = 0 run."""
    spec, data, x, y = batch
    ctx = StepContext(phase="P2", epoch=1, epochs=4, step=0, num_exits=4)
    meta = {}
    for ema in (0.0, 0.9):
        model = initial_model(spec, data, torch.device("cpu"))
        model.train()
        objective = build_regime("joint+metagf", {"ema": ema}).objective
        objective.step(model, x, y, make_optimizer(list(model.parameters()), TRAIN), ctx)
        meta[ema] = objective.meta_weights.detach()
    torch.testing.assert_close(meta[0.9], 0.1 * meta[0.0] + 0.9 * torch.ones_like(meta[0.0]))
    assert not torch.allclose(meta[0.9], meta[0.0])


def test_metagf_composes_with_joint_and_mixed_only():
    build_regime("joint+metagf")
    build_regime("mixed+metagf")
    with pytest.raises(UserError, match="use joint\\+metagf or mixed\\+metagf"):
        build_regime("disjoint+metagf")
