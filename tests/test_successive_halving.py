"""Successive-halving tuning: a run stopped at a rung and resumed is bitwise the run trained in one go, for every
objective (the property the tuning protocol rests on); rungs read no test data; the plan keeps the best candidates
by validation area and trains only those on."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from benchmark.pipeline import CHECKPOINT, execute_run
from benchmark.store import ResultsStore, read_json, read_torch
from regimes.registry import objective_names
from tests.conftest import digits_spec

CPU = torch.device("cpu")
TRAIN = {"epochs": 4, "p1_epochs": None, "batch_size": 256, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
         "nesterov": True, "weight_decay": 5e-4, "eval_every": 1}
WALL = ["epoch_seconds"]


def _regime(objective: str, schedule: str = "joint") -> str:
    return schedule if objective == "uniform" else f"{schedule}+{objective}"


def _train(spec, store: ResultsStore) -> dict:
    return execute_run(spec, store, data_root=Path("/nonexistent"), device=CPU, threads=1, keep_model=True)


def _same_run(store_a: ResultsStore, store_b: ResultsStore, run_id: str) -> None:
    a, b = store_a.run_dir(run_id), store_b.run_dir(run_id)
    weights_a, weights_b = read_torch(a / "model.pt"), read_torch(b / "model.pt")
    assert weights_a.keys() == weights_b.keys()
    for key in weights_a:
        assert torch.equal(weights_a[key], weights_b[key]), f"{key} differs after resuming"
    logits_a, logits_b = np.load(a / "logits.npz"), np.load(b / "logits.npz")
    for key in ("val", "test"):
        np.testing.assert_array_equal(logits_a[key], logits_b[key])
    history_a = pd.read_csv(a / "history.csv").drop(columns=WALL)
    history_b = pd.read_csv(b / "history.csv").drop(columns=WALL)
    pd.testing.assert_frame_equal(history_a, history_b)
    cost_a, cost_b = read_json(a / "metrics.json")["cost"], read_json(b / "metrics.json")["cost"]
    for key in ("optimizer_steps", "examples_seen", "train_flops"):
        assert cost_a[key] == cost_b[key], key
    assert read_json(a / "metrics.json")["summary"] == read_json(b / "metrics.json")["summary"]


@pytest.mark.parametrize("objective", objective_names())
def test_resumed_run_is_bitwise_the_uninterrupted_run(tmp_path, objective):
    """Three epochs: a rung, a rung resumed from it, and the full run resumed from that."""
    spec = digits_spec(_regime(objective), {**TRAIN, "epochs": 3})
    whole, halves = ResultsStore(tmp_path / "whole"), ResultsStore(tmp_path / "halves")
    _train(spec, whole)
    rung = _train(spec.at_epoch(1), halves)
    assert rung["stop_after"] == 1 and (halves.run_dir(spec.at_epoch(1).run_id) / CHECKPOINT).is_file()
    _train(spec.at_epoch(2), halves)                      # resumes from epoch 1, stops after 2
    metrics = _train(spec, halves)                        # resumes from epoch 2
    assert metrics["cost"]["resumed_from"] == spec.at_epoch(2).run_id
    _same_run(whole, halves, spec.run_id)


def test_resume_after_a_shared_backbone(tmp_path):
    """mixed: P1 comes from the shared backbone, the rung stops inside P2; the resumed run equals the whole one."""
    spec = digits_spec("mixed", TRAIN)
    whole, halves = ResultsStore(tmp_path / "whole"), ResultsStore(tmp_path / "halves")
    _train(spec, whole)
    _train(spec.at_epoch(3), halves)
    metrics = _train(spec, halves)
    assert metrics["cost"]["resumed_from"] == spec.at_epoch(3).run_id
    _same_run(whole, halves, spec.run_id)


HALVING = '[tuning]\nseeds = [7]\nlr = [0.4, 0.2, 0.1, 0.05, 0.02]\nrungs = [0.25, 0.5]\nkeep = 0.4\n'


def _finish(store, spec, metric=None, error=None):
    from benchmark.tuning import TUNING_METRIC
    from conftest import record_run
    record_run(store, spec, metrics={"summary": {TUNING_METRIC: metric}}, error=error)


def test_successive_halving_keeps_the_best_share_at_each_rung(grid_file, tmp_path):
    from benchmark.grid import load_grid
    from benchmark.tuning import make_plan
    grid = load_grid(str(grid_file(regimes=("joint", "mixed"), epochs=40, extra=HALVING)))
    store = ResultsStore(tmp_path / "out")
    plan = make_plan(grid.specs, grid.tuning, store)
    # joint's tuned epochs are all 40: rungs after 10 and 20; mixed's are its P2 (20 of 40), counted after P1 (20)
    assert {(s.regime, s.stop_after) for s in plan.tuning} == {("joint", 10), ("mixed", 25)}
    assert len(plan.tuning) == 10 and len(plan.awaiting) == 2
    first = {(s.regime, s.own_phases["lr"]): s for s in plan.tuning}
    joint_scores = {0.4: 0.5, 0.2: 0.9, 0.1: 0.7, 0.05: 0.9, 0.02: 0.1}   # 0.2 and 0.05 tie: both go on
    for lr, metric in joint_scores.items():
        _finish(store, first["joint", lr], metric)
    for lr in (0.4, 0.2, 0.1, 0.05):                      # mixed: one failed, three equal: the first declared go on
        _finish(store, first["mixed", lr], *((None, "non-finite loss") if lr == 0.4 else (0.8,)))
    _finish(store, first["mixed", 0.02], 0.8)

    plan = make_plan(grid.specs, grid.tuning, store)
    second = {(s.regime, s.own_phases["lr"]): s for s in plan.tuning if s.stop_after in (20, 30)}
    assert set(second) == {("joint", 0.2), ("joint", 0.05), ("mixed", 0.2), ("mixed", 0.1)}, "ceil(0.4 x 5) = 2 go on"
    assert {s.stop_after for s in second.values()} == {20, 30}
    _finish(store, second["joint", 0.2], 0.85)
    _finish(store, second["joint", 0.05], 0.95)
    _finish(store, second["mixed", 0.2], 0.7)
    _finish(store, second["mixed", 0.1], 0.75)

    plan = make_plan(grid.specs, grid.tuning, store)
    assert plan.complete, "one candidate left after the last rung: decided, no full-budget tuning run"
    assert all(s.stop_after is not None for s in plan.tuning)
    chosen = {s.regime: s.own_phase_train["lr"] for s in plan.reported}
    assert chosen == {"joint": 0.05, "mixed": 0.1}
    table = plan.choices
    assert len(table) == 14 and table["wall_seconds"].isna().all()
    assert table[table["continued"]].groupby("regime").size().to_dict() == {"joint": 2, "mixed": 2}
    assert set(table[table["chosen"]]["lr"]) == {0.05, 0.1}


def test_survivors_of_the_last_rung_are_compared_at_the_full_budget(grid_file, tmp_path):
    from benchmark.grid import load_grid
    from benchmark.tuning import make_plan
    extra = HALVING.replace("rungs = [0.25, 0.5]\nkeep = 0.4", "rungs = [0.5]\nkeep = 0.4")
    grid = load_grid(str(grid_file(regimes=("joint",), epochs=10, extra=extra)))
    store = ResultsStore(tmp_path / "out")
    for lr, metric in zip((0.4, 0.2, 0.1, 0.05, 0.02), (0.1, 0.6, 0.9, 0.5, 0.2)):
        _finish(store, next(s for s in make_plan(grid.specs, grid.tuning, store).tuning
                            if s.own_phases["lr"] == lr), metric)
    finalists = [s for s in make_plan(grid.specs, grid.tuning, store).tuning if s.stop_after is None]
    assert sorted(s.own_phases["lr"] for s in finalists) == [0.1, 0.2]
    assert finalists[0].run_id == finalists[0].trajectory.run_id, "the full run keeps the exhaustive run's id"
    _finish(store, finalists[0], 0.70)                    # the rung's leader falls behind at the end
    _finish(store, finalists[1], 0.75)
    plan = make_plan(grid.specs, grid.tuning, store)
    assert {s.own_phase_train["lr"] for s in plan.reported} == {finalists[1].own_phases["lr"]}


@pytest.mark.parametrize("extra, message", [
    ("rungs = [0.5]\n", "needs both"),
    ("keep = 0.5\n", "needs both"),
    ("rungs = [0.5, 0.25]\nkeep = 0.5\n", "increasing fractions"),
    ("rungs = [0, 0.5]\nkeep = 0.5\n", "increasing fractions"),
    ("rungs = [0.5]\nkeep = 1\n", "share of candidates"),
])
def test_malformed_halving_is_refused_at_load(grid_file, extra, message):
    from benchmark.errors import UserError
    from benchmark.grid import load_grid
    with pytest.raises(UserError, match=message):
        load_grid(str(grid_file(extra='[tuning]\nseeds = [7]\nlr = [0.1, 0.02]\n' + extra)))


def test_a_rung_reads_validation_only(tmp_path):
    """The rung's score is evaluate()'s validation area, computed without the test split."""
    from benchmark.evaluate import evaluate, validation_area
    rng = np.random.default_rng(0)
    val, val_y = rng.normal(size=(4, 300, 10)), rng.integers(0, 10, 300)
    test, test_y = rng.normal(size=(4, 200, 10)), rng.integers(0, 10, 200)
    costs, backbone = np.array([1.0, 2.0, 3.0, 4.0]), 4.0
    expected = evaluate(val, val_y, test, test_y, costs, backbone).summary["val_auc_normalised"]
    assert validation_area(val, val_y, costs, backbone) == expected
    assert validation_area(val, val_y, costs, backbone) == evaluate(val, val_y, test[:, :5], test_y[:5], costs,
                                                                    backbone).summary["val_auc_normalised"]


def test_agreement_counts_choices_regret_and_epochs():
    """Known answer: cell A agrees; in cell B halving picks the candidate exhaustive tuning scored 0.02 lower."""
    from benchmark.tuning_agreement import compare
    cell = {"dataset": "d", "arch": "a", "seed": 100}
    exhaustive = pd.DataFrame([{**cell, "regime": r, "candidate": c, "lr": lr, "chosen": chosen,
                                "seed_mean_val_auc_normalised": score}
                               for r, c, lr, chosen, score in [("A", 0, 0.1, True, 0.9), ("A", 1, 0.01, False, 0.8),
                                                               ("B", 0, 0.1, True, 0.9), ("B", 1, 0.01, False, 0.88)]])
    halving = pd.DataFrame([{**cell, "regime": r, "candidate": c, "lr": lr, "stop_after_epochs": stop,
                             "chosen": chosen, "wall_seconds": 1.0}
                            for r, c, lr, stop, chosen in [("A", 0, 0.1, 15, True), ("A", 1, 0.01, 15, False),
                                                           ("B", 0, 0.1, 15, False), ("B", 1, 0.01, 15, True),
                                                           ("B", 0, 0.1, 20, False), ("B", 1, 0.01, 20, True)]])
    table = compare(exhaustive, halving, {("d", "a", "A"): (10, 30), ("d", "a", "B"): (10, 30)}).set_index("regime")
    assert table["agree"].to_dict() == {"A": True, "B": False}
    assert table.loc["B", "regret_val_auc"] == pytest.approx(0.02) and table.loc["A", "regret_val_auc"] == 0
    # epochs after the shared P1 (10): exhaustive 2 x 20 = 40; halving A 2 x 5 = 10, B 2 x 5 + 2 x 5 = 20
    assert table["exhaustive_epochs"].tolist() == [40, 40] and table["halving_epochs"].to_dict() == {"A": 10, "B": 20}


def test_a_rung_has_its_own_id_and_the_full_run_keeps_the_id_it_had():
    from benchmark.spec import RunSpec
    spec = digits_spec("joint", TRAIN)
    rung = spec.at_epoch(2)
    assert "stop_after" not in spec.to_json() and spec.at_epoch(None).run_id == spec.run_id
    assert rung.run_id != spec.run_id and rung.trajectory == spec
    assert RunSpec.from_json(rung.to_json()) == rung and RunSpec.from_json(rung.to_json()).run_id == rung.run_id


def test_the_estimate_charges_a_rung_the_epochs_since_the_last_one():
    """A chain of rungs costs the full run's steps once, plus each rung's validation logits and per-run overhead."""
    from benchmark import cost_model
    spec = digits_spec("joint", {**TRAIN, "epochs": 40, "batch_size": 64})
    row = {"device_type": "cpu", "device_name": "test cpu", "arch": "small_cnn", "input_shape": "1x8x8",
           "batch_size": 64, "optimizer": "sgd", "seconds_per_step": 1.0, "threads": 1, "torch": "x", "date": "x"}
    calibration = cost_model.Calibration("cpu", "test cpu", (row,))
    whole = cost_model.estimate([("tune", spec)], calibration).cells[0].seconds
    chain = cost_model.estimate([("tune", spec.at_epoch(e)) for e in (10, 20, None)], calibration).cells[0].seconds
    rung_extra = 144 / 64 / 3 + cost_model.RUN_OVERHEAD_SECONDS        # validation logits and overhead per rung
    assert whole > 40 * 20 and chain == pytest.approx(whole + 2 * rung_extra)


def test_configurations_are_scored_on_one_stores_runs(grid_file, tmp_path):
    """Known answer: lr 0.1 leads at half the budget, lr 0.2 wins at the end. A rung at 1/2 keeping 2 of 3 still
    reaches the end with both and agrees with exhaustive tuning; keeping 1 of 3 stops with 0.1 and disagrees."""
    from benchmark.grid import load_grid
    from benchmark.tuning import make_plan
    from benchmark.tuning_agreement import configurations
    path = grid_file(regimes=("joint",), epochs=10,
                     extra='[tuning]\nseeds = [7]\nlr = [0.2, 0.1, 0.05]\nrungs = [0.5]\nkeep = 0.4\n')
    grid, store = load_grid(str(path)), ResultsStore(tmp_path / "out")
    for spec in make_plan(grid.specs, grid.tuning, store).tuning:
        lr = spec.own_phases["lr"]
        _finish(store, spec, {0.2: 0.7, 0.1: 0.8, 0.05: 0.6}[lr])             # the rung at epoch 5
        _finish(store, spec.trajectory, {0.2: 0.95, 0.1: 0.9, 0.05: 0.85}[lr])  # the end
    table = configurations(str(path), tmp_path / "out", [], ["0.5:0.6", "0.5:0.3"]).set_index("keep")
    assert table.loc[0.6, "agree"] == 1 and table.loc[0.3, "agree"] == 0
    assert table.loc[0.3, "regret_max"] == pytest.approx(0.05)
    assert table["exhaustive_epochs"].tolist() == [30, 30] and table.loc[0.3, "halving_epochs"] == 15
