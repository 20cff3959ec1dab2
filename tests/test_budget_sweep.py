"""The budget sweep's runs and its plateau verdict, on hand-made final-exit validation accuracies."""
import pandas as pd
import pytest

from benchmark.budget_sweep import sweep_specs, sweep_table
from benchmark.grid import load_grid
from benchmark.store import ResultsStore
from conftest import record_run


def record(store, spec, val_final_accuracy):
    record_run(store, spec, files={"exits.csv": pd.DataFrame({"exit": [0, 1], "val_accuracy": [0.1, val_final_accuracy]})})


def test_sweep_trains_joint_at_half_once_and_twice_the_cells_budget(grid_file):
    grid = load_grid(str(grid_file(regimes=("mixed+sdn",), seeds=(0, 1), epochs=6)))
    runs = sweep_specs(grid.specs)
    assert sorted((label, s.seed, s.train["epochs"]) for label, s in runs) == sorted(
        (label, seed, epochs) for label, epochs in (("E/2", 3), ("E", 6), ("2E", 12)) for seed in (0, 1))
    assert {s.regime for _, s in runs} == {"joint"} and all(s.hparams == {} for _, s in runs)


@pytest.mark.parametrize("accuracies, plateaued", [
    ({"E": [0.90, 0.90], "2E": [0.904, 0.904]}, True),    # +0.4 points: within 0.5
    ({"E": [0.90, 0.90], "2E": [0.92, 0.92]}, False),     # +2 points, no noise at all
    ({"E": [0.88, 0.92], "2E": [0.89, 0.93]}, True),      # +1 point, but the seeds spread 4 points: SE 2.8 points
])
def test_plateau_is_a_small_or_indistinguishable_gain(grid_file, tmp_path, accuracies, plateaued):
    grid = load_grid(str(grid_file(regimes=("joint",), seeds=(0, 1), epochs=6)))
    store = ResultsStore(tmp_path)
    runs = sweep_specs(grid.specs)
    for label, spec in runs:
        record(store, spec, accuracies.get(label, [0.5, 0.5])[spec.seed])
    table = sweep_table(runs, store).set_index("budget")
    gain = sum(accuracies["2E"]) / 2 - sum(accuracies["E"]) / 2
    assert table.loc["E", "gain_E_to_2E"] == pytest.approx(gain)
    assert bool(table.loc["E", "plateaued"]) is plateaued
    assert table.loc["2E", "epochs"] == 12 and table.loc["E/2", "seeds"] == 2
