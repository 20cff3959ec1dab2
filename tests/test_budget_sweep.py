"""The budget sweep's runs and its plateau verdict, on hand-made final-exit validation accuracies; `bench
budget-sweep` on runs already done."""
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from benchmark.budget_sweep import sweep_specs, sweep_table
from benchmark.cli import main
from benchmark.grid import load_grid
from benchmark.store import ResultsStore
from conftest import record_run


def record(store, spec, val_final_accuracy, val_samples=1000):
    folder = store.run_dir(spec.run_id)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "logits.npz", val_y=np.zeros(val_samples, dtype=np.int64))    # the split the run was read on
    record_run(store, spec, files={"exits.csv": pd.DataFrame({"exit": [0, 1], "val_accuracy": [0.1, val_final_accuracy]})})


def test_sweep_trains_joint_at_half_once_and_twice_the_cells_budget(grid_file):
    grid = load_grid(str(grid_file(regimes=("mixed+sdn",), seeds=(0, 1), epochs=6)))
    runs = sweep_specs(grid.specs)
    assert sorted((label, s.seed, s.train["epochs"]) for label, s in runs) == sorted(
        (label, seed, epochs) for label, epochs in (("E/2", 3), ("E", 6), ("2E", 12)) for seed in (0, 1))
    assert {s.regime for _, s in runs} == {"joint"} and all(s.hparams == {} for _, s in runs)
    assert {s.seed for _, s in sweep_specs(grid.specs, [1])} == {1}        # --seeds: a subset of the grid's
    assert {s.train["lr"] for _, s in runs} == {0.05}                          # the grid's [train] lr
    assert {s.train["lr"] for _, s in sweep_specs(grid.specs, lr=0.2)} == {0.2}   # --lr: the lr a cell will use


@pytest.mark.parametrize("accuracies, val_samples, plateaued", [
    ({"E": [0.90, 0.90], "2E": [0.904, 0.904]}, 1000, True),    # +0.4 points: within 0.5
    ({"E": [0.90, 0.90], "2E": [0.92, 0.92]}, 1000, False),     # +2 points
    ({"E": [0.88, 0.92], "2E": [0.89, 0.93]}, 1000, False),     # +1 point: seeds that spread 4 points excuse nothing
    ({"E": [0.90, 0.90], "2E": [0.904, 0.904]}, 144, False),    # within 0.5, on a split too small to see 0.5 points
])
def test_converged_means_at_most_half_a_point_from_E_to_2E_on_a_split_that_can_show_it(
        grid_file, tmp_path, accuracies, val_samples, plateaued):
    grid = load_grid(str(grid_file(regimes=("joint",), seeds=(0, 1), epochs=6)))
    store = ResultsStore(tmp_path)
    runs = sweep_specs(grid.specs)
    for label, spec in runs:
        record(store, spec, accuracies.get(label, [0.5, 0.5])[spec.seed], val_samples)
    table = sweep_table(runs, store).set_index("budget")
    gain = sum(accuracies["2E"]) / 2 - sum(accuracies["E"]) / 2
    assert table.loc["E", "gain_E_to_2E"] == pytest.approx(gain)
    assert bool(table.loc["E", "plateaued"]) is plateaued
    assert bool(table.loc["E", "validation_resolves"]) is (val_samples >= 1000)
    assert table.loc["E", "val_samples"] == val_samples
    assert table.loc["2E", "epochs"] == 12 and table.loc["E/2", "seeds"] == 2


def test_bench_budget_sweep_writes_the_table_of_its_runs_at_the_asked_seeds_and_lr(grid_file, tmp_path):
    """The command end to end, on runs already done (recorded by hand: nothing trains): --seeds (repeatable) and --lr
    pick the runs, whose table goes to tables/budget_sweep_lr<LR>.csv."""
    path = grid_file(regimes=("joint",), seeds=(0, 1, 2), epochs=6)
    store = ResultsStore(tmp_path / "out")
    runs = sweep_specs(load_grid(str(path)).specs, [0, 1], lr=0.2)
    for label, spec in runs:
        record(store, spec, {"E/2": 0.8, "E": 0.9, "2E": 0.902}[label])
    result = CliRunner().invoke(main, ["budget-sweep", "--grid", str(path), "--seeds", "0", "--seeds", "1", "--lr",
                                       "0.2", "--results", str(store.root), "--threads", "1"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(store.tables_dir / "budget_sweep_lr0.2.csv").set_index("budget")
    assert table.loc["E", "seeds"] == 2 and bool(table.loc["E", "plateaued"]) and set(table["lr"]) == {0.2}
    assert "0 trained, 6 already done, 0 failed" in result.stdout
    assert not (store.tables_dir / "budget_sweep.csv").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--grid", "quik"], "unknown grid 'quik'"),
    (["--seeds", "7"], "--seeds 7: not among the seeds"),
    (["--only", "arch=resnet1000"], "--only arch=resnet1000 matches none"),
])
def test_bench_budget_sweep_says_a_users_mistake_in_one_line(grid_file, tmp_path, args, fragment):
    args = ["--grid", str(grid_file()), *args] if args[0] != "--grid" else args
    result = CliRunner().invoke(main, ["budget-sweep", *args, "--results", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: ")
    assert "Traceback" not in result.output and fragment in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()
