"""Calibration of every exit (analysis/calibration.py) against known answers, and `bench analyze` writing its table
and reliability figure from a real tiny run's stored logits."""
import shutil

import numpy as np
import pandas as pd
import pytest

from analysis.calibration import (brier_score, calibration_table, confidence_and_correct, expected_calibration_error,
                                  figure_regimes, ks_calibration_error, negative_log_likelihood, shown_exits)
from benchmark.grid import load_grid
from benchmark.report import build_report
from benchmark.store import ResultsStore


def test_a_perfectly_calibrated_predictor_has_ece_and_ks_near_zero():
    rng = np.random.default_rng(0)
    confidence = rng.uniform(0.1, 1.0, 200_000)
    correct = (rng.uniform(size=confidence.size) < confidence).astype(float)
    assert expected_calibration_error(confidence, correct) < 0.01
    assert ks_calibration_error(confidence, correct) < 0.01


def test_an_overconfident_predictor_has_ece_and_ks_of_the_gap():
    rng = np.random.default_rng(1)
    confidence = np.full(100_000, 0.99)
    correct = rng.permutation(np.r_[np.ones(50_000), np.zeros(50_000)])
    assert expected_calibration_error(confidence, correct) == pytest.approx(0.49, abs=1e-9)
    assert ks_calibration_error(confidence, correct) == pytest.approx(0.49, abs=1e-9)


def test_ece_weights_each_equal_width_bin_by_its_mass():
    # bin of 0.95 (15th): 3 samples, accuracy 1/3; bin of 0.5 (8th): 1 sample, correct -> (3*|1/3-0.95| + 0.5) / 4
    confidence, correct = np.array([0.95, 0.95, 0.95, 0.5]), np.array([1.0, 0.0, 0.0, 1.0])
    assert expected_calibration_error(confidence, correct) == pytest.approx((3 * abs(1 / 3 - 0.95) + 0.5) / 4)


def test_nll_and_brier_on_two_hand_computed_samples():
    logits = np.log(np.array([[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]], dtype=np.float32))
    labels = np.array([0, 1])
    assert negative_log_likelihood(logits, labels) == pytest.approx(-(np.log(0.7) + np.log(0.25)) / 2, rel=1e-6)
    brier = ((0.3 ** 2 + 0.2 ** 2 + 0.1 ** 2) + (0.25 ** 2 + 0.75 ** 2 + 0.5 ** 2)) / 2
    assert brier_score(logits, labels) == pytest.approx(brier, rel=1e-6)
    confidence, correct = confidence_and_correct(logits, labels)
    assert confidence == pytest.approx([0.7, 0.5], rel=1e-6) and list(correct) == [1.0, 0.0]


def test_the_table_has_one_row_per_run_and_exit():
    rng = np.random.default_rng(2)
    logits, y = rng.normal(size=(3, 50, 4)).astype(np.float32), rng.integers(0, 4, 50)
    labels = {"run_id": "r", "dataset": "d", "arch": "a", "regime": "joint", "seed": 0}
    table, bins = calibration_table([(labels, logits, y)])
    assert list(table.exit) == [0, 1, 2] and (table.samples == 50).all() and (table.split == "test").all()
    assert bins.groupby("exit")["count"].sum().tolist() == [50, 50, 50]


def test_the_figure_shows_joint_mixed_and_the_best_joint_objective():
    runs = pd.DataFrame({"regime": ["joint+sdn", "joint+sdn", "joint+cet", "disjoint+sdn"],
                         "auc_normalised": [0.8, 0.9, 0.8, 0.99]})
    regimes = ["joint", "mixed", "joint+sdn", "joint+cet", "disjoint+sdn", "disjoint"]
    assert figure_regimes(regimes, runs) == ["joint", "mixed", "joint+sdn"]
    assert shown_exits([0, 1, 2, 3]) == [0, 1, 3] and shown_exits([0]) == [0]


@pytest.mark.slow
def test_bench_analyze_writes_calibration_from_a_real_runs_logits(smoke_analyzed, tmp_path):
    grid, analyzed, returncode, stderr = smoke_analyzed     # joint, disjoint, mixed trained, then `bench analyze`
    assert returncode == 0, stderr
    out = shutil.copytree(analyzed, tmp_path / "out")          # build_report below may draw into its figures/
    table = pd.read_csv(out / "tables" / "calibration.csv")
    exits = pd.read_csv(out / "tables" / "exits.csv")
    assert len(table) == len(exits) and set(table.regime) == {"joint", "disjoint", "mixed"}
    assert table.groupby("run_id").exit.apply(list).map(lambda e: e == sorted(set(e))).all()
    assert table.ece.between(0, 1).all() and table.ks.between(0, 1).all()
    assert (table.nll > 0).all() and table.brier.between(0, 2).all()
    merged = table.merge(exits, on=["run_id", "exit"])
    assert np.allclose(merged.accuracy, merged.test_accuracy)      # the same test split and prediction rule
    assert (out / "figures" / "reliability_digits_small_cnn.png").stat().st_size > 10_000
    text, _ = build_report(load_grid(str(grid), check_models=False), ResultsStore(out), out / "figures")
    assert "## Calibration" in text and "| `joint` |" in text.split("## Calibration")[1]
    assert "figures/reliability_digits_small_cnn.png" in text
