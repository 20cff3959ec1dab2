"""Experiment trackers: `bench run --log tensorboard` / `--log wandb` stream every run this command trains.

The main process logs a run when it finishes, by reading its folder (spec.json, history.csv, exits.csv,
metrics.json), whatever the executor: nothing runs inside workers, so a Ray worker on another machine needs neither
package nor the log folder. Runs done before the command (skipped) are not logged again; a run that is retrained (its
folder was damaged) is logged again, its TensorBoard events replacing the old ones. Tuning rungs and
tuning-seed runs are logged too, marked as tuning (a `tuning/` sub-folder in TensorBoard, `job_type = "tuning"` and
`config.tuning` in W&B) so the reported runs can be shown alone.

What one run logs, under the same names in both trackers:
  per epoch (step = global epoch): train/loss, train/lr_end, train/epoch_seconds, val_accuracy/exit_<k>,
      train_exit_ce/exit_<k> (NaN cells, e.g. epochs without evaluation, are left out); W&B also logs the phase name
  final (at the last epoch; W&B: the run's summary): test_accuracy/exit_<k>, test_macro_f1/exit_<k>, flops/exit_<k>,
      flops_fraction/exit_<k> (exits.csv; tuning rungs have none), summary/<key> (metrics.json's summary), cost/<key>
  the spec: W&B's config (plus `grid` and `tuning`); TensorBoard's hparams (flattened: `train.lr`, ...) and a `spec`
      text

Neither package is required: `require` turns a missing one into a one-line UserError before anything trains, and
they are imported only when logging is asked for (`bench --help` and dry runs import neither).
"""
from __future__ import annotations

import importlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.errors import UserError

TRACKERS = ("tensorboard", "wandb")
PER_EXIT_HISTORY = ("val_accuracy", "train_exit_ce")
"""history.csv's columns that differ between the exit rows of an epoch; the other numeric ones are per epoch."""
HISTORY_KEYS = ("phase", "epoch", "global_epoch", "exit", "run_id")
FINAL_EXIT_COLUMNS = ("test_accuracy", "test_macro_f1", "flops", "flops_fraction")
"""exits.csv's final per-exit numbers (its val_accuracy is the last epoch's, already in the history)."""
DEFAULT_WANDB_PROJECT = "exitbench"


def require(names) -> tuple[str, ...]:
    """The trackers `names` (each of TRACKERS, in order, once), or a UserError naming the missing package and the
    extra that installs it. Importing is the check: a package that is installed but broken fails here too, before
    anything trains."""
    names = tuple(dict.fromkeys(names))
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"--log {name}: unknown tracker; choose from {', '.join(TRACKERS)}")
        try:
            importlib.import_module(name)
            if name == "tensorboard":
                importlib.import_module("torch.utils.tensorboard")   # also checks tensorboard's version
        except ImportError as error:
            missing = isinstance(error, ModuleNotFoundError) and (error.name or name).split(".")[0] == name
            cause = "" if missing else f" (it is installed but does not import: {error})"
            raise UserError(f"--log {name} needs the {name} package: pip install -e '.[{name}]'{cause}") from None
    return names


@dataclass
class RunRecord:
    """What a tracker logs of one finished run, read from its folder."""
    run_id: str
    spec: dict[str, Any]
    tuning: bool
    epochs: list[tuple[int, str, dict[str, float]]]     # (global epoch, phase, {tag: value}) in order
    final: dict[str, float]                             # {tag: value}, logged at the last epoch / as the summary

    @property
    def last_step(self) -> int:
        return self.epochs[-1][0] if self.epochs else 0


def _number(value) -> float | None:
    """A finite float, or None (NaN, text, bools and missing values are not scalars to plot)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def read_run(folder: Path, tuning_seeds=()) -> RunRecord:
    """The record of the done run in `folder` (a tuning rung, `stop_after` set, or a run of a tuning seed is marked
    as tuning)."""
    from benchmark.store import read_csv, read_json
    spec = read_json(folder / "spec.json")
    metrics = read_json(folder / "metrics.json")
    history = read_csv(folder / "history.csv")
    epochs = []
    for step, rows in history.groupby("global_epoch", sort=True):
        values = {}
        for column in rows.columns:
            if column in HISTORY_KEYS:
                continue
            if column in PER_EXIT_HISTORY:
                for k, value in zip(rows["exit"], rows[column]):
                    values[f"{column}/exit_{int(k)}"] = _number(value)
            else:
                values[f"train/{column.removeprefix('train_')}"] = _number(rows[column].iloc[0])
        epochs.append((int(step), str(rows["phase"].iloc[0]), {k: v for k, v in values.items() if v is not None}))
    final = {}
    if (folder / "exits.csv").exists():
        exits = read_csv(folder / "exits.csv")
        for column in (c for c in FINAL_EXIT_COLUMNS if c in exits.columns):
            for k, value in zip(exits["exit"], exits[column]):
                final[f"{column}/exit_{int(k)}"] = _number(value)
    for key, value in (metrics.get("summary") or {}).items():
        if isinstance(value, list):
            final.update({f"summary/{key}/exit_{k}": _number(v) for k, v in enumerate(value)})
        else:
            final[f"summary/{key}"] = _number(value)
    for key, value in (metrics.get("cost") or {}).items():
        final[f"cost/{key}"] = _number(value)
    tuning = spec.get("stop_after") is not None or metrics.get("stop_after") is not None or \
        spec.get("seed") in set(tuning_seeds)
    return RunRecord(run_id=spec["run_id"], spec=spec, tuning=tuning, epochs=epochs,
                     final={k: v for k, v in final.items() if v is not None})


def flat_hparams(spec: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The spec as TensorBoard hparams: nested tables flattened to dotted keys (`train.lr`), values a number, text
    or bool (lists and nulls as their JSON text)."""
    flat = {}
    for key, value in spec.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


def tensorboard_dir(root: Path, record: RunRecord) -> Path:
    return root / "tensorboard" / ("tuning" if record.tuning else "") / record.run_id


def log_tensorboard(root: Path, grid_name: str, record: RunRecord) -> Path:
    """One TensorBoard run per run: results/<grid>/tensorboard/<run_id>/ (tuning runs: tensorboard/tuning/<run_id>/).
    Events an earlier training of the same run left there are replaced."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    folder = tensorboard_dir(root, record)
    if folder.exists():
        shutil.rmtree(folder)
    config = {**record.spec, "grid": grid_name, "tuning": record.tuning}
    writer = SummaryWriter(log_dir=str(folder))
    try:
        writer.add_text("spec", "    " + json.dumps(config, indent=2, sort_keys=True).replace("\n", "\n    "))
        for step, _, values in record.epochs:
            for tag, value in values.items():
                writer.add_scalar(tag, value, step)
        for tag, value in record.final.items():
            writer.add_scalar(tag, value, record.last_step)
        for summary in hparams(flat_hparams(config), dict(record.final)):
            writer.file_writer.add_summary(summary)
    finally:
        writer.close()
    return folder


def wandb_mode() -> str:
    """Offline unless WANDB_MODE asks for online (or disabled): logging never needs the network by default."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    return mode if mode in ("online", "disabled") else "offline"


def _wandb_settings(wandb):
    """Console capture off (the progress bars stay ours); no system-metrics sampling, git or code capture: the run
    is logged after it finished, so they would describe the logging, not the training. Older wandb versions that
    lack a setting get console capture off alone."""
    try:
        return wandb.Settings(console="off", x_disable_stats=True, x_disable_meta=True, disable_git=True,
                              save_code=False)
    except Exception:   # noqa: BLE001  (a setting this wandb version does not know)
        return wandb.Settings(console="off")


def log_wandb(root: Path, grid_name: str, record: RunRecord) -> None:
    """One W&B run per run, grouped by grid, in results/<grid>/wandb/ (offline unless WANDB_MODE=online)."""
    import wandb

    run = wandb.init(project=os.environ.get("WANDB_PROJECT") or DEFAULT_WANDB_PROJECT, group=grid_name,
                     name=record.run_id, job_type="tuning" if record.tuning else "reported",
                     tags=[record.spec.get("regime", ""), record.spec.get("dataset", ""),
                           record.spec.get("arch", ""), "tuning" if record.tuning else "reported"],
                     config={**record.spec, "grid": grid_name, "tuning": record.tuning},
                     dir=str(root), mode=wandb_mode(), settings=_wandb_settings(wandb))
    try:
        for step, phase, values in record.epochs:
            run.log({**values, "phase": phase}, step=step)
        run.summary.update(record.final)
    except BaseException:
        run.finish(exit_code=1)
        raise
    run.finish()


@dataclass
class Trackers:
    """The trackers of one `bench run`: `log(store, spec)` logs a finished run (a tracker's failure is a warning
    line, never the run's nor the grid's); `notes()` says what was logged where since the last call."""
    names: tuple[str, ...]
    grid_name: str
    tuning_seeds: frozenset = frozenset()
    logged: dict[str, int] = field(default_factory=dict)
    where: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def of(cls, names, grid) -> "Trackers | None":
        """`bench run --log ...`'s trackers (`names`, checked by `require` when the option was read) for `grid` (a
        benchmark.grid.Grid), or None when none is asked for."""
        if not names:
            return None
        return cls(names, grid.name, frozenset((grid.tuning or {}).get("seeds", ())))

    def log(self, store, spec) -> list[str]:
        """Log the done run `spec` of `store` to every tracker; returns the warnings (one line each)."""
        warnings = []
        try:
            record = read_run(store.run_dir(spec.run_id), self.tuning_seeds)
        except Exception as error:   # noqa: BLE001
            return [f"warning: run {spec.run_id} not logged ({type(error).__name__}: {error})"]
        for name in self.names:
            try:
                if name == "tensorboard":
                    log_tensorboard(store.root, self.grid_name, record)
                    self.where[name] = store.root / "tensorboard"
                else:
                    log_wandb(store.root, self.grid_name, record)
                    self.where[name] = store.root / "wandb"
            except Exception as error:   # noqa: BLE001  (a tracker never fails a run)
                warnings.append(f"warning: run {spec.run_id} not logged to {name} ({type(error).__name__}: {error})")
            else:
                self.logged[name] = self.logged.get(name, 0) + 1
        return warnings

    def notes(self) -> list[str]:
        """One line per tracker that logged runs since the last call: how many, where, how to look at them."""
        lines = []
        for name, count in self.logged.items():
            folder, runs = self.where[name], f"{count} run{'s' if count != 1 else ''}"
            if name == "tensorboard":
                lines.append(f"tensorboard: {runs} logged in {folder} (view: tensorboard --logdir {folder})")
            elif wandb_mode() == "offline":
                lines.append(f"wandb: {runs} logged offline in {folder} (upload: wandb sync {folder}/offline-run-*)")
            else:
                lines.append(f"wandb: {runs} logged ({wandb_mode()})")
        self.logged.clear()
        return lines
