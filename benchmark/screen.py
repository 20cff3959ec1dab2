"""The difficulty screen: a leaderboard cell must be one where early exits cost accuracy (issue 21).

Declared in the grid file before anything trains (`[screen]`: regime, min_gap, max_final) and decided on validation
only, at the cell's converged budget, before any other regime of the cell trains: `bench run` first tunes the screen
regime (joint) in every cell and trains its reported seeds with the chosen learning rate, then keeps a cell only if

    final exit's validation accuracy − first exit's >= min_gap     (early exits cost accuracy: regimes can differ)
    final exit's validation accuracy < max_final                   (headroom: the task is not solved)

seed means over the reported seeds (the runs the leaderboard reports for joint, trained the whole budget; their test
logits are stored for the final numbers but not read here). Cells that fail are dropped from the run (their other
regimes never train); every cell's numbers go to tables/screen.csv, committed with the grid, so that a reader sees
what was screened out and why.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from benchmark.spec import RunSpec
from benchmark.store import DONE, ResultsStore, read_csv

SCREEN_DEFAULTS = {"regime": "joint", "min_gap": 0.10, "max_final": 0.97}
SCREEN_COLUMNS = ["dataset", "arch", "regime", "lr", "epochs", "seeds", "val_samples", "val_first_exit",
                  "val_final_exit", "gap", "min_gap", "max_final", "passes", "reason"]


def screen_table(runs: list[RunSpec], screen: dict, store: ResultsStore, val_samples: dict[str, int]
                 ) -> pd.DataFrame:
    """One row per cell whose screen-regime `runs` (its reported seeds, tuned values applied) are all done: the seed
    means of the first and the final exit's validation accuracy, the gap, and the verdict with its reason.
    `val_samples` is the validation size per dataset."""
    cells: dict[tuple[str, str], list[RunSpec]] = {}
    for spec in runs:
        if spec.regime == screen["regime"]:
            cells.setdefault((spec.dataset, spec.arch), []).append(spec)
    rows = []
    for (dataset, arch), specs in sorted(cells.items()):
        if not all(store.state(spec.run_id) == DONE for spec in specs):
            continue
        accuracy = np.mean([read_csv(store.run_dir(spec.run_id) / "exits.csv").sort_values("exit").val_accuracy
                            for spec in specs], axis=0)
        first, final = float(accuracy[0]), float(accuracy[-1])
        gap = final - first
        reasons = []
        if gap < screen["min_gap"]:
            reasons.append(f"the first exit trails the final by {100 * gap:.1f} points, under "
                           f"{100 * screen['min_gap']:g}")
        if final >= screen["max_final"]:
            reasons.append(f"the final exit reaches {100 * final:.1f} %, at or above {100 * screen['max_final']:g} %")
        rows.append({"dataset": dataset, "arch": arch, "regime": screen["regime"],
                     "lr": float({**specs[0].train, **specs[0].own_phases}["lr"]),
                     "epochs": int(specs[0].train["epochs"]), "seeds": len(specs),
                     "val_samples": val_samples[dataset], "val_first_exit": first, "val_final_exit": final, "gap": gap,
                     "min_gap": screen["min_gap"], "max_final": screen["max_final"], "passes": not reasons,
                     "reason": "; ".join(reasons) or "passes"})
    return pd.DataFrame(rows, columns=SCREEN_COLUMNS)


def verdict_lines(table: pd.DataFrame) -> list[str]:
    """One line per screened cell, as `bench run` prints them."""
    return [f"screen {row.dataset}/{row.arch}: {'passes' if row.passes else 'fails'} — first exit "
            f"{100 * row.val_first_exit:.1f} %, final {100 * row.val_final_exit:.1f} % on {row.val_samples} validation "
            f"samples" + ("" if row.passes else f" ({row.reason}); its other regimes are not trained")
            for row in table.itertuples(index=False)]


def without_failed_cells(specs: list[RunSpec], store: ResultsStore) -> list[RunSpec]:
    """`specs` without the cells tables/screen.csv says failed: their screen-regime runs stay on disk but out of the
    tables, which describe leaderboard cells only (cells not screened yet keep their runs)."""
    path = store.tables_dir / "screen.csv"
    if not path.is_file():
        return specs
    table = read_csv(path)
    failed = {(row.dataset, row.arch) for row in table.itertuples(index=False) if not row.passes}
    return [spec for spec in specs if (spec.dataset, spec.arch) not in failed]
