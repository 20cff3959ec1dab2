"""Which code trained a run, and in which sitting it was timed (issue 21): recorded in every run's metrics.json and
runs.csv, so that a reader can follow a number to its commit and compare wall times only where they are comparable.

- `code_version`: the git commit of the exitbench checkout the process imported, and whether its tracked code
  (`CODE_PATHS`) differed from that commit (`git_dirty`); both None outside a git checkout (a wheel install).
- `timing_batch`: one id per `bench run` sitting — UTC start, host, executor and threads per run. Runs of one batch
  ran on one machine under one load, so their wall times compare; across batches only FLOPs do.
"""
from __future__ import annotations

import functools
import socket
import subprocess
import time
from pathlib import Path

CODE_PATHS = ("benchmark", "regimes", "analysis", "pyproject.toml")
"""What a run's numbers depend on: a change elsewhere (README, results, tests) does not make a checkout dirty."""


@functools.cache
def code_version() -> dict:
    """{"git_commit", "git_dirty"} of the checkout this package was imported from (once per process)."""
    return checkout_version(Path(__file__).resolve().parent.parent)


def checkout_version(root: Path) -> dict:
    """{"git_commit": HEAD's sha or None, "git_dirty": whether CODE_PATHS differ from it} of the checkout `root`."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return {"git_commit": None, "git_dirty": None}
    changes = git("status", "--porcelain", "--untracked-files=no", "--", *CODE_PATHS)
    return {"git_commit": commit, "git_dirty": None if changes is None else bool(changes)}


def new_timing_batch(executor: str, jobs: int, threads: int | None, device_type: str = "cpu") -> str:
    """A fresh batch id, e.g. '20261206T203512Z/host/process-2x1' (executor-jobs x torch threads per run, resolved
    as the runner resolves them)."""
    from benchmark.worker_start import threads_per_run
    per_run = threads_per_run(executor, jobs, threads, device_type)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{stamp}/{socket.gethostname()}/{executor}-{jobs if executor != 'local' else 1}x{per_run}"
