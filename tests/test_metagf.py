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
from regimes.metagf import fuse, task_directions
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


def test_task_directions_add_the_other_exits_gradients_scaled():
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    expected = torch.stack([g[k] + 0.1 * (g.sum(0) - g[k]) for k in range(3)])
    assert torch.allclose(task_directions(g, 0.1), expected)
    assert torch.equal(task_directions(g, 0.0), g)


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


def test_one_step_applies_the_fused_update_and_the_meta_step_lowers_the_look_ahead_loss(batch):
    spec, data, x, y = batch
    model = initial_model(spec, data, torch.device("cpu"))
    model.train()
    objective = build_regime("joint+metagf", {"ema": 0.0}).objective
    optimizer = make_optimizer(list(model.parameters()), TRAIN)
    ctx = StepContext(phase="P2", epoch=0, epochs=1, step=0, num_exits=model.num_exits)
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
    sizes = [p.numel() for p in grads.shared_parameters]
    fused = fuse(task_directions(grads.shared, 0.1), torch.ones(reach.shape), reach, sizes)
    names = {id(p): n for n, p in replay.named_parameters()}
    offset = 0
    after = dict(model.named_parameters())
    for p, size in zip(grads.shared_parameters, sizes):
        expected = before[names[id(p)]] - TRAIN["lr"] * fused[offset:offset + size].view_as(p)
        offset += size
        assert torch.allclose(after[names[id(p)]], expected, atol=1e-6), names[id(p)]
    head = model.heads[0].linear.weight
    head_grad = torch.autograd.grad(F.cross_entropy(replay(x)[0], y), replay.heads[0].linear.weight)[0]
    assert torch.allclose(head, before["heads.0.linear.weight"] - TRAIN["lr"] * head_grad, atol=1e-6)

    # the meta step moved the weights downhill on the look-ahead loss (a small step of its own direction)
    def look_ahead_loss(meta):
        update = fuse(task_directions(grads.shared, 0.1), meta, reach, sizes)
        state, offset = {}, 0
        for p, size in zip(grads.shared_parameters, sizes):
            state[names[id(p)]] = p.detach() - TRAIN["lr"] * update[offset:offset + size].view_as(p)
            offset += size
        for i, p in enumerate(grads.own_parameters):                # heads: their own exit's gradient
            own = next(g[i] for g in grads.own if g[i] is not None)
            state[names[id(p)]] = p.detach() - TRAIN["lr"] * own
        logits = torch.func.functional_call(replay, {**state, **{n: b.clone() for n, b in replay.named_buffers()}},
                                            (x,))
        weights = objective.meta_loss_weights(ctx)
        return float((weights * torch.stack([F.cross_entropy(z, y) for z in logits])).sum())

    start = torch.ones(reach.shape)
    moved = objective.meta_weights.detach()
    small = start + 0.05 * (moved - start) / (moved - start).abs().max()
    assert look_ahead_loss(small) < look_ahead_loss(start)


def test_metagf_composes_with_joint_and_mixed_only():
    build_regime("joint+metagf")
    build_regime("mixed+metagf")
    with pytest.raises(UserError, match="use joint\\+metagf or mixed\\+metagf"):
        build_regime("disjoint+metagf")
