"""Is each cell's epoch budget enough? The committed evidence: `bench budget-sweep --grid quick`.

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

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.spec import RunSpec
from benchmark.store import DONE, ResultsStore, read_csv

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


def table_path(store: ResultsStore, lr: float | None = None) -> Path:
    """Where the sweep's table goes: tables/budget_sweep.csv, or budget_sweep_lr<LR>.csv for a sweep at `lr` instead
    of the grid's [train] lr."""
    return store.tables_dir / ("budget_sweep.csv" if lr is None else f"budget_sweep_lr{lr:g}.csv")
