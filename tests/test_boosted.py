"""`boosted`: the exits are an additive ensemble in training and at inference, and exit k's loss never reaches an
earlier head — checked on a real model and real data, through training, evaluation's forward and early exit."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmark.data import load_dataset
from benchmark.evaluate import ExitOutputs, exit_decisions
from benchmark.latency import early_exit_forward
from benchmark.models.eval_mode import evaluating
from benchmark.pipeline import initial_model
from benchmark.spec import RunSpec
from benchmark.train import held
from regimes.boosted import BoostedEnsemble
from regimes.registry import build_regime

CPU = torch.device("cpu")
TRAIN = {"epochs": 1, "p1_epochs": None, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
         "nesterov": True, "weight_decay": 5e-4, "eval_every": 1}


def spec_for(regime, hparams=None):
    return RunSpec(dataset="digits", arch="small_cnn", regime=regime, seed=0, train=dict(TRAIN),
                   model={"head": "pool", "exits": "flops:0.25,0.5,0.75"}, hparams=hparams or {})


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", "/nonexistent")


@pytest.fixture(scope="module")
def inputs(digits):
    x, prepare = held(digits, "train")
    return prepare(x[:64]), digits.y_train[:64]


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


def test_early_exit_runs_the_ensemble_and_leaves_where_evaluation_does(digits):
    model = initial_model(spec_for("joint+boosted"), digits, CPU)
    x_test, prepare = held(digits, "test")
    x = prepare(x_test)
    with evaluating(model):
        outputs = ExitOutputs.from_logits(torch.stack(model(x)).numpy(), digits.y_test.numpy())
    thresholds = np.full(model.num_exits - 1, np.inf)
    thresholds[1] = np.quantile(outputs.score[1], 0.5)            # exit 0 closed: its head still feeds exit 1
    decided = exit_decisions(outputs.score, thresholds)
    with evaluating(model):
        prediction, exits = early_exit_forward(model, x, thresholds)
    differ = np.flatnonzero(exits != decided)
    first = np.minimum(exits, decided)[differ]
    assert (np.abs(outputs.score[first, differ] - thresholds[first]) < 1e-5).all()     # float noise at a threshold
    assert (decided == 1).any() and (decided == model.num_exits - 1).any()
    same = exits == decided
    assert np.array_equal(prediction[same], outputs.prediction[decided, np.arange(len(decided))][same])
