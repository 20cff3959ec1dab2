"""Is each cell's epoch budget enough? The committed evidence: `python -m benchmark.budget_sweep --grid quick`.

A ranking at a budget where nothing has converged measures early speed, not the regimes. For every (dataset,
arch) cell of a grid this trains `joint` (the grid's [train] lr, the grid's seeds) at E/2, E and 2E epochs —
ordinary runs of the grid's store, so they are cached — and writes `tables/budget_sweep.csv`: the seed-mean
final-exit *validation* accuracy at each budget. The rule (BENCHMARK.md, issue 21): a budget E is converged when
going to 2E gains at most PLATEAU_POINTS (0.5 points) of seed-mean final-exit validation accuracy, read on a
validation split where 0.5 points are at least MIN_SAMPLES_PER_HALF_POINT samples (1 000 or more); on a smaller
split no budget is declared converged (an earlier rule let "within two standard errors" pass +0.93 points on 144
samples). Test data is never read.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.cli import DEFAULT_DATA_ROOT
from benchmark.grid import load_grid, parse_filters, select
from benchmark.runner import run_grid
from benchmark.spec import RunSpec
from benchmark.store import DONE, ResultsStore, read_csv, write_csv

PLATEAU_POINTS = 0.005
"""Largest final-exit validation accuracy gain from E to 2E epochs for which E counts as converged."""
MIN_SAMPLES_PER_HALF_POINT = 5
"""The validation split must hold this many samples per PLATEAU_POINTS of accuracy for the rule to be read."""

BUDGETS = {"E/2": 0.5, "E": 1.0, "2E": 2.0}


def sweep_specs(specs: list[RunSpec], seeds: list[int] | None = None,
                lr: float | None = None) -> list[tuple[str, RunSpec]]:
    """(budget label, joint run at that budget) for every cell and seed (`seeds`, default all) of a grid's runs, at
    the grid's [train] lr or `lr`."""
    joint = {(s.dataset, s.arch, s.seed): s for s in specs if seeds is None or s.seed in seeds}
    runs = []
    for spec in joint.values():
        base = replace(spec, regime="joint", own_phases={}, hparams={},
                       train={**spec.train, **({} if lr is None else {"lr": lr})})
        for label, factor in BUDGETS.items():
            epochs = max(2, round(spec.train["epochs"] * factor))
            runs.append((label, replace(base, train={**base.train, "epochs": epochs, "p1_epochs": None})))
    return runs


def sweep_table(runs: list[tuple[str, RunSpec]], store: ResultsStore) -> pd.DataFrame:
    """One row per cell x budget: seed-mean and std of the final exit's validation accuracy, the validation size,
    and the verdict."""
    rows = []
    for label, spec in runs:
        if store.state(spec.run_id) != DONE:
            continue
        exits = read_csv(store.run_dir(spec.run_id) / "exits.csv")
        rows.append({"dataset": spec.dataset, "arch": spec.arch, "lr": spec.train["lr"], "budget": label,
                     "epochs": spec.train["epochs"],
                     "seed": spec.seed, "val_final_accuracy": float(exits["val_accuracy"].iloc[-1]),
                     "val_samples": validation_size(store.run_dir(spec.run_id))})
    frame = pd.DataFrame(rows)
    table = (frame.groupby(["dataset", "arch", "lr", "budget", "epochs", "val_samples"],
                           sort=False)["val_final_accuracy"]
             .agg(val_final_accuracy_mean="mean", val_final_accuracy_std="std", seeds="count").reset_index())
    cells = ["dataset", "arch"]
    mean = table.pivot_table(index=cells, columns="budget", values="val_final_accuracy_mean")
    variance_of_mean = table.assign(v=table["val_final_accuracy_std"] ** 2 / table["seeds"]).pivot_table(
        index=cells, columns="budget", values="v")
    verdict = pd.DataFrame({"gain_E_to_2E": mean["2E"] - mean["E"],
                            "gain_standard_error": (variance_of_mean["2E"] + variance_of_mean["E"]) ** 0.5})
    samples = table.groupby(cells)["val_samples"].min()
    verdict["validation_resolves"] = samples * PLATEAU_POINTS >= MIN_SAMPLES_PER_HALF_POINT
    verdict["plateaued"] = (verdict["gain_E_to_2E"] <= PLATEAU_POINTS) & verdict["validation_resolves"]
    return table.join(verdict, on=cells)


def validation_size(folder: Path) -> int:
    """The size of the validation split a run was evaluated on, read from the run: its logits.npz's labels, or the
    per-image confusion matrices of a segmentation run's dense.npz."""
    if (folder / "dense.npz").is_file():
        with np.load(folder / "dense.npz") as stored:
            return stored["val_confusion"].shape[1]
    with np.load(folder / "logits.npz") as stored:
        return len(stored["val_y"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="quick")
    parser.add_argument("--results", type=Path, default=None, help="results folder [default: results/<grid>]")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds to sweep [default: the grid's]")
    parser.add_argument("--executor", choices=["local", "process"], default="local")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--only", nargs="*", default=[], help="KEY=VALUE filters, as bench run --only")
    parser.add_argument("--lr", type=float, default=None,
                        help="sweep at this lr instead of the grid's [train] lr (writes budget_sweep_lr<LR>.csv)")
    args = parser.parse_args(argv)
    grid = load_grid(args.grid, args.data_root)
    store = ResultsStore(args.results or Path("results") / grid.name)
    runs = sweep_specs(select(grid.specs, parse_filters(args.only)), args.seeds, args.lr)
    outcome = run_grid([spec for _, spec in runs], store, grid_name=grid.name, data_root=args.data_root,
                       executor=args.executor, jobs=args.jobs, threads=args.threads,
                       desc=f"budget sweep {grid.name}", write_tables=lambda: None)
    table = sweep_table(runs, store)
    name = "budget_sweep.csv" if args.lr is None else f"budget_sweep_lr{args.lr:g}.csv"
    write_csv(store.tables_dir / name, table)
    print(table.to_string(index=False))
    return 1 if outcome.failed or outcome.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
