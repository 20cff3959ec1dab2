"""Does successive halving choose what exhaustive tuning chose, and at what cost? (BENCHMARK.md, "Tuning").

    python -m benchmark.tuning_agreement --grid quick EXHAUSTIVE_TUNING_CSV HALVING_TUNING_CSV [--output FILE]

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", required=True, help="the grid both tables tuned (for the cells' budgets)")
    parser.add_argument("exhaustive", type=Path)
    parser.add_argument("halving", type=Path)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args(argv)
    table = compare(pd.read_csv(args.exhaustive), pd.read_csv(args.halving), cell_budgets(args.grid))
    if args.output:
        table.to_csv(args.output, index=False)
    print(table.to_string(index=False))
    print(summary(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
