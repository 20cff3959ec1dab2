"""Shared fixtures: offline hub, fixed threads, tiny grids written to real files."""
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

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
