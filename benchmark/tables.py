"""Tidy result tables regenerated from the run folders (never appended to, so never duplicated).

runs.csv    one row per done run: spec columns, summary metrics, training cost
exits.csv   one row per run x exit
curves.csv  one row per run x policy x operating point
Raw numbers only: accuracies are fractions in [0, 1]; FLOPs count 1 multiply-add as 2 FLOPs.
"""
from __future__ import annotations

import pandas as pd

from benchmark.store import ResultsStore, read_json, write_csv

SPEC_COLUMNS = ["run_id", "dataset", "arch", "regime", "seed"]


def run_row(metrics: dict) -> dict:
    cost = metrics["cost"]
    return {
        **{key: metrics[key] for key in SPEC_COLUMNS},
        "num_exits": metrics["num_exits"],
        **metrics["summary"],
        "backbone_flops": metrics["flops"]["backbone"],
        "train_wall_seconds": cost["wall_seconds"],
        "train_optimizer_steps": cost["optimizer_steps"],
        "train_examples_seen": cost["examples_seen"],
        "train_flops_estimate": cost["train_flops_estimate"],
        "p1_reused": cost["p1_reused"],
        "threads": metrics["environment"]["threads"],
        "device": metrics["environment"]["device"],
    }


def _ordered(frame: pd.DataFrame, first: list[str]) -> pd.DataFrame:
    if frame.empty:
        return frame
    return frame[first + [c for c in frame.columns if c not in first]]


def build_tables(store: ResultsStore, run_ids: set[str] | None = None) -> dict[str, pd.DataFrame]:
    """Tables of the done runs in `run_ids` (default: every done run in the folder). Runs of an older version
    of the grid file (other ids) stay on disk but out of the tables."""
    rows, exits, curves = [], [], []
    for run_id in store.done_run_ids():
        if run_ids is not None and run_id not in run_ids:
            continue
        folder = store.run_dir(run_id)
        metrics = read_json(folder / "metrics.json")
        rows.append(run_row(metrics))
        spec = {key: metrics[key] for key in SPEC_COLUMNS}
        exits.append(pd.read_csv(folder / "exits.csv").assign(**spec))
        curves.append(pd.read_csv(folder / "curves.csv").assign(**spec))
    sort = ["dataset", "arch", "regime", "seed"]
    runs = pd.DataFrame(rows)
    runs = runs.sort_values(sort, kind="stable") if not runs.empty else runs
    exits_frame = pd.concat(exits, ignore_index=True) if exits else pd.DataFrame()
    curves_frame = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()
    if not exits_frame.empty:
        exits_frame = exits_frame.sort_values(sort + ["exit"], kind="stable")
        curves_frame = curves_frame.sort_values(sort + ["policy", "point"], kind="stable")
    return {"runs": _ordered(runs, SPEC_COLUMNS), "exits": _ordered(exits_frame, SPEC_COLUMNS),
            "curves": _ordered(curves_frame, SPEC_COLUMNS)}


def write_tables(store: ResultsStore, run_ids: set[str] | None = None) -> dict[str, pd.DataFrame]:
    tables = build_tables(store, run_ids)
    for name, frame in tables.items():
        write_csv(store.tables_dir / f"{name}.csv", frame)
    return tables
