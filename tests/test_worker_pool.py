"""`--executor process`'s workers (`runner.WorkerPool`): how they start is what makes a small run's grid fast and
a Ctrl-C clean, so both are checked on real worker processes."""
from __future__ import annotations

import signal
import sys

import pytest

from benchmark.runner import WorkerPool
from benchmark.worker_start import resolve_executor, threads_per_run, worker_context

LATE_IMPORTS = ("torch._dynamo", "seaborn")
"""Preloaded modules that neither this file nor the runner imports: present in a worker only if it was forked
from the preloaded server."""


def worker_state() -> tuple[list[str], bool, int, int]:
    """(the LATE_IMPORTS present, whether Ctrl-C is blocked, torch's threads, inductor's compile threads) as a worker
    sees them on arrival."""
    import torch
    import torch._inductor.config as inductor
    return ([m for m in LATE_IMPORTS if m in sys.modules],
            signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []), torch.get_num_threads(),
            inductor.compile_threads)


@pytest.mark.skipif(sys.platform != "linux", reason="workers fork from a preloaded server on Linux only")
def test_workers_arrive_with_the_heavy_imports_done_and_ctrl_c_blocked():
    assert worker_context().get_start_method() == "forkserver"
    pool = WorkerPool(2, 1)
    try:
        states = [future.result(timeout=120) for future in [pool.submit(worker_state) for _ in range(2)]]
    finally:
        pool.terminate()
    assert states == [(list(LATE_IMPORTS), True, 1, 1)] * 2      # one compile thread: no compile pool per worker
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])     # this process: Ctrl-C as before


@pytest.mark.parametrize("executor, jobs, threads, device, expected", [
    ("auto", None, None, "cpu", ("process", 8)),      # the default: one one-thread run per core
    ("auto", None, 2, "cpu", ("process", 4)),         # runs of 2 threads: half as many at a time
    ("auto", None, 8, "cpu", ("local", 1)),           # one run fills the cores: no pool
    ("auto", 1, None, "cpu", ("local", 1)),
    ("auto", 3, None, "cpu", ("process", 3)),
    ("auto", None, None, "cuda", ("local", 1)),       # a GPU: one run at a time
    ("process", None, None, "cpu", ("process", 8)),
    ("process", 2, None, "cuda", ("process", 2)),
    ("local", 4, None, "cpu", ("local", 1)),          # local runs one at a time whatever --jobs says
    ("ray", None, None, "cpu", ("ray", 1)),           # --jobs means nothing to Ray
])
def test_the_default_executor_runs_one_single_thread_run_per_cpu_core(monkeypatch, executor, jobs, threads, device,
                                                                      expected):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert resolve_executor(executor, jobs, threads, device) == expected


def test_threads_per_run_split_the_cores_between_the_cpu_runs_at_a_time(monkeypatch):
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert threads_per_run(*resolve_executor("auto", None, None, "cpu"), None, "cpu") == 1
    assert threads_per_run("process", 3, None, "cpu") == 2          # 8 // 3
    assert threads_per_run("process", 2, 3, "cpu") == 3             # --threads wins
    assert threads_per_run("local", 1, None, "cpu") == 8            # one run at a time: every core
    assert threads_per_run("process", 2, None, "cuda") == 8         # the GPU computes; the cores feed it
