"""The difficulty screen: a leaderboard cell must be one where early exits cost accuracy (issue 21).

Declared in the grid file before anything trains (`[screen]`: regime, min_gap, max_final) and decided on validation
only, at the cell's converged budget, before any other regime of the cell trains: `bench run` first tunes the screen
regime (joint) in every cell, then reads its tuning winner — the chosen learning rate, trained the whole budget on
the tuning seeds — and keeps a cell only if

    final exit's validation accuracy − first exit's >= min_gap     (early exits cost accuracy: regimes can differ)
    final exit's validation accuracy < max_final                   (headroom: the task is not solved)

seed means over the tuning seeds. Cells that fail are dropped from the run (their other regimes never train); every
cell's numbers go to tables/screen.csv, committed with the grid, so that a reader sees what was screened out and why.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from benchmark.store import DONE, ResultsStore

SCREEN_DEFAULTS = {"regime": "joint", "min_gap": 0.10, "max_final": 0.97}
SCREEN_COLUMNS = ["dataset", "arch", "regime", "lr", "epochs", "tuning_seeds", "val_samples", "val_first_exit",
                  "val_final_exit", "gap", "min_gap", "max_final", "passes", "reason"]


def screen_table(choices: pd.DataFrame, screen: dict, store: ResultsStore, val_samples: dict[str, int]
                 ) -> pd.DataFrame:
    """One row per cell whose screen regime is decided: its tuning winner's validation accuracy at the first and the
    final exit (seed means of the runs that trained the whole budget), the gap, and the verdict with its reason.
    `choices` is a tuning plan's table (`make_plan(...).choices`); `val_samples` the validation size per dataset."""
    if choices.empty:
        return pd.DataFrame(columns=SCREEN_COLUMNS)
    winners = choices[(choices.regime == screen["regime"]) & choices.chosen]
    rows = []
    for (dataset, arch), cell in winners.groupby(["dataset", "arch"], sort=True):
        final_stage = cell[cell.stop_after_epochs == cell.stop_after_epochs.max()]
        if not (final_stage.state == DONE).all():
            continue
        accuracy = np.mean([pd.read_csv(store.run_dir(run_id) / "exits.csv").sort_values("exit").val_accuracy
                            for run_id in final_stage.run_id], axis=0)
        first, final = float(accuracy[0]), float(accuracy[-1])
        gap = final - first
        reasons = []
        if gap < screen["min_gap"]:
            reasons.append(f"the first exit trails the final by {100 * gap:.1f} points, under "
                           f"{100 * screen['min_gap']:g}")
        if final >= screen["max_final"]:
            reasons.append(f"the final exit reaches {100 * final:.1f} %, at or above {100 * screen['max_final']:g} %")
        rows.append({"dataset": dataset, "arch": arch, "regime": screen["regime"], "lr": float(final_stage.lr.iloc[0]),
                     "epochs": int(final_stage.stop_after_epochs.iloc[0]), "tuning_seeds": len(final_stage),
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
