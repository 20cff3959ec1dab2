"""Shared fixtures: offline hub, fixed threads, tiny grids written to real files, the digits data and a spec
and training batch on it for tests that build a model through `initial_model`."""
import os
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
BENCH = [sys.executable, "-m", "benchmark.cli"]


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
    from benchmark.data import UCI_HAR_SIGNALS
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
