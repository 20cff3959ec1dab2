"""Ending a command's process without the interpreter's teardown. Once a command is done, the teardown frees every
object of torch and the libraries beside it one by one: about 1 s of a core after every `bench` command and every
perturbed rerun of `bench check`, a sixth of a small `bench run` (BENCHMARK.md). What must happen at exit still
does: Python joins the threads and runs every atexit handler (Ray's shutdown, logging's flush, multiprocessing's
cleanup of the fork server), the last of them the one registered here, which flushes the two streams and ends the
process with the command's exit status. Handlers registered before it would run after it, so never: the one a
module imported that early registers is logging's flush (`python -m benchmark.check` imports logging with torch
before its `__main__` block runs), which it runs itself. An uncaught exception (a bug: its traceback) keeps the
interpreter's own exit."""
from __future__ import annotations

import atexit
import os
import sys
from typing import Callable

_EXIT_STATUS: list[int] = []


def without_teardown(command: Callable[[], object]) -> None:
    """Run `command` as the process's work (its SystemExit, or 0 when it returns, is the exit status), then exit
    without the teardown. Call it before anything registers an atexit handler, so that its own runs last."""
    atexit.register(_exit_now)
    try:
        command()
    except SystemExit as done:
        code = done.code
        _EXIT_STATUS.append(code if isinstance(code, int) else 0 if code is None else 1)
        raise
    _EXIT_STATUS.append(0)


def _exit_now() -> None:
    if not _EXIT_STATUS:
        return
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()       # flush and close every handler (again, if its own ran already)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a reader that went away, a closed stream: nothing left to deliver
            pass
    os._exit(_EXIT_STATUS[0])
