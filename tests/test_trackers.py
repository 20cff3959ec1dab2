"""`bench run --log tensorboard|wandb`: what the trackers hold is read back (TensorBoard's event files, W&B's offline
run files) and compared with the run folders; a missing package is one line and exit 2 before anything is written;
runs already done are not logged again. (Runs of worker processes logged by the main process: tests/test_end_to_end.py,
the process executor's test.)"""
import importlib.util
import json
import struct
import sys

import pandas as pd
import pytest
from click.testing import CliRunner

from benchmark.cli import main
from conftest import SERIAL_RUN, write_grid

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("trackers")]   # one xdist worker trains `logged` once

TUNING = "\n[tuning]\nseeds = [100]\nlr = [0.1, 0.05]\nrungs = [0.5]\nkeep = 0.5\n"
TRACKERS = [name for name in ("tensorboard", "wandb") if importlib.util.find_spec(name) is not None]


def offline_wandb(monkeypatch, home):
    """W&B offline, silent, with every folder it would write outside the results in `home`: no network, no ~."""
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_DIR": home / "wandb",
                       "WANDB_CACHE_DIR": home / "cache", "WANDB_CONFIG_DIR": home / "config",
                       "WANDB_DATA_DIR": home / "data", "XDG_CACHE_HOME": home / "xdg"}.items():
        monkeypatch.setenv(key, str(value))


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    """(grid file, results, {run_id: folder}, stderr, files the trackers held after the first command, stderr of a
    rerun): a joint grid with a [tuning] table (two rungs, one reported run), trained with every tracker that is
    installed; then the same command again."""
    if not TRACKERS:
        pytest.skip("neither tensorboard nor wandb is installed")
    root = tmp_path_factory.mktemp("trackers")
    grid = write_grid(root / "grid.toml", regimes=("joint",), epochs=2, extra=TUNING)
    args = ["run", "--grid", str(grid), "--results", str(root / "out"), *SERIAL_RUN,
            *(a for name in TRACKERS for a in ("--log", name))]
    with pytest.MonkeyPatch.context() as monkeypatch:
        offline_wandb(monkeypatch, root / "home")
        first = CliRunner().invoke(main, args)
        assert first.exit_code == 0, first.output
        files = tracker_files(root / "out")
        again = CliRunner().invoke(main, args)
        assert again.exit_code == 0, again.output
    runs = {p.name: p for p in (root / "out" / "runs").iterdir()}
    return grid, root / "out", runs, first.stderr, files, again.stderr


def tracker_files(results):
    return sorted(p.relative_to(results) for p in results.rglob("*")
                  if p.relative_to(results).parts[0] in ("tensorboard", "wandb") and p.is_file())


def test_tensorboard_scalars_are_the_run_folders_numbers(logged):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, results, runs, stderr, _, _ = logged
    for count in ("2 runs", "1 run"):      # the tuning rungs, then the reported run
        assert f"tensorboard: {count} logged in {results / 'tensorboard'} (view: tensorboard --logdir " in stderr
    for run_id, folder in runs.items():
        metrics = json.loads((folder / "metrics.json").read_text())
        tuning = metrics.get("stop_after") is not None
        logdir = results / "tensorboard" / ("tuning" if tuning else "") / run_id
        assert len(list(logdir.glob("events.out.tfevents.*"))) == 1
        events = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
        events.Reload()
        scalars = lambda tag: [(e.step, e.value) for e in events.Scalars(tag)]  # noqa: E731
        history = pd.read_csv(folder / "history.csv")
        for k, rows in history.groupby("exit"):
            assert scalars(f"val_accuracy/exit_{k}") == [
                (step, pytest.approx(value, rel=1e-6)) for step, value in zip(rows.global_epoch, rows.val_accuracy)]
            assert scalars(f"train_exit_ce/exit_{k}") == [
                (step, pytest.approx(value, rel=1e-6)) for step, value in zip(rows.global_epoch, rows.train_exit_ce)]
        per_epoch = history.drop_duplicates("global_epoch")
        assert scalars("train/loss") == [(step, pytest.approx(value, rel=1e-6))
                                         for step, value in zip(per_epoch.global_epoch, per_epoch.train_loss)]
        last = int(history.global_epoch.max())
        assert scalars("summary/val_auc_normalised") == [(last, pytest.approx(metrics["summary"]["val_auc_normalised"],
                                                                              rel=1e-6))]
        spec = json.loads((folder / "spec.json").read_text())
        text = events.Tensors("spec/text_summary")[0].tensor_proto.string_val[0].decode()
        assert json.loads(text) == {**spec, "grid": "grid", "tuning": tuning}
        if tuning:
            assert "test_accuracy/exit_0" not in events.Tags()["scalars"]     # rungs never read test data
            continue
        exits = pd.read_csv(folder / "exits.csv")
        for row in exits.itertuples():
            assert scalars(f"test_accuracy/exit_{row.exit}") == [(last, pytest.approx(row.test_accuracy, rel=1e-6))]
            assert scalars(f"test_macro_f1/exit_{row.exit}") == [(last, pytest.approx(row.test_macro_f1, rel=1e-6))]
        assert scalars("summary/final_accuracy") == [(last, pytest.approx(metrics["summary"]["final_accuracy"],
                                                                          rel=1e-6))]


def test_tensorboard_hparams_hold_the_spec(logged):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, results, runs, _, _, _ = logged
    reported = [run_id for run_id, folder in runs.items() if (folder / "exits.csv").exists()]
    assert len(reported) == 1
    events = EventAccumulator(str(results / "tensorboard" / reported[0]))
    events.Reload()
    content = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    spec = json.loads((runs[reported[0]] / "spec.json").read_text())
    assert start.hparams["regime"].string_value == "joint"
    assert start.hparams["seed"].number_value == spec["seed"] == 0
    assert start.hparams["train.epochs"].number_value == 2
    assert start.hparams["tuning"].bool_value is False
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert "test_accuracy/exit_0" in {info.name.tag for info in experiment.metric_infos}


def wandb_records(path):
    """The records of a W&B transaction log (run-<id>.wandb): LevelDB's log format after a 7-byte W&B header,
    records split into chunks (7-byte header: CRC, length, type) that never cross a 32 KiB block."""
    from wandb.proto import wandb_internal_pb2
    data, position, pieces = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if left < 7 or (length, kind) == (0, 0):       # the block's padding
            position += left
            continue
        pieces += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):                              # FULL, LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pieces)
            pieces = b""
            yield record


def wandb_run(folder):
    """(run record, {step: {key: value}}, summary) of an offline W&B run folder."""
    run, history, summary = None, {}, {}
    key = lambda item: item.key or "/".join(item.nested_key)  # noqa: E731
    for record in wandb_records(next(folder.glob("run-*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            history[record.history.step.num] = {key(i): json.loads(i.value_json) for i in record.history.item}
        elif kind == "summary":
            summary.update({key(i): json.loads(i.value_json) for i in record.summary.update})
    return run, history, summary


def test_wandb_offline_runs_hold_config_history_and_summary(logged):
    pytest.importorskip("wandb")
    _, results, runs, stderr, _, _ = logged
    for count in ("2 runs", "1 run"):
        assert f"wandb: {count} logged offline in {results / 'wandb'} (upload: wandb sync " in stderr
    offline = {}
    for folder in (results / "wandb").glob("offline-run-*"):
        run, history, summary = wandb_run(folder)
        offline[run.display_name] = run, history, summary
    assert set(offline) == set(runs)
    for run_id, folder in runs.items():
        run, history, summary = offline[run_id]
        spec = json.loads((folder / "spec.json").read_text())
        metrics = json.loads((folder / "metrics.json").read_text())
        tuning = metrics.get("stop_after") is not None
        config = {item.key: json.loads(item.value_json) for item in run.config.update if item.key != "_wandb"}
        assert config == {**spec, "grid": "grid", "tuning": tuning}
        assert (run.run_group, run.job_type) == ("grid", "tuning" if tuning else "reported")
        frame = pd.read_csv(folder / "history.csv")
        assert sorted(history) == sorted(frame.global_epoch.unique())
        for row in frame.itertuples():
            step = history[row.global_epoch]
            assert step["phase"] == row.phase
            assert step[f"val_accuracy/exit_{row.exit}"] == pytest.approx(row.val_accuracy)
            assert step["train/loss"] == pytest.approx(row.train_loss)
        assert summary["summary/val_auc_normalised"] == pytest.approx(metrics["summary"]["val_auc_normalised"])
        if not tuning:
            for row in pd.read_csv(folder / "exits.csv").itertuples():
                assert summary[f"test_accuracy/exit_{row.exit}"] == pytest.approx(row.test_accuracy)
                assert summary[f"flops/exit_{row.exit}"] == pytest.approx(row.flops)
            assert summary["summary/final_accuracy"] == pytest.approx(metrics["summary"]["final_accuracy"])


def test_runs_done_before_the_command_are_not_logged_again(logged):
    _, results, _, _, before, again = logged
    assert tracker_files(results) == before
    assert "logged" not in again


def test_a_full_run_of_a_tuning_seed_is_marked_tuning(logged):
    from benchmark.trackers import read_run
    _, _, runs, _, _, _ = logged
    folder = next(folder for folder in runs.values() if (folder / "exits.csv").exists())    # the reported run, seed 0
    assert read_run(folder).tuning is False
    assert read_run(folder, tuning_seeds={0}).tuning is True


@pytest.mark.parametrize("name", ["tensorboard", "wandb"])
def test_a_missing_package_is_one_line_and_exit_2_before_anything_is_written(tmp_path, monkeypatch, name):
    for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")] + [name]:
        monkeypatch.setitem(sys.modules, module, None)
    grid = write_grid(tmp_path / "grid.toml", regimes=("joint",), epochs=2)
    for extra in ([], ["--dry-run"]):
        result = CliRunner().invoke(main, ["run", "--grid", str(grid), "--results", str(tmp_path / "out"),
                                           *SERIAL_RUN, "--log", name, *extra])
        assert result.exit_code == 2
        assert result.stderr == f"error: --log {name} needs the {name} package: pip install -e '.[{name}]'\n"
        assert result.stdout == ""
        assert not (tmp_path / "out").exists()


def test_an_unknown_tracker_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(main, ["run", "--grid", "smoke", "--dry-run", "--log", "mlflow"])
    assert result.exit_code == 2 and "'mlflow' is not one of 'tensorboard', 'wandb'" in result.stderr


def test_a_tracker_that_fails_is_a_warning_not_a_failed_run(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    import benchmark.trackers as trackers

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(trackers, "log_tensorboard", broken)
    grid = write_grid(tmp_path / "grid.toml", regimes=("joint",), epochs=2)
    result = CliRunner().invoke(main, ["run", "--grid", str(grid), "--results", str(tmp_path / "out"),
                                       *SERIAL_RUN, "--log", "tensorboard"])
    assert result.exit_code == 0, result.output
    assert "not logged to tensorboard (OSError: disk full)" in result.stderr
    assert "1 trained" in result.stdout
