"""Tidy result tables regenerated from the run folders (never appended to, so never duplicated).

runs.csv      one row per done or failed run: spec columns, `status` (done | failed) and the failure's `error`,
              summary metrics and training cost (`train_flops` measured: train.py), empty for a failed run
exits.csv     one row per run x exit
curves.csv    one row per run x policy x operating point, listed in the order validation ties are broken by
selected.csv  one row per run x operating point validation selects (the budgets and the staircase's steps)
tuning.csv    one row per tuning run: candidate values, validation metric, which candidate was chosen
Raw numbers only: accuracies are fractions in [0, 1]; FLOPs count 1 multiply-add as 2 FLOPs.
A table with no rows still has its header (the identity columns), so every reader can parse it.
"""
from __future__ import annotations

import pandas as pd

from benchmark.store import DONE, FAILED, ResultsStore, read_csv, read_json, write_csv

SPEC_COLUMNS = ["run_id", "dataset", "arch", "regime", "seed"]
RUN_STATUS_COLUMNS = ["status", "error"]


def spec_row(spec: dict) -> dict:
    """A run's identity and the training settings that matter to a reader, from its spec.json; `weights` (the
    pretrained backbone it started from: benchmark/weights.py) only for runs that have one, so grids without
    pretrained weights keep their columns."""
    own = {**spec["train"], **spec["own_phases"]}
    weights = spec["model"].get("weights")
    return {**{key: spec[key] for key in SPEC_COLUMNS}, "epochs": spec["train"]["epochs"],
            "batch_size": spec["train"]["batch_size"], "lr": own["lr"], "p1_lr": spec["train"]["lr"],
            "protocol": spec.get("protocol"), **({"weights": weights} if weights else {})}


def run_row(metrics: dict, spec: dict) -> dict:
    """One runs.csv row of a done run: identity, settings, summary numbers, cost."""
    cost = metrics["cost"]
    return {
        **spec_row(spec), "status": DONE, "error": None,
        "num_exits": metrics["num_exits"],
        **metrics["summary"],
        "backbone_flops": metrics["flops"]["backbone"],
        "train_wall_seconds": cost["wall_seconds"],
        "train_optimizer_steps": cost["optimizer_steps"],
        "train_examples_seen": cost["examples_seen"],
        "train_flops": cost["train_flops"],
        "p1_reused": cost["p1_reused"],
        "threads": metrics["environment"]["threads"],
        "device": metrics["environment"]["device"],
        **{key: metrics["environment"].get(key) for key in ("torch", "cpu_model", "cpu_capability", "cpu_flags",
                                                           "cpu_caches", "isa_env")},
        **{key: metrics.get("provenance", {}).get(key) for key in ("git_commit", "git_dirty", "timing_batch")},
    }


def _ordered(frame: pd.DataFrame, first: list[str]) -> pd.DataFrame:
    if frame.empty and frame.columns.empty:
        return pd.DataFrame(columns=first)
    return frame[first + [c for c in frame.columns if c not in first]]


def build_tables(store: ResultsStore, run_ids: set[str] | None = None,
                 provenance: dict[str, dict] | None = None) -> dict[str, pd.DataFrame]:
    """Tables of the done and failed runs in `run_ids` (default: every run in the folder); a failed run has a
    runs.csv row with its error and no other rows. Runs of an older version of the grid file (other ids) stay on
    disk but out of the tables. `provenance` (run id -> columns) says which values were tuned (tuning.py)."""
    from benchmark.evaluate import POLICY_ORDER
    rows, exits, curves, selected = [], [], [], []
    for run_id in store.run_ids():
        state = store.state(run_id)
        if (run_ids is not None and run_id not in run_ids) or state not in (DONE, FAILED):
            continue
        folder = store.run_dir(run_id)
        if state == FAILED:
            rows.append({**spec_row(read_json(folder / "spec.json")), "status": FAILED, "error": store.error(run_id),
                         **(provenance or {}).get(run_id, {})})
            continue
        metrics = read_json(folder / "metrics.json")
        if metrics.get("stop_after") is not None:      # a tuning rung: in tuning.csv, never a result row
            continue
        row = run_row(metrics, read_json(folder / "spec.json"))
        rows.append({**row, **(provenance or {}).get(run_id, {})})
        spec = {key: metrics[key] for key in SPEC_COLUMNS}
        exits.append(read_csv(folder / "exits.csv").assign(**spec))
        curves.append(read_csv(folder / "curves.csv").assign(**spec))
        selected.append(read_csv(folder / "selected.csv").assign(**spec))
    sort = ["dataset", "arch", "regime", "seed"]
    runs = pd.DataFrame(rows)
    runs = runs.sort_values(sort, kind="stable") if not runs.empty else runs
    frames = {name: pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
              for name, parts in (("exits", exits), ("curves", curves), ("selected", selected))}
    if exits:
        frames["exits"] = frames["exits"].sort_values(sort + ["exit"], kind="stable")
        policy_rank = frames["curves"]["policy"].map({p: i for i, p in enumerate(POLICY_ORDER)})
        frames["curves"] = frames["curves"].assign(_rank=policy_rank).sort_values(
            sort + ["_rank", "point"], kind="stable").drop(columns="_rank")
        frames["selected"] = frames["selected"].sort_values(sort, kind="stable")
    return {"runs": _ordered(runs, SPEC_COLUMNS + RUN_STATUS_COLUMNS), **{name: _ordered(frame, SPEC_COLUMNS)
                                                     for name, frame in frames.items()}}


def write_tables(store: ResultsStore, run_ids: set[str] | None = None, provenance: dict[str, dict] | None = None,
                 tuning: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Regenerate the tables; `tuning` (the plan's choices) is written as tuning.csv when the grid tunes."""
    tables = build_tables(store, run_ids, provenance)
    if tuning is not None and not tuning.empty:
        tables["tuning"] = tuning
    for name, frame in tables.items():
        write_csv(store.tables_dir / f"{name}.csv", frame)
    return tables
