"""Shared fixtures: offline hub, fixed threads, tiny grids written to real files, folders built once per session
(across pytest-xdist workers), the digits data and a spec and training batch on it for tests that build a model
through `initial_model`; the cyclic garbage collector set for a test process's large heap."""
import gc
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
"""Torch threads of this test process and of what it trains (in-process or in a `bench` subprocess: pass
`SERIAL_RUN` to every `bench run` that trains): its share of the cores, at most 2. Two xdist workers on 2
cores get 1 each; two processes with 2 threads each on 2 cores slow each other 10-20x (OpenMP spin-waits)."""
torch.set_num_threads(THREADS)
SERIAL_RUN = ["--executor", "local", "--threads", str(THREADS)]
"""What every `bench run` that trains in a test passes (in-process or in a `bench` subprocess): one run at a time on
THREADS threads. The default, one worker process per core, would run two on a core an xdist worker already fills
(and its workers would not see what a test patches in this process); the tests of the process executor name it."""

REPO = Path(__file__).resolve().parents[1]
BENCH = [sys.executable, "-m", "benchmark.cli"]


gc.set_threshold(10_000, 10, 10)


def pytest_collection_finish(session):
    """A test process holds a large heap once collected (torch, torchvision, timm, matplotlib, Ray: ~250 000
    objects) that Python's cyclic collector walks again at every full collection: frozen here, and with 10 000
    allocations between young collections instead of 700, the collector takes ~0.4 s of a worker's CPU instead of
    ~1.8 s on four in-process test files, which ran in 8-10 % less CPU time (57 against 63 s)."""
    gc.freeze()


def pytest_sessionfinish(session):
    """Freeze again before the process exits, so its teardown does not walk the heap the tests grew (a worker's
    exit took ~1.6 s instead of ~0.25 s, at the end of the run where nothing else runs)."""
    gc.freeze()


def pytest_collection_modifyitems(items):
    """Slow tests first, collection order otherwise (a stable sort): with one xdist worker per core the suite's wall
    time is decided by what each worker picks up last, and a half-minute end-to-end test picked up last leaves the
    other core idle while it runs."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True)
def _own_thread_count():
    """In-process `bench` commands and `execute_run` set torch's thread count (in a test or a fixture): every test
    starts with THREADS, and leaves THREADS to the fixtures after it."""
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)
    yield
    if torch.get_num_threads() != THREADS:
        torch.set_num_threads(THREADS)


@pytest.fixture(scope="session")
def shared_folder(tmp_path_factory):
    """`shared_folder(name, build)`: a folder that `build(folder)` fills once per test session, even across
    pytest-xdist workers (they share the parent of their base temporary folders; a file lock makes the others wait
    for the first). Tests must treat it as read-only: copy it (shutil.copytree) before changing anything in it."""
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base

    def get(name: str, build) -> Path:
        folder = root / "shared" / name
        folder.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(folder) + ".lock"):
            if not (folder.parent / f"{name}.built").exists():
                shutil.rmtree(folder, ignore_errors=True)          # what a failed build left
                folder.mkdir()
                build(folder)
                (folder.parent / f"{name}.built").touch()
        return folder
    return get


def write_grid(path: Path, *, datasets=("digits",), archs=("small_cnn",), regimes=("joint", "disjoint", "mixed"),
               seeds=(0,), epochs=2, extra: str = "") -> Path:
    """A real grid file on disk (TOML), small enough to train in seconds."""
    quote = lambda xs: ", ".join(f'"{x}"' for x in xs)  # noqa: E731
    path.write_text(
        f'description = "test grid"\n'
        f"datasets = [{quote(datasets)}]\narchs = [{quote(archs)}]\nregimes = [{quote(regimes)}]\n"
        f"seeds = [{', '.join(map(str, seeds))}]\n\n"
        f"[train]\nepochs = {epochs}\nbatch_size = 64\nlr = 0.05\n\n[model]\nhead = \"pool\"\n"
        f'exits = "flops:0.25,0.5,0.75"\n' + extra)
    return path


@pytest.fixture
def grid_file(tmp_path):
    return lambda name="grid.toml", **kw: write_grid(tmp_path / name, **kw)


def bench_subprocess(*args, timeout=300):
    """`bench ARGS` through the real entry point in a fresh interpreter, from the repository root."""
    import subprocess
    return subprocess.run([*BENCH, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=timeout)


def bench_in_process(*args):
    """`bench ARGS` in this process through click's CliRunner (the real commands, not the entry point's fresh
    interpreter): the result's exit_code, stdout and stderr; an exception other than SystemExit is raised, so a
    traceback fails the test with its own message instead of a bare exit code 1."""
    from click.testing import CliRunner

    from benchmark.cli import main
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture(scope="session")
def smoke_results(shared_folder):
    """(grid, results folder, stdout of the `bench run` that trained it): joint, disjoint, mixed on digits x
    small_cnn, 2 epochs, no models kept, trained once per session by `bench run` in a subprocess. Read-only:
    tests that run more commands on it use a copy."""
    def build(folder):
        grid = write_grid(folder / "grid.toml", epochs=2)
        result = bench_subprocess("run", "--grid", grid, "--results", folder / "out", *SERIAL_RUN)
        assert result.returncode == 0, result.stderr
        (folder / "stdout.txt").write_text(result.stdout)
    folder = shared_folder("smoke", build)
    return folder / "grid.toml", folder / "out", (folder / "stdout.txt").read_text()


@pytest.fixture(scope="session")
def smoke_analyzed(shared_folder, smoke_results):
    """(grid, results folder, exit code, stderr) of `bench analyze` (in-process: `smoke_results` went through the
    entry point) on a copy of `smoke_results`, once per session; read-only. Its runs have no model.pt: only the
    analyses of stored logits and the tables run."""
    grid, results, _ = smoke_results

    def build(folder):
        shutil.copytree(results, folder / "out")
        result = bench_in_process("analyze", "--grid", grid, "--results", folder / "out")
        (folder / "returncode.txt").write_text(str(result.exit_code))
        (folder / "stderr.txt").write_text(result.stderr)
    folder = shared_folder("smoke_analyzed", build)
    return (grid, folder / "out", int((folder / "returncode.txt").read_text()),
            (folder / "stderr.txt").read_text())


@pytest.fixture(scope="session")
def analysed(shared_folder):
    """A real joint run (digits x small_cnn, 2 epochs) trained with --save-models, then `bench analyze` with the
    robustness analysis only, two corruptions at two severities; once per session (read-only: tests copy it)."""
    from click.testing import CliRunner

    from benchmark.cli import main

    def build(root):
        grid = write_grid(root / "grid.toml", regimes=("joint",), epochs=2,
                          extra='\n[analyses]\nmodel = ["robustness"]\ncorruptions = ["gaussian_noise", "contrast"]\n'
                                'severities = [1, 5]\n')
        runner = CliRunner()
        trained = runner.invoke(main, ["run", "--grid", str(grid), "--results", str(root / "out"), "--save-models",
                                       *SERIAL_RUN])
        assert trained.exit_code == 0, trained.output
        result = runner.invoke(main, ["analyze", "--grid", str(grid), "--results", str(root / "out")])
        assert result.exit_code == 0, result.output
    root = shared_folder("robustness", build)
    return root / "grid.toml", root / "out"


class TorchCallCounter(TorchFunctionMode):
    """Counts the torch functions and tensor methods called while it is active."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.calls += 1
        return func(*args, **(kwargs or {}))


def torch_calls(function) -> int:
    """How many torch calls `function()` makes: equal counts for small and large batches mean no per-sample
    loop, an exact check that machine load cannot make flaky (a timing could)."""
    with TorchCallCounter() as counter:
        function()
    return counter.calls


def record_run(store, spec, metrics=None, error=None, files=None):
    """A run folder as the pipeline leaves it: spec.json, the other `files` (name -> DataFrame), then metrics.json
    with the run id and every file's checksum (done) or error.json (failed)."""
    from benchmark.store import folder_digests, write_csv, write_json
    folder = store.run_dir(spec.run_id)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "spec.json", spec.to_json())
    for name, frame in (files or {}).items():
        write_csv(folder / name, frame)
    if error is not None:
        write_json(folder / "error.json", {"run_id": spec.run_id, "error": error})
    else:
        write_json(folder / "metrics.json", {**(metrics or {}), "run_id": spec.run_id, "files": folder_digests(folder)})


def uci_har_number(value):
    """A float as the UCI HAR files print it: ' 1.8085150e-004' (sign or space, 3-digit exponent)."""
    mantissa, exponent = f"{value:.7e}".split("e")
    return f"{mantissa if value < 0 else ' ' + mantissa}e{int(exponent):+04d}"


def write_uci_har(root, sizes=(("train", 60), ("test", 12))):
    """A tiny UCI HAR folder in the original layout and number format; returns what each split holds."""
    from benchmark.data.uci_har import UCI_HAR_SIGNALS
    rng = np.random.default_rng(0)
    written = {}
    for split, n in sizes:
        folder = root / "UCI HAR Dataset" / split
        (folder / "Inertial Signals").mkdir(parents=True)
        windows = rng.normal(size=(n, 9, 128)).astype(np.float32) * np.arange(1, 10, dtype=np.float32)[:, None]
        for c, signal in enumerate(UCI_HAR_SIGNALS):
            lines = ("".join(f" {uci_har_number(v)}" for v in row) for row in windows[:, c])
            (folder / "Inertial Signals" / f"{signal}_{split}.txt").write_text("\n".join(lines) + "\n")
        labels = np.arange(n) % 6 + 1
        (folder / f"y_{split}.txt").write_text("".join(f"{k}\n" for k in labels))
        written[split] = windows, labels
    return written


def digits_spec(regime: str, train: dict, hparams: dict | None = None, seed: int = 0):
    """A digits x small_cnn run of `regime` with three pool heads at 25/50/75 % of the FLOPs."""
    from benchmark.spec import RunSpec
    return RunSpec(dataset="digits", arch="small_cnn", regime=regime, seed=seed, train=dict(train),
                   model={"head": "pool", "exits": "flops:0.25,0.5,0.75"}, hparams=hparams or {})


@pytest.fixture(scope="module")
def digits():
    from benchmark.data import load_dataset
    return load_dataset("digits", "/nonexistent")


@pytest.fixture(scope="module")
def inputs(digits):
    """The first 64 training examples of digits, as model inputs, and their labels."""
    from benchmark.train import held
    x, prepare = held(digits, "train")
    return prepare(x[:64]), digits.y_train[:64]
