"""`--executor process`'s workers (`runner.WorkerPool`): how they start is what makes a small run's grid fast and
a Ctrl-C clean, so both are checked on real worker processes."""
from __future__ import annotations

import signal
import sys

import pytest

from benchmark.runner import WorkerPool
from benchmark.worker_start import worker_context

LATE_IMPORTS = ("torch._dynamo", "sklearn.model_selection")
"""Preloaded modules that neither this file nor the runner imports: present in a worker only if it was forked
from the preloaded server."""


def worker_state() -> tuple[list[str], bool, int]:
    """(the LATE_IMPORTS present, whether Ctrl-C is blocked, torch's threads) as a worker sees them on arrival."""
    import torch
    return ([m for m in LATE_IMPORTS if m in sys.modules],
            signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, []), torch.get_num_threads())


@pytest.mark.skipif(sys.platform != "linux", reason="workers fork from a preloaded server on Linux only")
def test_workers_arrive_with_the_heavy_imports_done_and_ctrl_c_blocked():
    assert worker_context().get_start_method() == "forkserver"
    pool = WorkerPool(2, 1)
    try:
        states = [future.result(timeout=120) for future in [pool.submit(worker_state) for _ in range(2)]]
    finally:
        pool.terminate()
    assert states == [(list(LATE_IMPORTS), True, 1)] * 2
    assert signal.SIGINT not in signal.pthread_sigmask(signal.SIG_BLOCK, [])     # this process: Ctrl-C as before
