"""A results folder that never lies: damaged files found and recomputed, failures visible, machine trouble and
Ctrl-C answered with one line. Every case builds the situation for real: real run folders trained by `bench run`
in a subprocess, files truncated or replaced on disk, a small tmpfs for a full or read-only disk (skipped with the
reason where this machine cannot mount one), signals sent to the process group as a terminal's Ctrl-C is.

What is about the process itself (signals, the lock held while it runs, a log file, a terminal, a closed pipe) runs
`bench` in a real subprocess; the commands that look at or recompute a damaged folder (`cli`) call the same click
command in-process, as tests/test_cli.py does, without the 3-5 s of interpreter and library start-up each (27 of
them here), their warnings written to the stderr they return as a subprocess would.
"""
import errno
import fcntl
import os
import pty
import re
import shutil
import signal
import subprocess
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from benchmark.store import CorruptFile, ResultsStore, read_json, read_logits, read_torch, write_json
from conftest import BENCH, REPO, SERIAL_RUN, bench_in_process, write_grid

REGIMES = ("joint", "mixed")
ANALYSES = '[analyses]\nmodel = ["rank"]\nsamples = 100\n'


def bench(*args, timeout=300, **kwargs):
    return subprocess.run([*BENCH, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          **kwargs)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def cli(*args):
    """`bench ARGS` in-process: exit code, stdout, and stderr with every warning raised, as a subprocess prints them
    (an exception other than SystemExit is raised: a traceback fails the test)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = bench_in_process(*args)
    printed = "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    return Result(result.exit_code, result.stdout, result.stderr + printed)


def assert_one_line(result, code, *fragments):
    """Exit `code`, no traceback, and the problem said on one stderr line holding every fragment."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    lines = [line for line in result.stderr.splitlines() if all(f in line for f in fragments)]
    assert lines, result.stderr


@pytest.fixture(scope="session")
def trained(shared_folder):
    """One grid (joint, mixed; digits/small_cnn; 2 epochs) trained once per session with its models by `bench run`
    in a subprocess; tests work on copies."""
    def build(root):
        grid = write_grid(root / "grid.toml", regimes=REGIMES, extra=ANALYSES)
        result = bench("run", "--grid", grid, "--results", root / "out", "--save-models", *SERIAL_RUN)
        assert result.returncode == 0, result.stderr
    return shared_folder("reliability", build)


@pytest.fixture
def results(trained, tmp_path):
    """(grid file, a private copy of the trained results folder, its store, run id by regime)."""
    shutil.copytree(trained, tmp_path / "copy")
    grid, out = tmp_path / "copy" / "grid.toml", tmp_path / "copy" / "out"
    runs = pd.read_csv(out / "tables" / "runs.csv")
    return grid, out, ResultsStore(out), dict(zip(runs.regime, runs.run_id))


def recomputed(grid, out, run_id, *extra):
    """`bench run` recomputes exactly `run_id` and the tables list it as done again."""
    result = cli("run", "--grid", grid, "--results", out, *extra, *SERIAL_RUN)
    assert result.returncode == 0, result.stderr
    assert f"1 trained, {len(REGIMES) - 1} already done" in result.stdout, result.stdout
    runs = pd.read_csv(out / "tables" / "runs.csv")
    assert set(runs.status) == {"done"} and run_id in set(runs.run_id)
    return result


# --- damaged files ---------------------------------------------------------------------------------------------

def test_a_truncated_metrics_json_is_named_and_the_run_recomputed(results):
    grid, out, store, ids = results
    metrics = store.run_dir(ids["joint"]) / "metrics.json"
    metrics.write_text(metrics.read_text()[:40])
    dry = cli("run", "--grid", grid, "--results", out, "--dry-run")
    assert dry.returncode == 0 and "Traceback" not in dry.stderr
    assert re.search(rf"{ids['joint']}\s+pending", dry.stdout), dry.stdout
    assert_one_line(dry, 0, str(metrics), "not valid JSON")
    shown = cli("show", ids["joint"], "--results", out)
    assert shown.returncode == 0 and "pending" in shown.stdout and str(metrics) in shown.stdout
    analyzed = cli("analyze", "--grid", grid, "--results", out)
    assert_one_line(analyzed, 0, str(metrics))
    assert ids["joint"] not in set(pd.read_csv(out / "tables" / "runs.csv").run_id), "tables never keep it"
    assert "recomputes it" in recomputed(grid, out, ids["joint"]).stderr


def test_a_truncated_error_json_is_named_and_the_run_retried(results):
    grid, out, store, ids = results
    folder = store.run_dir(ids["mixed"])
    (folder / "metrics.json").unlink()
    (folder / "error.json").write_text('{"error": "non-fin')
    dry = cli("run", "--grid", grid, "--results", out, "--dry-run")
    assert_one_line(dry, 0, str(folder / "error.json"), "not valid JSON")
    assert cli("show", ids["mixed"], "--results", out).returncode == 0
    recomputed(grid, out, ids["mixed"])


@pytest.mark.parametrize("damage", ["random bytes", "wrong shape"])
def test_damaged_logits_are_noticed_and_recomputed(results, damage):
    grid, out, store, ids = results
    logits = store.run_dir(ids["joint"]) / "logits.npz"
    if damage == "random bytes":
        size = logits.stat().st_size
        logits.write_bytes(np.random.default_rng(0).bytes(size))
    else:
        with np.load(logits) as stored:
            arrays = dict(stored)
        arrays["test"] = arrays["test"][:, :-1]
        np.savez_compressed(logits, **arrays)
    assert store.state(ids["joint"]) == "pending"
    dry = cli("run", "--grid", grid, "--results", out, "--dry-run")
    assert_one_line(dry, 0, str(logits), "checksum")
    recomputed(grid, out, ids["joint"])


def test_read_logits_checks_shapes_against_the_run(results):
    _, _, store, ids = results
    path = store.run_dir(ids["joint"]) / "logits.npz"
    with np.load(path) as stored:
        val, test = len(stored["val_y"]), len(stored["test_y"])
    assert read_logits(path, 4, val, test)["test"].shape[:2] == (4, test)
    with pytest.raises(CorruptFile, match=r"'val' has shape .*expected \(5, "):
        read_logits(path, 5, val, test)
    with pytest.raises(CorruptFile, match="'test' has shape"):
        read_logits(path, 4, val, test + 1)
    path.write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(CorruptFile, match="truncated or corrupt"):
        read_logits(path, 4, val, test)


def test_a_corrupt_model_is_named_never_loaded_unsafely_and_recomputed(results):
    grid, out, store, ids = results
    model = store.run_dir(ids["mixed"]) / "model.pt"
    model.write_bytes(model.read_bytes()[:100])
    with pytest.raises(CorruptFile) as caught:
        read_torch(model)
    assert str(model) in str(caught.value) and "weights_only" not in str(caught.value)
    analyzed = cli("analyze", "--grid", grid, "--results", out)
    assert_one_line(analyzed, 0, str(model), "checksum")
    recomputed(grid, out, ids["mixed"], "--save-models")
    assert ResultsStore(out).state(ids["mixed"]) == "done"


def test_a_corrupt_shared_backbone_is_retrained_by_the_next_run_that_needs_it(results):
    grid, out, store, ids = results
    backbone, = (out / "backbones").iterdir()
    before = read_json(backbone / "cost.json")
    (backbone / "model.pt").write_bytes(b"\x80\x02not a checkpoint")
    shutil.rmtree(store.run_dir(ids["mixed"]))                        # the run that needs it is to be trained
    dry = cli("run", "--grid", grid, "--results", out, "--dry-run")
    assert_one_line(dry, 0, str(backbone / "model.pt"), "retrained")
    assert re.search(rf"{ids['mixed']}\s+pending .* to train", dry.stdout), dry.stdout
    result = recomputed(grid, out, ids["mixed"])
    assert "weights_only" not in result.stderr
    after = read_json(backbone / "cost.json")
    assert ResultsStore(out).backbone_inspect(backbone.name)[0]          # the corrupt file was replaced by a good one
    assert after["model_sha256"] == before["model_sha256"]    # bitwise the first: deterministic training and bytes
    runs = pd.read_csv(out / "tables" / "runs.csv").set_index("regime")
    assert not runs.loc["mixed", "p1_reused"], "the run that retrained the backbone paid for it"


def test_stale_temporaries_of_a_killed_writer_are_removed_by_the_next_run(results):
    grid, out, store, ids = results
    stale = [out / "tables" / ".runs.csv.x1.tmp", store.run_dir(ids["joint"]) / ".metrics.json.x2.tmp",
             next((out / "backbones").iterdir()) / ".model.pt.x3.tmp"]
    for path in stale:
        path.write_bytes(b"")
    assert ResultsStore(out).state(ids["joint"]) == "done", "a temporary is never part of a run"
    result = cli("run", "--grid", grid, "--results", out, *SERIAL_RUN)
    assert result.returncode == 0 and "2 already done" in result.stdout
    assert not [p for p in stale if p.exists()] and not list(out.rglob("*.tmp"))


def test_p1_cost_goes_to_the_run_that_trained_it_whenever_the_kill_came(results):
    """A kill after the backbone is stored but before its run finishes leaves the backbone and a run folder
    without metrics.json; the rerun of that run is still the one that paid for P1."""
    grid, out, store, ids = results
    trained_by = read_json(next((out / "backbones").iterdir()) / "cost.json")["trained_by"]
    assert trained_by == ids["mixed"]
    (store.run_dir(ids["mixed"]) / "metrics.json").unlink()
    recomputed(grid, out, ids["mixed"])
    runs = pd.read_csv(out / "tables" / "runs.csv").set_index("regime")
    assert not runs.loc["mixed", "p1_reused"]


# --- failures visible ------------------------------------------------------------------------------------------

def test_when_every_run_failed_the_tables_are_valid_csv_with_a_header(grid_file, tmp_path):
    grid = grid_file(regimes=REGIMES, extra="[arch_overrides.small_cnn]\nlr = 1e30\n")
    result = cli("run", "--grid", grid, "--results", tmp_path / "out", *SERIAL_RUN)
    assert result.returncode == 1 and "2 reported runs of grid" in result.stderr
    tables = {p.stem: pd.read_csv(p) for p in (tmp_path / "out" / "tables").glob("*.csv")}
    assert set(tables) >= {"runs", "exits", "curves", "selected"}
    assert list(tables["runs"].status) == ["failed", "failed"]
    assert tables["runs"].error.str.startswith("non-finite loss").all()
    for name in ("exits", "curves", "selected"):
        assert tables[name].empty and {"run_id", "dataset", "arch", "regime", "seed"} <= set(tables[name].columns)


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount a tmpfs of `size` bytes (root only); yields a function that mounts and returns the mount point."""
    mounted = []

    def mount(size: int, *options: str) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        opts = ",".join([f"size={size}", *options])
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip() or 'not root'})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_a_full_disk_leaves_the_run_pending_and_the_rerun_trains_it(grid_file, small_tmpfs):
    grid = grid_file(regimes=("joint",))
    disk = small_tmpfs(4 << 20)
    out, filler = disk / "out", disk / "filler"
    filler.write_bytes(b"\0" * ((4 << 20) - (96 << 10)))          # leave less than one run's files need
    full = cli("run", "--grid", grid, "--results", out, *SERIAL_RUN)
    assert_one_line(full, 1, "full disk", "free space")
    run_dir, = (out / "runs").iterdir()
    assert not (run_dir / "error.json").exists(), "a full disk is not the run's failure"
    filler.unlink()
    again = cli("run", "--grid", grid, "--results", out, *SERIAL_RUN)
    assert again.returncode == 0 and "1 trained, 0 already done" in again.stdout, again.stdout + again.stderr


DRY_RUN = pytest.mark.parametrize("dry_run", [[], ["--dry-run"]], ids=["run", "dry-run"])
"""--dry-run refuses what `run` refuses, without writing anything (issue 22)."""


@DRY_RUN
def test_a_read_only_results_folder_is_one_line_exit_2(grid_file, small_tmpfs, dry_run):
    disk = small_tmpfs(1 << 20, "ro")
    result = cli("run", "--grid", grid_file(regimes=("joint",)), "--results", disk / "out", *dry_run)
    assert_one_line(result, 2, str(disk / "out"), "read-only file system", "--results")


@DRY_RUN
def test_an_immutable_results_folder_is_one_line_exit_2(grid_file, small_tmpfs, dry_run):
    out = small_tmpfs(1 << 20) / "out"
    out.mkdir()
    if subprocess.run(["chattr", "+i", str(out)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported here (needs root and a file system with immutable flags)")
    try:
        result = cli("run", "--grid", grid_file(regimes=("joint",)), "--results", out, *dry_run)
        assert_one_line(result, 2, str(out), "not writable", "--results")
        assert not any(out.iterdir())
    finally:
        subprocess.run(["chattr", "-i", str(out)], capture_output=True)


@DRY_RUN
def test_results_under_a_regular_file_is_one_line_exit_2(grid_file, tmp_path, dry_run):
    (tmp_path / "file").write_text("x")
    result = cli("run", "--grid", grid_file(regimes=("joint",)), "--results", tmp_path / "file" / "out", *dry_run)
    assert_one_line(result, 2, str(tmp_path / "file" / "out"), "regular file", "--results")


@pytest.mark.parametrize("command", ["run", "analyze", "report"])
def test_results_naming_a_regular_file_is_one_line_exit_2(grid_file, tmp_path, command):
    """Click's own check printed four lines of usage; now the project's one line (issue 22)."""
    (tmp_path / "file").write_text("x")
    result = cli(command, "--grid", grid_file(regimes=("joint",)), "--results", tmp_path / "file")
    assert_one_line(result, 2, str(tmp_path / "file"), "is a regular file, not a folder")
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_machine_errors_keep_a_run_pending_run_errors_fail_it(tmp_path, monkeypatch):
    """The errors a tmpfs cannot produce (EIO, EACCES mid-run) take the same path as the full disk above."""
    import benchmark.pipeline as pipeline
    from benchmark.spec import RunSpec
    store = ResultsStore(tmp_path)
    spec = RunSpec(dataset="digits", arch="small_cnn", regime="joint", seed=0, train={"epochs": 2}, model={})
    raised = []

    def execute_run_that_meets(spec, store, **_):
        write_json(store.start_run(spec.run_id) / "spec.json", spec.to_json())
        raise raised[-1]

    monkeypatch.setattr(pipeline, "execute_run", execute_run_that_meets)
    for code in (errno.ENOSPC, errno.EIO, errno.EACCES, errno.EROFS):
        raised.append(OSError(code, os.strerror(code)))
        with pytest.raises(OSError):
            pipeline.safe_execute(spec, store)
        assert store.state(spec.run_id) == "pending"
    raised.append(FileNotFoundError(errno.ENOENT, "no such file", "x.csv"))
    assert pipeline.safe_execute(spec, store)[0] == "failed" and store.state(spec.run_id) == "failed"


# --- interruptions, data root, lock --------------------------------------------------------------------------

@pytest.fixture
def ctrl_c_reaches_children():
    """A background job (`cmd &`, nohup, some CI runners) starts pytest with Ctrl-C ignored, and an ignored signal
    stays ignored across exec: the bench processes started here would never see the Ctrl-C under test. A handled
    one is reset to the default at exec, where Python installs its KeyboardInterrupt."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def interrupt_when(process, ready, timeout=240, sig=signal.SIGINT):
    """Send Ctrl-C to the process group (as a terminal does) once `ready()` holds; SIGTERM to the process alone (as
    `kill` does)."""
    deadline = time.time() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, "the moment to interrupt never came"
        time.sleep(0.05)
    if sig == signal.SIGINT:
        os.killpg(process.pid, sig)
    else:
        os.kill(process.pid, sig)
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, stdout, stderr


@pytest.mark.slow
def test_ctrl_c_during_the_analyses_says_how_to_resume_and_exits_130(grid_file, tmp_path, ctrl_c_reaches_children):
    grid = grid_file(regimes=REGIMES, extra='[analyses]\nrun_after = true\nmodel = ["rank", "landscape"]\n'
                                             'landscape_points_2d = 41\nlandscape_2d_seeds = [0]\n')
    out = tmp_path / "out"
    process = subprocess.Popen([*BENCH, "run", "--grid", str(grid), "--results", str(out), *SERIAL_RUN],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    code, _, stderr = interrupt_when(process, lambda: any(out.glob("runs/*/rank.csv")))
    assert code == 130 and "interrupted: rerun the same command" in stderr, stderr
    assert "Aborted" not in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("moment, sig", [("workers start", signal.SIGINT), ("workers train", signal.SIGINT),
                                         ("workers train", signal.SIGTERM)])
@pytest.mark.slow
def test_ctrl_c_or_sigterm_with_process_workers_prints_no_worker_tracebacks_and_stops_them(grid_file, tmp_path,
                                                                                          moment, sig,
                                                                                          ctrl_c_reaches_children):
    """SIGTERM (a cluster's time limit, `kill`) reaches the main process alone and takes Ctrl-C's path."""
    grid = grid_file(regimes=REGIMES, seeds=(0, 1), epochs=400)    # no run can end before the interrupt
    out = tmp_path / "out"
    process = subprocess.Popen([*BENCH, "run", "--grid", str(grid), "--results", str(out), "--executor", "process",
                                "--jobs", "2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    started = time.time()
    ready = {"workers start": lambda: (out / ".lock").exists() and time.time() - started > 1.0,
             "workers train": lambda: any(out.glob("runs/*/spec.json"))}[moment]
    code, _, stderr = interrupt_when(process, ready, sig=sig)
    stopped = time.time()
    expected = (130, "interrupted") if sig == signal.SIGINT else (143, "terminated (SIGTERM)")
    assert code == expected[0] and f"{expected[1]}: rerun the same command" in stderr, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert not any(out.glob("runs/*/error.json")), "an interrupted run is pending, not failed"
    assert not any(out.glob("runs/*/metrics.json")), "the interrupt came before any run finished"
    time.sleep(1)
    group = subprocess.run(["ps", "-o", "stat=,args=", "-g", str(process.pid)], capture_output=True, text=True)
    alive = [line for line in group.stdout.splitlines() if not line.strip().startswith("Z")]   # Z: already dead
    assert not alive, f"processes left running: {alive}"
    assert stopped - started < 60


def test_a_bad_data_root_leaves_no_results_folder(grid_file, tmp_path):
    grid = grid_file(datasets=("mnist",), regimes=("joint",))
    result = cli("run", "--grid", grid, "--results", tmp_path / "out", "--data-root", tmp_path / "nothing")
    assert_one_line(result, 2, "MNIST", str(tmp_path / "nothing"), "--download")
    assert not (tmp_path / "out").exists()


def test_a_failed_download_says_the_machine_seems_offline(tmp_path):
    from benchmark.data.torchvision_sets import _TorchvisionSource
    source = _TorchvisionSource("MNIST", "{root}/MNIST/raw/")
    message = source._unavailable_message(tmp_path, True, OSError("Name or service not known"))
    assert "seems offline" in message and "rerun with --download" not in message


def test_analyze_regenerates_missing_run_tables(results):
    grid, out, _, ids = results
    (out / "tables" / "runs.csv").unlink()
    analyzed = cli("analyze", "--grid", grid, "--results", out)
    assert analyzed.returncode == 0, analyzed.stderr
    assert set(pd.read_csv(out / "tables" / "runs.csv").run_id) == set(ids.values())
    assert (out / "tables" / "leaderboard.csv").is_file()


@pytest.mark.slow
def test_the_lock_is_held_from_training_to_the_end_of_the_analyses(grid_file, tmp_path):
    grid = grid_file(regimes=REGIMES, extra='[analyses]\nrun_after = true\nmodel = ["rank"]\n')
    out = tmp_path / "out"
    process = subprocess.Popen([*BENCH, "run", "--grid", str(grid), "--results", str(out), *SERIAL_RUN],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    held_once, free_after = False, []
    while process.poll() is None:
        if (out / ".lock").exists():
            with open(out / ".lock") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    held_once = True
                else:
                    fcntl.flock(handle, fcntl.LOCK_UN)
                    if held_once and process.poll() is None:
                        free_after.append(time.time())
        time.sleep(0.01)
    _, stderr = process.communicate()
    assert process.returncode == 0, stderr
    assert held_once and (out / "runs").is_dir() and any(out.glob("runs/*/rank.csv"))
    last_write = max(p.stat().st_mtime for p in out.rglob("*") if p.is_file() and p.name != ".lock")
    assert not [t for t in free_after if t < last_write], "another command could have written in between"


# --- using it ----------------------------------------------------------------------------------------------------

def test_dry_run_into_a_closed_pipe_exits_quietly_with_0(grid_file, tmp_path):
    command = " ".join([*BENCH, "run", "--grid", str(grid_file()), "--results", str(tmp_path / "out"), "--dry-run"])
    done = subprocess.run(["bash", "-c", f"{command} | true; echo \"status=${{PIPESTATUS[0]}}\""], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert "status=0" in done.stdout and done.stderr == "", done.stderr


def test_a_log_file_gets_one_plain_line_per_run(grid_file, tmp_path):
    log = tmp_path / "log.txt"
    with open(log, "w") as handle:
        done = subprocess.run([*BENCH, "run", "--grid", str(grid_file(regimes=REGIMES)), "--results",
                               str(tmp_path / "out"), *SERIAL_RUN], cwd=REPO, stdout=handle,
                              stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text and "\x1b[" not in text, "no carriage returns or cursor codes in a log file"
    lines = [line for line in text.splitlines() if line.startswith("done ")]
    assert len(lines) == 2 and all(re.search(r"digits/small_cnn seed 0: final accuracy 0\.\d{4}, [\d.]+ s; "
                                             r"\d left, ETA \d+:\d\d:\d\d$", line) for line in lines), text
    assert {line.split()[2] for line in lines} == set(REGIMES)


def test_a_terminal_also_gets_one_line_per_finished_run(grid_file, tmp_path):
    leader, follower = pty.openpty()
    process = subprocess.Popen([*BENCH, "run", "--grid", str(grid_file(regimes=("joint",))), "--results",
                                str(tmp_path / "out"), *SERIAL_RUN], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=follower)
    os.close(follower)
    received = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:
            break
        if not chunk:
            break
        received += chunk
    process.wait(timeout=300)
    os.close(leader)
    assert process.returncode == 0
    assert re.search(rb"done [0-9a-f]{12} joint digits/small_cnn seed 0: final accuracy", received), received[-2000:]


def test_show_rounds_for_display(results):
    _, out, _, ids = results
    shown = cli("show", ids["joint"], "--results", out)
    assert shown.returncode == 0
    summary = shown.stdout.split("\n}\n", 1)[1]                     # after the spec's JSON
    assert "final_accuracy" in summary and not re.search(r"\d\.\d{5,}", summary), summary


def test_help_texts_are_whole_and_perf_explains_its_options():
    top = bench("--help")
    assert top.returncode == 0 and "..." not in top.stdout.split("Commands:")[1]
    perf = cli("perf", "--help")
    assert perf.returncode == 0 and "DESIGN.md" not in perf.stdout
    for option in ("--arch", "--dataset", "--epochs", "--repeats", "--device", "--threads"):
        line = perf.stdout[perf.stdout.index(f"  {option}"):].split("\n  -")[0]
        assert "[default:" in line, line


def test_analyze_after_joint_went_missing_leaves_no_stale_table_or_figure_and_states_completeness(results):
    """summary.csv and final_accuracy_ci.png need joint: once its run is gone they are removed, not left from the
    earlier analysis (REPORT.md would embed the stale figure), and `bench analyze` says what is missing."""
    grid, out, _, ids = results
    first = cli("analyze", "--grid", grid, "--results", out)
    assert first.returncode == 0, first.stderr
    assert "Reported runs: 2 done, 0 failed, 0 missing" in first.stdout
    assert (out / "tables" / "summary.csv").is_file() and (out / "figures" / "final_accuracy_ci.png").is_file()

    shutil.rmtree(out / "runs" / ids["joint"])
    again = cli("analyze", "--grid", grid, "--results", out)
    assert again.returncode == 0, again.stderr
    assert "Reported runs: 1 done, 0 failed, 1 missing" in again.stdout
    assert not (out / "tables" / "summary.csv").exists()
    assert not (out / "figures" / "final_accuracy_ci.png").exists()
    assert set(pd.read_csv(out / "tables" / "leaderboard.csv").regime) == {"mixed"}


def test_analyzing_an_only_slice_keeps_the_grids_tables_whole(results):
    """Analysing one slice must not shrink the grid's tables to it: leaderboard.csv keeps joint (the baseline) and
    rank.csv / calibration.csv keep every done run (a newcomer's two `--only` slices left them to the last one)."""
    grid, out, _, ids = results
    whole = cli("analyze", "--grid", grid, "--results", out)
    assert whole.returncode == 0, whole.stderr
    sliced = cli("analyze", "--grid", grid, "--results", out, "--only", "regime=mixed")
    assert sliced.returncode == 0, sliced.stderr
    tables = out / "tables"
    assert set(pd.read_csv(tables / "leaderboard.csv").regime) == {"joint", "mixed"}
    for name in ("rank", "calibration"):
        assert set(pd.read_csv(tables / f"{name}.csv").run_id) == set(ids.values()), name
    assert set(pd.read_csv(tables / "summary.csv").regime) == {"joint", "mixed"}


def test_bench_analyze_into_a_log_file_writes_plain_lines_not_carriage_return_bars(results, tmp_path):
    grid, out, _, ids = results
    log = tmp_path / "analyze.txt"
    with open(log, "w") as handle:
        done = subprocess.run([*BENCH, "analyze", "--grid", str(grid), "--results", str(out)], cwd=REPO,
                              stdout=handle, stderr=subprocess.STDOUT, timeout=300)
    text = log.read_text()
    assert done.returncode == 0, text
    assert "\r" not in text and "\x1b[" not in text, "no carriage returns or cursor codes in a log file"
    assert {line.split()[1] for line in text.splitlines() if line.startswith("analyzed ")} == set(ids.values())


def test_identical_checkpoints_are_identical_bytes_whatever_the_temporary_name(tmp_path):
    """torch.save named the zip archive's root after the (random) temporary file: the same tensors stored different
    bytes, so the checksums of two identical runs differed."""
    from benchmark.store import write_torch
    state = {"weight": torch.arange(12.0).reshape(3, 4), "step": torch.tensor(7)}
    write_torch(tmp_path / "a" / "model.pt", state)
    write_torch(tmp_path / "b" / "model.pt", state)
    write_torch(tmp_path / "other_name.pt", state)
    payloads = {(tmp_path / p).read_bytes() for p in ("a/model.pt", "b/model.pt", "other_name.pt")}
    assert len(payloads) == 1
    loaded = read_torch(tmp_path / "a" / "model.pt")
    assert torch.equal(loaded["weight"], state["weight"]) and int(loaded["step"]) == 7
