"""Is each cell's epoch budget enough? The committed evidence: `python -m benchmark.budget_sweep --grid quick`.

A ranking at a budget where nothing has converged measures early speed, not the regimes. For every (dataset,
arch) cell of a grid this trains `joint` (the grid's [train] lr, the grid's seeds) at E/2, E and 2E epochs —
ordinary runs of the grid's store, so they are cached — and writes `tables/budget_sweep.csv`: the seed-mean
final-exit *validation* accuracy at each budget. The rule (BENCHMARK.md): a budget E is enough when going to 2E
gains at most PLATEAU_POINTS of final-exit validation accuracy, or less than two standard errors of that gain over
seeds — a gain the validation split cannot tell from noise (on digits one validation sample is 0.69 points, more
than PLATEAU_POINTS). Test data is never read.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.cli import DEFAULT_DATA_ROOT
from benchmark.grid import load_grid
from benchmark.runner import run_grid
from benchmark.spec import RunSpec
from benchmark.store import DONE, ResultsStore, write_csv

PLATEAU_POINTS = 0.005
"""Largest final-exit validation accuracy gain from E to 2E epochs for which E counts as converged."""

BUDGETS = {"E/2": 0.5, "E": 1.0, "2E": 2.0}


def sweep_specs(specs: list[RunSpec]) -> list[tuple[str, RunSpec]]:
    """(budget label, joint run at that budget) for every cell and seed of a grid's runs."""
    joint = {(s.dataset, s.arch, s.seed): s for s in specs}
    runs = []
    for spec in joint.values():
        base = replace(spec, regime="joint", own_phases={}, hparams={})
        for label, factor in BUDGETS.items():
            epochs = max(2, round(spec.train["epochs"] * factor))
            runs.append((label, replace(base, train={**base.train, "epochs": epochs, "p1_epochs": None})))
    return runs


def sweep_table(runs: list[tuple[str, RunSpec]], store: ResultsStore) -> pd.DataFrame:
    """One row per cell x budget: seed-mean and std of the final exit's validation accuracy, and the verdict."""
    rows = []
    for label, spec in runs:
        if store.state(spec.run_id) != DONE:
            continue
        exits = pd.read_csv(store.run_dir(spec.run_id) / "exits.csv")
        rows.append({"dataset": spec.dataset, "arch": spec.arch, "budget": label, "epochs": spec.train["epochs"],
                     "seed": spec.seed, "val_final_accuracy": float(exits["val_accuracy"].iloc[-1])})
    frame = pd.DataFrame(rows)
    table = (frame.groupby(["dataset", "arch", "budget", "epochs"], sort=False)["val_final_accuracy"]
             .agg(val_final_accuracy_mean="mean", val_final_accuracy_std="std", seeds="count").reset_index())
    cells = ["dataset", "arch"]
    mean = table.pivot_table(index=cells, columns="budget", values="val_final_accuracy_mean")
    variance_of_mean = table.assign(v=table["val_final_accuracy_std"] ** 2 / table["seeds"]).pivot_table(
        index=cells, columns="budget", values="v")
    verdict = pd.DataFrame({"gain_E_to_2E": mean["2E"] - mean["E"],
                            "gain_standard_error": (variance_of_mean["2E"] + variance_of_mean["E"]) ** 0.5})
    verdict["plateaued"] = verdict["gain_E_to_2E"] <= np.maximum(PLATEAU_POINTS, 2 * verdict["gain_standard_error"])
    return table.join(verdict, on=cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="quick")
    parser.add_argument("--results", type=Path, default=None, help="results folder [default: results/<grid>]")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    grid = load_grid(args.grid, args.data_root)
    store = ResultsStore(args.results or Path("results") / grid.name)
    runs = sweep_specs(grid.specs)
    outcome = run_grid([spec for _, spec in runs], store, grid_name=grid.name, data_root=args.data_root,
                       threads=args.threads, desc=f"budget sweep {grid.name}", write_tables=lambda: None)
    table = sweep_table(runs, store)
    write_csv(store.tables_dir / "budget_sweep.csv", table)
    print(table.to_string(index=False))
    return 1 if outcome.failed or outcome.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
