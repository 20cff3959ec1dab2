"""How `--executor process` starts its worker processes (`runner.WorkerPool`): forked from a server that has
imported what every worker needs, with Ctrl-C blocked. Imports no torch, so `bench run` can start the server before
it imports anything heavy itself."""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from contextlib import contextmanager, suppress


WORKER_PRELOAD = ["benchmark.runner", "benchmark.analyze", "torch._dynamo", "matplotlib.pyplot", "seaborn"]
"""What every worker imports anyway: torch and exitbench (~1.7 s), torch._dynamo (~1 s: the optimizers' step, the
FLOP counter and deterministic mode import it) and the plotting libraries (~0.5 s, the grid's figures; importing
pyplot picks no backend, `analysis.style` sets Agg). Not scikit-learn: no run imports it (benchmark/data/stratify.py)."""


def resolve_executor(executor: str, jobs: int | None, threads: int | None, device_type: str) -> tuple[str, int]:
    """`--executor auto` and `--jobs`'s default, as (executor, jobs). On the CPU, as many runs at a time as the cores
    hold runs of `threads` (default 1) threads — `process` workers, or `local` when that is one: a small model trains
    barely faster on two threads than on one (BENCHMARK.md, "Runs per CPU-hour"), so one run per core does about
    twice the runs of one run on all cores, and runs get the same thread count (which can move a number's last bits)
    on every machine. On a GPU one run at a time, the device doing the arithmetic."""
    if executor in ("local", "ray"):
        return executor, 1                # one run at a time here; Ray's cluster schedules its own
    if jobs is None:
        jobs = max(1, (os.cpu_count() or 1) // (threads or 1)) if device_type == "cpu" else 1
    if executor == "auto":
        executor = "process" if jobs > 1 else "local"
    return executor, jobs


def threads_per_run(executor: str, jobs: int, threads: int | None, device_type: str) -> int:
    """Torch threads of each run: `--threads`, else the cores split between the runs at a time of `process` on the
    CPU, all cores for one run at a time or on a GPU (the device does the arithmetic)."""
    cores = os.cpu_count() or 1
    return threads or (max(1, cores // jobs) if executor == "process" and device_type == "cpu" else cores)


def uses_worker_pool(executor: str, jobs: int) -> bool:
    """Whether a command runs on a `WorkerPool`: `--executor process` with more than one job (one job runs here)."""
    return executor == "process" and jobs > 1


def worker_context() -> multiprocessing.context.BaseContext:
    """How `WorkerPool` starts its workers. On Linux, forked from a fork server that imported `WORKER_PRELOAD` once,
    so a worker starts with those imports done (a spawned worker pays them itself: ~3.5 s of a core each, at every
    `bench run`); the server is a fresh interpreter that has only imported, so no thread or CUDA state is forked.
    Calling this early (`bench run` does, before it imports torch) lets the server import while this process works.
    Elsewhere (macOS forks unsafely, Windows cannot) workers are spawned."""
    if sys.platform != "linux":
        return multiprocessing.get_context("spawn")
    import multiprocessing.forkserver
    import multiprocessing.resource_tracker
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(WORKER_PRELOAD)
    multiprocessing.resource_tracker.ensure_running()   # first: starting it unblocks Ctrl-C in this process
    with interrupt_deferred():            # the server, and every worker forked from it, starts with Ctrl-C blocked
        multiprocessing.forkserver.ensure_running()
    return context


def stop_fork_server() -> None:
    """Kill the fork server `worker_context` started, if it runs, and forget it (the next pool starts another).
    `multiprocessing` offers no public way; its `_stop` (which its own tests use) reaps the server."""
    server = getattr(sys.modules.get("multiprocessing.forkserver"), "_forkserver", None)
    pid = getattr(server, "_forkserver_pid", None)
    if pid is None or not hasattr(server, "_stop"):
        return
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    server._stop()


@contextmanager
def interrupt_deferred():
    """Block Ctrl-C while a child process starts, so the child inherits it blocked; a Ctrl-C that arrives meanwhile
    (another thread of this process may take it, so blocking it is not enough) is noted and raised after."""
    noted = []
    handler = signal.signal(signal.SIGINT, lambda *_: noted.append(True))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        signal.signal(signal.SIGINT, handler)
    if noted:
        raise KeyboardInterrupt
