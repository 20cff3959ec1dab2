"""K runs of one cell trained as one batched model (benchmark/batched_runs.py) end where the same runs trained one by
one end: vmap over stacked models and the grouped-convolution wide model, each model its own initial weights,
batches and lr, BatchNorm statistics per model; and the batches are the ones the trainer draws.

The equivalence is checked in float64. In float32 the batched kernels round differently from the per-model ones
(1e-7), and after a few steps one pre-ReLU activation may sit closer to 0 than that: its unit switches on in one run
and off in the other, and the first conv's gradient jumps by ~1e-3 (measured: a single sign flip, |x| = 3e-7, at
step 3 of these two runs). The trainer shows the same jumps between 1 and 2 threads; in float64 no activation comes
that close, so the runs must agree to 1e-10, which a wrong lr, weight decay, momentum or shared BatchNorm statistic
(differences >= 1e-6 in one step) cannot."""
import copy
import dataclasses

import pytest
import torch

from benchmark.batched_runs import (TRAIN, GroupedRuns, VmapRuns, WideSmallCNN, bitwise_equal, make_cell,
                                    max_difference, run_spec, trainer_batches, trainer_for)
from benchmark.data import load_dataset
from benchmark.pipeline import initial_model
from benchmark.train import run_phase
from regimes.base import Phase
from regimes.registry import build_regime

CPU = torch.device("cpu")
STEPS = 4
LRS = [0.2, 0.05]          # two tuning candidates' lrs, on two seeds: every way the runs of a cell differ


@pytest.fixture(scope="module")
def digits():
    """digits cut to two batches of 128: a phase epoch is two steps."""
    full = load_dataset("digits", "/nonexistent")
    size = 2 * TRAIN["batch_size"]
    return dataclasses.replace(full, x_train=full.stored("train")[:size], y_train=full.y_train[:size])


@pytest.fixture(scope="module")
def cell(digits):
    return make_cell(digits, "small_cnn", 2, STEPS, LRS)


@pytest.fixture(scope="module")
def cell64(cell):
    return dataclasses.replace(cell, models=[copy.deepcopy(m).double() for m in cell.models],
                               batches=[[(x.double(), y) for x, y in b] for b in cell.batches])


def trained(method, cell):
    runs = trainer_for(method, cell, STEPS)
    runs.train(cell.batches, STEPS)
    return runs.states()


@pytest.fixture(scope="module")
def sequential(cell):
    return trained("sequential", cell)


def test_the_sequential_reference_is_the_trainer(digits, cell, sequential):
    """`run_phase` on each run (2 epochs of 2 steps) ends bitwise where the reference loop on `trainer_batches`
    does: same batches in the same order, same step, optimizer and schedule."""
    for seed, lr, state in zip(cell.seeds, cell.lrs, sequential):
        spec = run_spec("small_cnn", seed, lr)
        model = initial_model(spec, digits, CPU)
        run_phase(model, Phase("P2", "all", STEPS // 2), build_regime("joint").objective, digits,
                  {**spec.train, "eval_every": 10 ** 9}, pairing_seed=spec.pairing_seed, epoch_offset=0, device=CPU)
        assert bitwise_equal([model.state_dict()], [state])


@pytest.mark.parametrize("method", ["vmap", "vmap_grad", "grouped"])
def test_batched_runs_end_where_the_sequential_runs_end(cell64, method):
    """Weights and BatchNorm statistics of every model (float64) after 4 steps; the runs moved by far more."""
    reference, states = trained("sequential", cell64), trained(method, cell64)
    assert [set(s) for s in states] == [set(s) for s in reference]
    diff, _ = max_difference(states, reference)
    assert diff < 1e-10, diff
    assert max_difference(states, [m.state_dict() for m in cell64.models])[0] > 1e-2, "the runs trained"


@pytest.mark.parametrize("method", ["vmap", "grouped"])
def test_batched_runs_are_bitwise_reproducible_and_close_in_float32(cell, sequential, method):
    first, second = trained(method, cell), trained(method, cell)
    assert bitwise_equal(first, second)
    assert max_difference(first, sequential)[0] < 1e-2


def test_the_models_keep_their_own_batchnorm_statistics(cell):
    """One vmapped step updates each model's running mean from its own batch, as that model alone would."""
    runs = VmapRuns(cell.fresh(), cell.lrs, TRAIN, STEPS)
    runs.train(cell.batches, 1)
    alone = cell.fresh()
    for model, batches in zip(alone, cell.batches):
        model.train()
        with torch.no_grad():
            model(batches[0][0])
    key = "blocks.0.1.running_mean"
    for state, model in zip(runs.states(), alone):
        assert torch.allclose(state[key], model.state_dict()[key], atol=1e-6)
    assert not torch.allclose(runs.states()[0][key], runs.states()[1][key])


def test_the_wide_model_maps_the_runs_state_both_ways(cell):
    wide = WideSmallCNN.from_models(cell.fresh())
    assert bitwise_equal(wide.states(), [m.state_dict() for m in cell.models])
    grouped = GroupedRuns(cell.fresh(), cell.lrs, TRAIN, STEPS)
    assert grouped.model.blocks[1][0].groups == 2


def test_trainer_batches_follow_the_epochs(digits):
    batches = trainer_batches(digits, 7, 5, TRAIN["batch_size"])
    assert len(batches) == 5 and all(x.shape == (128, 1, 8, 8) for x, _ in batches)
    first_epoch = torch.cat([y for _, y in batches[:2]])
    assert sorted(first_epoch.tolist()) == sorted(digits.y_train.tolist())   # an epoch is a permutation
