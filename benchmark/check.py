"""`bench check`: rerun a grid into a temporary folder and compare it with its committed golden table.

The golden table `results/<grid>/golden.csv` has one row per (key, metric): `key` names a run by what it is —
"dataset/arch/regime/seed", and "dataset/arch/regime/seed/exit=k" for per-exit rows — never by a path, a time or
a run id; `metric` is one of RUN_METRICS (runs.csv), EXIT_METRIC (exits.csv) or "<table>.<column>" of an analysis
table (ANALYSIS_ROWS: calibration, rank, information, sharpness, robustness, hypervolume — the rerun runs the grid's
analyses, so a change to an analysis fails the check too); `expected` is the value of the run that wrote the table;
`tolerance` is how far a rerun may land from it (both ways) and still pass. Every run and exit metric is
higher-is-better, so a rerun below `expected - tolerance` is a *regression* and one above `expected + tolerance` an
*improvement*; an analysis number outside its tolerance has *moved* (it has no better side); all fail, as do a
*missing* row (a run that failed or an exit that vanished) and an *unexpected* one (the table must then be updated
on purpose: `bench check --update`). A NaN (no operating point fits a budget) matches only a NaN.

Why tolerances at all. CPU training is bitwise deterministic on one machine for a fixed thread count and fixed
instruction-set (ISA) settings — but not across them: the floating-point summation order of oneDNN's convolutions,
ATen's vectorised kernels and MKL's GEMMs depends on the thread count and on the ISA each library dispatches to,
and training amplifies a last-bit difference into a few test samples. Measured on the smoke grid (digits x
small_cnn x joint/disjoint/mixed, 10 epochs, 144 validation / 360 test samples, 33 rows; AMD EPYC with AVX-512,
torch 2.14.1; BENCHMARK.md "Reproducibility" has the table): repeating a setting is bitwise identical; threads
2/3/4, ATEN_CPU_CAPABILITY avx2/default, ONEDNN_MAX_CPU_ISA AVX2/SSE41 and MKL_CBWR=COMPATIBLE each change the
logits of every run and move up to all 33 rows, by up to 0.033 (12 test samples) from the 1-thread native
run; MKL_ENABLE_INSTRUCTIONS=AVX2, MKL_CBWR=AVX2 and ONEDNN_MAX_CPU_ISA=AVX512_CORE change nothing there.

So tolerances are *measured* when the table is written: `--update` trains the grid once as `bench check` does
(CHECK_THREADS, this machine's ISA) for `expected`, then once per PERTURBATIONS entry — other thread counts, ATen
and oneDNN pinned to lower ISAs; each a subprocess, since the ISA variables are read when the libraries load. Each
row's tolerance is SPREAD_MARGIN (1.5) x the largest |perturbed - expected| seen on any row of its (dataset, arch)
cell — test metrics and the validation metric pooled separately — floored at one sample's worth (1 / test samples;
1 / validation samples for val_auc_normalised) and rounded up to 4 decimals. The rule was chosen by holding out
each of 12 measured settings and deriving tolerances from random 6 of the other 11 (360 trials): a per-row max
lets the held-out setting fail the check in 81 % of trials, pooling per (cell, metric) in 48 %, pooling per cell
in 27 %, x1.5 in 7 %, x2 in 0.3 %; with the default PERTURBATIONS the smoke table's tolerances were 0.0459 (test
metrics) and 0.0157 (validation) and none of the 6 held-out settings (nor a repeat) failed it (protocol 2; the
protocol-3 table's are 0.0429 and 0.0154).
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from benchmark.errors import UserError

RUN_METRICS = ("final_accuracy", "auc_normalised", "accuracy_at_25pct", "accuracy_at_50pct", "accuracy_at_75pct",
               "final_macro_f1", "val_auc_normalised")
EXIT_METRIC = "test_accuracy"
VALIDATION_METRICS = ("val_auc_normalised",)
GOLDEN_COLUMNS = ["key", "metric", "expected", "tolerance"]
ANALYSIS_ROWS = {
    # table: (rows kept, key columns after the run's or cell's, metrics); a checked row's metric is "table.column"
    "calibration": ({"split": "test"}, ["exit"], ["ece", "nll"]),
    "rank": (None, ["block"], ["effective_rank"]),
    "information": ({"estimator": "renyi", "stage": "final"}, ["block"], ["I_XT_bits", "I_TY_bits"]),
    "sharpness": (None, ["exit"], ["sharpness"]),
    "robustness_summary": ({"point": ["area", "final"]}, ["point"], ["corrupted_accuracy"]),
    "hypervolume": (None, [], ["hypervolume_normalised"]),
}
"""The analysis tables' checked numbers (issue 21: a change to an analysis passed CI unseen). Per run where the table
has runs (calibration, rank, information, sharpness), per (cell, regime) otherwise. Left out, with the reason:
landscape.csv (its slices are summarised by sharpness), pareto.csv (its fronts by the hypervolume), summary.csv
and leaderboard.csv (seed means and ranks of the run metrics checked above), robustness.csv (by its summary)."""
ANALYSIS_FLOOR = 1e-4
"""Smallest tolerance of an analysis number (its unit varies: bits, ranks, ECE): the table's 4-decimal rounding."""
CHECK_THREADS = 1
"""`bench check` trains with 1 thread by default: every machine has one, so the thread count never differs
between the run that wrote the golden table and the one checking it (it changes the numbers)."""

PERTURBATIONS: tuple[tuple[str, int, dict[str, str]], ...] = (
    ("2 threads", 2, {}),
    ("ATen AVX2", 1, {"ATEN_CPU_CAPABILITY": "avx2"}),
    ("oneDNN AVX2", 1, {"ONEDNN_MAX_CPU_ISA": "AVX2"}),
    ("3 threads", 3, {}),
    ("ATen default (no SIMD)", 1, {"ATEN_CPU_CAPABILITY": "default"}),
    ("2 threads, ATen and oneDNN AVX2", 2, {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}),
)
"""(name, threads, environment) of the reruns whose spread sets the tolerances: each is a setting that changes the
floating-point summation order, as another machine of the same kind may (BENCHMARK.md, "Reproducibility")."""
SPREAD_MARGIN = 1.5
"""Tolerance = SPREAD_MARGIN x the pooled largest deviation of the perturbed reruns (measured: module docstring)."""


@dataclass(frozen=True)
class Difference:
    kind: str              # regression | improvement | moved (an analysis number) | missing | unexpected
    key: str
    metric: str
    expected: float
    actual: float
    tolerance: float

    def line(self) -> str:
        what = f"{self.kind:11}  {self.key:40} {self.metric:19}"
        if self.kind == "missing":
            return f"{what} expected {_number(self.expected)} ± {_number(self.tolerance)}, not in the rerun"
        if self.kind == "unexpected":
            return f"{what} got {_number(self.actual)}, not in the golden table"
        delta = "" if math.isnan(self.expected) or math.isnan(self.actual) else f" ({self.actual - self.expected:+.4f})"
        return (f"{what} expected {_number(self.expected)} ± {_number(self.tolerance)}, "
                f"got {_number(self.actual)}{delta}")


def _number(value: float) -> str:
    return "NaN" if value is None or math.isnan(value) else f"{value:.4f}"


def run_key(row) -> str:
    """A run's key: what it is (dataset, arch, regime, seed) — never where or when it ran."""
    return f"{row['dataset']}/{row['arch']}/{row['regime']}/{int(row['seed'])}"


def observed(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The checked numbers of a results folder's tables, long: key, metric, value (done runs only: a failed run
    has no numbers, so its rows are missing)."""
    runs = tables["runs"]
    if runs.empty:
        return pd.DataFrame(columns=["key", "metric", "value"])
    runs = runs[runs["status"] == "done"]
    keys = runs.apply(run_key, axis=1) if not runs.empty else pd.Series(dtype=str)
    duplicated = sorted(set(keys[keys.duplicated()]))
    if duplicated:
        raise UserError(f"the grid has several reported runs per key ({', '.join(duplicated)}): bench check needs "
                        f"dataset/arch/regime/seed to name one run")
    rows = [{"key": key, "metric": metric, "value": float(row[metric])}
            for key, (_, row) in zip(keys, runs.iterrows()) for metric in RUN_METRICS]
    exits = tables["exits"]
    done = set(runs["run_id"])
    if not exits.empty:
        for _, row in exits[exits["run_id"].isin(done)].iterrows():
            rows.append({"key": f"{run_key(row)}/exit={int(row['exit'])}", "metric": EXIT_METRIC,
                         "value": float(row[EXIT_METRIC])})
    for name, (kept, key_columns, metrics) in ANALYSIS_ROWS.items():
        table = tables.get(name, pd.DataFrame())
        if table.empty:
            continue
        for column, allowed in (kept or {}).items():
            table = table[table[column].isin(allowed if isinstance(allowed, list) else [allowed])]
        if "run_id" in table:
            table = table[table["run_id"].isin(done)]
        for _, row in table.iterrows():
            owner = run_key(row) if "seed" in table else f"{row['dataset']}/{row['arch']}/{row['regime']}/seeds"
            key = "/".join([owner, *(f"{c}={_label(row[c])}" for c in key_columns)])
            rows.extend({"key": key, "metric": f"{name}.{metric}", "value": float(row[metric])} for metric in metrics)
    frame = pd.DataFrame(rows, columns=["key", "metric", "value"])
    twice = frame[frame.duplicated(["key", "metric"])]
    if not twice.empty:      # a table grew a column that tells its rows apart: ANALYSIS_ROWS must name it
        raise ValueError(f"several rows for {twice.iloc[0]['key']} {twice.iloc[0]['metric']}: add the column that "
                         f"tells them apart to ANALYSIS_ROWS")
    return frame


def is_analysis_metric(metric: str) -> bool:
    """Whether a golden row's metric is an analysis table's number ("<table>.<column>", ANALYSIS_ROWS)."""
    return metric.split(".", 1)[0] in ANALYSIS_ROWS


def _label(value) -> str:
    """A key part: integers without '.0' (block=3, exit=0), anything else as it reads."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def sample_floor(keys_metrics: pd.DataFrame, split_sizes: dict[str, tuple[int, int]]) -> pd.Series:
    """One sample's worth per row: 1 / test samples, 1 / validation samples for validation metrics.
    `split_sizes`: dataset -> (validation samples, test samples)."""
    def floor(row) -> float:
        if is_analysis_metric(row["metric"]):
            return ANALYSIS_FLOOR
        n_val, n_test = split_sizes[row["key"].split("/", 1)[0]]
        return 1.0 / (n_val if row["metric"] in VALIDATION_METRICS else n_test)
    return pd.Series([floor(r) for _, r in keys_metrics.iterrows()], index=pd.MultiIndex.from_frame(
        keys_metrics[["key", "metric"]]), dtype=float)


def spread_group(key: str, metric: str) -> str:
    """The rows whose spread is pooled: one (dataset, arch) cell's test metrics, its validation metrics, or one of
    its analysis numbers (each has its own unit)."""
    cell = "/".join(key.split("/")[:2])
    if is_analysis_metric(metric):
        return f"{cell}|{metric}"
    return cell + ("|validation" if metric in VALIDATION_METRICS else "|test")


def measured_tolerances(base: pd.DataFrame, reruns: list[pd.DataFrame], floors: pd.Series,
                        margin: float = SPREAD_MARGIN) -> dict:
    """Per (key, metric) of `base` (an observed() frame): `margin` x the largest |rerun - base| that any perturbed
    rerun showed on any row of the same spread_group, at least the row's floor, rounded up to 4 decimals.

    Pooled, not per row: every row's spread has the same cause (a last-bit difference amplified by training), and
    the largest of a handful of reruns per row is a poor bound for the next one (measured: module docstring). A
    row missing from a rerun (it failed there) or NaN there (no point fits the budget) adds nothing."""
    values = [dict(zip(zip(r["key"], r["metric"]), r["value"])) for r in reruns]
    pooled: dict[str, float] = {}
    for key, metric, value in base[["key", "metric", "value"]].itertuples(index=False):
        group = spread_group(key, metric)
        pooled.setdefault(group, 0.0)
        for other in values:
            seen = other.get((key, metric), math.nan)
            if not (math.isnan(value) or math.isnan(seen)):
                pooled[group] = max(pooled[group], abs(seen - value))
    tolerances = {}
    for key, metric in zip(base["key"], base["metric"]):
        tolerance = max(margin * pooled[spread_group(key, metric)], float(floors[(key, metric)]))
        tolerances[(key, metric)] = math.ceil(round(tolerance * 1e4, 6)) / 1e4
    return tolerances


def golden_table(tables: dict[str, pd.DataFrame], tolerances) -> pd.DataFrame:
    """The golden table of a results folder's tables: key, metric, expected, tolerance, sorted by key and metric.
    `tolerances`: a mapping (key, metric) -> tolerance covering every row (measured_tolerances)."""
    rows = observed(tables)
    frame = pd.DataFrame({"key": rows["key"], "metric": rows["metric"], "expected": rows["value"],
                          "tolerance": [float(tolerances[(k, m)]) for k, m in zip(rows["key"], rows["metric"])]})
    return frame.sort_values(["key", "metric"], kind="stable").reset_index(drop=True)[GOLDEN_COLUMNS]


def compare(golden: pd.DataFrame, actual: pd.DataFrame) -> list[Difference]:
    """Every row of `actual` (observed()) outside its golden row's tolerance, every golden row missing from it and
    every row of it the golden table lacks; in golden-table order, unexpected rows last."""
    got = {(k, m): v for k, m, v in zip(actual["key"], actual["metric"], actual["value"])}
    known = set()
    differences = []
    for key, metric, expected, tolerance in golden[GOLDEN_COLUMNS].itertuples(index=False):
        known.add((key, metric))
        expected, tolerance = float(expected), float(tolerance)
        if (key, metric) not in got:
            differences.append(Difference("missing", key, metric, expected, math.nan, tolerance))
            continue
        value = float(got[(key, metric)])
        if math.isnan(expected) or math.isnan(value):
            if math.isnan(expected) != math.isnan(value):
                kind = "regression" if math.isnan(value) else "improvement"
                differences.append(Difference(kind, key, metric, expected, value, tolerance))
            continue
        tolerance = 0.0 if math.isnan(tolerance) else tolerance
        directional = not is_analysis_metric(metric)
        if value < expected - tolerance - 1e-12:
            differences.append(Difference("regression" if directional else "moved", key, metric, expected, value,
                                          tolerance))
        elif value > expected + tolerance + 1e-12:
            differences.append(Difference("improvement" if directional else "moved", key, metric, expected, value,
                                          tolerance))
    for (key, metric), value in got.items():
        if (key, metric) not in known:
            differences.append(Difference("unexpected", key, metric, math.nan, float(value), math.nan))
    return differences


def moved(golden: pd.DataFrame, actual: pd.DataFrame) -> int:
    """How many golden rows the rerun did not reproduce exactly (0: a bitwise reproduction, as on the machine and
    settings that wrote the table)."""
    got = {(k, m): v for k, m, v in zip(actual["key"], actual["metric"], actual["value"])}
    return sum(not _same(expected, got.get((key, metric), math.nan))
               for key, metric, expected in zip(golden["key"], golden["metric"], golden["expected"]))


def render(differences: list[Difference], golden_path: Path, rows: int, command: str, moved_rows: int) -> str:
    """The readable diff: one line per difference, what it means, and how to accept it on purpose."""
    if not differences:
        how = ("every value identical to the table's" if moved_rows == 0 else
               f"{moved_rows} moved within tolerance, as on another machine or thread count")
        return f"bench check: all {rows} rows of {golden_path} within tolerance ({how})"
    counts = {}
    for d in differences:
        counts[d.kind] = counts.get(d.kind, 0) + 1
    lines = [f"bench check: {len(differences)} difference{'s' * (len(differences) > 1)} between the rerun and the {rows}-row golden table "
             f"{golden_path} (" + ", ".join(f"{n} {kind}" for kind, n in counts.items()) + ")"]
    lines += ["  " + d.line() for d in differences]
    lines.append(f"Fix a regression. If the change is intended (an improvement, a protocol change, a run added or "
                 f"removed), rewrite the table on purpose with `bench check {command} --update` and commit it.")
    return "\n".join(lines)


def table_changes(old: pd.DataFrame | None, new: pd.DataFrame) -> list[str]:
    """What --update changed: rows added and removed, expected values and tolerances that moved."""
    if old is None:
        return [f"new golden table: {len(new)} rows"]
    before = old.set_index(["key", "metric"])
    after = new.set_index(["key", "metric"])
    lines = []
    for index in after.index.difference(before.index, sort=False):
        lines.append(f"  added    {index[0]:40} {index[1]:19} {_number(after.loc[index, 'expected'])} "
                     f"± {_number(after.loc[index, 'tolerance'])}")
    for index in before.index.difference(after.index, sort=False):
        lines.append(f"  removed  {index[0]:40} {index[1]:19} was {_number(before.loc[index, 'expected'])}")
    for index in after.index.intersection(before.index, sort=False):
        was, now = before.loc[index], after.loc[index]
        moved = [f"{column} {_number(was[column])} -> {_number(now[column])}" for column in ("expected", "tolerance")
                 if not _same(was[column], now[column])]
        if moved:
            lines.append(f"  changed  {index[0]:40} {index[1]:19} " + ", ".join(moved))
    return lines or ["  no row changed"]


def _same(a, b) -> bool:
    a, b = float(a), float(b)
    return (math.isnan(a) and math.isnan(b)) or a == b


def read_golden(path: Path) -> pd.DataFrame:
    try:
        frame = pd.read_csv(path)
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise UserError(f"golden table {path} cannot be read ({error})") from None
    if list(frame.columns) != GOLDEN_COLUMNS:
        raise UserError(f"golden table {path} has columns {', '.join(map(str, frame.columns))}; expected "
                        f"{', '.join(GOLDEN_COLUMNS)}")
    return frame


def rerun(grid, root: Path, *, threads: int, data_root: Path) -> tuple[dict[str, pd.DataFrame], dict[str, str]]:
    """Train the grid's reported runs (its tuning runs first, where it has [tuning]) into `root` on the CPU, as
    `bench run` would, then run the grid's analyses; return the run and analysis tables and the failed runs (run id
    -> error)."""
    import torch

    from benchmark.analyze import analyze_grid
    from benchmark.runner import run_grid
    from benchmark.store import ResultsStore, write_csv
    from benchmark.tables import build_tables
    from benchmark.tuning import make_plan
    from benchmark.weights import stage as stage_weights

    store = ResultsStore(root)
    stage_weights(store.root, grid.weights)
    common = {"grid_name": grid.name, "data_root": data_root, "device": "cpu", "threads": threads,
              "write_tables": lambda: None}
    plan = make_plan(grid.specs, grid.tuning, store)
    if plan.tuning:
        if run_grid(plan.tuning, store, desc=f"tuning {grid.name}", **common).interrupted:
            raise KeyboardInterrupt
        plan = make_plan(grid.specs, grid.tuning, store)
    if not plan.complete:
        reasons = list(plan.untunable.values()) or [f"{len(plan.awaiting)} runs still await their tuning"]
        raise UserError(f"grid {grid.name} cannot be rerun in full: {'; '.join(reasons)}")
    settings = grid.analyses
    outcome = run_grid(plan.reported, store, snapshot_every=settings["snapshot_every"],
                       snapshot_samples=settings["snapshot_samples"], save_models=bool(settings["model"]), **common)
    if outcome.interrupted:
        raise KeyboardInterrupt
    tables = build_tables(store, {s.run_id for s in plan.reported}, plan.provenance)
    for name in ("runs", "exits", "curves", "selected"):
        write_csv(store.tables_dir / f"{name}.csv", tables[name])       # what the analyses read
    analyze_grid(plan.reported, store, settings, data_root=data_root, device=torch.device("cpu"), threads=threads)
    return {**tables, **analysis_tables(root)}, outcome.failed


def analysis_tables(root: Path) -> dict[str, pd.DataFrame]:
    """The checked analysis tables of a results folder (an absent one: empty)."""
    from benchmark.store import read_csv
    paths = {name: root / "tables" / f"{name}.csv" for name in ANALYSIS_ROWS}
    return {name: read_csv(path) if path.is_file() else pd.DataFrame() for name, path in paths.items()}


def _perturbed_rerun(grid_path: Path, root: Path, threads: int, environment: dict[str, str],
                     data_root: Path) -> dict[str, pd.DataFrame]:
    command = [sys.executable, "-m", "benchmark.check", str(grid_path), str(root), str(threads), str(data_root)]
    result = subprocess.run(command, env={**os.environ, **environment}, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise RuntimeError(f"perturbed rerun {' '.join(command)} failed:\n{result.stderr[-2000:]}")
    from benchmark.store import read_csv
    return {**{name: read_csv(root / "tables" / f"{name}.csv") for name in ("runs", "exits")}, **analysis_tables(root)}


def split_sizes(datasets, data_root: Path) -> dict[str, tuple[int, int]]:
    from benchmark.data import load_dataset
    return {name: (len(load_dataset(name, data_root).y_val), len(load_dataset(name, data_root).y_test))
            for name in datasets}


def check(grid_name: str, *, update: bool = False, golden: Path | None = None, data_root: Path,
          threads: int = CHECK_THREADS, perturbations=None, echo=print) -> int:
    """Rerun the grid into a temporary folder and compare it with the golden table (0: pass, 1: differences), or
    with `update` rewrite the table — expected values from this rerun, tolerances from the perturbed reruns —
    and print what changed (0). `perturbations` defaults to PERTURBATIONS (read at call time)."""
    from benchmark.data import load_dataset
    from benchmark.grid import load_grid

    perturbations = PERTURBATIONS if perturbations is None else perturbations
    grid = load_grid(grid_name, data_root)
    path = Path(golden) if golden else Path("results") / grid.name / "golden.csv"
    command = f"--grid {grid_name}" + (f" --golden {golden}" if golden else "")
    if not update and not path.is_file():
        raise UserError(f"no golden table {path}: write it with `bench check {command} --update` (and commit it)")
    old = read_golden(path) if path.is_file() else None
    for name in sorted({s.dataset for s in grid.specs}):
        load_dataset(name, data_root)                       # missing data: one line, before anything trains
    with tempfile.TemporaryDirectory(prefix=f"bench-check-{grid.name}-") as tmp:
        tables, failed = rerun(grid, Path(tmp) / "rerun", threads=threads, data_root=data_root)
        for run_id, message in failed.items():
            echo(f"  rerun {run_id} failed: {message}")
        if update and failed:
            echo(f"not writing {path}: {len(failed)} runs of the rerun failed (a golden table never records a "
                 f"failure); fix them first")
            return 1
        actual = observed(tables)
        if not update:
            differences = compare(old, actual)
            echo(render(differences, path, len(old), command, moved(old, actual)))
            return 1 if differences else 0
        reruns = []
        for number, (name, perturbed_threads, environment) in enumerate(perturbations, 1):
            echo(f"measuring tolerances: rerun {number}/{len(perturbations)} ({name})")
            reruns.append(observed(_perturbed_rerun(grid.path, Path(tmp) / f"perturbed{number}", perturbed_threads,
                                                    environment, data_root)))
    floors = sample_floor(actual, split_sizes({key.split("/", 1)[0] for key in actual["key"]}, data_root))
    new = golden_table(tables, measured_tolerances(actual, reruns, floors))
    path.parent.mkdir(parents=True, exist_ok=True)
    from benchmark.store import write_csv
    write_csv(path, new)
    echo(f"wrote {path} ({len(new)} rows; tolerances from {len(perturbations)} perturbed "
         f"rerun{'' if len(perturbations) == 1 else 's'}: "
         + ", ".join(name for name, _, _ in perturbations) + ")")
    for line in table_changes(old, new):
        echo(line)
    return 0


def _main(argv: list[str]) -> None:
    """`python -m benchmark.check GRID ROOT THREADS DATA_ROOT`: one perturbed rerun (its own process, so that the
    ISA variables it was started with take effect); `rerun` leaves its run and analysis tables in ROOT/tables."""
    from benchmark.grid import load_grid
    grid_path, root, threads, data_root = argv
    rerun(load_grid(grid_path, data_root), Path(root), threads=int(threads), data_root=Path(data_root))


if __name__ == "__main__":
    from benchmark.quick_exit import without_teardown
    without_teardown(lambda: _main(sys.argv[1:]))
