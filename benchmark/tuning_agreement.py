"""Does successive halving choose what exhaustive tuning chose, and at what cost? (BENCHMARK.md, "Tuning").

    python -m benchmark.tuning_agreement --grid quick EXHAUSTIVE_TUNING_CSV HALVING_TUNING_CSV [--output FILE]
    python -m benchmark.tuning_agreement --grid quick --store DIR --only arch=small_cnn --config 0.5:0.4 ...

The second form scores halving configurations (rungs:keep, rungs joined by "+") against exhaustive tuning read from
one store where every candidate has run to every rung and to the end: `make_plan` without and with each
configuration on the same runs, nothing trained (BENCHMARK.md's table of configurations).

Both files are `tuning.csv` tables of the same grid's cells: one from exhaustive tuning (every candidate trained the
whole budget; e.g. a committed protocol-3 table), one from successive halving. Per cell (dataset, arch, regime):
the candidate each protocol chose, whether they agree, and the **regret** of the halving choice — the exhaustive
table's full-budget seed-mean validation area of the best candidate minus that of the candidate halving chose (0 when
they agree; small when halving picked a candidate exhaustive tuning could barely tell apart). Cost is counted in
training epochs after the shared P1 (trained once per seed either way), whatever the machine: exhaustive =
candidates x seeds x those epochs of a full run; halving = every rung run's epochs since the rung it resumed from.
Only the validation metric is read: nothing here looks at test data.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

CELL = ["dataset", "arch", "regime"]
SCORE = "seed_mean_val_auc_normalised"


def compare(exhaustive: pd.DataFrame, halving: pd.DataFrame, budgets: dict[tuple, tuple[int, int]]) -> pd.DataFrame:
    """One row per cell present, and decided, in both tables; `budgets[cell]` = (shared P1 epochs, all epochs)."""
    rows = []
    decided = halving[halving["chosen"]].groupby(CELL)["candidate"].first()
    for cell, chosen in decided.items():
        full = exhaustive.set_index(CELL).loc[[cell]] if cell in exhaustive.set_index(CELL).index else None
        if full is None or not full["chosen"].any():
            continue
        scores = full.groupby("candidate")[SCORE].first()
        best = int(full[full["chosen"]]["candidate"].iloc[0])
        shared, total = budgets[cell]
        runs = halving.set_index(CELL).loc[[cell]].sort_values("stop_after_epochs")
        epochs, reached = 0, {}
        for run in runs.itertuples():
            start = reached.get((run.candidate, run.seed), shared)
            epochs += run.stop_after_epochs - start
            reached[(run.candidate, run.seed)] = run.stop_after_epochs
        seeds = full["seed"].nunique()
        rows.append({**dict(zip(CELL, cell)), "exhaustive_candidate": best, "halving_candidate": int(chosen),
                     "exhaustive_lr": float(full[full["chosen"]]["lr"].iloc[0]),
                     "halving_lr": float(runs[runs["candidate"] == chosen]["lr"].iloc[0]),
                     "agree": best == chosen, "regret_val_auc": float(scores[best] - scores[int(chosen)]),
                     "exhaustive_epochs": len(scores) * seeds * (total - shared), "halving_epochs": epochs,
                     "halving_wall_seconds": float(runs["wall_seconds"].sum())})
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame) -> str:
    agree = int(table["agree"].sum())
    return (f"{len(table)} cells: halving chose exhaustive tuning's candidate in {agree} ({agree / len(table):.0%}); "
            f"regret (exhaustive validation area lost) median {table['regret_val_auc'].median():.4f}, max "
            f"{table['regret_val_auc'].max():.4f}; tuning epochs {table['halving_epochs'].sum()} vs "
            f"{table['exhaustive_epochs'].sum()} exhaustive "
            f"({table['halving_epochs'].sum() / table['exhaustive_epochs'].sum():.2f}x)")


def cell_budgets(grid_name: str) -> dict[tuple, tuple[int, int]]:
    """(shared P1 epochs, all epochs of a full run) of every cell of a grid."""
    from benchmark.grid import load_grid
    from regimes.base import Budget
    from regimes.registry import build_regime
    budgets = {}
    for spec in load_grid(grid_name, Path("/nonexistent")).specs:
        phases = build_regime(spec.regime, spec.hparams).phases(Budget(spec.train["epochs"], spec.train["p1_epochs"]))
        shared = phases[0].epochs if phases[0].trains == "backbone" else 0
        budgets[(spec.dataset, spec.arch, spec.regime)] = (shared, sum(p.epochs for p in phases))
    return budgets


def configurations(grid_name: str, store_root: Path, only: list[str], configs: list[str]) -> pd.DataFrame:
    """One row per configuration: agreement, regret and cost against exhaustive tuning on the same store's runs."""
    from benchmark.grid import load_grid, parse_filters, select
    from benchmark.store import ResultsStore
    from benchmark.tuning import make_plan
    grid = load_grid(grid_name, Path("/nonexistent"))
    specs, store = select(grid.specs, parse_filters(only)), ResultsStore(store_root)
    base = {k: v for k, v in grid.tuning.items() if k not in ("rungs", "keep")}
    exhaustive = make_plan(specs, base, store)
    if not exhaustive.complete:
        raise SystemExit(f"{store_root}: not every candidate has run to the end; train them first")
    rows = []
    for config in configs:
        rungs, keep = config.split(":")
        plan = make_plan(specs, {**base, "rungs": [float(r) for r in rungs.split("+")], "keep": float(keep)}, store)
        table = compare(exhaustive.choices, plan.choices, cell_budgets(grid_name))
        rows.append({"rungs": rungs, "keep": float(keep), "cells": len(table), "agree": int(table["agree"].sum()),
                     "regret_median": table["regret_val_auc"].median(), "regret_max": table["regret_val_auc"].max(),
                     "halving_epochs": int(table["halving_epochs"].sum()),
                     "exhaustive_epochs": int(table["exhaustive_epochs"].sum())})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="the grid both tables tuned (for the cells' budgets)")
    parser.add_argument("exhaustive", type=Path, nargs="?")
    parser.add_argument("halving", type=Path, nargs="?")
    parser.add_argument("--store", type=Path, help="score --config configurations on this store's runs instead")
    parser.add_argument("--only", action="append", default=[])
    parser.add_argument("--config", action="append", default=[], help="rungs:keep, e.g. 0.25+0.5:0.4")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    if args.store:
        table = configurations(args.grid, args.store, args.only, args.config)
        if args.output:
            table.to_csv(args.output, index=False)
        print(table.to_string(index=False))
        return 0
    from benchmark.store import read_csv
    table = compare(read_csv(args.exhaustive), read_csv(args.halving), cell_budgets(args.grid))
    if args.output:
        table.to_csv(args.output, index=False)
    print(table.to_string(index=False))
    print(summary(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
