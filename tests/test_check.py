"""`bench check`: a real rerun of a tiny grid against a golden table written by `bench check --update`.

The table is written once per test session (one run: digits x small_cnn x joint, 2 epochs, every analysis at a small
size; tolerances measured from one perturbed rerun instead of the default six, to keep the module short); each
test then edits a copy.
"""
import math
import re
import shutil

import pandas as pd
import pytest
import torch

import benchmark.check as check_module
from benchmark.check import (GOLDEN_COLUMNS, Difference, compare, measured_tolerances, observed, render,
                             sample_floor)
from conftest import bench_in_process, write_grid

pytestmark = [pytest.mark.slow,                  # its session fixture reruns a grid: scheduled first (conftest.py)
              pytest.mark.xdist_group("check")]  # one xdist worker: the other would wait for `written` doing nothing

FEW_PERTURBATIONS = (("ATen AVX2", 1, {"ATEN_CPU_CAPABILITY": "avx2"}),)
"""One perturbed rerun, of one thread: a 2-thread rerun beside the other xdist worker is oversubscribed (slow)."""
SMALL_ANALYSES = ("[analyses]\nsamples = 100\nlandscape_samples = 64\nlandscape_points_1d = 5\n"
                  "landscape_points_2d = 3\ninterpolation_points = 3\nseverities = [3]\n")
"""Every analysis, at a size that keeps the module's reruns short."""
ANALYSIS_METRICS = {"calibration.ece", "calibration.nll", "rank.effective_rank", "information.I_XT_bits",
                    "information.I_TY_bits", "sharpness.sharpness", "robustness_summary.corrupted_accuracy",
                    "hypervolume.hypervolume_normalised"}


def bench(*args):
    threads = torch.get_num_threads()
    try:
        return bench_in_process(*args)
    finally:
        torch.set_num_threads(threads)          # the rerun trains with 1 thread: leave other tests' setting alone


@pytest.fixture(scope="session")
def written(shared_folder):
    """(grid file, golden table written by --update, the command's output), once per session; read-only (tests
    that edit the table use `golden_copy`)."""
    def build(folder):
        grid = write_grid(folder / "tiny.toml", regimes=("joint",), epochs=2, extra=SMALL_ANALYSES)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(check_module, "PERTURBATIONS", FEW_PERTURBATIONS)
            result = bench("check", "--grid", grid, "--golden", folder / "golden.csv", "--update")
        assert result.exit_code == 0, result.output
        (folder / "output.txt").write_text(result.output)
    folder = shared_folder("check", build)
    return folder / "tiny.toml", folder / "golden.csv", (folder / "output.txt").read_text()


REAL_RERUN = check_module.rerun
RERUNS: dict = {}


def rerun_once(grid, root, *, threads, data_root):
    """`check.rerun` of a grid once per test process: reruns of the tiny grid are bitwise equal (the
    `within tolerance (every value identical` assertion below checks it on a real rerun), so the tests that only edit
    a copy of the golden table share one rerun instead of retraining for each."""
    key = (str(grid.path), threads, str(data_root))
    if key not in RERUNS:
        RERUNS[key] = REAL_RERUN(grid, root, threads=threads, data_root=data_root)
    tables, failed = RERUNS[key]
    return {name: table.copy() for name, table in tables.items()}, dict(failed)


@pytest.fixture
def golden_copy(written, tmp_path, monkeypatch):
    """A copy of the golden table to edit, checked against the process's one rerun of the tiny grid."""
    grid, golden, _ = written
    copy = tmp_path / "golden.csv"
    shutil.copy(golden, copy)
    monkeypatch.setattr(check_module, "rerun", rerun_once)
    return grid, copy


def test_update_writes_a_table_that_then_passes(written):
    grid, golden, output = written
    assert "wrote" in output and "new golden table" in output and "1 perturbed rerun: ATen AVX2" in output
    table = pd.read_csv(golden)
    assert list(table.columns) == GOLDEN_COLUMNS
    runs = table[~table.metric.str.contains(".", regex=False)]
    assert len(runs) == 7 + 4                   # 7 run metrics + test accuracy of each of the 4 exits
    assert (runs["tolerance"] >= 1 / 360 - 1e-9).all()         # at least one of digits' 360 test samples
    per_metric = table.groupby("metric").size()
    blocks = 9                                                  # small_cnn's blocks: rank and information per block
    assert {m: per_metric[m] for m in ANALYSIS_METRICS} == {
        "calibration.ece": 4, "calibration.nll": 4, "sharpness.sharpness": 4, "rank.effective_rank": blocks,
        "information.I_XT_bits": blocks, "information.I_TY_bits": blocks,
        "robustness_summary.corrupted_accuracy": 2, "hypervolume.hypervolume_normalised": 2}   # joint's and the cell's
    assert (table.loc[table.metric.isin(ANALYSIS_METRICS), "tolerance"] >= check_module.ANALYSIS_FLOOR).all()
    result = bench("check", "--grid", grid, "--golden", golden)
    assert result.exit_code == 0, result.output
    assert "within tolerance (every value identical" in result.output   # same machine, same threads: bitwise


def test_keys_name_runs_never_paths_or_times(written):
    grid, golden, _ = written
    table = pd.read_csv(golden)
    pattern = r"digits/small_cnn/(joint/(0(/exit=[0-3]|/block=[0-8])?|seeds(/point=(area|final))?)|\(all\)/seeds)"
    assert all(re.fullmatch(pattern, key) for key in table["key"]), table["key"]
    assert not any(str(grid.parent) in key or "seconds" in metric for key, metric in zip(table.key, table.metric))
    assert set(table["metric"]) == {*check_module.RUN_METRICS, check_module.EXIT_METRIC, *ANALYSIS_METRICS}


def _edit(path, change):
    """Rewrite the table at `path` as `change(table)` returns it."""
    change(pd.read_csv(path)).to_csv(path, index=False)


def _shift(sign):
    def change(table):
        row = table.index[(table.key == "digits/small_cnn/joint/0") & (table.metric == "final_accuracy")][0]
        table.loc[row, "expected"] += sign * (table.loc[row, "tolerance"] + 0.01)
        return table
    return change


def _shift_analysis(table):
    row = table.index[(table.key == "digits/small_cnn/joint/0/block=4") & (table.metric == "rank.effective_rank")][0]
    table.loc[row, "expected"] += table.loc[row, "tolerance"] + 0.5
    return table


def _remove_exit_row(table):
    return table[(table.key != "digits/small_cnn/joint/0/exit=2") | (table.metric != "test_accuracy")]


def _add_row(table):
    return pd.concat([table, pd.DataFrame([["digits/small_cnn/joint/1", "final_accuracy", 0.9, 0.01]],
                                          columns=GOLDEN_COLUMNS)])


@pytest.mark.parametrize("change, kind, key", [
    (_shift(+1), "regression", "digits/small_cnn/joint/0 "),          # golden above the rerun: rerun regressed
    (_shift(-1), "improvement", "digits/small_cnn/joint/0 "),         # golden below: an unannounced improvement
    (_shift_analysis, "moved", "digits/small_cnn/joint/0/block=4"),    # an analysis number has no better side
    (_remove_exit_row, "unexpected", "digits/small_cnn/joint/0/exit=2"),   # the rerun has a row the table lacks
    (_add_row, "missing", "digits/small_cnn/joint/1"),                 # the table has a row the rerun lacks
])
def test_check_fails_with_a_readable_diff(golden_copy, change, kind, key):
    grid, golden = golden_copy
    _edit(golden, change)
    result = bench("check", "--grid", grid, "--golden", golden)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip().startswith(kind)]
    assert len(lines) == 1 and key in lines[0], result.output
    assert "1 difference between" in result.output and f"--golden {golden} --update" in result.output


def test_within_tolerance_passes_at_its_edge(golden_copy):
    grid, golden = golden_copy
    table = pd.read_csv(golden)

    _edit(golden, lambda t: t.assign(expected=t.expected + 0.99 * t.tolerance))   # every row moved, within tolerance
    result = bench("check", "--grid", grid, "--golden", golden)
    assert result.exit_code == 0, result.output
    assert f"{len(table)} moved within tolerance" in result.output


def test_update_prints_what_changed(golden_copy, monkeypatch):
    grid, golden = golden_copy
    _edit(golden, _shift(+1))
    monkeypatch.setattr(check_module, "PERTURBATIONS", ())            # tolerances = one-sample floors
    result = bench("check", "--grid", grid, "--golden", golden, "--update")
    assert result.exit_code == 0, result.output
    changed = [line for line in result.output.splitlines() if line.strip().startswith("changed")]
    assert any("final_accuracy" in line and "expected" in line for line in changed), result.output
    assert bench("check", "--grid", grid, "--golden", golden).exit_code == 0


def test_missing_golden_table_says_how_to_write_it(written, tmp_path):
    grid, _, _ = written
    result = bench("check", "--grid", grid, "--golden", tmp_path / "none.csv")
    assert result.exit_code == 2
    assert "--update" in result.stderr and "Traceback" not in result.output


def test_compare_kinds_and_nan():
    golden = pd.DataFrame([("a/b/c/0", "final_accuracy", 0.90, 0.01), ("a/b/c/0", "accuracy_at_25pct", math.nan, 0.01),
                           ("a/b/c/0", "auc_normalised", 0.50, 0.01)], columns=GOLDEN_COLUMNS)
    actual = pd.DataFrame([("a/b/c/0", "final_accuracy", 0.91, ), ("a/b/c/0", "accuracy_at_25pct", 0.3),
                           ("a/b/c/0", "auc_normalised", 0.48), ("a/b/c/1", "auc_normalised", 0.5)],
                          columns=["key", "metric", "value"])
    kinds = [(d.kind, d.key, d.metric) for d in compare(golden, actual)]
    assert kinds == [("improvement", "a/b/c/0", "accuracy_at_25pct"), ("regression", "a/b/c/0", "auc_normalised"),
                     ("unexpected", "a/b/c/1", "auc_normalised")]     # 0.91 is exactly at the tolerance: passes
    text = render([Difference("regression", "a/b/c/0", "auc_normalised", 0.5, 0.48, 0.01)], "g.csv", 3, "--grid x", 0)
    assert "expected 0.5000 ± 0.0100, got 0.4800 (-0.0200)" in text and "bench check --grid x --update" in text


def test_tolerances_pool_a_cells_spread_and_floor_at_one_sample():
    tables = {"runs": pd.DataFrame({"run_id": ["r0", "r1"], "dataset": "d", "arch": "a", "regime": "joint",
                                    "seed": [0, 1], "status": "done",
                                    **{m: [0.9, 0.8] for m in check_module.RUN_METRICS}}),
              "exits": pd.DataFrame(columns=["run_id", "dataset", "arch", "regime", "seed", "exit", "test_accuracy"])}
    base = observed(tables)
    moved = base.assign(value=base["value"] + [0.02 if m == "final_accuracy" and k.endswith("/0") else 0.0
                                               for k, m in zip(base.key, base.metric)])
    tolerances = measured_tolerances(base, [moved], sample_floor(base, {"d": (100, 400)}), margin=1.5)
    assert tolerances[("d/a/joint/1", "auc_normalised")] == 0.03       # pooled over the cell's test metrics
    assert tolerances[("d/a/joint/0", "val_auc_normalised")] == 0.01   # validation pooled apart: its floor 1/100
    assert measured_tolerances(base, [], sample_floor(base, {"d": (100, 400)}))[("d/a/joint/0", "final_accuracy")] \
        == 0.0025                                                       # no rerun: one of 400 test samples


def test_runs_record_what_tells_machines_apart():
    from benchmark.determinism import configure
    from benchmark.tables import run_row
    threads = torch.get_num_threads()
    try:
        environment = configure(torch.device("cpu"), 1)
    finally:
        torch.set_num_threads(threads)
    assert environment["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert environment["torch"] == torch.__version__ and environment["cpu_model"] and environment["threads"] == 1
    spec = {"run_id": "r", "dataset": "d", "arch": "a", "regime": "joint", "seed": 0,
            "train": {"epochs": 2, "batch_size": 64, "lr": 0.05}, "own_phases": {},
            "model": {"head": "pool", "exits": "flops:0.5"}}
    metrics = {"cost": {"wall_seconds": 1.0, "optimizer_steps": 1, "examples_seen": 1, "train_flops": 1.0,
                        "p1_reused": False}, "num_exits": 1, "summary": {}, "flops": {"backbone": 1.0},
               "environment": environment}
    row = run_row(metrics, spec)
    assert {row[k] for k in ("torch", "cpu_model", "cpu_capability", "threads")} >= {torch.__version__, 1}
    old = run_row({**metrics, "environment": {"threads": 2, "device": "cpu"}}, spec)   # runs from before: empty
    assert old["cpu_capability"] is None and old["threads"] == 2
