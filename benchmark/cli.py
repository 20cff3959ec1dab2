"""`bench`: run grids, list what is registered, show a run. User mistakes exit with 2 and one clear message."""
from __future__ import annotations

import dataclasses
import errno
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import click

from benchmark.errors import UserError

DEFAULT_DATA_ROOT = Path(os.environ.get("EXITBENCH_DATA", "~/.cache/exitbench")).expanduser()


class UserErrorsAsMessages(click.Group):
    """Turns a user's mistake into one `error: ...` line and exit code 2, never a traceback; the machine's
    trouble (full disk, unwritable folder) into one line naming the path and the fix; Ctrl-C into exit 130 with
    how to resume (SIGTERM: the same, exit 143); a closed pipe (`bench ... | head`) into a quiet exit 0."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as error:
            click.echo(f"error: {error}", err=True)
            ctx.exit(2)
        except KeyboardInterrupt:
            _interrupted()
        except BrokenPipeError:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # nothing left to flush at exit
            ctx.exit(0)
        except OSError as error:
            from benchmark.store import RESOURCE_ERRNOS, unwritable_message
            if error.errno not in RESOURCE_ERRNOS | {errno.ENOTDIR}:
                raise
            click.echo(f"error: {unwritable_message(str(error.filename or 'the results folder'), error)}", err=True)
            ctx.exit(1 if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO) else 2)


_TERMINATED: list[int] = []


def _results_folder(ctx, param, value: Path | None) -> Path | None:
    """--results names a folder (made if missing): a regular file there is one line and exit 2, not click's usage."""
    if value is not None and value.exists() and not value.is_dir():
        raise UserError(f"--results {value} is a regular file, not a folder: pass a folder (it is created if missing)")
    return value


def _selected(grid, only: tuple[str, ...]) -> list:
    """The grid's runs that `--only` keeps; a filter that keeps none is the user's mistake (one line, exit 2)."""
    from benchmark.grid import parse_filters, select
    specs = select(grid.specs, parse_filters(only))
    if not specs:
        raise UserError(f"--only {' '.join(only)} matches none of the {len(grid.specs)} runs of grid '{grid.name}'")
    return specs


def _require_trackers(ctx, param, names: tuple[str, ...]) -> tuple[str, ...]:
    """--log: each tracker's package importable (benchmark.trackers.require), checked before anything else runs."""
    from benchmark.trackers import require
    return require(names)


def _terminate(signum, frame) -> None:
    """SIGTERM (a cluster's time limit or preemption, `kill`) takes Ctrl-C's path: the run in flight stays pending,
    process workers are stopped, and the exit says how to resume. Python's default would die on the spot."""
    _TERMINATED.append(signum)
    raise KeyboardInterrupt


@click.group(cls=UserErrorsAsMessages, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """exitbench: training regimes of early-exit networks under one protocol."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")   # never hang on a hub lookup; pretrained=True says why it failed
    signal.signal(signal.SIGTERM, _terminate)


@main.command(short_help="Train and evaluate the grid's pending runs, then write the tables.")
@click.option("--grid", "grid_name", default="quick", show_default=True,
              help="Registered grid name (see `bench list grids`) or path to a grid .toml file.")
@click.option("--only", multiple=True, metavar="KEY=GLOB",
              help="Keep runs whose KEY (dataset, arch, regime, seed, run_id) matches GLOB; repeatable.")
@click.option("--executor", type=click.Choice(["auto", "local", "process", "ray"]), default="auto", show_default=True,
              help="auto: process with --jobs workers, local when that is one; local: one run after another; "
                   "process: --jobs worker processes; ray: every run a Ray task, on this machine or the cluster at "
                   "--address.")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Runs at a time for --executor auto and process [default: on the CPU one per --threads cores "
                   "(one per core), on a GPU 1].")
@click.option("--address", default=None, metavar="auto|HOST:PORT",
              help="--executor ray: the cluster to join (auto: the one `ray start` runs here) [default: a local Ray].")
@click.option("--cpus-per-run", type=click.IntRange(min=1), default=None,
              help="--executor ray: CPUs each run declares, also its torch threads [default: grid's [resources], "
                   "else 1].")
@click.option("--gpus-per-run", type=click.FloatRange(min=0), default=None,
              help="--executor ray: GPUs each run declares (fractions share a GPU) [default: grid's [resources], "
                   "else 1 when the cluster has GPUs].")
@click.option("--dry-run", is_flag=True, help="Print the runs and their state; train nothing.")
@click.option("--results", type=click.Path(path_type=Path), default=None, callback=_results_folder,
              help="Results folder [default: results/<grid>].")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA_ROOT,
              show_default=True, help="Where standard datasets live (or are downloaded to with --download).")
@click.option("--download", is_flag=True, help="Download missing standard datasets into --data-root.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads per run [default: the cores split between --jobs; 1 with the default --jobs on "
                   "the CPU].")
@click.option("--retry-failed", is_flag=True, help="Rerun runs that failed before (they are skipped otherwise).")
@click.option("--allow-failed", is_flag=True,
              help="Exit 0 even if reported runs are failed (they stay in runs.csv with their error). Failed tuning "
                   "candidates never fail the command: they lose the tuning, as the protocol says.")
@click.option("--save-models", is_flag=True, help="Also store each trained model as runs/<id>/model.pt.")
@click.option("--fast", is_flag=True,
              help="torch.compile the model (eager if compiling fails) and, on CUDA, let cuDNN pick benchmarked, "
                   "non-deterministic algorithms. Numbers may differ, so fast runs get their own run ids "
                   "[default results: results/<grid>-fast].")
@click.option("--log", multiple=True, type=click.Choice(["tensorboard", "wandb"]),
              callback=_require_trackers,
              help="Log each run this command trains (history per epoch, final per-exit metrics, the spec) to "
                   "TensorBoard (results/<grid>/tensorboard/) or W&B (offline unless WANDB_MODE=online; "
                   "results/<grid>/wandb/), grouped by grid; repeatable. Needs the package: pip install -e "
                   "'.[tensorboard]' or '.[wandb]'.")
def run(grid_name, only, executor, jobs, address, cpus_per_run, gpus_per_run, dry_run, results, data_root, download,
        device, threads, retry_failed, allow_failed, save_models, fast, log):
    """Train and evaluate every run of a grid that is not done yet, regenerate the tables, and name the command that
    writes REPORT.md from them. With --log, each run is also logged to TensorBoard or W&B when it finishes (by this
    process, whatever the executor; runs already done are not logged again).

    Exits 1 while a reported run of the grid is failed (see --allow-failed), 130 when interrupted (rerun the
    same command to resume: finished runs are kept)."""
    from benchmark.worker_start import (resolve_executor, stop_fork_server, threads_per_run, uses_worker_pool,
                                        worker_context)
    guess = resolve_executor(executor, jobs, threads, "cuda" if device == "cuda" else "cpu")  # torch not imported yet
    if uses_worker_pool(*guess) and not dry_run:
        worker_context()          # the workers' fork server imports torch while this process imports and loads
        click.get_current_context().call_on_close(stop_fork_server)    # also when a mistake ends the command
    from benchmark.checks import cell_warnings
    from benchmark.data import load_dataset
    from benchmark.determinism import resolve_device
    from benchmark.grid import load_grid
    from benchmark.provenance import new_timing_batch
    from benchmark.runner import damaged, run_grid, worker_pool
    from benchmark.store import DONE, FAILED, ResultsStore
    from benchmark.trackers import Trackers
    from benchmark.tuning import make_plan
    from benchmark.weights import stage as stage_weights

    grid = load_grid(grid_name, data_root)
    if fast:       # part of every spec (and run id): tuning, tables and analyses of this command all see fast runs
        grid = dataclasses.replace(grid, specs=[dataclasses.replace(s, fast=True) for s in grid.specs])
    specs = _selected(grid, only)
    store = ResultsStore(results or Path("results") / (f"{grid.name}-fast" if fast else grid.name))
    for warning in cell_warnings(specs, data_root):
        click.echo(f"warning: {warning}", err=True)
    plan = make_plan(specs, grid.tuning, store)
    device_type = resolve_device(device).type
    executor, jobs = resolve_executor(executor, jobs, threads, device_type)
    if uses_worker_pool(*guess) and not uses_worker_pool(executor, jobs):
        stop_fork_server()        # --device auto found a GPU: one run at a time
    for line in damaged(plan.tuning + plan.reported, store, device_type):
        click.echo(f"warning: {line}", err=True)
    if dry_run:
        store.check_writable(write=False)          # what `run` would refuse, refused without writing anything
        _print_plan(plan, store, device_type, grid.analyses["run_after"], None if executor == "ray" else jobs,
                    threads_per_run(executor, jobs, threads, device_type))
        if grid.screen is not None:
            screen = grid.screen
            click.echo(f"screen: {screen['regime']} is tuned and trained first in every cell; a cell's other runs "
                       f"train only if its first exit trails the final by >= {100 * screen['min_gap']:g} points and "
                       f"the final stays below {100 * screen['max_final']:g} % (validation; tables/screen.csv)")
        return
    for name in sorted({s.dataset for s in plan.tuning + plan.reported + plan.awaiting
                        if store.state(s.run_id) != DONE}):
        load_dataset(name, data_root, download=download)       # missing data: one line, before any folder exists

    settings = grid.analyses
    common = dict(grid_name=grid.name, executor=executor, jobs=jobs, data_root=data_root, device=device,
                  retry_failed=retry_failed, download=download, threads=threads, address=address,
                  cpus_per_run=cpus_per_run or grid.resources["cpus_per_run"],
                  gpus_per_run=gpus_per_run if gpus_per_run is not None else grid.resources["gpus_per_run"],
                  write_tables=lambda: _write_grid_tables(grid, store),
                  timing_batch=new_timing_batch(executor, jobs, threads, device_type),   # one sitting: every stage
                  log=Trackers.of(log, grid))       # --log: tuning, screen and reported runs, as each finishes
    reported = dict(save_models=save_models or bool(settings["model"] and settings["run_after"]),
                    snapshot_every=settings["snapshot_every"], snapshot_samples=settings["snapshot_samples"])
    lost = {}                           # Ray tasks that never came back: their runs stay pending
    with store.lock(), _ray_session(executor, address), worker_pool(executor, jobs, threads, device) as pool:
        common["pool"] = pool           # the lock: from the first write to the last; one pool for every stage
        stage_weights(store.root, grid.weights)                # [model] weights: the copy every run loads
        if grid.screen is not None:
            specs = _screened(grid, specs, store, data_root, lost, common, reported)
            plan = make_plan(specs, grid.tuning, store)
        plan = _tune(grid, specs, plan, store, lost, common, f"tuning {grid.name}",
                     f"tuning runs of grid {grid.name}")
        if plan.at_edge:
            click.echo(f"note: {len(plan.at_edge)} cells chose the smallest or largest declared lr (a wider "
                       f"[tuning] lr set might do better): {'; '.join(plan.at_edge)}", err=True)
        outcome = run_grid(plan.reported, store, **reported, **common,
                           analyses=settings if settings["run_after"] else None)   # started early on process workers
        _report(f"grid {grid.name}", outcome, store)
        lost.update(outcome.lost)
        for reason in plan.untunable.values():
            click.echo(f"  not run: {reason}", err=True)
        if outcome.interrupted:
            raise KeyboardInterrupt
        if settings["run_after"]:
            _analyze(grid, plan.reported, _whole_plan(grid, store).reported, store, data_root, device, threads, pool)
        # the main job's output is the report (issue 21): its one command, not drawn here (figures cost seconds on
        # every run, and a grid resumed in sittings needs it once, at the end)
        results_option = "" if results is None else f" --results {store.root}"
        click.echo(f"next: `bench report --grid {grid_name}{results_option}` writes {store.root / 'REPORT.md'} "
                   f"from these tables")
    failed = [] if allow_failed else [s.run_id for s in plan.reported if store.state(s.run_id) == FAILED]
    if failed:
        click.echo(f"{len(failed)} reported runs of grid {grid.name} are failed (runs.csv lists each with its "
                   f"error): fix the cause and rerun with --retry-failed, or pass --allow-failed", err=True)
    if failed or plan.untunable or lost:
        sys.exit(1)


def _tune(grid, specs, plan, store, lost: dict, common: dict, desc: str, what: str):
    """Train `plan`'s tuning runs stage by stage (successive halving: a stage's runs are known once the one before is
    done) and return the plan the store then gives."""
    from benchmark.runner import run_grid
    from benchmark.store import DONE
    from benchmark.tuning import make_plan

    tried = set()
    while pending := [s for s in plan.tuning if s.run_id not in tried and store.state(s.run_id) != DONE]:
        tried.update(s.run_id for s in pending)
        tuning = run_grid(pending, store, desc=desc, **common)
        lost.update(tuning.lost)
        _report(what, tuning, store)
        if tuning.interrupted:
            raise KeyboardInterrupt
        plan = make_plan(specs, grid.tuning, store)
    return plan


def _screened(grid, specs, store, data_root, lost: dict, common: dict, reported: dict) -> list:
    """The difficulty screen (benchmark/screen.py): tune the screen regime in the cells of `specs` first and train its
    reported seeds (`reported`: run_grid's settings for reported runs), write the whole grid's tables/screen.csv,
    print each cell's verdict, and keep the runs of the cells that pass."""
    from benchmark.data import load_dataset
    from benchmark.runner import run_grid
    from benchmark.screen import screen_table, verdict_lines
    from benchmark.store import write_csv
    from benchmark.tuning import make_plan

    regime = grid.screen["regime"]
    screened = [s for s in specs if s.regime == regime]
    plan = _tune(grid, screened, make_plan(screened, grid.tuning, store), store, lost, common,
                 f"screen {grid.name}", f"screen ({regime}'s tuning) of grid {grid.name}")
    outcome = run_grid(plan.reported, store, desc=f"screen {grid.name}: {regime}'s reported seeds", **reported,
                       **common)
    _report(f"screen ({regime}'s reported seeds) of grid {grid.name}", outcome, store)
    lost.update(outcome.lost)
    if outcome.interrupted:
        raise KeyboardInterrupt
    everywhere = make_plan([s for s in grid.specs if s.regime == regime], grid.tuning, store).reported
    sizes = {name: len(load_dataset(name, data_root).y_val) for name in {s.dataset for s in everywhere}}
    table = screen_table(everywhere, grid.screen, store, sizes)
    write_csv(store.tables_dir / "screen.csv", table)
    decided = {(row.dataset, row.arch): row for row in table.itertuples(index=False)}
    cells = {(s.dataset, s.arch) for s in screened}
    for line in verdict_lines(table[[cell in cells for cell in zip(table.dataset, table.arch)]]):
        click.echo(line, err=True)
    return [s for s in specs if (s.dataset, s.arch) in decided and decided[s.dataset, s.arch].passes]


@contextmanager
def _ray_session(executor: str, address: str | None):
    """One Ray connection for the tuning and the reported runs of `bench run --executor ray` (a local Ray takes
    seconds to start); nothing for the other executors."""
    if executor != "ray":
        yield
        return
    from benchmark import ray_executor
    started = ray_executor.connect(address)
    try:
        yield
    finally:
        if started:
            ray_executor.disconnect()


def _whole_plan(grid, store):
    """The plan of every reported run of the grid, cells that failed the difficulty screen left out: what the grid's
    tables describe, whatever --only slice was run."""
    from benchmark.screen import without_failed_cells
    from benchmark.tuning import make_plan
    return make_plan(without_failed_cells(grid.specs, store) if grid.screen else grid.specs, grid.tuning, store)


def _write_grid_tables(grid, store):
    """The whole grid's tables, so that an --only subset does not shrink them; cells that failed the difficulty
    screen are left out (tables/screen.csv has their numbers). Returns the whole plan they describe."""
    from benchmark.tables import write_tables
    whole = _whole_plan(grid, store)
    write_tables(store, {s.run_id for s in whole.reported}, whole.provenance, whole.choices)
    return whole


def _report(what: str, outcome, store) -> None:
    click.echo(f"{what}: {len(outcome.done)} trained, {len(outcome.skipped)} already done, "
               f"{len(outcome.failed)} failed, {len(outcome.skipped_failed)} failed earlier (use --retry-failed)"
               f"; tables in {store.tables_dir}")
    for run_id, message in outcome.failed.items():
        click.echo(f"  failed {run_id}: {message}", err=True)
    if outcome.lost:
        click.echo(f"  {len(outcome.lost)} runs never came back from Ray (they stay pending; rerun the same command):",
                   err=True)
    for run_id, message in outcome.lost.items():
        click.echo(f"  lost {run_id}: {message}", err=True)


def _interrupted() -> None:
    what, code = ("terminated (SIGTERM)", 128 + signal.SIGTERM) if _TERMINATED else ("interrupted", 130)
    click.echo(f"{what}: rerun the same command to finish the remaining work (finished runs are kept)", err=True)
    sys.exit(code)


def _analyze(grid, specs, whole, store, data_root, device, threads, pool=None) -> None:
    """Per-run analyses of `specs` (on `pool`'s workers, if given), the grid's tables of `whole` (every reported run
    of the grid)."""
    from benchmark.analyze import analysis_threads, analyze_grid
    from benchmark.determinism import resolve_device
    written = analyze_grid(specs, store, grid.analyses, data_root=data_root, device=resolve_device(device),
                           threads=analysis_threads(threads), tables_of=whole, pool=pool)
    tables = ", ".join(f"{name}.csv ({rows} rows)" for name, rows in written.items()
                       if name not in ("per_run_seconds", "missing_models"))
    click.echo(f"analyses of grid {grid.name}: {tables}; per-run analyses took {written['per_run_seconds']} s; "
               f"figures in {store.root / 'figures'}")
    if written["missing_models"]:
        click.echo(f"  {written['missing_models']} runs have no model.pt, so rank, information and landscape skipped "
                   f"them: models are kept only by `bench run --grid {grid.name} --save-models` (or `run_after = true` "
                   f"in the grid's [analyses]); delete those runs' folders under {store.root / 'runs'} and rerun with "
                   f"the flag to get them", err=True)


@main.command(short_help="Rank, information, landscape, Pareto and statistics of done runs.")
@click.option("--grid", "grid_name", default="quick", show_default=True,
              help="Registered grid name or path to a grid .toml file.")
@click.option("--only", multiple=True, metavar="KEY=GLOB", help="Analyse only matching runs; repeatable.")
@click.option("--results", type=click.Path(path_type=Path), default=None, callback=_results_folder,
              help="Results folder [default: results/<grid>].")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA_ROOT,
              show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Torch threads [default: 1].")
def analyze(grid_name, only, results, data_root, device, threads):
    """Rank, information flow, loss landscape (per run), Pareto fronts and statistics (across runs).

    Of the done runs of a grid, as tables in results/<grid>/tables and figures in results/<grid>/figures; the
    run tables are regenerated first from the run folders, so the analyses never read stale ones."""
    from benchmark.determinism import resolve_device
    from benchmark.grid import load_grid, parse_filters, select
    from benchmark.runner import damaged
    from benchmark.screen import without_failed_cells
    from benchmark.store import DONE, ResultsStore
    from benchmark.tuning import make_plan

    grid = load_grid(grid_name, data_root)
    store = ResultsStore(results or Path("results") / grid.name)
    specs = select(grid.specs, parse_filters(only))
    specs = make_plan(without_failed_cells(specs, store) if grid.screen else specs, grid.tuning, store).reported
    for line in damaged(specs, store, resolve_device(device).type):
        click.echo(f"warning: {line}", err=True)
    if not any(store.state(s.run_id) == DONE for s in specs):
        raise UserError(f"no done runs of grid '{grid.name}' in {store.root}; run `bench run --grid {grid_name}` first")
    with store.lock():
        whole = _write_grid_tables(grid, store)
        _analyze(grid, specs, whole.reported, store, data_root, device, threads)
    _echo_completeness(grid, store)


def _echo_completeness(grid, store) -> None:
    """The report's completeness lines (done, failed with the reason, missing), so an analysis of part of a grid
    says so where it is run."""
    from benchmark.report import completeness
    from benchmark.store import read_csv
    tables = store.tables_dir
    tuning = read_csv(tables / "tuning.csv") if (tables / "tuning.csv").is_file() else None
    for line in completeness(grid, read_csv(tables / "runs.csv"), tuning):
        click.echo(line.removeprefix("- ").replace("**", ""))


@main.command(short_help="Evaluate per-exit outputs of models trained elsewhere under the suite's protocol.")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--grid", "grid_name", default=None,
              help="Add the entries to this grid's report (results/<grid>/external/; each must declare one of the "
                   "grid's datasets and hold its test split).")
@click.option("--as", "as_name", default=None, help="The entries' name [default: each file's own name, else its stem].")
@click.option("--results", type=click.Path(path_type=Path), default=None, callback=_results_folder,
              help="Results folder [default: results/<grid> with --grid, else results/external].")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA_ROOT,
              show_default=True, help="Where the grid's datasets are (to check an entry's test split against).")
def evaluate(files, grid_name, as_name, results, data_root):
    """Evaluate FILES — per-exit validation and test outputs of models exitbench did not train (BENCHMARK.md,
    'Models trained elsewhere': the .npz format) — by the suite's own evaluation: every exit policy, the operating
    points and areas validation selects, calibration, and robustness where corrupted test outputs are given. Each
    file is an entry folder of the same per-run tables a trained run has, with its report section. Every file is
    checked before anything is written. Python: `benchmark.external`."""
    from benchmark.external import EXTERNAL_FOLDER, read_outputs, write_entry
    from benchmark.report import external_report
    from benchmark.store import ResultsStore

    entries = [(path, read_outputs(path, as_name)) for path in files]
    seen = {}
    for path, outputs in entries:
        if outputs.entry_id in seen:
            raise UserError(f"{seen[outputs.entry_id]} and {path} are both entry '{outputs.entry_id}' (same name and "
                            f"seed): give each file its own 'seed' (or name)")
        seen[outputs.entry_id] = path
    grid = None
    if grid_name is not None:
        from benchmark.external import check_against_grid
        from benchmark.grid import load_grid
        grid = load_grid(grid_name, data_root, check_models=False)
        for path, outputs in entries:
            check_against_grid(path, outputs, grid, data_root)
    store = ResultsStore(results or Path("results") / (grid.name if grid else EXTERNAL_FOLDER))
    root = store.root / EXTERNAL_FOLDER if grid else store.root
    with store.lock():
        for path, outputs in entries:
            folder, summary = write_entry(root, outputs, path, grid.name if grid else None)
            click.echo(f"{outputs.entry_id}: area {100 * summary['auc_normalised']:.1f} %, final exit "
                       f"{100 * summary['final_accuracy']:.1f} % -> {folder}")
        if grid is None:
            from benchmark.store import write_text
            write_text(store.root / "REPORT.md", external_report(root))
            click.echo(f"report: {store.root / 'REPORT.md'}")
    if grid is not None:
        click.echo(f"added to grid '{grid.name}': `bench report --grid {grid_name}"
                   f"{'' if results is None else f' --results {results}'}` writes it into {store.root / 'REPORT.md'}")


@main.command(short_help="Write results/<grid>/REPORT.md: leaderboards, claims, findings, figures.")
@click.option("--grid", "grid_name", default="quick", show_default=True,
              help="Registered grid name or path to a grid .toml file.")
@click.option("--results", type=click.Path(path_type=Path), default=None, callback=_results_folder,
              help="Results folder [default: results/<grid>].")
@click.option("--update-benchmark", is_flag=True,
              help="Also rewrite the leaderboard between the markers in BENCHMARK.md.")
@click.option("--claims", "claims_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Claims file to test [default: the shipped benchmark/claims.toml; copy it to add yours].")
def report(grid_name, results, update_benchmark, claims_file):
    """Write results/<grid>/REPORT.md and the figures it embeds from the stored runs and tables; trains nothing.

    The run tables are regenerated first when the run folders are here (a clone holding only the committed tables
    reports from those)."""
    from benchmark.grid import load_grid
    from benchmark.report import write_report
    from benchmark.store import ResultsStore

    grid = load_grid(grid_name, check_models=False)          # reads what was run; checks nothing to train
    store = ResultsStore(results or Path("results") / grid.name)
    if not (store.tables_dir / "runs.csv").is_file() and not store.run_ids():
        raise UserError(f"no runs of grid '{grid.name}' in {store.root}; run `bench run --grid {grid_name}` first")
    with store.lock():
        if store.run_ids():
            _write_grid_tables(grid, store)
        path = write_report(grid, store, benchmark_file=Path("BENCHMARK.md") if update_benchmark else None,
                            claims_file=claims_file)
    click.echo(f"report of grid {grid.name}: {path}" + ("; BENCHMARK.md's leaderboard updated" if update_benchmark
                                                          else ""))


@main.command(short_help="Test any claim — regime A vs B on a metric — on a grid's runs, by the claims' rules.")
@click.argument("a")
@click.argument("b")
@click.option("--metric", default="auc_normalised", show_default=True,
              help="A runs.csv summary number, a per-exit number or a robustness number (benchmark/claims.toml "
                   "lists them).")
@click.option("--direction", type=click.Choice(["greater", "not_less"]), default="greater", show_default=True,
              help="greater: A > B; not_less: A is not worse than B by more than --margin.")
@click.option("--margin", type=float, default=None, help="not_less only: the margin in metric units (0.005 = half a "
                                                         "point).")
@click.option("--cells", multiple=True, default=("*/*",), show_default=True,
              help='"dataset/arch" globs of the cells that give pairs (repeatable).')
@click.option("--grid", "grid_name", default="quick", show_default=True,
              help="Registered grid name or path to a grid .toml file.")
@click.option("--results", type=click.Path(path_type=Path), default=None, callback=_results_folder,
              help="Results folder [default: results/<grid>].")
def claim(a, b, metric, direction, margin, cells, grid_name, results):
    """Test "A beats B on METRIC" (or "A is not worse than B") over every (cell, seed) pair of a grid's runs, from
    its tables, with the rules of the shipped claims: a one-sided paired t-test, the 95 % CI against the margin, the
    detectable effect. One claim is a family of one; to correct several together, list them in a claims file and
    run `bench report --claims FILE`. Python: `benchmark.claims.test_claim`."""
    import pandas as pd

    from benchmark.claims import ALPHA, VERDICT_RULE, claim_findings, claims_phrase, test_claim
    from benchmark.external import EXTERNAL_FOLDER, entry_runs, read_entries
    from benchmark.grid import load_grid
    from benchmark.store import ResultsStore, read_csv

    grid = load_grid(grid_name, check_models=False)
    store = ResultsStore(results or Path("results") / grid.name)
    tables = store.tables_dir
    if not (tables / "runs.csv").is_file():
        raise UserError(f"no runs table of grid '{grid.name}' in {tables}; run `bench run --grid {grid_name}` first")
    robustness = read_csv(tables / "robustness.csv") if (tables / "robustness.csv").is_file() else None
    runs, exits = read_csv(tables / "runs.csv"), read_csv(tables / "exits.csv")
    entries = read_entries(store.root / EXTERNAL_FOLDER)
    if entries and {a, b} & {metrics["regime"] for metrics, _ in entries}:     # an external entry is a side
        entry_rows, entry_exits = entry_runs(entries)
        runs, exits = pd.concat([runs, entry_rows], ignore_index=True), pd.concat([exits, entry_exits],
                                                                                 ignore_index=True)
    row = test_claim(runs, exits, a, b, metric, direction, margin, tuple(cells), robustness,
                     entries=tuple(metrics["regime"] for metrics, _ in entries))
    click.echo(claim_findings(pd.DataFrame([row]))[0])
    click.echo(f"Verdict rule: {VERDICT_RULE.format(alpha=ALPHA, m=claims_phrase(int(row.family_size)))}.")


def _print_plan(plan, store, device_type: str, analyses: bool, jobs: int | None, run_threads: int) -> None:
    """Every run the grid will train — tuning runs, then reported runs — with its state and its shared P1; then the
    estimated cost per (dataset, arch) cell and in total (benchmark/cost_model.py), its wall time for `jobs` runs at a
    time of `run_threads` threads (none for Ray: None)."""
    from benchmark import cost_model
    from benchmark.runner import p1_stored
    from benchmark.store import DONE, FAILED
    click.echo(f"{'run_id':12}  {'state':8} {'role':7} {'dataset':12} {'arch':16} {'regime':18} {'seed':>4}  "
               f"{'lr':>8}  p1")
    rows = [("tune", s) for s in plan.tuning] + [("report", s) for s in plan.reported]
    for role, spec in rows:
        state = store.state(spec.run_id)
        stored = p1_stored(spec, store, device_type)
        p1 = ("pretrained" if spec.model.get("weights") else "-") if stored is None else (
            "stored" if stored else "to train")
        click.echo(f"{spec.run_id:12}  {state:8} {role:7} {spec.dataset:12} {spec.arch:16} {spec.regime:18} "
                   f"{spec.seed:4}  {spec.own_phase_train['lr']:8.4g}  {p1}")
        if state == FAILED:
            click.echo(f"{'':14}error: {store.error(spec.run_id)}")
    for spec in plan.awaiting:
        click.echo(f"{'(tuning)':12}  {'awaiting':8} {'report':7} {spec.dataset:12} {spec.arch:16} "
                   f"{spec.regime:18} {spec.seed:4}  {'?':>8}  lr chosen once the cell's tuning runs are done")
    for reason in plan.untunable.values():
        click.echo(f"not runnable: {reason}")
    specs = [s for _, s in rows]
    counts = {s: sum(store.state(x.run_id) == s for x in specs) for s in ("done", "failed", "pending")}
    click.echo(f"{len(specs)} runs ({len(plan.tuning)} tuning): " + ", ".join(f"{n} {s}" for s, n in counts.items())
               + (f"; {len(plan.awaiting)} reported runs await their cell's tuning" if plan.awaiting else "")
               + (f"; {len(plan.expected)} more tuning runs in later successive-halving stages (which candidates "
                  f"go on is known once a stage is done)" if plan.expected else ""))
    context = click.get_current_context(silent=True)          # the grid's name, for the calibration command
    grid_name = context.params.get("grid_name") if context else None
    calibration = cost_model.choose_calibration(cost_model.read_calibration(), device_type, run_threads=run_threads)
    costs = cost_model.estimate(rows[:len(plan.tuning)] + [("tune", s) for s in plan.expected] + rows[len(plan.tuning):]
                                + [("report", s) for s in plan.awaiting], calibration, device_type=device_type,
                                done=lambda s: store.state(s.run_id) == DONE,
                                p1_done=lambda s: bool(p1_stored(s, store, device_type)), analyses=analyses)
    for line in cost_model.format_estimate(costs, grid_name, device_type, jobs):
        click.echo(line)


@main.command(name="list", short_help="List registered regimes, architectures, datasets or grids.")
@click.argument("what", type=click.Choice(["regimes", "archs", "datasets", "grids"]), default="regimes")
def list_(what):
    """List registered regimes (with hyperparameters), architectures, datasets or grids."""
    if what == "regimes":
        from regimes.registry import OBJECTIVES, SCHEDULES, objective_names, schedule_names
        click.echo("Schedules (a regime is SCHEDULE or SCHEDULE+OBJECTIVE):")
        for name in schedule_names():
            click.echo(f"  {name:10} {SCHEDULES[name].description}")
        click.echo("Objectives:")
        for name in objective_names():
            cls = OBJECTIVES[name]
            label = "  [reconstructed]" if cls.reconstructed else ""
            click.echo(f"  {name:10} {cls.description}{label}\n  {'':10} source: {cls.source}")
            for key, declared in cls.hparams.items():
                click.echo(f"  {'':10} {name}.{key} = {declared.default!r} ({declared.allowed}): {declared.meaning}")
    elif what == "archs":
        from benchmark.models import arch_table
        for row in arch_table():
            click.echo(f"  {row['name']:18} {row['source']:12} {row['description']}")
    elif what == "datasets":
        from benchmark.data import dataset_table
        for row in dataset_table():
            classes = "classes" if row["task"] == "classification" else "per-pixel classes"
            click.echo(f"  {row['name']:14} {row['kind']:7} {row['classes']:>4} {classes}  {row['source']:28} "
                       f"{row['description']}")
    else:
        from benchmark.grid import load_grid, grid_names
        for name in grid_names():
            grid = load_grid(name, check_models=False)     # listing only: `bench run` checks the models
            click.echo(f"  {name:8} {len(grid.specs):4} runs  {grid.description}")


@main.command(short_help="Show one run: spec, state, per-exit results and summary.")
@click.argument("run_id")
@click.option("--results", type=click.Path(path_type=Path), default=None, callback=_results_folder,
              help="Results folder to look in [default: every results/<grid>].")
def show(run_id, results):
    """Show a run's spec, state, per-exit results and summary (rounded; the files keep raw numbers)."""
    import json

    import pandas as pd

    from benchmark.store import DONE, FAILED, ResultsStore, read_csv, read_json
    roots = [results] if results else sorted(p for p in Path("results").glob("*") if p.is_dir())
    for root in roots:
        store = ResultsStore(root)
        folder = store.run_dir(run_id)
        if not folder.is_dir():
            continue
        state = store.state(run_id)
        click.echo(f"run {run_id} in {root}: {state}")
        for line in store.problems([run_id]):
            click.echo(f"warning: {line}")
        if (folder / "spec.json").is_file():
            click.echo(json.dumps(read_json(folder / "spec.json"), indent=2, sort_keys=True))
        if state == FAILED:
            click.echo(f"error: {store.error(run_id)}")
        if state == DONE:
            metrics = read_json(folder / "metrics.json")
            if metrics.get("stop_after") is not None:
                click.echo(f"a tuning rung: stopped after epoch {metrics['stop_after']} (checkpoint.pt), validation only")
            else:
                with pd.option_context("display.width", 120, "display.max_columns", 20):
                    click.echo(read_csv(folder / "exits.csv").drop(columns="run_id").to_string(
                        index=False, float_format=_rounded))
            for key, value in metrics["summary"].items():
                click.echo(f"  {key:22} {_rounded(value)}")
            click.echo(f"  {'train_wall_seconds':22} {metrics['cost']['wall_seconds']:.2f}")
        return
    for root in roots:
        if _show_committed_row(run_id, root):
            return
    where = results or "results/*"
    raise UserError(f"no run '{run_id}' in {where}; `bench run --grid NAME --dry-run` lists run ids")


def _show_committed_row(run_id: str, root: Path) -> bool:
    """A run listed in a committed runs.csv whose folder is not here (run folders are not in git): its numbers
    from the table, and what to run to get the folder. False if `root`'s runs.csv does not list it."""
    import pandas as pd

    from benchmark.store import read_csv
    table = root / "tables" / "runs.csv"
    if not table.is_file():
        return False
    runs = read_csv(table)
    row = runs[runs["run_id"] == run_id]
    if row.empty:
        return False
    run = row.iloc[0]
    click.echo(f"run {run_id}: {run['regime']} on {run['dataset']}/{run['arch']}, seed {run['seed']}, "
               f"{run['status']} — listed in {table}, but its folder is not in {root / 'runs'} (run folders are not "
               f"in git; the numbers below are the table's)")
    for key in ("final_accuracy", "auc_normalised", "accuracy_at_25pct", "accuracy_at_50pct", "accuracy_at_75pct",
                "accuracy_at_100pct", "val_auc_normalised", "train_wall_seconds", "git_commit", "protocol"):
        if key in run.index and pd.notna(run[key]):
            click.echo(f"  {key:22} {_rounded(run[key])}")
    click.echo(f"to get its folder (exits, curves, logits): `bench run --grid {root.name} --results {root}` trains "
               f"the grid's runs; a run trained under another protocol version gets a new id")
    return True


def _rounded(value) -> str:
    """Four decimals for fractions, four significant digits for counts like FLOPs."""
    if not isinstance(value, float):
        return str(value)
    return f"{value:.4f}" if abs(value) < 1000 else f"{value:.4g}"


@main.command(short_help="Rerun a grid into a temporary folder and compare it with its golden table.")
@click.option("--grid", "grid_name", default="smoke", show_default=True,
              help="Registered grid name or path to a grid .toml file.")
@click.option("--update", is_flag=True,
              help="Rewrite the golden table from this rerun (tolerances from perturbed reruns) and print what changed.")
@click.option("--golden", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Golden table [default: results/<grid>/golden.csv].")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA_ROOT,
              show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Torch threads of the rerun (the thread count changes the numbers: keep the table's).")
def check(grid_name, update, golden, data_root, threads):
    """Retrain the grid's runs on the CPU in a temporary folder (results/ is never touched) and compare their
    metrics with the golden table (key, metric, expected, tolerance): a value outside its tolerance either way,
    a missing row or an unexpected one fails. Exits 0 when every row is within tolerance, 1 on differences, 2 on a
    user error (no golden table: create it with --update).

    --update rewrites the table: expected values from this rerun, each row's tolerance measured from reruns under
    other thread counts and instruction sets (benchmark/check.py; BENCHMARK.md, "Reproducibility")."""
    from benchmark.check import check as run_check
    sys.exit(run_check(grid_name, update=update, golden=golden, data_root=data_root, threads=threads,
                       echo=click.echo))


@main.command(short_help="Time real early exit per operating point beside the speed-up its FLOPs predict.")
@click.argument("run_id", required=False)
@click.option("--grid", "grid_name", default=None,
              help="Measure every done run of this grid (name or .toml) that has a model.pt; also writes "
                   "tables/latency.csv.")
@click.option("--results", type=click.Path(path_type=Path), default=None, callback=_results_folder,
              help="Results folder [default: results/<grid>; for RUN_ID, every results/<grid>].")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA_ROOT,
              show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True, help="Torch threads.")
@click.option("--repeats", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed passes per operating point (the median is reported).")
@click.option("--samples", type=click.IntRange(min=1), default=200, show_default=True,
              help="Test samples timed one by one (batch size 1).")
@click.option("--batch-size", type=click.IntRange(min=1), default=256, show_default=True,
              help="Batch size of the batched variant (the whole test split; finished rows are dropped).")
def latency(run_id, grid_name, results, data_root, device, threads, repeats, samples, batch_size):
    """Run the trained model with early exit that really stops (batch size 1, and batched with finished samples
    dropped) at the baseline (the backbone alone), every internal exit alone and each operating point validation
    selected, and time it beside the speed-up its FLOPs predict: runs/<id>/latency.csv (with --grid also
    tables/latency.csv). Needs the run's model.pt (`bench run --save-models`)."""
    from benchmark.determinism import resolve_device
    from benchmark.latency import find_run, latency_summary, measurable_spec, measure_grid, measure_run

    if bool(run_id) == bool(grid_name):
        raise UserError("give either a RUN_ID or --grid NAME (`bench latency --help`)")
    settings = dict(data_root=data_root, device=resolve_device(device), threads=threads, repeats=repeats,
                    samples=samples, batch_size=batch_size)
    if run_id:
        roots = [results] if results else sorted(p for p in Path("results").glob("*") if p.is_dir())
        store = find_run(run_id, roots)
        spec = measurable_spec(store, run_id)
        with store.lock():
            table = measure_run(spec, store, **settings)
        click.echo(latency_summary(table))
        click.echo(f"latency of run {run_id}: {len(table)} rows in {store.run_dir(run_id) / 'latency.csv'}")
        return
    from benchmark.grid import load_grid
    from benchmark.store import ResultsStore
    from benchmark.tuning import make_plan
    grid = load_grid(grid_name, data_root)
    store = ResultsStore(results or Path("results") / grid.name)
    specs = make_plan(grid.specs, grid.tuning, store).reported
    with store.lock():
        table, skipped = measure_grid(specs, store, **settings)
    no_model = sum("no model.pt" in reason for reason in skipped.values())
    why = f"{no_model} have no model.pt, {len(skipped) - no_model} are not done, failed or damaged"
    if table.empty:
        raise UserError(f"none of the {len(specs)} reported runs of grid '{grid.name}' in {store.root} could be "
                        f"measured ({why}); train them with `bench run --grid {grid_name} --save-models`")
    for reason in skipped.values():
        click.echo(f"  skipped: {reason}", err=True)
    click.echo(latency_summary(table))
    click.echo(f"latency of grid {grid.name}: {table.run_id.nunique()} runs measured, {len(skipped)} skipped"
               + (f" ({why}: rerun them with `bench run --save-models`)" if skipped else "")
               + f"; {store.tables_dir / 'latency.csv'}")


@main.command(name="budget-sweep", short_help="Train joint at E/2, E and 2E epochs per cell: is each budget converged?")
@click.option("--grid", "grid_name", default="quick", show_default=True,
              help="Registered grid name or path to a grid .toml file.")
@click.option("--only", multiple=True, metavar="KEY=GLOB",
              help="Sweep the cells and seeds of the runs whose KEY matches GLOB, as `bench run --only`; repeatable.")
@click.option("--seeds", multiple=True, type=int, metavar="SEED",
              help="A seed to sweep (of the grid's); repeatable: --seeds 0 --seeds 1 [default: the grid's seeds].")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Sweep at this lr instead of the grid's [train] lr (writes tables/budget_sweep_lr<LR>.csv).")
@click.option("--executor", type=click.Choice(["auto", "local", "process"]), default="auto", show_default=True,
              help="auto: process with --jobs workers, local when that is one; local: one run after another; "
                   "process: --jobs worker processes.")
@click.option("--jobs", type=click.IntRange(min=1), default=None,
              help="Runs at a time for --executor auto and process [default: on the CPU one per --threads cores "
                   "(one per core), on a GPU 1].")
@click.option("--results", type=click.Path(path_type=Path), default=None, callback=_results_folder,
              help="Results folder [default: results/<grid>].")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA_ROOT,
              show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads per run [default: the cores split between --jobs; 1 with the default --jobs on "
                   "the CPU].")
def budget_sweep(grid_name, only, seeds, lr, executor, jobs, results, data_root, threads):
    """Is each cell's epoch budget E enough? Train `joint` in every (dataset, arch) cell of the grid, at the grid's
    seeds and [train] lr (or --seeds, --lr), at E/2, E and 2E epochs — ordinary runs of the grid's results folder,
    so they are cached — and write tables/budget_sweep.csv: the seed-mean final-exit validation accuracy per budget
    and whether E has plateaued (at most 0.5 points gained from E to 2E, on a validation split that can show 0.5
    points). Test data is never read. Python: `benchmark.budget_sweep`.

    Exits 1 when a run failed, 130 when interrupted (rerun the same command to resume: finished runs are kept)."""
    from benchmark.budget_sweep import sweep_specs, sweep_table, table_path
    from benchmark.determinism import resolve_device
    from benchmark.grid import load_grid
    from benchmark.runner import run_grid
    from benchmark.store import ResultsStore, write_csv
    from benchmark.weights import stage as stage_weights
    from benchmark.worker_start import resolve_executor

    grid = load_grid(grid_name, data_root)
    specs = _selected(grid, only)
    missing = sorted(set(seeds) - {s.seed for s in specs})
    if missing:
        raise UserError(f"--seeds {' '.join(map(str, missing))}: not among the seeds of grid '{grid.name}' "
                        f"({', '.join(map(str, sorted({s.seed for s in specs})))})")
    runs = sweep_specs(specs, list(seeds) or None, lr)
    store = ResultsStore(results or Path("results") / grid.name)
    executor, jobs = resolve_executor(executor, jobs, threads, resolve_device("auto").type)
    with store.lock():
        stage_weights(store.root, grid.weights)
        outcome = run_grid([spec for _, spec in runs], store, grid_name=grid.name, data_root=data_root,
                           executor=executor, jobs=jobs, threads=threads, desc=f"budget sweep {grid.name}",
                           write_tables=lambda: None)
        if outcome.interrupted:
            raise KeyboardInterrupt
        for run_id, message in outcome.failed.items():
            click.echo(f"  failed {run_id}: {message}", err=True)
        table = sweep_table(runs, store)
        write_csv(table_path(store, lr), table)
    click.echo(table.to_string(index=False))
    click.echo(f"budget sweep of grid {grid.name}: {len(outcome.done)} trained, {len(outcome.skipped)} already done, "
               f"{len(outcome.failed)} failed; {table_path(store, lr)}")
    if outcome.failed:
        sys.exit(1)


@main.command(short_help="Training images/s of the trainer against a plain DataLoader loop and an in-memory loop.")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--arch", default="small_cnn", show_default=True, help="Registered arch (`bench list archs`).")
@click.option("--dataset", default="mnist5k", show_default=True,
              help="Registered dataset (`bench list datasets`), or synthetic-cifar: random 8-bit 3x32x32 images held "
                   "as CIFAR is, to measure throughput without CIFAR's files.")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_DATA_ROOT,
              show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=3, show_default=True, help="Epochs per timed repeat.")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed repeats; the median is reported.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True,
              help="Where to train.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch threads [default: torch's own, all cores unless OMP_NUM_THREADS says otherwise].")
@click.option("--workers", type=click.IntRange(min=0), default=min(8, os.cpu_count() or 1), show_default=True,
              help="DataLoader worker processes of the plain loop.")
@click.option("--objectives", is_flag=True,
              help="Instead: the cost per step of the objectives NAME... (every registered one if none is named) "
                   "relative to uniform, beside each one's arithmetic minimum.")
def perf(names, arch, dataset, data_root, epochs, repeats, device, threads, workers, objectives):
    """Training throughput of exitbench's trainer against the plain PyTorch loop a researcher would write, on the
    same model, data and batch size: a torchvision DataLoader loop with per-sample transforms (--workers processes,
    float32), the minimal in-memory loop over the data as exitbench holds it (with its precision and layout: what is
    left is the trainer's own overhead), and the trainer itself (its validation pass reported apart). Goals: the
    trainer at most 2 % slower per step than the in-memory loop; on a GPU at least 2x the DataLoader loop for CIFAR
    ResNet-18 (`--arch resnet18 --dataset synthetic-cifar --device cuda`).

    With --objectives: each objective's P2 (and P3) step time relative to uniform, its arithmetic minimum (the FLOPs
    its procedure cannot do without) relative to uniform's, and measured / minimum. Python: `benchmark.perf`;
    BENCHMARK.md, "Training throughput"."""
    import torch

    from benchmark.data import load_dataset
    from benchmark.determinism import configure, resolve_device
    from benchmark.perf import compare_loops, objective_costs, synthetic_cifar
    from regimes.registry import objective_names

    if names and not objectives:
        raise UserError(f"objective names ({' '.join(names)}) are for --objectives: `bench perf --objectives "
                        f"{' '.join(names)}`")
    unknown = sorted(set(names) - set(objective_names()))
    if unknown:
        raise UserError(f"unknown objective(s) {', '.join(unknown)}; registered: {', '.join(objective_names())}")
    device = resolve_device(device)
    threads = threads or torch.get_num_threads()
    configure(device, threads)
    data = synthetic_cifar() if dataset == "synthetic-cifar" else load_dataset(dataset, data_root)
    data = data.to(device)
    if objectives:
        objective_costs(arch, data, epochs, repeats, device, list(names), echo=click.echo)
    elif not compare_loops(arch, data, epochs, repeats, device, threads, workers, echo=click.echo):
        sys.exit(1)


@main.command(short_help="Measure seconds per training step of a grid's cells: the cost estimate's calibration.")
@click.option("--grid", "grid_name", default="full", show_default=True,
              help="Registered grid name or path to a grid .toml file.")
@click.option("--only", multiple=True, metavar="KEY=GLOB",
              help="Calibrate (or estimate) only the runs whose KEY matches GLOB, as `bench run --only`; repeatable.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="The device to calibrate: the one the grid will run on.")
@click.option("--threads", type=click.IntRange(min=1), default=1, show_default=True,
              help="Torch threads (CPU calibration).")
@click.option("--warmup", type=click.IntRange(min=0), default=None,
              help="Untimed steps first [default: cuda 5, cpu 1].")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help="Timed steps, the median taken [default: cuda 20, cpu 2].")
@click.option("--memory-fraction", type=click.FloatRange(min=0, min_open=True), default=0.5, show_default=True,
              help="CPU: skip cells whose step would need more than this share of the available memory.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Calibration file the measured rows are merged into (and --estimate reads) [default: "
                   "benchmark/cost_calibration.csv, or $EXITBENCH_COST_CALIBRATION].")
@click.option("--estimate", is_flag=True,
              help="Measure nothing: print the grid's estimated cost from the calibration file, as `bench run "
                   "--dry-run` prints it under its run listing.")
def calibrate(grid_name, only, device, threads, warmup, steps, memory_fraction, output, estimate):
    """Measure the seconds of one `joint` training step of every (arch, input shape, batch size, optimizer) of the
    grid — a random batch at the grid's batch size, as the trainer runs it on this device, the median of --steps
    timed steps after --warmup — and merge the rows into the calibration file, which the cost estimate of
    `bench run --dry-run` reads (benchmark/cost_model.py). On the CPU a cell whose step would not fit in memory is
    skipped and named. Run it on the GPU the grid will run on (`--device cuda`) and commit the rows it adds."""
    from benchmark import cost_model
    from benchmark.determinism import resolve_device
    from benchmark.grid import load_grid

    grid = load_grid(grid_name, check_models=False)
    specs = _selected(grid, only)
    device_type = resolve_device(device).type
    if estimate:
        for line in cost_model.grid_estimate(grid, specs, grid_name, device_type, output):
            click.echo(line)
        return
    cuda, path = device_type == "cuda", output or cost_model.calibration_path()
    rows = cost_model.calibrate(specs, device_type, threads=threads,
                                warmup=(5 if cuda else 1) if warmup is None else warmup,
                                steps=steps or (20 if cuda else 2), memory_fraction=memory_fraction, output=path,
                                echo=click.echo)
    click.echo(f"calibration of grid {grid.name} on {device_type}: {len(rows)} rows merged into {path}")


def entry() -> None:
    """The `bench` command (the console script, `python -m benchmark.cli`): `main`, its process ending without the
    interpreter's teardown (benchmark/quick_exit.py)."""
    from benchmark.quick_exit import without_teardown
    without_teardown(main)         # click's standalone mode ends in SystemExit, on success too


if __name__ == "__main__":
    entry()
