"""Runs a grid: skips done runs, schedules the runs that train shared P1 backbones first, executes the rest
locally, in a process pool or as Ray tasks (`benchmark.ray_executor`), shows progress with ETA, and regenerates the
tables.

Killing `bench run` loses at most the runs in flight: a run is done only once its metrics.json is renamed
into place (and its files match their checksums), and a rerun starts every other run from scratch.
On a terminal progress shows as bars; with stderr redirected (a cluster log) as one plain line per finished run.
"""
from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch
from tqdm.auto import tqdm

from benchmark.data import load_dataset
from benchmark.determinism import resolve_device
from benchmark.pipeline import safe_execute
from benchmark.provenance import new_timing_batch
from benchmark.spec import RunSpec
from benchmark.store import DONE, FAILED, ResultsStore, read_json
from benchmark.worker_start import (interrupt_deferred, stop_fork_server, threads_per_run, uses_worker_pool,
                                    worker_context)
from benchmark import tables
from regimes.base import Budget
from regimes.registry import build_regime

if TYPE_CHECKING:
    from benchmark.trackers import Trackers

EXECUTORS = ("local", "process", "ray")
LOST = "lost"  # a Ray task that never came back (its worker died every retry): the run stays pending


@dataclass
class GridOutcome:
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)       # already done before this invocation
    skipped_failed: list[str] = field(default_factory=list)  # failed earlier, not retried
    lost: dict[str, str] = field(default_factory=dict)       # Ray tasks that never came back: the runs stay pending
    interrupted: bool = False


def p1_epochs(spec: RunSpec) -> int | None:
    """The P1 budget of a run, or None if its schedule has no P1 or it starts from pretrained weights (then P1 is
    skipped: benchmark/weights.py)."""
    if spec.model.get("weights") is not None:
        return None
    phases = build_regime(spec.regime, spec.hparams).phases(
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
    return None if epochs is None else store.backbone_inspect(spec.p1_id(epochs, device_type))[0]


def damaged(specs: list[RunSpec], store: ResultsStore, device_type: str) -> list[str]:
    """One line per damaged run folder or shared backbone the runs of `specs` would read (each is recomputed)."""
    lines = store.problems(s.run_id for s in specs)
    seen = set()
    for spec in specs:
        epochs = p1_epochs(spec)
        p1 = spec.p1_id(epochs, device_type) if epochs else None
        if p1 and p1 not in seen:
            seen.add(p1)
            problem = store.backbone_inspect(p1)[1]
            if problem:
                lines.append(f"{problem}: the shared backbone is retrained by the next run that needs it")
    return lines


def planned_epochs(spec: RunSpec, store: ResultsStore, device_type: str) -> int:
    """Epochs the run's progress bar counts: to its rung (tuning) or the end, less a stored shared P1."""
    epochs, last = p1_epochs(spec), spec.stop_after or spec.train["epochs"]
    if p1_stored(spec, store, device_type):
        return last - epochs
    return last


def _worker_init(threads: int) -> None:
    """A worker computes on its share of the cores (`threads` torch threads), and --fast's inductor compiles its
    kernels in the worker itself, not in a compile pool of its own beside the other workers (a pool whose semaphore
    a worker stopped at the end would leak, with a warning)."""
    import torch
    import torch._inductor.config as inductor        # preloaded with torch._dynamo (worker_start.WORKER_PRELOAD)
    torch.set_num_threads(threads)
    inductor.compile_threads = 1


def _worker(spec_json: dict, root: str, data_root: str, device: str, threads: int,
            extras: dict) -> tuple[str, str, str | None]:
    import torch
    spec = RunSpec.from_json(spec_json)
    status, message = safe_execute(spec, ResultsStore(root), data_root=Path(data_root),
                                   device=torch.device(device), threads=threads, **extras)
    return spec.run_id, status, message


class WorkerPool:
    """The worker processes of `--executor process`, started once and kept for every stage a command runs (the
    screen, each successive-halving stage, the reported runs, the per-run analyses): starting one imports torch and
    exitbench, seconds of a core that a pool per stage paid again at every stage (issue 19).

    Workers start with Ctrl-C blocked (a blocked signal stays blocked across fork and exec), so an interrupt reaches
    only this process, which stops them: no tracebacks from workers, and the runs they had in flight stay pending.
    A worker is started by a submit (from the fork server, `worker_context`, or spawned), so every submit blocks
    Ctrl-C while it runs."""

    def __init__(self, jobs: int, threads: int):
        self.jobs, self.threads = jobs, threads
        self.executor = futures.ProcessPoolExecutor(max_workers=jobs, mp_context=worker_context(),
                                                    initializer=_worker_init, initargs=(threads,))
        self.analysed: dict[str, futures.Future] = {}

    def submit(self, fn, *args) -> futures.Future:
        with interrupt_deferred():
            return self.executor.submit(fn, *args)

    def analyse(self, spec: RunSpec, store: ResultsStore, settings: dict, data_root: Path, device: torch.device,
                threads: int) -> futures.Future:
        """The per-run analyses of a done run (`analyze.analyse_run_or_say_why`), submitted once per run: the
        reported runs' stage starts them as each run finishes, on workers its last runs would leave idle, and the
        analysis step of `bench run` waits on the same futures."""
        from benchmark.analyze import analyse_run_or_say_why
        if spec.run_id not in self.analysed:
            self.analysed[spec.run_id] = self.submit(analyse_run_or_say_why, spec, ResultsStore(store.root),
                                                     settings, data_root, device, threads)   # unlocked: the lock is ours
        return self.analysed[spec.run_id]

    def terminate(self) -> None:
        """Stop the workers now, then their fork server: at the end, when every result is in (an idle worker is
        stopped rather than asked to exit, which would wait ~0.5 s for its interpreter's teardown; the server would
        outlive this process by ~1.5 s of its own, holding this process's output open), or on an interrupt or
        error."""
        workers = multiprocessing.active_children()
        for worker in workers:
            worker.terminate()
        for worker in workers:
            worker.join()
        self.executor.shutdown(wait=False, cancel_futures=True)
        stop_fork_server()


@contextmanager
def worker_pool(executor: str, jobs: int, threads: int | None, device: str):
    """A `WorkerPool` for `--executor process --jobs N` (N > 1), kept until the block ends, then stopped (at once if it
    ends by an exception, Ctrl-C included); None for the other executors."""
    if not uses_worker_pool(executor, jobs):
        yield None
        return
    pool = WorkerPool(jobs, threads_per_run(executor, jobs, threads, resolve_device(device).type))
    try:
        yield pool
    finally:
        pool.terminate()


def run_grid(specs: list[RunSpec], store: ResultsStore, *, grid_name: str, executor: str = "local", jobs: int = 1,
             data_root: Path, device: str = "auto", retry_failed: bool = False, download: bool = False,
             threads: int | None = None, save_models: bool = False, snapshot_every: int = 0,
             snapshot_samples: int = 250, write_tables: Callable[[], object] | None = None,
             desc: str | None = None, address: str | None = None, cpus_per_run: int | None = None,
             gpus_per_run: float | None = None, timing_batch: str | None = None,
             log: Trackers | None = None, pool: WorkerPool | None = None,
             analyses: dict | None = None) -> GridOutcome:
    """Train the pending runs of `specs`, then call `write_tables` (also when interrupted; default: tables of
    every run in the folder). `address`, `cpus_per_run` and `gpus_per_run` are for the Ray executor; `timing_batch`
    names the sitting the runs are timed in (`provenance.new_timing_batch`; default: a new one for this call);
    `log` (`benchmark.trackers.Trackers`, `bench run --log`) gets each run this call trains, once it is done.
    `pool`: the `WorkerPool` of `--executor process` to run on (`worker_pool`; default: one for this call), which
    also starts the per-run analyses of `analyses` (the grid's [analyses] settings) of each run as soon as it is done
    (the other executors leave them to `analyze.analyze_grid`)."""
    outcome = GridOutcome()
    device_type = "cpu" if executor == "ray" else resolve_device(device).type     # Ray's nodes resolve their own
    timing_batch = timing_batch or new_timing_batch(executor, jobs, threads, device_type)
    ray_started = False
    if executor == "ray":
        from benchmark import ray_executor
        ray_started = ray_executor.connect(address)
    try:
        with store.lock():
            _run_pending(specs, store, outcome, grid_name=grid_name, executor=executor, jobs=jobs,
                         data_root=data_root, device=device, retry_failed=retry_failed, download=download,
                         threads=threads, extras={"keep_model": save_models, "snapshot_every": snapshot_every,
                                                  "snapshot_samples": snapshot_samples, "timing_batch": timing_batch},
                         write_tables=write_tables, desc=desc, cpus_per_run=cpus_per_run, gpus_per_run=gpus_per_run,
                         log=log, pool=pool, analyses=analyses)
    finally:
        if ray_started:
            ray_executor.disconnect()
    return outcome


def _run_pending(specs, store, outcome, *, grid_name, executor, jobs, data_root, device, retry_failed, download,
                 threads, extras, write_tables, desc, cpus_per_run, gpus_per_run, log=None, pool=None,
                 analyses=None) -> None:
    if executor == "ray":
        from benchmark import ray_executor
        device_type, ray_cpus, ray_gpus = ray_executor.resolve_resources(device, cpus_per_run or threads,
                                                                         gpus_per_run)
        torch_device = torch.device(device_type)
        cluster = ray_executor.cluster_resources()
        where = (f" on Ray ({cluster['CPU']:g} CPUs, {cluster['GPU']:g} GPUs; {ray_cpus} CPUs, {ray_gpus:g} GPUs "
                 f"per run)")
    else:
        torch_device, where = resolve_device(device), ""
    store.remove_stale_temporaries()
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
    progress = Progress(len(pending), (desc or f"grid {grid_name}") + where, store, log)
    try:
        if executor == "ray":
            _run_ray(stages(pending, store, torch_device.type), store, outcome, progress, data_root,
                     torch_device.type, ray_cpus, ray_gpus, extras)
        else:
            from benchmark.analyze import analysis_threads
            analysed = None if analyses is None else (analyses, analysis_threads(threads))
            with nullcontext(pool) if pool or not pending else worker_pool(executor, jobs, threads, device) as own:
                for stage in stages(pending, store, torch_device.type):
                    if own is not None:
                        _run_pool(stage, store, outcome, progress, own, data_root, torch_device, extras, analysed)
                    else:
                        _run_local(stage, store, outcome, progress, data_root, torch_device,
                                   threads_per_run(executor, 1, threads, torch_device.type), extras)
    except KeyboardInterrupt:
        outcome.interrupted = True
    finally:
        progress.close()
        for line in log.notes() if log else ():
            print(line, file=sys.stderr, flush=True)
        (write_tables or (lambda: tables.write_tables(store)))()


class Progress:
    """A bar with ETA on a terminal, one plain line per finished run when stderr is a file (a cluster log: no
    carriage returns or cursor codes); either way one line per run saying how it ended. Done runs go to the
    trackers `log` (`bench run --log`), from this process whatever the executor."""

    def __init__(self, total: int, desc: str, store: ResultsStore, log=None):
        self.total, self.finished, self.store, self.log = total, 0, store, log
        self.started = time.monotonic()
        self.tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True, disable=not self.tty)

    def run_bar(self, spec: RunSpec, epochs: int):
        return tqdm(total=epochs, desc=f"{spec.regime} {spec.dataset}/{spec.arch} s{spec.seed}", unit="epoch",
                    leave=False, position=1, dynamic_ncols=True, disable=not self.tty)

    def record(self, outcome: GridOutcome, spec: RunSpec, status: str, message: str | None) -> None:
        if status == DONE:
            outcome.done.append(spec.run_id)
            metrics = read_json(self.store.run_dir(spec.run_id) / "metrics.json")
            reached = (f"final accuracy {metrics['summary']['final_accuracy']:.4f}" if spec.stop_after is None else
                       f"rung at epoch {spec.stop_after}, validation area {metrics['summary']['val_auc_normalised']:.4f}")
            result = f"{reached}, {metrics['cost']['segment_wall_seconds']:.1f} s"
        elif status == LOST:
            outcome.lost[spec.run_id] = message or "unknown error"
            result = f"LOST: {message}; the run stays pending and the next `bench run` retries it"
        else:
            outcome.failed[spec.run_id] = message or "unknown error"
            result = f"FAILED: {message} (details: runs/{spec.run_id}/error.json)"
        self.finished += 1
        left = self.total - self.finished
        eta = (time.monotonic() - self.started) / self.finished * left
        line = (f"{status} {spec.run_id} {spec.regime} {spec.dataset}/{spec.arch} seed {spec.seed}: {result}; "
                f"{left} left, ETA {_clock(eta)}")
        self._write(line)
        for warning in self.log.log(self.store, spec) if self.log and status == DONE else ():
            self._write(warning)
        self.bar.update(1)
        self.bar.set_postfix(done=len(outcome.done), failed=len(outcome.failed))

    def _write(self, line: str) -> None:
        if self.tty:
            tqdm.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()


def _clock(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _run_local(stage, store, outcome, progress, data_root, device, threads, extras) -> None:
    for spec in stage:
        run_bar = progress.run_bar(spec, planned_epochs(spec, store, device.type))

        def on_epoch(phase: str, epoch: int, loss: float, run_bar=run_bar) -> None:
            run_bar.update(1)
            run_bar.set_postfix(phase=phase, epoch=epoch, loss=f"{loss:.3f}")

        try:
            status, message = safe_execute(spec, store, data_root=data_root, device=device, threads=threads,
                                           on_epoch=on_epoch, **extras)
        finally:
            run_bar.close()
        progress.record(outcome, spec, status, message)


def _run_pool(stage, store, outcome, progress, pool: WorkerPool, data_root, device, extras,
              analyses: tuple[dict, int] | None) -> None:
    """An exception (Ctrl-C included) stops the workers at once: the runs in flight stay pending. With `analyses`
    (the grid's [analyses] settings, their torch threads), each run's analyses start as soon as it is done."""
    try:
        pending = {pool.submit(_worker, spec.to_json(), str(store.root), str(data_root), str(device), pool.threads,
                               extras): spec for spec in stage}
        for future in futures.as_completed(pending):
            _, status, message = future.result()
            progress.record(outcome, pending[future], status, message)
            if status == DONE and analyses is not None:
                pool.analyse(pending[future], store, analyses[0], data_root, device, analyses[1])
    except BaseException:
        pool.terminate()
        raise


def _run_ray(stages_, store, outcome, progress, data_root, device_type, cpus, gpus, extras) -> None:
    """Every run as a Ray task at once; dependants of a P1 backbone wait on it inside Ray (`ray_executor`)."""
    from benchmark import ray_executor
    p1_of = {}
    for spec in (s for stage in stages_ for s in stage):
        epochs = p1_epochs(spec)
        p1_of[spec.run_id] = spec.p1_id(epochs, device_type) if epochs else None
    refs, backbones = ray_executor.submit_runs(stages_, store, p1_of, data_root=data_root, device_type=device_type,
                                               cpus=cpus, gpus=gpus, extras=extras)
    ray_executor.collect(refs, backbones, store, p1_of,
                         record=lambda spec, status, message: progress.record(outcome, spec, status, message),
                         lost=lambda spec, reason: progress.record(outcome, spec, LOST, reason))
