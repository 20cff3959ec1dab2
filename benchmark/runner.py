"""Runs a grid: skips done runs, schedules the runs that train shared P1 backbones first, executes the rest
locally or in a process pool, shows progress with ETA, and regenerates the tables.

Killing `bench run` loses at most the runs in flight: a run is done only once its metrics.json is renamed
into place, and a rerun starts every other run from scratch.
"""
from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from benchmark.data import load_dataset
from benchmark.determinism import resolve_device
from benchmark.pipeline import safe_execute
from benchmark.spec import RunSpec
from benchmark.store import DONE, FAILED, ResultsStore
from benchmark import tables
from regimes.base import Budget
from regimes.registry import build_regime

EXECUTORS = ("local", "process")


@dataclass
class GridOutcome:
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)       # already done before this invocation
    skipped_failed: list[str] = field(default_factory=list)  # failed earlier, not retried
    interrupted: bool = False


def p1_epochs(spec: RunSpec) -> int | None:
    """The P1 budget of a run, or None if its schedule has no P1."""
    phases = build_regime(spec.regime, spec.hparams).schedule.phases(
        Budget(spec.train["epochs"], spec.train["p1_epochs"]))
    return phases[0].epochs if phases[0].trains == "backbone" else None


def stages(pending: list[RunSpec], store: ResultsStore, device_type: str) -> list[list[RunSpec]]:
    """Stage 1: one run per P1 backbone not yet stored (they train it); stage 2: everything else."""
    first, rest, claimed = [], [], set()
    for spec in pending:
        epochs = p1_epochs(spec)
        p1 = spec.p1_id(epochs, device_type) if epochs else None
        if p1 and p1 not in claimed and p1_stored(spec, store, device_type) is False:
            claimed.add(p1)
            first.append(spec)
        else:
            rest.append(spec)
    return [s for s in (first, rest) if s]


def p1_stored(spec: RunSpec, store: ResultsStore, device_type: str) -> bool | None:
    """Whether the shared P1 backbone this run needs is stored; None if its schedule has no P1."""
    epochs = p1_epochs(spec)
    return None if epochs is None else (store.backbone_dir(spec.p1_id(epochs, device_type)) / "cost.json").is_file()


def planned_epochs(spec: RunSpec, store: ResultsStore, device_type: str) -> int:
    epochs = p1_epochs(spec)
    if p1_stored(spec, store, device_type):
        return spec.train["epochs"] - epochs
    return spec.train["epochs"]


def _worker_init(threads: int) -> None:
    import torch
    torch.set_num_threads(threads)


def _worker(spec_json: dict, root: str, data_root: str, device: str, threads: int,
            extras: dict) -> tuple[str, str, str | None]:
    import torch
    spec = RunSpec.from_json(spec_json)
    status, message = safe_execute(spec, ResultsStore(root), data_root=Path(data_root),
                                   device=torch.device(device), threads=threads, **extras)
    return spec.run_id, status, message


def run_grid(specs: list[RunSpec], store: ResultsStore, *, grid_name: str, executor: str = "local", jobs: int = 1,
             data_root: Path, device: str = "auto", retry_failed: bool = False, download: bool = False,
             threads: int | None = None, save_models: bool = False, snapshot_every: int = 0,
             snapshot_samples: int = 250, write_tables: Callable[[], object] | None = None,
             desc: str | None = None) -> GridOutcome:
    """Train the pending runs of `specs`, then call `write_tables` (also when interrupted; default: tables of
    every done run in the folder)."""
    outcome = GridOutcome()
    torch_device = resolve_device(device)
    with store.lock():
        pending = []
        for spec in specs:
            state = store.state(spec.run_id)
            if state == DONE:
                outcome.skipped.append(spec.run_id)
            elif state == FAILED and not retry_failed:
                outcome.skipped_failed.append(spec.run_id)
            else:
                pending.append(spec)
        for name in sorted({s.dataset for s in pending}):      # missing data fails before any training
            load_dataset(name, data_root, download=download)
        cores = os.cpu_count() or 1
        if executor == "process" and jobs > 1 and torch_device.type == "cpu":
            per_run_threads = threads or max(1, cores // jobs)
        else:
            per_run_threads = threads or cores
        extras = {"keep_model": save_models, "snapshot_every": snapshot_every, "snapshot_samples": snapshot_samples}
        bar = tqdm(total=len(pending), desc=desc or f"grid {grid_name}", unit="run", dynamic_ncols=True,
                   mininterval=0.5 if sys.stderr.isatty() else 5.0)
        try:
            for stage in stages(pending, store, torch_device.type):
                if executor == "process" and jobs > 1:
                    _run_pool(stage, store, outcome, bar, jobs, data_root, torch_device, per_run_threads, extras)
                else:
                    _run_local(stage, store, outcome, bar, data_root, torch_device, per_run_threads, extras)
        except KeyboardInterrupt:
            outcome.interrupted = True
        finally:
            bar.close()
            (write_tables or (lambda: tables.write_tables(store)))()
    return outcome


def _record(outcome: GridOutcome, bar, run_id: str, status: str, message: str | None) -> None:
    if status == "done":
        outcome.done.append(run_id)
    else:
        outcome.failed[run_id] = message or "unknown error"
        tqdm.write(f"run {run_id} failed: {message} (details: runs/{run_id}/error.json)")
    bar.update(1)
    bar.set_postfix(done=len(outcome.done), failed=len(outcome.failed))


def _run_local(stage, store, outcome, bar, data_root, device, threads, extras) -> None:
    for spec in stage:
        run_bar = tqdm(total=planned_epochs(spec, store, device.type), desc=f"{spec.regime} {spec.dataset}/{spec.arch} s{spec.seed}",
                       unit="epoch", leave=False, position=1, dynamic_ncols=True,
                       mininterval=0.5 if sys.stderr.isatty() else 5.0)

        def on_epoch(phase: str, epoch: int, loss: float, run_bar=run_bar) -> None:
            run_bar.update(1)
            run_bar.set_postfix(phase=phase, epoch=epoch, loss=f"{loss:.3f}")

        try:
            status, message = safe_execute(spec, store, data_root=data_root, device=device, threads=threads,
                                           on_epoch=on_epoch, **extras)
        finally:
            run_bar.close()
        _record(outcome, bar, spec.run_id, status, message)


def _run_pool(stage, store, outcome, bar, jobs, data_root, device, threads, extras) -> None:
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init,
                                     initargs=(threads,)) as pool:
        pending = {pool.submit(_worker, spec.to_json(), str(store.root), str(data_root), str(device), threads,
                               extras)
                   for spec in stage}
        try:
            for future in futures.as_completed(pending):
                _record(outcome, bar, *future.result())
        except KeyboardInterrupt:
            for future in pending:
                future.cancel()
            raise
