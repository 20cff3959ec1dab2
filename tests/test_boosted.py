"""`boosted`: the exits are an additive ensemble in training and at inference, and exit k's loss never reaches an
earlier head — checked on a real model and real data (early exit through the ensemble: test_latency.py)."""
import torch
import torch.nn.functional as F

from benchmark.models.eval_mode import evaluating
from benchmark.pipeline import initial_model
from regimes.boosted import BoostedEnsemble
from regimes.registry import build_regime

from conftest import digits_spec

CPU = torch.device("cpu")
TRAIN = {"epochs": 1, "p1_epochs": None, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
         "nesterov": True, "weight_decay": 5e-4, "eval_every": 1}


def spec_for(regime, hparams=None):
    return digits_spec(regime, TRAIN, hparams)


def test_every_exit_outputs_the_shrunken_ensemble_of_the_heads_so_far(digits, inputs):
    x, _ = inputs
    model = initial_model(spec_for("joint+boosted", {"shrinkage": 0.3}), digits, CPU)
    assert isinstance(model.combiner, BoostedEnsemble) and model.combiner.shrinkage == 0.3
    plain = initial_model(spec_for("joint"), digits, CPU)
    assert plain.combiner is None
    with evaluating(model), evaluating(plain):
        boosted, heads = model(x), plain(x)                         # same initial weights: same head logits
    expected = heads[0]
    assert torch.allclose(boosted[0], expected)
    for k in range(1, model.num_exits):
        expected = heads[k] + 0.3 * expected
        assert torch.allclose(boosted[k], expected, atol=1e-5)


def test_exit_k_loss_reaches_no_earlier_head_but_its_own_head_and_the_backbone(digits, inputs):
    x, y = inputs
    model = initial_model(spec_for("joint+boosted"), digits, CPU)
    objective = build_regime("joint+boosted").objective
    model.train()
    for k in range(1, model.num_exits):
        model.zero_grad(set_to_none=True)
        F.cross_entropy(objective.forward(model, x)[k], y).backward()
        for j in range(k):
            assert all(p.grad is None or not p.grad.any() for p in model.heads[j].parameters()), (k, j)
        own = model.heads[k].parameters() if k < len(model.heads) else model.classifier.parameters()
        assert any(p.grad is not None and p.grad.any() for p in own)
        assert any(p.grad is not None and p.grad.any() for p in model.blocks[0].parameters())



def test_loss_is_the_sum_of_the_ensembles_losses_and_blocks_get_the_mean_of_their_exits_gradients(digits, inputs):
    """Boosted's step: Σ_k CE(F_k) (a sum: the heads get their exit's whole gradient, 1/K of it under a mean) with
    gradient equilibrium on the backbone (block i gets 1/n_i of the summed gradients of the n_i exits at or after
    it). The reference: one backward per exit on the plain ensemble forward, no hooks, combined by hand."""
    x, y = inputs
    model = initial_model(spec_for("joint+boosted"), digits, CPU).double()
    objective = build_regime("joint+boosted").objective
    model.train()
    blocks = [list(b.parameters()) for b in model.blocks]
    heads = [list(h.parameters()) for h in [*model.heads, model.classifier]]
    flat = [p for ps in blocks + heads for p in ps]
    state = {n: b.clone() for n, b in model.named_buffers()}
    loss = objective.loss(objective.forward(model, x.double()), y, None)
    ours = torch.autograd.grad(loss, flat)
    per_exit = []
    for k in range(model.num_exits):
        model.load_state_dict(state, strict=False)
        grads = torch.autograd.grad(F.cross_entropy(model(x.double())[k], y), flat, allow_unused=True)
        per_exit.append([g if g is not None else torch.zeros_like(p) for g, p in zip(grads, flat)])
    exit_block = [*model.exit_blocks, len(model.blocks) - 1]
    index = 0
    for i, params in enumerate(blocks):
        downstream = [k for k in range(model.num_exits) if exit_block[k] >= i]
        for _ in params:
            expected = sum(per_exit[k][index] for k in downstream) / len(downstream)
            torch.testing.assert_close(ours[index], expected, rtol=1e-9, atol=1e-12)
            index += 1
    for k, params in enumerate(heads):
        for _ in params:
            torch.testing.assert_close(ours[index], per_exit[k][index], rtol=1e-9, atol=1e-12)
            index += 1
