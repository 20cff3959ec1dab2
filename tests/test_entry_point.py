"""`bench`'s exit (benchmark.cli.entry, benchmark/quick_exit.py): main's exit status and everything it wrote, every
atexit handler run, and no interpreter teardown after a command — checked in fresh interpreters whose `main` is
replaced by a small one (importing benchmark.cli costs no torch: each process takes a fraction of a second)."""
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

SCRIPT = textwrap.dedent("""
    import atexit, os, sys
    from pathlib import Path
    from benchmark import cli

    # A module global's finaliser, which only the interpreter's teardown runs; it holds what it calls (by then the
    # teardown may have emptied the modules' globals).
    class Finaliser:
        def __init__(self, path):
            self.write, self.fd = os.write, os.open(path, os.O_WRONLY | os.O_CREAT)

        def __del__(self):
            self.write(self.fd, b"ran")

    kept = Finaliser(Path(sys.argv[1], "teardown"))

    # logging imported before the entry registers its handler (as `python -m benchmark.check` imports it with
    # torch): logging's own atexit handler would run after the entry's, so never, and the entry runs it itself.
    import logging

    class Closing(logging.Handler):
        def emit(self, record):
            pass

        def close(self):
            Path(sys.argv[1], "logging").touch()
            super().close()

    logging.getLogger().addHandler(Closing())

    def command():
        atexit.register(lambda: Path(sys.argv[1], "atexit").touch())   # as a library a command imports registers
        sys.stdout.write("x" * 100_000)                                  # buffered: not yet flushed
        if sys.argv[2] == "raise":
            raise RuntimeError("a bug")
        if sys.argv[2] == "exit":
            sys.exit(3)

    cli.main = command
    cli.entry() if sys.argv[3] == "entry" else cli.main()
""")


def exit_of(tmp_path, ending: str, caller: str):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), ending, caller], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    ran = {name for name, happened in (("atexit", (tmp_path / "atexit").exists()),
                                       ("logging", (tmp_path / "logging").exists()),
                                       ("teardown", (tmp_path / "teardown").read_bytes() == b"ran")) if happened}
    return done.returncode, done.stdout, done.stderr, ran


@pytest.mark.parametrize("ending, status", [("exit", 3), ("return", 0)])   # click's way; `python -m benchmark.check`'s
def test_entry_exits_with_mains_status_after_every_atexit_handler_and_without_the_teardown(tmp_path, ending, status):
    code, stdout, stderr, ran = exit_of(tmp_path, ending, "entry")
    assert (code, stderr) == (status, "")
    assert stdout == "x" * 100_000                      # flushed whole before the process ended
    assert ran == {"atexit", "logging"}


def test_without_entry_the_teardown_runs_so_the_check_above_can_fail(tmp_path):
    assert exit_of(tmp_path, "exit", "main")[::3] == (3, {"atexit", "logging", "teardown"})


@pytest.mark.parametrize("caller", ["entry", "main"])
def test_an_uncaught_exception_keeps_the_interpreters_own_exit(tmp_path, caller):
    code, stdout, stderr, ran = exit_of(tmp_path, "raise", caller)
    assert code == 1 and "RuntimeError: a bug" in stderr and stdout == "x" * 100_000
    assert ran == {"atexit", "logging", "teardown"}
