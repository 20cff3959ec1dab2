"""The difficulty screen: declared in the grid file, decided on the screen regime's validation accuracies before any
other regime of a cell trains; failing cells train nothing more, and tables/screen.csv says why."""
import json

import pandas as pd
import pytest

from benchmark.errors import UserError
from benchmark.grid import load_grid
from benchmark.spec import RunSpec
from conftest import SERIAL_RUN, bench_in_process

TUNING = "[tuning]\nseeds = [100]\nlr = [0.05, 0.1]\n"


@pytest.mark.parametrize("screen, problem", [
    ("[screen]\nmin_gapp = 0.1\n", "unknown key"),
    ('[screen]\nregime = "joint+sdn"\n', "is not one of the grid's regimes"),
    ("[screen]\nmin_gap = 1.5\n", "must be a validation accuracy in \\[0, 1\\], got 1.5"),
    ("[screen]\nmax_final = true\n", "expected float, got True"),
])
def test_a_malformed_screen_is_refused_at_load(grid_file, screen, problem):
    with pytest.raises(UserError, match=problem):
        load_grid(str(grid_file(regimes=("joint", "disjoint"), extra=TUNING + screen)))


def test_the_screen_needs_the_tuning_it_reads(grid_file):
    with pytest.raises(UserError, match="declare \\[tuning\\] too"):
        load_grid(str(grid_file(regimes=("joint", "disjoint"), extra="[screen]\n")))


def test_declared_values_override_the_defaults(grid_file):
    grid = load_grid(str(grid_file(regimes=("joint", "disjoint"), extra=TUNING + "[screen]\nmax_final = 0.9\n")))
    assert grid.screen == {"regime": "joint", "min_gap": 0.10, "max_final": 0.9}
    assert load_grid(str(grid_file(name="plain.toml", regimes=("joint",), extra=TUNING))).screen is None


def run_id(spec_json: dict) -> str:
    return RunSpec.from_json(spec_json).run_id


@pytest.mark.parametrize("screen, passes", [("max_final = 0.0\n", False), ("min_gap = 0.0\nmax_final = 1.0\n", None)])
def test_only_cells_that_pass_train_their_other_regimes(tmp_path, grid_file, screen, passes):
    """A real `bench run`: joint is tuned and its reported seeds trained first; screen.csv holds their seed-mean
    validation accuracies (recomputed here from the runs' own exits.csv) and the verdict by the declared rule; the
    other regime trains only in a cell that passes. max_final = 0 fails every cell; with min_gap 0 and max_final 1
    the verdict is whatever the numbers say, and the runs follow it."""
    grid = grid_file(regimes=("joint", "disjoint"), seeds=(0, 1), epochs=2, extra=TUNING + "[screen]\n" + screen)
    result = bench_in_process("run", "--grid", grid, "--results", tmp_path / "out", *SERIAL_RUN)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "out" / "tables" / "screen.csv")
    assert len(table) == 1
    row = table.iloc[0]
    tuning = pd.read_csv(tmp_path / "out" / "tables" / "tuning.csv")
    winner = tuning[(tuning.regime == "joint") & tuning.chosen]
    joint = [json.loads((folder / "spec.json").read_text()) for folder in (tmp_path / "out" / "runs").iterdir()]
    reported = [spec for spec in joint if spec["regime"] == "joint" and spec["seed"] in (0, 1)
                and spec.get("stop_after") is None]
    assert len(reported) == 2 and all({**spec["train"], **spec["own_phases"]}["lr"] == winner.lr.iloc[0]
                                      for spec in reported)
    exits = [pd.read_csv(tmp_path / "out" / "runs" / run_id(spec) / "exits.csv").sort_values("exit").val_accuracy
             for spec in reported]
    assert row.val_first_exit == pytest.approx((exits[0].iloc[0] + exits[1].iloc[0]) / 2)
    assert row.val_final_exit == pytest.approx((exits[0].iloc[-1] + exits[1].iloc[-1]) / 2)
    assert row.lr == winner.lr.iloc[0] and row.val_samples == 144 and row.seeds == 2
    expected = row.val_final_exit - row.val_first_exit >= row.min_gap and row.val_final_exit < row.max_final
    assert bool(row.passes) == expected and (passes is None or expected == passes)
    assert ("passes" if expected else "fails") in result.stderr
    trained = {json.loads((folder / "spec.json").read_text())["regime"]
               for folder in (tmp_path / "out" / "runs").iterdir() if (folder / "metrics.json").is_file()}
    assert trained == ({"joint", "disjoint"} if expected else {"joint"})
    runs = pd.read_csv(tmp_path / "out" / "tables" / "runs.csv")
    assert set(runs.regime) == (set() if not expected else {"joint", "disjoint"})
