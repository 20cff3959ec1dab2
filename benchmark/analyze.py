"""`bench analyze`: the analyses that explain the regimes, for the done runs of a grid.

Per run, on the trained model (cached next to the run, so a rerun only does what is missing):
  rank.csv          numerical rank of the activations after every block
  information.csv   I(X;T), I(T;Y) per block (Renyi and binning) and the H(Y) - CE bound per exit
  landscape.csv     1-D slices (every run), a 2-D slice (runs of `landscape_2d_seeds`), and the
                    interpolation from the shared P1 backbone to the final model (disjoint*/mixed* runs)
  robustness.csv    every exit, budget point and the primary area on corrupted test data, thresholds fit on clean
                    validation (analysis/robustness.py); the corrupted logits in robustness_logits.npz
Across runs (regenerated every time): calibration of every exit from the stored test logits (no model needed:
calibration.csv, reliability.csv, reliability_<dataset>_<arch>.png), Pareto fronts and hypervolumes, statistics
over seeds, the joint -> mixed interpolation per seed, the robustness summary, and every figure. Information-plane snapshots are recorded *during training*
(`snapshot_every` in the grid's [analyses]); analyze only gathers them.

Every model analysis runs on a fixed, class-stratified, non-augmented subset of the training split drawn by one
rule (`analysis_subset`, fixed seed, never a run seed; `samples` for rank and information, `landscape_samples` for
the landscape), the same for every run, with the model in eval mode, so numbers compare across regimes.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from analysis import calibration, information, landscape, pareto, rank, robustness, statistics
from benchmark.corruptions import CORRUPTIONS, SEVERITIES, corrupted_inputs, corruptions_for
from benchmark.data import dataset_kind, load_dataset
from benchmark.determinism import eval_batch_size
from benchmark.pipeline import collect_dense, collect_logits, initial_model, labelled
from benchmark.runner import p1_epochs
from benchmark.snapshots import analysis_subset
from benchmark.spec import RunSpec
from benchmark.store import (ResultsStore, read_csv, read_dense, read_json, read_logits, read_run_logits, read_torch,
                             write_csv, write_npz)

ANALYSIS_DEFAULTS: dict[str, Any] = {
    "run_after": False,            # `bench run` analyses the grid when it has trained it
    "model": ["rank", "information", "landscape", "robustness"],   # per-run analyses on the trained model
    "samples": 500,                # N for rank and information (fixed subset of the training split)
    "snapshot_every": 0,           # information-plane snapshots every k epochs during training (0 = none)
    "snapshot_samples": 250,
    "landscape_samples": 256,
    "landscape_points_1d": 21,     # alpha on [-1, 1]
    "landscape_points_2d": 9,      # alpha x beta on [-1, 1]^2
    "landscape_2d_seeds": [0],     # 2-D slices cost points_2d^2 forwards: only these seeds
    "interpolation_points": 13,    # t on [-0.25, 1.25]
    "corruptions": [*CORRUPTIONS["image"], *CORRUPTIONS["series"]],   # robustness: those of each dataset's kind
    "severities": list(SEVERITIES),
}
MODEL_ANALYSES = ("rank", "information", "landscape", "robustness")
SUMMARY_METRICS = ["final_accuracy", "final_macro_f1", "accuracy_at_25pct", "accuracy_at_50pct",
                   "accuracy_at_75pct", "accuracy_at_100pct", "auc_normalised", "train_wall_seconds", "train_flops",
                   "train_optimizer_steps", "train_examples_seen"]
COST_METRICS = ["train_flops", "train_optimizer_steps", "train_wall_seconds"]
"""Charged beside accuracy on the leaderboard, as ratios to joint's in the same cell."""
DIRECTION_SEED = 12345             # the same random directions for every run of an architecture


def load_trained(spec: RunSpec, store: ResultsStore, data, device: torch.device):
    model = initial_model(spec, data, device, pretrained=False)      # model.pt replaces every weight
    model.load_state_dict(read_torch(store.run_dir(spec.run_id) / "model.pt"))
    return model.eval()


def p1_state(spec: RunSpec, store: ResultsStore) -> dict | None:
    epochs = p1_epochs(spec)
    trained_on = torch.device(read_json(store.run_dir(spec.run_id) / "metrics.json")["environment"]["device"]).type
    path = store.backbone_dir(spec.p1_id(epochs, trained_on)) / "model.pt" if epochs else None
    return read_torch(path) if path is not None and path.is_file() else None


def analyse_run(spec: RunSpec, store: ResultsStore, settings: dict, data_root: Path, device: torch.device) -> None:
    """Compute the missing per-run analyses of one done run (each file written atomically)."""
    folder = store.run_dir(spec.run_id)
    todo = [name for name in settings["model"] if not (folder / f"{name}.csv").is_file()
            or (name == "robustness" and not _robustness_current(folder, spec, settings))]
    if not todo:
        return
    if not (folder / "model.pt").is_file():
        raise FileNotFoundError(f"run {spec.run_id} has no model.pt: rerun it with `bench run --save-models` "
                                f"(or a grid whose [analyses] lists model analyses)")
    data = load_dataset(spec.dataset, data_root).to(device)
    model = load_trained(spec, store, data, device)
    x, y = analysis_subset(data, settings["samples"])          # the same samples for rank and information
    if "rank" in todo:
        write_csv(folder / "rank.csv", labelled(rank.rank_table(model, x, n_samples=None), spec))
    if "information" in todo:
        tables = [information.information_table(model, x, y, estimator=e, n_samples=None)
                  for e in ("renyi", "binning")]
        bound = information.exit_bound_table(model, x, y, n_samples=None).assign(estimator="H(Y)-CE bound")
        frame = pd.concat([*tables, bound], ignore_index=True).assign(stage="final")
        write_csv(folder / "information.csv", labelled(frame, spec))
    if "landscape" in todo:
        write_csv(folder / "landscape.csv", labelled(run_landscape(spec, store, model, data, settings), spec))
    if "robustness" in todo:
        write_csv(folder / "robustness.csv", labelled(run_robustness(spec, store, model, data, settings, device), spec))


def analysis_threads(threads: int | None) -> int:
    """Torch threads of the per-run analyses: `--threads`, else 1 (their small per-point tensors run faster on 1
    thread than on 2: measured)."""
    return threads or 1


def _analysed(done: list[RunSpec], store: ResultsStore, settings: dict, data_root: Path, device: torch.device,
              threads: int, pool):
    """(spec, None or why it has no model) for each run of `done` once its per-run analyses are written: one after
    another here, or as many at once as `pool` has workers, each with `threads` torch threads as here (so the
    numbers are the same)."""
    if pool is None:
        for spec in done:
            yield spec, analyse_run_or_say_why(spec, store, settings, data_root, device, threads)
        return
    from concurrent.futures import as_completed
    submitted = {pool.analyse(spec, store, settings, data_root, device, threads): spec for spec in done}
    for future in as_completed(submitted):
        yield submitted[future], future.result()


def analyse_run_or_say_why(spec: RunSpec, store: ResultsStore, settings: dict, data_root: Path, device: torch.device,
                           threads: int) -> str | None:
    """`analyse_run` with `threads` torch threads, in this process or a worker's; a run without model.pt gives the
    reason instead (the other errors propagate)."""
    torch.set_num_threads(threads)
    try:
        analyse_run(spec, store, settings, data_root, device)
    except FileNotFoundError as error:
        return str(error)
    return None


def robustness_cases(spec: RunSpec, settings: dict) -> list[tuple[str, int]]:
    """The (corruption, severity) pairs the grid declares for this run's dataset kind."""
    return [(c, s) for c in corruptions_for(dataset_kind(spec.dataset), settings["corruptions"])
            for s in settings["severities"]]


def _robustness_current(folder: Path, spec: RunSpec, settings: dict) -> bool:
    """Whether the cached robustness.csv covers exactly the declared corruptions and severities."""
    cached = read_csv(folder / "robustness.csv", usecols=["corruption", "severity"]).drop_duplicates()
    have = {(c, int(s)) for c, s in cached.itertuples(index=False) if s > 0}
    return have == set(robustness_cases(spec, settings))


def run_robustness(spec: RunSpec, store: ResultsStore, model, data, settings: dict,
                   device: torch.device) -> pd.DataFrame:
    """Corrupted test logits of every declared (corruption, severity) by the one eval-forward (`collect_logits`),
    stored as runs/<id>/robustness_logits.npz (keys "<corruption>@<severity>"), and the run's robustness rows.
    A segmentation run's corrupted outputs are dense.npz's per-image arrays (`collect_dense`), used and not kept:
    the confusion matrices of ten cases would be ten times dense.npz."""
    folder = store.run_dir(spec.run_id)
    backbone = read_json(folder / "metrics.json")["flops"]["backbone"]
    if data.task == "segmentation":
        from analysis.calibration import N_BINS
        from benchmark.dense import SUMMARY_RULES
        stored = read_dense(folder / "dense.npz", model.num_exits, len(data.y_val), len(data.y_test),
                            data.num_classes, SUMMARY_RULES, N_BINS)
        corrupted = {(c, s): collect_dense(model, corrupted_inputs(data, "test", c, s).to(device), data.y_test,
                                           data.num_classes, eval_batch_size(device))
                     for c, s in robustness_cases(spec, settings)}
        return robustness.run_dense_robustness(stored["val"], stored["test"], corrupted, stored["exit_flops"], backbone)
    stored = read_logits(folder / "logits.npz", model.num_exits, len(data.y_val), len(data.y_test))
    corrupted = {(c, s): collect_logits(model, corrupted_inputs(data, "test", c, s).to(device), eval_batch_size(device))
                 for c, s in robustness_cases(spec, settings)}
    write_npz(folder / "robustness_logits.npz", **{f"{c}@{s}": logits for (c, s), logits in corrupted.items()})
    return robustness.run_robustness(stored["val"], stored["val_y"], stored["test"], stored["test_y"], corrupted,
                                     stored["exit_flops"], backbone)


def run_landscape(spec: RunSpec, store: ResultsStore, model, data, settings: dict) -> pd.DataFrame:
    x, y = analysis_subset(data, settings["landscape_samples"])
    generator = torch.Generator().manual_seed(DIRECTION_SEED)
    d1, d2 = landscape.random_direction(model, generator), landscape.random_direction(model, generator)
    near = landscape.DEFAULT_RADIUS * np.array([-1.0, -0.5, 0.5, 1.0])   # the sharpness box needs close points
    alphas = np.unique(np.concatenate([np.linspace(-1, 1, settings["landscape_points_1d"]), near, [0.0]]))
    parts = [landscape.slice_1d(model, x, y, d1, alphas).assign(kind="slice_1d")]
    if spec.seed in settings["landscape_2d_seeds"]:
        grid = np.linspace(-1, 1, settings["landscape_points_2d"])
        parts.append(landscape.slice_2d(model, x, y, d1, d2, grid, grid).assign(kind="slice_2d"))
    start = p1_state(spec, store)
    if start is not None:
        ts = np.linspace(-0.25, 1.25, settings["interpolation_points"])
        parts.append(landscape.interpolate(model, start, model.state_dict(), x, y, ts)
                     .assign(kind="interpolation", pair=f"P1 backbone → {spec.regime}"))
    return pd.concat(parts, ignore_index=True)


def joint_to_mixed(specs: list[RunSpec], store: ResultsStore, settings: dict, data_root: Path,
                   device: torch.device) -> pd.DataFrame:
    """Linear interpolation from the joint to the mixed model of the same (dataset, arch, seed): do the two
    schedules land in one basin? Same initial weights, same batches, so a low barrier is possible."""
    by_key = {(s.dataset, s.arch, s.seed, s.regime): s for s in specs}
    frames = []
    for (dataset, arch, seed, regime), joint in sorted(by_key.items()):
        mixed = by_key.get((dataset, arch, seed, "mixed"))
        if regime != "joint" or mixed is None or seed not in settings["landscape_2d_seeds"]:
            continue
        paths = [store.run_dir(s.run_id) / "model.pt" for s in (joint, mixed)]
        if not all(p.is_file() for p in paths):
            continue
        data = load_dataset(dataset, data_root).to(device)
        model = initial_model(joint, data, device, pretrained=False).eval()
        x, y = analysis_subset(data, settings["landscape_samples"])
        ts = np.linspace(-0.25, 1.25, settings["interpolation_points"])
        table = landscape.interpolate(model, read_torch(paths[0]), read_torch(paths[1]), x, y, ts)
        frames.append(table.assign(dataset=dataset, arch=arch, seed=seed, regime="mixed", pair="joint → mixed",
                                   run_id=mixed.run_id, run_id_a=joint.run_id))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _gather(store: ResultsStore, specs: list[RunSpec], name: str) -> pd.DataFrame:
    frames = [read_csv(store.run_dir(s.run_id) / name) for s in specs
              if (store.run_dir(s.run_id) / name).is_file()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


ANALYSIS_TABLES = frozenset({"rank", "information", "landscape", "sharpness", "robustness", "robustness_summary",
                             "calibration", "reliability", "pareto", "hypervolume", "summary", "leaderboard"})
"""The tables `analyze_grid` writes: each is rewritten from the done runs, or removed when it cannot be computed
now (say joint's runs failed since: no summary.csv), so no table outlives the runs it was computed from."""
ANALYSIS_FIGURES = ("rank_profiles.png", "information_plane.png", "landscape_*.png", "interpolation_*.png",
                    "robustness_*.png", "reliability_*.png", "pareto_fronts.png", "final_accuracy_ci.png")
"""The figures it draws (globs in figures/; REPORT.md's own figures are not among them), removed before drawing."""


def analyze_grid(specs: list[RunSpec], store: ResultsStore, settings: dict, *, data_root: Path,
                 device: torch.device, threads: int, tables_of: list[RunSpec] | None = None,
                 pool=None) -> dict[str, int]:
    """Per-run analyses for every done run in `specs` (on the workers of `pool`, a `runner.WorkerPool`, if given),
    then the grid-level tables and figures of every done run in `tables_of` (default `specs`): the grid's whole
    plan, so that analysing an --only slice does not shrink the tables to that slice."""
    torch.set_num_threads(threads)
    done = [s for s in specs if store.state(s.run_id) == "done"]
    everything = [s for s in (specs if tables_of is None else tables_of) if store.state(s.run_id) == "done"]
    started = time.perf_counter()
    failures = {}
    tty = sys.stderr.isatty()          # a redirected stderr (a log file) gets one plain line per run, not CR bars
    bar = tqdm(total=len(done), desc="analyze runs", unit="run", dynamic_ncols=True, disable=not tty)
    for number, (spec, missing_model) in enumerate(_analysed(done, store, settings, data_root, device, threads, pool),
                                                   start=1):
        if missing_model:
            failures[spec.run_id] = missing_model
        bar.update(1)
        if not tty:
            print(f"analyzed {spec.run_id} {spec.regime} {spec.dataset}/{spec.arch} seed {spec.seed} "
                  f"({number}/{len(done)})", file=sys.stderr, flush=True)
    bar.close()
    per_run_seconds = time.perf_counter() - started
    tables = store.tables_dir
    figures = store.root / "figures"
    for stale in (path for pattern in ANALYSIS_FIGURES for path in figures.glob(pattern)):
        stale.unlink()              # every figure below is drawn afresh or, if it cannot be now, left absent
    written = {}
    draw, drawn = _figure_drawer(pool)

    def emit(name: str, frame: pd.DataFrame) -> None:
        if not frame.empty:
            write_csv(tables / f"{name}.csv", frame)
            written[name] = len(frame)

    rank_frame = _gather(store, everything, "rank.csv")
    emit("rank", rank_frame)
    if not rank_frame.empty:
        draw(rank.plot_rank_profiles, rank_frame, figures / "rank_profiles.png")

    info = pd.concat([_gather(store, everything, "information.csv"),
                      _gather(store, everything, "information_snapshots.csv")], ignore_index=True)
    emit("information", info)
    snapshots = info[info.get("stage", pd.Series(dtype=str)) == "snapshot"] if not info.empty else info
    if not snapshots.empty:
        draw(information.plot_information_plane, snapshots, figures / "information_plane.png")

    land = _gather(store, everything, "landscape.csv")
    pairs = (joint_to_mixed(everything, store, settings, data_root, device) if "landscape" in settings["model"]
             else None)
    if pairs is not None and not pairs.empty:
        land = pd.concat([land, pairs.assign(kind="interpolation")], ignore_index=True)
    emit("landscape", land)
    if not land.empty:
        draw(_landscape_figures, land, figures)
        one_d = land[land.kind == "slice_1d"].dropna(axis=1, how="all")
        emit("sharpness", landscape.sharpness(one_d.drop(columns=["kind"])))

    robust = _gather(store, everything, "robustness.csv")
    emit("robustness", robust)
    if not robust.empty:
        emit("robustness_summary", robustness.robustness_summary(robust))
        draw(robustness.plot_severity_curves, robust, figures)

    runs_path = tables / "runs.csv"
    calib, bins = calibration.calibration_table(stored_test_logits(everything, store),
                                                dense_runs=stored_test_calibration(everything, store))
    emit("calibration", calib)
    emit("reliability", bins)
    if not bins.empty:
        draw(calibration.plot_reliability_diagrams, bins, figures,
             read_csv(runs_path) if runs_path.is_file() else None)

    curves_path = tables / "curves.csv"
    if curves_path.is_file() and runs_path.is_file():
        curves, runs = read_csv(curves_path), read_csv(runs_path)
        ids = {s.run_id for s in everything}
        curves, runs = curves[curves.run_id.isin(ids)], runs[runs.run_id.isin(ids)]
        emit("pareto", pareto.pareto_table(curves))
        emit("hypervolume", pareto.hypervolume_table(curves))
        draw(pareto.plot_pareto_fronts, curves, figures / "pareto_fronts.png")
        if "joint" in set(runs.regime):
            summary = statistics.summary_table(runs, [m for m in SUMMARY_METRICS if m in runs.columns])
            emit("summary", summary)
            draw(statistics.plot_confidence_intervals, summary, "final_accuracy", figures / "final_accuracy_ci.png")
        emit("leaderboard", leaderboard(runs))
    for name in ANALYSIS_TABLES.difference(written):
        (tables / f"{name}.csv").unlink(missing_ok=True)    # cannot be computed from today's runs: no stale copy
    drawn()
    written["per_run_seconds"] = round(per_run_seconds, 1)
    written["missing_models"] = len(failures)
    return written


def _figure_drawer(pool):
    """(draw, drawn): `draw(plot, *args)` draws one figure here, or submits it to a worker of `pool` (`bench run
    --executor process`), where the grid's figures (~0.3 s each) draw side by side while this process writes the
    tables; `drawn()` waits for them, raising a worker's error here."""
    if pool is None:
        return (lambda plot, *args: plot(*args)), (lambda: None)
    pending = []

    def drawn() -> None:
        for future in pending:
            future.result()
    return (lambda plot, *args: pending.append(pool.submit(plot, *args))), drawn


def stored_test_logits(specs: list[RunSpec], store: ResultsStore):
    """(labels, test logits (K, N, C), test labels) of every run in `specs` that has logits.npz, read with the
    shape checks of `read_run_logits`."""
    for spec in specs:
        folder = store.run_dir(spec.run_id)
        if not (folder / "logits.npz").is_file():
            continue
        stored = read_run_logits(folder, read_json(folder / "metrics.json")["num_exits"])
        yield spec.labels, stored["test"], stored["test_y"]


def stored_test_calibration(specs: list[RunSpec], store: ResultsStore):
    """(labels, test reliability sums (K, N, bins, 3), test likelihood sums (K, N, 2)) of every segmentation run in
    `specs` (those with dense.npz), read with the shape checks of `read_dense` (sizes from the file's own arrays)."""
    from benchmark.dense import SUMMARY_RULES
    for spec in specs:
        path = store.run_dir(spec.run_id) / "dense.npz"
        if not path.is_file():
            continue
        num_exits = read_json(store.run_dir(spec.run_id) / "metrics.json")["num_exits"]
        with np.load(path) as sizes:
            val_size, test_size = len(sizes["val_confusion"][0]), len(sizes["test_confusion"][0])
            classes, bins = sizes["test_confusion"].shape[-1], sizes["test_reliability"].shape[2]
        stored = read_dense(path, num_exits, val_size, test_size, classes, SUMMARY_RULES, bins)
        yield spec.labels, stored["test"]["reliability"], stored["test"]["likelihood"]


def leaderboard(runs: pd.DataFrame) -> pd.DataFrame:
    """Average rank by the primary metric (validation-selected area) across cells, with each regime's cost
    beside it: the mean over cells of its seed-mean training FLOPs, steps and wall time relative to joint's.

    Wall times compare only within one sitting (issue 21): `wall_time_one_sitting` is the share of a regime's cells
    whose runs and joint's were all timed in one timing batch (runs.csv `timing_batch`, `provenance.py`); below 1
    the wall-time ratio mixes sittings (or sittings nobody recorded) and the report flags it."""
    board = statistics.average_ranks(runs, "auc_normalised")
    if "joint" not in set(runs.regime):
        return board
    cells = ["dataset", "arch"]
    means = runs.groupby([*cells, "regime"])[COST_METRICS].mean()
    joint = means.xs("joint", level="regime").reindex(means.index.droplevel("regime"))
    relative = means / joint.to_numpy()
    board = board.join(relative.groupby("regime").mean().add_suffix("_vs_joint"), on="regime")
    batches = (runs["timing_batch"] if "timing_batch" in runs else pd.Series(np.nan, index=runs.index))
    sittings = batches.groupby([runs[c] for c in [*cells, "regime"]]).agg(
        lambda b: b.iloc[0] if b.notna().all() and b.nunique() == 1 else None)
    joint_sitting = sittings.xs("joint", level="regime").reindex(sittings.index.droplevel("regime"))
    same = pd.Series([a is not None and a == b for a, b in zip(sittings.to_numpy(), joint_sitting.to_numpy())],
                     index=sittings.index)
    same[same.index.get_level_values("regime") == "joint"] = True      # joint against itself: 1.00x by definition
    return board.join(same.groupby(level="regime").mean().rename("wall_time_one_sitting"), on="regime")


CORE_REGIMES = ("joint", "disjoint", "mixed")


def _landscape_figures(land: pd.DataFrame, figures: Path) -> None:
    """Final exit, first seed: one line per regime (1-D), per pair (interpolation), a panel per core regime (2-D)."""
    land = land[land.seed == land.seed.min()]
    one_d = land[(land.kind == "slice_1d")]
    for (dataset, arch), cell in one_d.groupby(["dataset", "arch"]):
        last = cell[cell.exit == cell.exit.max()]
        landscape.plot_slices_1d(last, figures / f"landscape_1d_{dataset}_{arch}.png",
                                 title=f"1-D loss slices, final exit — {dataset} / {arch}")
    interp = land[land.kind == "interpolation"]
    for (dataset, arch), cell in interp.groupby(["dataset", "arch"]):
        last = cell[cell.exit == cell.exit.max()]
        landscape.plot_interpolation(last, figures / f"interpolation_{dataset}_{arch}.png",
                                     title=f"Linear interpolation, final exit — {dataset} / {arch}")
    two_d = land[(land.kind == "slice_2d") & land.regime.isin(CORE_REGIMES)]
    for (dataset, arch), cell in two_d.groupby(["dataset", "arch"]):
        landscape.plot_contour_2d(cell, figures / f"landscape_2d_{dataset}_{arch}.png",
                                  title=f"2-D loss slice, final exit — {dataset} / {arch}")
