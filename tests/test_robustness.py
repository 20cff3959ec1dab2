"""Robustness: severity 0 is the run's clean numbers exactly, corruption never moves a threshold (they are fit on
clean validation), the mCE summary on a hand case, and `bench analyze` on a real trained run."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.robustness import CLEAN, robustness_summary, run_robustness
from benchmark.cli import main
from benchmark.evaluate import evaluate
from benchmark.store import ResultsStore, read_json
from click.testing import CliRunner
from conftest import write_grid


def random_logits(seed, n_exits=3, n_samples=80, n_classes=4):
    rng = np.random.default_rng(seed)
    return (rng.normal(scale=2.5, size=(n_exits, n_samples, n_classes)).astype(np.float32),
            rng.integers(0, n_classes, size=n_samples))


def test_severity_zero_rows_are_the_clean_evaluation_and_thresholds_stay_put():
    val, val_y = random_logits(0)
    test, test_y = random_logits(1)
    costs, backbone = np.array([0.5, 1.5, 3.5]), 3.2
    noisy = {("gaussian_noise", s): test + np.random.default_rng(s).normal(scale=s, size=test.shape).astype(np.float32)
             for s in (1, 2)}
    table = run_robustness(val, val_y, test, test_y, noisy, costs, backbone)
    clean = evaluate(val, val_y, test, test_y, costs, backbone)
    at_zero = table[table.severity == 0].set_index("point")
    assert set(table[table.severity == 0].corruption) == {CLEAN}
    assert at_zero.loc["area", "accuracy"] == clean.summary["auc_normalised"]
    for name in ("25pct", "50pct", "75pct", "100pct"):
        assert at_zero.loc[f"at_{name}", "accuracy"] == clean.summary[f"accuracy_at_{name}"]
    for k in range(3):
        assert at_zero.loc[f"exit_{k}", "accuracy"] == clean.exits.test_accuracy[k]
        assert at_zero.loc[f"exit_{k}", "macro_f1"] == clean.exits.test_macro_f1[k]
    assert at_zero.loc["exit_2", "macro_f1"] == clean.summary["final_macro_f1"]
    # the chosen points come from validation only: the same (policy, point) at every corruption and severity
    budgets = table[table.point.str.startswith("at_")]
    assert budgets.groupby("point")[["policy", "policy_point"]].nunique().max().max() == 1
    # while the test numbers do move
    assert table[table.severity == 2].set_index("point").loc["exit_0", "accuracy"] != at_zero.loc["exit_0", "accuracy"]


def test_relative_mce_on_a_hand_case():
    rows = []
    # joint errors: corruption a: 0.1, 0.3 (sum 0.4); b: 0.2, 0.2 (0.4). mixed: a: 0.2, 0.2 (0.4); b: 0.1, 0.1 (0.2)
    errors = {"joint": {"a": (0.1, 0.3), "b": (0.2, 0.2)}, "mixed": {"a": (0.2, 0.2), "b": (0.1, 0.1)}}
    for regime, by_corruption in errors.items():
        rows.append({"corruption": CLEAN, "severity": 0, "accuracy": 0.95})
        rows[-1].update(regime=regime)
        for corruption, per_severity in by_corruption.items():
            for severity, error in enumerate(per_severity, start=1):
                rows.append({"regime": regime, "corruption": corruption, "severity": severity, "accuracy": 1 - error})
    table = pd.DataFrame(rows).assign(dataset="d", arch="a", seed=0, point="exit_0", exit=0)
    summary = robustness_summary(table).set_index(["regime", "point"])
    assert summary.loc[("mixed", "exit_0"), "relative_mce"] == pytest.approx((0.4 / 0.4 + 0.2 / 0.4) / 2)
    assert summary.loc[("joint", "final"), "relative_mce"] == pytest.approx(1.0)
    assert summary.loc[("mixed", "exit_0"), "corrupted_accuracy"] == pytest.approx(1 - 0.15)
    assert summary.loc[("mixed", "exit_0"), "drop"] == pytest.approx(0.95 - 0.85)


def test_bench_analyze_writes_robustness_whose_severity_zero_is_the_run(analysed):
    _, out = analysed
    store = ResultsStore(out)
    (run_id,) = store.done_run_ids()
    folder = store.run_dir(run_id)
    table = pd.read_csv(out / "tables" / "robustness.csv")
    assert set(zip(table.corruption, table.severity)) == {(CLEAN, 0), ("gaussian_noise", 1), ("gaussian_noise", 5),
                                                          ("contrast", 1), ("contrast", 5)}
    summary = read_json(folder / "metrics.json")["summary"]
    at_zero = table[table.severity == 0].set_index("point")
    assert at_zero.loc["area", "accuracy"] == summary["auc_normalised"]
    assert at_zero.loc["at_25pct", "accuracy"] == summary["accuracy_at_25pct"]
    exits = pd.read_csv(folder / "exits.csv")
    assert np.array_equal(at_zero.loc[[f"exit_{k}" for k in exits.exit], "accuracy"], exits.test_accuracy)
    logits = np.load(folder / "robustness_logits.npz")
    assert sorted(logits.files) == ["contrast@1", "contrast@5", "gaussian_noise@1", "gaussian_noise@5"]
    assert logits["contrast@5"].dtype == np.float32 and logits["contrast@5"].shape[0] == len(exits)
    worst = table[(table.severity == 5) & (table.point == f"exit_{exits.exit.max()}")].accuracy
    assert (worst < at_zero.loc[f"exit_{exits.exit.max()}", "accuracy"]).all()
    assert (out / "tables" / "robustness_summary.csv").is_file()
    assert (out / "figures" / "robustness_digits_small_cnn.png").stat().st_size > 10_000


def test_a_changed_corruption_set_recomputes_and_an_unchanged_one_is_cached(analysed, tmp_path):
    grid, out = analysed
    shutil.copytree(out, tmp_path / "out")
    store = ResultsStore(tmp_path / "out")
    (run_id,) = store.done_run_ids()
    cached = store.run_dir(run_id) / "robustness.csv"
    before = cached.stat().st_mtime_ns
    runner = CliRunner()
    assert runner.invoke(main, ["analyze", "--grid", str(grid), "--results", str(tmp_path / "out")]).exit_code == 0
    assert cached.stat().st_mtime_ns == before
    text = Path(grid).read_text().replace('severities = [1, 5]', 'severities = [2]')
    changed = tmp_path / "grid.toml"
    changed.write_text(text)
    result = runner.invoke(main, ["analyze", "--grid", str(changed), "--results", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert set(pd.read_csv(cached).severity) == {0, 2}


def test_the_grid_rejects_unknown_corruptions_and_severities(tmp_path):
    runner = CliRunner()
    for line, key in (('corruptions = ["fog"]', "analyses.corruptions"), ("severities = [0, 6]", "analyses.severities")):
        grid = write_grid(tmp_path / "grid.toml", regimes=("joint",), epochs=2, extra=f"\n[analyses]\n{line}\n")
        result = runner.invoke(main, ["run", "--grid", str(grid), "--results", str(tmp_path / "out"), "--dry-run"])
        assert result.exit_code == 2 and key in result.output, result.output
