"""`bench list` and `bench run --dry-run` answer in about a second or two: they build no backbone and draw no figure,
so they must not import torchvision or timm (~1.3 s together; torchvision.ops pulls in torch._dynamo) nor matplotlib
and seaborn (~0.5 s). Checked by what a fresh interpreter has imported, not by a clock, so it holds on a loaded
machine. Neither imports scikit-learn or SciPy (~0.9 s): `list` needs no dataset, and a dry run, which loads its
datasets to check its cells, reads digits and draws its splits without them (benchmark/data/stratify.py)."""

import json
import os
import subprocess
import sys

import pytest

BUILDING = ("torchvision", "timm")
PLOTTING = ("matplotlib", "seaborn")
DATA = ("sklearn", "scipy")
TRACKERS = ("tensorboard", "wandb")   # imported only by `bench run --log` (benchmark/trackers.py)


def run_bench(args: list[str], modules: tuple[str, ...]) -> tuple[str, set[str]]:
    """`bench ARGS` in a fresh interpreter: its output, and which of ``modules`` it imported."""
    code = (
        "import json, sys\n"
        "from benchmark.cli import main\n"
        f"main({args!r}, standalone_mode=False)\n"
        f"print(json.dumps([m for m in {list(modules)!r} if m in sys.modules]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600,
                          check=False)
    assert done.returncode == 0, done.stderr
    *output, imported = done.stdout.splitlines()
    return "\n".join(output), set(json.loads(imported))


@pytest.mark.parametrize("what, expected", [
    ("archs", ["small_cnn", "resnet18", "vit_tiny", "efficientnet_b0"]),
    ("datasets", ["digits", "cifar10", "uci_har"]),
    ("grids", ["smoke", "quick"]),
])
def test_listing_imports_no_model_zoo_plotting_or_data_library(what, expected):
    output, imported = run_bench(["list", what], BUILDING + PLOTTING + DATA + TRACKERS)
    assert all(name in output for name in expected)
    assert imported == set()


def test_a_dry_run_imports_no_model_zoo_plotting_or_data_library(tmp_path):
    output, imported = run_bench(["run", "--grid", "smoke", "--dry-run", "--results", str(tmp_path / "results")],
                                 BUILDING + PLOTTING + DATA + TRACKERS)
    assert "small_cnn" in output and "pending" in output
    assert imported == set()
