"""`bench run` on real data through the real entry point: files, tables, resume, determinism, failures, kill."""
import json
import os
import shutil
import signal
import subprocess
import time

import numpy as np
import pandas as pd
import pytest

from benchmark import PROTOCOL_VERSION
from benchmark.provenance import code_version
from conftest import BENCH, REPO, SERIAL_RUN, bench_in_process

pytestmark = pytest.mark.slow


def bench_run(grid, results, *extra, timeout=300):
    return subprocess.run([*BENCH, "run", "--grid", str(grid), "--results", str(results), *map(str, extra)],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


def run_dirs(results):
    return sorted((results / "runs").iterdir())


# smoke_results and smoke_analyzed (joint, disjoint, mixed; trained and analysed once per session) are in conftest.py:
# tests/test_calibration.py reads them too.


def copy_of(results, tmp_path):
    shutil.copytree(results, tmp_path / "copy")
    return tmp_path / "copy"


def test_every_run_writes_its_files_and_the_tables(smoke_results):
    _, results, stdout = smoke_results
    assert "3 trained" in stdout
    assert "next: `bench report --grid " in stdout and str(results / "REPORT.md") in stdout   # ends with the answer
    for folder in run_dirs(results):
        assert {p.name for p in folder.iterdir()} == {"spec.json", "history.csv", "logits.npz", "exits.csv",
                                                     "curves.csv", "selected.csv", "metrics.json"}
        metrics = json.loads((folder / "metrics.json").read_text())
        logits = np.load(folder / "logits.npz")
        assert logits["val"].dtype == np.float32 and logits["test"].shape[0] == metrics["num_exits"]
        assert 0.0 <= metrics["summary"]["final_accuracy"] <= 1.0
        assert metrics["cost"]["optimizer_steps"] > 0 and metrics["cost"]["examples_seen"] > 0
        assert metrics["provenance"]["git_commit"] == code_version()["git_commit"]       # the code that trained it
    runs = pd.read_csv(results / "tables" / "runs.csv")
    assert runs.timing_batch.nunique() == 1 and runs.git_commit.notna().all()        # one bench run, one sitting
    assert (runs.protocol == PROTOCOL_VERSION).all()
    exits = pd.read_csv(results / "tables" / "exits.csv")
    curves = pd.read_csv(results / "tables" / "curves.csv")
    assert sorted(runs.regime) == ["disjoint", "joint", "mixed"] and runs.run_id.is_unique
    assert len(exits) == runs.num_exits.sum()
    assert set(curves.policy) == {"exit", "threshold", "budgeted", "entropy", "patience", "ensemble"}
    assert not curves.duplicated(["run_id", "policy", "point"]).any()


def test_p1_is_trained_once_and_charged_to_both_users(smoke_results):
    _, results, _ = smoke_results
    assert len(list((results / "backbones").iterdir())) == 1
    runs = pd.read_csv(results / "tables" / "runs.csv").set_index("regime")
    assert sorted(runs.loc[["disjoint", "mixed"], "p1_reused"]) == [False, True]
    p1_steps = {r: json.loads((results / "runs" / runs.loc[r, "run_id"] / "metrics.json").read_text())
                ["cost"]["phases"][0]["optimizer_steps"] for r in ("disjoint", "mixed")}
    assert p1_steps["disjoint"] == p1_steps["mixed"] > 0


def test_rerun_skips_done_runs_and_never_duplicates_rows(smoke_results, tmp_path):
    grid, results, _ = smoke_results
    results = copy_of(results, tmp_path)
    before = {p.name: (p / "metrics.json").stat().st_mtime_ns for p in run_dirs(results)}
    again = bench_in_process("run", "--grid", grid, "--results", results, *SERIAL_RUN)  # no training
    assert again.exit_code == 0 and "0 trained, 3 already done" in again.stdout
    assert before == {p.name: (p / "metrics.json").stat().st_mtime_ns for p in run_dirs(results)}
    assert len(pd.read_csv(results / "tables" / "runs.csv")) == 3


def test_same_grid_twice_gives_identical_numbers(smoke_results, tmp_path):
    grid, first, _ = smoke_results
    second = tmp_path / "second"
    assert bench_run(grid, second, *SERIAL_RUN).returncode == 0      # the thread count of the first
    for folder in run_dirs(first):
        a = json.loads((folder / "metrics.json").read_text())
        b = json.loads((second / "runs" / folder.name / "metrics.json").read_text())
        assert a["summary"] == b["summary"] and a["flops"] == b["flops"]
        assert a["provenance"]["timing_batch"] != b["provenance"]["timing_batch"]    # two sittings: not comparable
        la, lb = np.load(folder / "logits.npz"), np.load(second / "runs" / folder.name / "logits.npz")
        assert np.array_equal(la["test"], lb["test"]) and np.array_equal(la["val"], lb["val"])
        pd.testing.assert_frame_equal(pd.read_csv(folder / "curves.csv"),
                                      pd.read_csv(second / "runs" / folder.name / "curves.csv"))


def test_non_finite_loss_fails_that_run_only(grid_file, tmp_path):
    grid = grid_file(archs=("small_cnn", "cifar_resnet8"), regimes=("joint", "mixed"),
                     extra="[arch_overrides.small_cnn]\nlr = 1e30\n")
    result = bench_run(grid, tmp_path / "out", *SERIAL_RUN)
    assert result.returncode == 1, result.stderr
    runs = pd.read_csv(tmp_path / "out" / "tables" / "runs.csv")
    done, failed = runs[runs.status == "done"], runs[runs.status == "failed"]
    assert sorted(done.arch) == ["cifar_resnet8", "cifar_resnet8"] and done.error.isna().all()
    assert sorted(failed.arch) == ["small_cnn", "small_cnn"] and failed.final_accuracy.isna().all()
    assert sorted(failed.error) == ["non-finite loss at epoch 1, phase P1", "non-finite loss at epoch 1, phase P2"]
    # the reruns train nothing: in this process (the first run checked the real entry point's exit code)
    skipped = bench_in_process("run", "--grid", grid, "--results", tmp_path / "out", *SERIAL_RUN)
    assert "2 failed earlier" in skipped.stdout and skipped.exit_code == 1  # failed runs: not retried, not forgotten
    assert "2 reported runs of grid" in skipped.stderr and "--allow-failed" in skipped.stderr
    allowed = bench_in_process("run", "--grid", grid, "--results", tmp_path / "out", "--allow-failed", *SERIAL_RUN)
    assert allowed.exit_code == 0, allowed.output


def test_killed_run_resumes_without_loss_or_duplicates(grid_file, tmp_path):
    grid = grid_file(seeds=(0, 1), epochs=2)
    results = tmp_path / "out"
    process = subprocess.Popen([*BENCH, "run", "--grid", str(grid), "--results", str(results), *SERIAL_RUN], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(results.glob("runs/*/metrics.json"))) < 2:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done_before = {p.parent.name for p in results.glob("runs/*/metrics.json")}
    assert 2 <= len(done_before) < 6, "the kill must land mid-grid"
    for path in results.glob("runs/*/metrics.json"):
        json.loads(path.read_text())                    # every metrics.json present is complete
    resumed = bench_in_process("run", "--grid", grid, "--results", results, *SERIAL_RUN)
    assert resumed.exit_code == 0, resumed.output
    assert f"{6 - len(done_before)} trained, {len(done_before)} already done" in resumed.stdout
    runs = pd.read_csv(results / "tables" / "runs.csv")
    assert len(runs) == 6 and runs.run_id.is_unique
    assert not list(results.rglob("*.tmp")), "no temporary file may survive a completed rerun"


POOL_ANALYSES = '[analyses]\nrun_after = true\nmodel = ["rank", "robustness"]\nsamples = 100\n' \
                'corruptions = ["gaussian_noise"]\nseverities = [1]\n'


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one core: the default runs one run at a time, in-process")
def test_by_default_one_process_per_core_runs_the_grid_and_the_main_process_logs_its_runs(grid_file, tmp_path):
    """`bench run` without executor flags, on the CPU: one one-thread worker process per core. Also: the workers
    start each run's analyses as soon as it is done and draw the grid's figures, with this process's numbers and
    pixels."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    grid = grid_file(epochs=2, extra=POOL_ANALYSES)
    result = bench_run(grid, tmp_path / "out", "--log", "tensorboard")
    assert result.returncode == 0, result.stderr
    per_run = sorted((tmp_path / "out" / "runs").glob("*/r*.csv"))
    assert len(per_run) == 6                            # rank.csv and robustness.csv of each of the 3 runs
    here = copy_of(tmp_path / "out", tmp_path / "here")
    for path in here.glob("runs/*/r*.csv"):
        path.unlink()
    again = bench_in_process("analyze", "--grid", grid, "--results", here)
    assert again.exit_code == 0, again.output
    assert all(path.read_bytes() == (here / path.relative_to(tmp_path / "out")).read_bytes() for path in per_run)
    figures = sorted((tmp_path / "out" / "figures").glob("*.png"))
    assert {"rank_profiles.png", "pareto_fronts.png"} <= {path.name for path in figures}
    assert [path.read_bytes() for path in figures] == [(here / "figures" / path.name).read_bytes() for path in figures]
    runs = pd.read_csv(tmp_path / "out" / "tables" / "runs.csv")
    assert len(runs) == 3 and runs.threads.eq(1).all()
    assert runs.timing_batch.str.endswith(f"/process-{os.cpu_count()}x1").all()
    assert len(list((tmp_path / "out" / "backbones").iterdir())) == 1       # disjoint's and mixed's P1, trained once
    assert runs.p1_reused.sum() == 1                                        # by one worker, reused by the other
    # --log: the workers' runs are logged by the main process, each once, with the run folder's numbers
    assert sorted(p.name for p in (tmp_path / "out" / "tensorboard").iterdir()) == sorted(runs.run_id)
    for run_id in runs.run_id:
        events = EventAccumulator(str(tmp_path / "out" / "tensorboard" / run_id))
        events.Reload()
        final = pd.read_csv(tmp_path / "out" / "runs" / run_id / "exits.csv").test_accuracy.iloc[-1]
        assert [e.value for e in events.Scalars("test_accuracy/exit_3")] == [pytest.approx(final, rel=1e-6)]


ANALYSES = """
[analyses]
run_after = true
samples = 150
snapshot_every = 1
snapshot_samples = 100
landscape_samples = 64
landscape_points_1d = 5
landscape_points_2d = 3
interpolation_points = 5
corruptions = ["gaussian_noise", "contrast"]
severities = [1, 5]
"""
# Two corruptions at two severities: robustness still runs and writes its tables (whose rows tests/test_robustness.py
# checks); all of them at five severities took half of these analyses' time and no assertion here reads them.


def test_run_with_analyses_writes_every_table_and_figure(grid_file, tmp_path):
    grid = grid_file(seeds=(0, 1), epochs=2, extra=ANALYSES)
    results = tmp_path / "out"
    result = bench_in_process("run", "--grid", grid, "--results", results, *SERIAL_RUN)
    assert result.exit_code == 0, result.output        # in this process: the other tests here cover the entry point
    tables = results / "tables"
    for name in ("rank", "information", "landscape", "sharpness", "pareto", "hypervolume", "summary", "leaderboard"):
        assert len(pd.read_csv(tables / f"{name}.csv")) > 0, name
    info = pd.read_csv(tables / "information.csv")
    snapshots = info[info.stage == "snapshot"]
    assert sorted(snapshots.epoch.unique()) == [0, 1, 2]
    assert set(snapshots.regime) == {"joint", "disjoint", "mixed"}
    landscape = pd.read_csv(tables / "landscape.csv")
    assert set(landscape.kind) == {"slice_1d", "slice_2d", "interpolation"}
    assert {"joint → mixed", "P1 backbone → mixed", "P1 backbone → disjoint"} <= set(landscape.pair.dropna())
    figures = sorted(p.name for p in (results / "figures").glob("*.png"))
    assert {"rank_profiles.png", "information_plane.png", "pareto_fronts.png",
            "landscape_1d_digits_small_cnn.png", "landscape_2d_digits_small_cnn.png",
            "interpolation_digits_small_cnn.png", "final_accuracy_ci.png"} <= set(figures)
    cached = {p: p.stat().st_mtime_ns for p in results.glob("runs/*/rank.csv")}
    again = bench_in_process("analyze", "--grid", grid, "--results", results)
    assert again.exit_code == 0, again.output
    assert cached == {p: p.stat().st_mtime_ns for p in results.glob("runs/*/rank.csv")}, "per-run analyses are cached"


def test_analyze_without_stored_models_says_how_to_get_them(smoke_analyzed):
    _, _, returncode, stderr = smoke_analyzed          # `bench analyze` on a copy of smoke_results (conftest.py)
    assert returncode == 0, stderr
    assert "3 runs have no model.pt" in stderr
    assert "--save-models" in stderr and "run_after = true" in stderr
