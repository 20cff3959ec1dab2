"""The tuning protocol: candidates on tuning seeds, the choice by a validation metric, reported runs with the winner."""
import math

import pandas as pd
import pytest
from click.testing import CliRunner

from benchmark.cli import main
from benchmark.grid import load_grid
from benchmark.store import ResultsStore
from benchmark.tuning import NOT_TUNED, TUNING_METRIC, candidates, make_plan
from conftest import SERIAL_RUN, record_run

TUNING = '[tuning]\nseeds = [7, 8]\nlr = [0.1, 0.02]\n'


def finish(store, spec, metric=None, error=None):
    """Record a tuning run's outcome the way the pipeline does: metrics.json (done) or error.json (failed)."""
    record_run(store, spec, metrics={"summary": {TUNING_METRIC: metric, "auc_normalised": 0.0}}, error=error)


def test_candidates_are_declared_lr_times_one_objective_knob(grid_file):
    grid = load_grid(str(grid_file(regimes=("joint", "joint+sdn"),
                                   extra=TUNING + "[tuning.hparams.sdn]\nc_max = [0.5, 0.9]\n")))
    by_regime = {s.regime: candidates(s, grid.tuning) for s in grid.specs}
    assert by_regime["joint"] == [{"lr": 0.1}, {"lr": 0.02}]
    assert by_regime["joint+sdn"] == [{"lr": 0.1, "sdn.c_max": 0.5}, {"lr": 0.1, "sdn.c_max": 0.9},
                                      {"lr": 0.02, "sdn.c_max": 0.5}, {"lr": 0.02, "sdn.c_max": 0.9}]


def test_the_seed_mean_validation_metric_chooses_and_failures_lose(grid_file, tmp_path):
    grid = load_grid(str(grid_file(regimes=("joint", "mixed"), seeds=(0, 1), extra=TUNING)))
    store = ResultsStore(tmp_path / "out")
    plan = make_plan(grid.specs, grid.tuning, store)
    assert len(plan.tuning) == 2 * 2 * 2 and not plan.reported and len(plan.awaiting) == 4
    assert not {s.seed for s in plan.tuning} & {0, 1}, "tuning never trains a reported seed"

    runs = {(s.regime, s.own_phases["lr"], s.seed): s for s in plan.tuning}
    # joint: lr 0.1 wins on the seed mean (0.80) although lr 0.02 has the best single seed (0.85)
    for (lr, seed), metric in {(0.1, 7): 0.80, (0.1, 8): 0.80, (0.02, 7): 0.85, (0.02, 8): 0.70}.items():
        finish(store, runs["joint", lr, seed], metric)
    # mixed: lr 0.1 diverged on one seed, so it loses to a worse but finite candidate
    finish(store, runs["mixed", 0.1, 7], 0.99)
    finish(store, runs["mixed", 0.1, 8], error="non-finite loss at epoch 2, phase P2")
    finish(store, runs["mixed", 0.02, 7], 0.5)
    assert {s.regime for s in make_plan(grid.specs, grid.tuning, store).awaiting} == {"mixed"}
    finish(store, runs["mixed", 0.02, 8], 0.5)

    plan = make_plan(grid.specs, grid.tuning, store)
    assert plan.complete and len(plan.reported) == 4
    chosen = {(s.regime, s.seed): s.own_phase_train["lr"] for s in plan.reported}
    assert chosen == {("joint", 0): 0.1, ("joint", 1): 0.1, ("mixed", 0): 0.02, ("mixed", 1): 0.02}
    assert all(plan.provenance[s.run_id]["tuned"] == "lr" for s in plan.reported)
    assert plan.at_edge == ["digits/small_cnn/joint: lr 0.1", "digits/small_cnn/mixed: lr 0.02"]
    for spec in plan.reported:    # the reported run is the grid's run with the chosen lr in its own phases only
        original = next(g for g in grid.specs if (g.regime, g.seed) == (spec.regime, spec.seed))
        assert spec.train == original.train and spec.hparams == original.hparams
    table = plan.choices
    assert table.groupby("regime")["chosen"].sum().to_dict() == {"joint": 2, "mixed": 2}  # both seeds of the winner
    assert math.isinf(table.set_index(["regime", "lr", "seed"]).loc[("mixed", 0.1, 8), TUNING_METRIC])


def test_a_cell_whose_every_candidate_failed_is_not_run(grid_file, tmp_path):
    grid = load_grid(str(grid_file(regimes=("joint",), extra=TUNING)))
    store = ResultsStore(tmp_path / "out")
    for spec in make_plan(grid.specs, grid.tuning, store).tuning:
        finish(store, spec, error="non-finite loss at epoch 1, phase P2")
    plan = make_plan(grid.specs, grid.tuning, store)
    assert not plan.reported and not plan.complete
    assert "every tuning candidate of digits/small_cnn/joint failed" in plan.untunable["digits", "small_cnn", "joint"]


def test_grids_without_tuning_report_their_values_as_not_tuned(grid_file, tmp_path):
    grid = load_grid(str(grid_file()))
    plan = make_plan(grid.specs, grid.tuning, ResultsStore(tmp_path))
    assert plan.reported == grid.specs and not plan.tuning
    assert {p["tuned"] for p in plan.provenance.values()} == {NOT_TUNED}


@pytest.mark.slow
def test_bench_run_tunes_then_trains_the_reported_seeds_with_the_winner(grid_file, tmp_path):
    grid = grid_file(regimes=("joint", "mixed"), epochs=2, extra='[tuning]\nseeds = [5]\nlr = [0.05, 1e30]\n')
    out = tmp_path / "out"
    bench = lambda *extra: CliRunner().invoke(main, ["run", "--grid", str(grid), "--results", str(out), *extra])  # noqa: E731
    before = bench("--dry-run")
    assert before.exit_code == 0, before.output
    assert "2 reported runs await their cell's tuning" in before.stdout and "awaiting" in before.stdout

    result = bench(*SERIAL_RUN)
    assert result.exit_code == 0, result.output
    assert "tuning runs of grid" in result.stdout
    tuning = pd.read_csv(out / "tables" / "tuning.csv")
    runs = pd.read_csv(out / "tables" / "runs.csv")
    assert len(tuning) == 4 and set(tuning.state) == {"done", "failed"}      # lr 1e30 diverges: a lost candidate
    assert (tuning.loc[tuning.chosen, "lr"] == 0.05).all() and tuning.chosen.sum() == 2
    assert sorted(runs.regime) == ["joint", "mixed"] and set(runs.seed) == {0}
    assert (runs.lr == 0.05).all() and (runs.tuned == "lr").all() and (runs.p1_lr == 0.05).all()

    after = bench("--dry-run")
    assert "await" not in after.stdout and after.stdout.count(" done ") == 2 + 2


def test_each_optimizer_tunes_over_its_own_learning_rates(tmp_path):
    """[tuning.lr] with one list per optimizer: a cell tries only its own optimizer's list."""
    from benchmark.grid import load_grid
    from benchmark.store import ResultsStore
    from benchmark.tuning import make_plan
    path = tmp_path / "g.toml"
    path.write_text('datasets = ["digits"]\narchs = ["small_cnn", "cifar_resnet8"]\nregimes = ["joint"]\nseeds = [0]\n'
                    '[train]\nepochs = 2\n[arch_overrides.cifar_resnet8]\noptimizer = "adamw"\nlr = 1e-3\n'
                    '[tuning]\nseeds = [9]\n[tuning.lr]\nsgd = [0.1, 0.05]\nadamw = [2e-3, 1e-3, 5e-4]\n')
    plan = make_plan(load_grid(str(path)).specs, load_grid(str(path)).tuning, ResultsStore(tmp_path / "r"))
    tried = {}
    for run in plan.tuning:
        tried.setdefault(run.arch, set()).add(run.own_phases["lr"])
    assert tried == {"small_cnn": {0.1, 0.05}, "cifar_resnet8": {2e-3, 1e-3, 5e-4}}


def test_a_per_optimizer_lr_table_must_cover_every_optimizer_the_grid_uses(tmp_path):
    from benchmark.errors import UserError
    from benchmark.grid import load_grid
    path = tmp_path / "g.toml"
    path.write_text('datasets = ["digits"]\narchs = ["small_cnn"]\nregimes = ["joint"]\nseeds = [0]\n'
                    '[train]\nepochs = 2\n[tuning]\nseeds = [9]\n[tuning.lr]\nadamw = [1e-3]\n')
    with pytest.raises(UserError, match=r"key 'tuning.lr': declares no learning rates for sgd"):
        load_grid(str(path))
    path.write_text(path.read_text().replace("adamw = [1e-3]", "sgd = [0.1]\nadam = [1e-3]"))
    with pytest.raises(UserError, match=r"key 'tuning.lr.adam': unknown optimizer \(did you mean 'adamw'\?\)"):
        load_grid(str(path))
