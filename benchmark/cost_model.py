"""Estimated device-hours of a grid's runs: a per-arch cost model calibrated by measured training steps.

    bench calibrate --grid full --device cuda                       # on the GPU the grid will run on
    bench calibrate --grid full --device cpu --threads 1 --steps 2
    bench calibrate --grid full --estimate                          # the estimate alone (no run listing)

`bench run --grid GRID --dry-run` prints the same estimate under its run listing.

**Model.** A run costs, in seconds, the sum over its phases of

    steps x s(arch, input shape, batch size, device) x m(phase)

plus its evaluation, where
- steps = phase epochs x (training examples // batch size): the trainer's count (it drops the ragged last batch);
- s is the **calibration**: the measured seconds of one `joint` training step of the cell's model — a random batch
  of the grid's batch size at the dataset's input shape, forward through every exit, mean cross-entropy, backward,
  the cell's optimizer step; bf16 autocast and channels-last on CUDA as in the trainer — the median of a few timed
  steps after warm-up, written by `bench calibrate` to benchmark/cost_calibration.csv (device name, arch, input shape,
  batch size, seconds per step, torch version, date). Data indexing and augmentation (one gather on the device)
  are not in it;
- m is the phase's **training FLOPs per step relative to a joint (uniform) step** (`STEP_MULTIPLIERS`), derived from
  the protocol-5 quick grid's runs (results/step_costs/quick_protocol5_runs.csv: train_flops / train_examples_seen per regime, seed-mean,
  averaged over quick's two archs; `derive_multipliers` recomputes them): the P1 step and the P3 (heads only) step
  from the two-phase schedules (mixed = P1 and P2 halves, disjoint = P1 and P3 halves), every objective's P2 step
  from joint+objective (an objective's last phases taken out). Objectives quick does not cover count 1 and are
  named. FLOPs are device independent; wall time need not follow them (on quick's CPU runs l2w took 6.5x joint's
  wall time for 4.3x its FLOPs);
- the shared P1 of the disjoint/mixed runs of one (dataset, arch, seed, P1 budget, training settings) is trained
  once (`RunSpec.p1_id`): it is counted once, with the first run that needs it;
- evaluation: a forward pass is taken as a third of a training step per example — the validation split every
  `eval_every` epochs and at the end of every phase, and the final validation and test logits.

Training FLOPs (device independent) are printed beside: a joint step's FLOPs per example, counted on a meta-device
copy of the cell's model under `flops.counting_flops` as the trainer counts its first step (it matches
the step-cost runs' train_flops exactly), x m x steps x batch size. That counter corrects PyTorch's charge for a grouped
(depthwise) convolution's backward, which ignores `groups` (MobileNetV2's step read 3.9 GFLOPs per example at 32 px
for a 0.18 GFLOPs forward before the correction).

A CPU calibration skips a cell whose step would need more than `--memory-fraction` of the available memory
(`activation_bytes`) and says so: on a small machine ResNet-50 and MobileNetV2 at 64 px stay uncalibrated.
"""
from __future__ import annotations

import csv
import datetime
import functools
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from benchmark.spec import RunSpec

CALIBRATION_FILE = Path(__file__).parent / "cost_calibration.csv"
CALIBRATION_ENV = "EXITBENCH_COST_CALIBRATION"
"""A path here replaces CALIBRATION_FILE (tests; a calibration kept outside the repository)."""
CALIBRATION_COLUMNS = ["device_type", "device_name", "arch", "input_shape", "num_classes", "batch_size", "optimizer",
                       "head", "exits", "threads", "warmup_steps", "timed_steps", "seconds_per_step",
                       "step_flops_per_example", "torch", "date"]
STEP_COST_RUNS = Path(__file__).resolve().parents[1] / "results" / "step_costs" / "quick_protocol5_runs.csv"
"""The runs the multipliers below come from: the protocol-5 quick grid, 15 regimes on two archs (results/step_costs)."""

STEP_MULTIPLIERS: dict[str, float] = {
    "backbone": 0.989,     # P1: the backbone and its classifier, no heads
    "heads": 0.341,        # P3 (uniform): forward through the frozen backbone, forward and backward of the heads
    "uniform": 1.0,        # P2 of every objective below: backbone and heads together
    "sdn": 1.0,
    "distill": 1.0,
    "ge": 1.0,
    "bdl": 0.985,
    "cet": 2.0,            # a second forward and backward on the perturbed input
    "l2w": 4.343,          # the meta step: pseudo-step, double backward, two real steps
    "boosted": 1.0,
    "ztw": 1.0,            # its P2 step; the ensemble phase is charged as "heads" (`phase_multiplier`)
    "pcgrad": 1.945,       # one backward per exit, through that exit's head and the blocks before it
    "cagrad": 1.951,
    "nash": 1.951,
    "metagf": 2.94,        # pcgrad's backwards, plus the look-ahead forward and its backward to the meta-weights
}
"""Training FLOPs per step relative to a joint (uniform) step, from STEP_COST_RUNS
(`derive_multipliers`; rounded to 3 decimals). A P3 step of objective X counts heads x X."""

EVAL_FRACTION = 1 / 3
RUN_OVERHEAD_SECONDS = 1.0
"""Per run, beside its steps and evaluation passes: building the model, counting its FLOPs, evaluating every policy
from the logits and writing the run's files (measured on the quick grid: BENCHMARK.md, "Tuning")."""
ANALYSIS_EXAMPLES = 60_000
"""The per-run analyses (rank, information plane, loss-landscape slices, robustness under corruption) in example
forwards of the run's model: about what quick's analyses cost per reported run in units of its evaluation forward
(BENCHMARK.md, "Tuning"), so that a grid's estimate includes them on any calibrated device."""
"""A forward pass per example, as a fraction of a training step per example (forward + backward ~ 3 forwards)."""

# Official (train, test) sizes and input shapes of the standard datasets, for estimating without their files; the
# validation split is carved from train as benchmark.data does (scikit-learn rounds the held-out count up).
STANDARD_DATASETS: dict[str, tuple[int, int, tuple[int, ...]]] = {
    "cifar10": (50_000, 10_000, (3, 32, 32)),
    "cifar100": (50_000, 10_000, (3, 32, 32)),
    "tinyimagenet": (100_000, 10_000, (3, 64, 64)),
    "svhn": (73_257, 26_032, (3, 32, 32)),
    "mnist": (60_000, 10_000, (1, 28, 28)),
    "fashion_mnist": (60_000, 10_000, (1, 28, 28)),
    "kmnist": (60_000, 10_000, (1, 28, 28)),
    "uci_har": (7_352, 2_947, (9, 128)),
}


# --------------------------------------------------------------------------------------------------------------
# Multipliers


def derive_multipliers(runs_csv: Path = STEP_COST_RUNS) -> dict[str, float]:
    """`STEP_MULTIPLIERS` recomputed from a runs.csv holding joint, disjoint, mixed and joint+X runs with the P1
    taking half the budget: per arch, seed-mean FLOPs per example seen relative to joint's, then the mean over archs.
    An objective's last phases (ztw's ensemble epochs) are taken out of joint+X's mean at the ratio `estimate`
    charges them (`phase_multiplier`), so that the estimate charges the run what it measured."""
    from benchmark.store import read_csv
    from regimes.registry import build_regime

    runs = read_csv(runs_csv)
    runs = runs[runs.status == "done"] if "status" in runs else runs
    per_example = (runs.train_flops / runs.train_examples_seen).groupby([runs.arch, runs.regime]).mean().unstack(0)
    budget = runs.groupby([runs.arch, runs.regime]).epochs.first().unstack(0)
    joint = per_example.loc["joint"]
    p1 = 2 * per_example.loc["mixed"] - joint                  # mixed: E/2 of P1, E/2 of joint's step
    ratios = {"backbone": p1 / joint, "heads": (2 * per_example.loc["disjoint"] - p1) / joint, "uniform": joint / joint}
    for regime in per_example.index:
        if regime.startswith("joint+"):
            ratio = per_example.loc[regime] / joint
            objective = build_regime(regime).objective
            last = objective.final_phases()
            if last:       # every epoch sees the training set once: the last phases' share of the examples seen
                epochs = sum(p.epochs for p in last)
                share = epochs / (budget.loc[regime] + epochs)
                charged = sum(p.epochs * phase_multiplier(p.trains, objective.name)[0] for p in last) / epochs
                ratio = (ratio - share * charged) / (1 - share)
            ratios[regime.removeprefix("joint+")] = ratio
    return {name: round(float(ratio.mean()), 3) for name, ratio in ratios.items()}


def phase_multiplier(trains: str, objective: str) -> tuple[float, bool]:
    """(m, known) of a phase that trains `trains` ("backbone", "all", "heads", "combiner") under `objective`;
    unknown: m = 1. A `combiner` phase (ztw's ensembles: a frozen network's forward, a backward through the
    combiner alone) is charged P3's ratio, which also backpropagates through the heads: an upper bound."""
    if trains == "backbone":
        return STEP_MULTIPLIERS["backbone"], True
    if trains == "combiner":
        return STEP_MULTIPLIERS["heads"], True
    known = objective in STEP_MULTIPLIERS
    m = STEP_MULTIPLIERS.get(objective, 1.0)
    return (STEP_MULTIPLIERS["heads"] * m if trains == "heads" else m), known


# --------------------------------------------------------------------------------------------------------------
# Dataset geometry and step FLOPs


@dataclass(frozen=True)
class Geometry:
    n_train: int
    n_val: int
    n_test: int
    input_shape: tuple[int, ...]
    num_classes: int


def geometry_of(data) -> Geometry:
    return Geometry(len(data.y_train), len(data.y_val), len(data.y_test), tuple(data.input_shape), data.num_classes)


def dataset_geometry(name: str) -> Geometry | None:
    """Split sizes and input shape of a dataset: from its loaded copy if one is loaded (or it is embedded and loads
    without files), else from its official sizes (`STANDARD_DATASETS`); None if neither is known."""
    from benchmark import data
    from benchmark.data import registry
    from benchmark.data.build import VALIDATION_FRACTION
    from benchmark.errors import DataUnavailable

    loaded = next((d for key, d in registry._CACHE.items() if key[0] == name), None)
    if loaded is not None:
        return geometry_of(loaded)
    classes = {row["name"]: row["classes"] for row in data.dataset_table()}
    if name in STANDARD_DATASETS:
        train, test, shape = STANDARD_DATASETS[name]
        val = math.ceil(train * VALIDATION_FRACTION)
        return Geometry(train - val, val, test, shape, classes[name])
    if name in classes and registry._REGISTRY[name].embedded:
        try:
            return geometry_of(data.load_dataset(name, "."))
        except DataUnavailable:
            return None
    return None


@functools.cache
def step_flops_per_example(arch: str, num_classes: int, input_shape: tuple[int, ...], head: str,
                           exits: str | tuple[int, ...]) -> float | None:
    """Training FLOPs per example of one joint (uniform) step of the model, counted on a meta-device copy as the
    trainer counts its first step (forward through every exit, loss, backward; the optimizer counts none)."""
    import torch

    from benchmark.flops import counting_flops, without_batch_norm
    from benchmark.models import build_model
    from regimes.base import StepContext
    from regimes.registry import build_regime

    batch = 2                                 # counted per example: the total over the batch, divided by it
    try:
        with torch.random.fork_rng(), torch.device("meta"):
            model = without_batch_norm(build_model(arch, num_classes, input_shape, head=head,
                                                   exits=list(exits) if isinstance(exits, tuple) else exits))
        model.train()
        x = torch.zeros(batch, *input_shape, device="meta")
        y = torch.zeros(batch, dtype=torch.long, device="meta")
        ctx = StepContext(phase="P2", epoch=0, epochs=1, step=0, num_exits=model.num_exits,
                          generator=torch.Generator().manual_seed(0), data_kind="image" if len(input_shape) == 3
                          else "series")
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        with counting_flops() as counter:
            build_regime("joint").objective.step(model, x, y, optimizer, ctx)
    except Exception:                         # noqa: BLE001 — an estimate without FLOPs is still an estimate
        return None
    return float(counter.get_total_flops()) / batch


# --------------------------------------------------------------------------------------------------------------
# Calibration file


def shape_text(shape: Iterable[int]) -> str:
    return "x".join(str(s) for s in shape)


def calibration_path() -> Path:
    return Path(os.environ.get(CALIBRATION_ENV) or CALIBRATION_FILE)


def read_calibration(path: Path | None = None) -> list[dict]:
    path = calibration_path() if path is None else path
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row["seconds_per_step"] = float(row["seconds_per_step"])
        row["batch_size"] = int(row["batch_size"])
    return rows


def write_calibration(rows: list[dict], path: Path) -> None:
    """Replace the rows of the same (device, arch, input shape, batch size, optimizer) and keep the others."""
    from benchmark.store import _atomic

    key = lambda r: (r["device_name"], r["arch"], r["input_shape"], int(r["batch_size"]), r["optimizer"])  # noqa: E731
    new = {key(r) for r in rows}
    kept = [r for r in read_calibration(path) if key(r) not in new]
    merged = sorted(kept + rows, key=lambda r: (r["device_type"], r["device_name"], r["arch"], r["input_shape"]))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, CALIBRATION_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(merged)
    _atomic(path, write)


def this_device_name(device_type: str) -> str:
    """What calibration rows are keyed by: the GPU's name, or the CPU model."""
    if device_type == "cuda":
        import torch
        return torch.cuda.get_device_name()
    from benchmark.determinism import cpu_environment
    return cpu_environment()["cpu_model"]


@dataclass(frozen=True)
class Calibration:
    """A device's calibration rows; `run_threads`: the torch threads `bench run` gives each run here (on a CPU, rows
    measured with that many threads are preferred, so the hours are this machine's wall-clock hours)."""
    device_type: str
    device_name: str
    rows: tuple[dict, ...]
    run_threads: int | None = None

    @property
    def unit(self) -> str:
        return "GPU-hours" if self.device_type == "cuda" else "CPU-hours"

    def seconds_per_step(self, arch: str, input_shape: tuple[int, ...], batch_size: int,
                         optimizer: str) -> float | None:
        matches = [r for r in self.rows if r["arch"] == arch and r["input_shape"] == shape_text(input_shape)
                   and r["batch_size"] == batch_size]
        matches.sort(key=lambda r: (r["optimizer"] != optimizer, str(r["threads"]) != str(self.run_threads)))
        return (matches or [{"seconds_per_step": None}])[0]["seconds_per_step"]

    def describe(self) -> str:
        first = self.rows[0]
        threads = f", {first['threads']} thread(s)" if self.device_type == "cpu" else ""
        dates = sorted({r["date"] for r in self.rows})
        return (f"{self.device_name} ({self.device_type}{threads}; torch {first['torch']}; measured "
                f"{dates[0]}{'..' + dates[-1] if len(dates) > 1 else ''})")


def choose_calibration(rows: list[dict], device_type: str, device_name: str | None = None,
                       run_threads: int | None = None) -> Calibration | None:
    """This machine's device if it is calibrated, else a calibrated CUDA device (the first by name), else None: another
    machine's CPU says nothing about this one. `run_threads`: as `Calibration`'s, on a CPU."""
    by_device: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        by_device.setdefault((row["device_type"], row["device_name"]), []).append(row)
    name = device_name if device_name is not None else this_device_name(device_type)
    gpus = sorted(d for d in by_device if d[0] == "cuda")
    choice = (device_type, name) if (device_type, name) in by_device else (gpus[0] if gpus else None)
    return None if choice is None else Calibration(choice[0], choice[1], tuple(by_device[choice]),
                                                   run_threads if choice[0] == "cpu" else None)


# --------------------------------------------------------------------------------------------------------------
# Estimate


@dataclass
class CellCost:
    dataset: str
    arch: str
    runs: int = 0
    tuning_runs: int = 0
    shared_p1: int = 0
    train_flops: float | None = 0.0
    seconds: float | None = 0.0          # None: not calibrated
    seconds_left: float | None = 0.0     # runs not done yet (and P1 backbones not stored yet)


@dataclass
class Estimate:
    calibration: Calibration | None
    cells: list[CellCost] = field(default_factory=list)
    unknown_objectives: set[str] = field(default_factory=set)
    unknown_datasets: set[str] = field(default_factory=set)

    def total(self, attribute: str) -> float | None:
        values = [getattr(c, attribute) for c in self.cells]
        return None if not values or None in values else sum(values)

    def partial_total(self, attribute: str) -> float:
        return sum(getattr(c, attribute) or 0.0 for c in self.cells)

    @property
    def uncalibrated_cells(self) -> list[CellCost]:
        return [c for c in self.cells if c.seconds is None]


def _phases(spec: RunSpec):
    from regimes.base import Budget
    from regimes.registry import build_regime
    regime = build_regime(spec.regime, spec.hparams)
    return regime.phases(Budget(spec.train["epochs"], spec.train["p1_epochs"])), regime.objective.name


def _evaluation_passes(epochs: int, eval_every: int) -> int:
    return epochs // eval_every + (1 if epochs % eval_every else 0)


def estimate(runs: Iterable[tuple[str, RunSpec]], calibration: Calibration | None, *,
             done: Callable[[RunSpec], bool] = lambda spec: False,
             p1_done: Callable[[RunSpec], bool] = lambda spec: False,
             device_type: str | None = None, analyses: bool = False) -> Estimate:
    """The cost of `runs` ((role, spec) pairs; role "tune" counts as a tuning run), per (dataset, arch) cell in the
    order first seen. `done(spec)`: the run is done (it costs nothing more); `p1_done(spec)`: its shared P1 backbone is
    stored (it costs nothing more). A tuning rung (`stop_after`) is charged the epochs since the previous rung of its
    trajectory listed before it (it resumes from that rung's checkpoint). `analyses`: each reported run is also
    charged the grid's analyses (`ANALYSIS_EXAMPLES`)."""
    result = Estimate(calibration)
    cells: dict[tuple[str, str], CellCost] = {}
    seen_p1: set[str] = set()
    trained_to: dict[str, int] = {}
    geometries: dict[str, Geometry | None] = {}
    device_type = device_type or (calibration.device_type if calibration else "cuda")
    for role, spec in runs:
        cell = cells.setdefault((spec.dataset, spec.arch), CellCost(spec.dataset, spec.arch))
        cell.runs += 1
        cell.tuning_runs += role == "tune"
        if spec.dataset not in geometries:
            geometries[spec.dataset] = dataset_geometry(spec.dataset)
        geometry = geometries[spec.dataset]
        if geometry is None:
            result.unknown_datasets.add(spec.dataset)
            cell.train_flops = cell.seconds = cell.seconds_left = None
            continue
        batch = spec.train["batch_size"]
        steps_per_epoch = max(1, geometry.n_train // batch)
        exits = tuple(spec.model["exits"]) if isinstance(spec.model["exits"], list) else spec.model["exits"]
        flops = step_flops_per_example(spec.arch, geometry.num_classes, geometry.input_shape, spec.model["head"], exits)
        step_seconds = calibration.seconds_per_step(spec.arch, geometry.input_shape, batch,
                                                    spec.train["optimizer"]) if calibration else None
        eval_seconds_per_example = None if step_seconds is None else step_seconds / batch * EVAL_FRACTION
        phases, objective = _phases(spec)
        run_done = done(spec)
        run_flops, run_seconds, left = 0.0, 0.0, 0.0
        first = trained_to.get(spec.trajectory.run_id, 0)          # a tuning rung resumes where the last stopped
        last = spec.stop_after if spec.stop_after is not None else sum(p.epochs for p in phases)
        trained_to[spec.trajectory.run_id] = last
        offset = 0
        for phase in phases:
            window = max(0, min(offset + phase.epochs, last) - max(offset, first))
            offset += phase.epochs
            if window == 0:
                continue
            if phase.trains == "backbone":
                if spec.model.get("weights") is not None:
                    continue                      # pretrained: P1 is skipped (benchmark/weights.py)
                key = spec.p1_id(phase.epochs, device_type)
                if key in seen_p1:
                    continue                      # shared: counted with the first run that needs it
                seen_p1.add(key)
                cell.shared_p1 += 1
                phase_done = p1_done(spec)
            else:
                phase_done = run_done
            m, known = phase_multiplier(phase.trains, objective)
            if not known:
                result.unknown_objectives.add(objective)
            steps = window * steps_per_epoch
            run_flops += steps * batch * m * (flops or 0.0)
            own = spec.own_phase_train if phase.trains != "backbone" else spec.train
            passes = _evaluation_passes(window, own["eval_every"])
            if step_seconds is not None:
                seconds = steps * step_seconds * m + passes * geometry.n_val * eval_seconds_per_example
                run_seconds += seconds
                left += 0.0 if phase_done else seconds
        if step_seconds is not None:
            final = (geometry.n_val + geometry.n_test * (spec.stop_after is None)) * eval_seconds_per_example
            final += RUN_OVERHEAD_SECONDS + (role == "report" and analyses) * ANALYSIS_EXAMPLES * eval_seconds_per_example
            run_seconds += final
            left += 0.0 if run_done else final
        cell.train_flops = None if flops is None or cell.train_flops is None else cell.train_flops + run_flops
        cell.seconds = None if step_seconds is None or cell.seconds is None else cell.seconds + run_seconds
        cell.seconds_left = None if step_seconds is None or cell.seconds_left is None else cell.seconds_left + left
    result.cells = list(cells.values())
    return result


def _number(value: float, thousands: str = "") -> str:
    """Three significant digits at most below 100, whole numbers above."""
    if value >= 100:
        return f"{value:{thousands}.0f}"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}" if value >= 1 else f"{value:.3f}"


def _clock(seconds: float) -> str:
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min"


def format_estimate(estimate: Estimate, grid_name: str | None, device_type: str, jobs: int | None = None) -> list[str]:
    """The lines `bench run --dry-run` prints under its run listing. `jobs`: runs at a time on this machine's CPU
    (`bench run --jobs`), for its wall time: the runs' seconds spread evenly over them (each at the calibration's
    `run_threads`); None: no wall time (Ray)."""
    grid = grid_name or "GRID"
    command = f"bench calibrate --grid {grid} --device cuda"
    calibration = estimate.calibration
    lines = []
    if calibration is None:
        lines.append(f"estimated cost: no calibration of this machine's {device_type} "
                     f"({this_device_name(device_type)}) nor of a GPU in {calibration_path()}, so device-hours are not estimated (training FLOPs are); "
                     f"calibrate this machine with `bench calibrate --grid {grid} --device {device_type}`")
        unit = "hours"
    else:
        lines.append(f"estimated cost (benchmark/cost_model.py), calibration {calibration.describe()} from "
                     f"{calibration_path().name}; steps x measured s/step x the regime's FLOPs multiplier, shared P1 "
                     f"counted once:")
        unit = calibration.unit
    hours = lambda seconds: "n/c" if seconds is None else _number(seconds / 3600)      # noqa: E731
    pflop = lambda flops: "?" if flops is None else _number(flops / 1e15, ",")         # noqa: E731
    lines.append(f"  {'dataset':12} {'arch':16} {'runs':>5} {'tuning':>6} {'P1s':>4} {'train PFLOP':>12} "
                 f"{unit:>10} {'still to run':>12}")
    for c in estimate.cells:
        lines.append(f"  {c.dataset:12} {c.arch:16} {c.runs:5} {c.tuning_runs:6} {c.shared_p1:4} "
                     f"{pflop(c.train_flops):>12} {hours(c.seconds):>10} {hours(c.seconds_left):>12}")
    runs = sum(c.runs for c in estimate.cells)
    total = estimate.total("seconds")
    total_text = hours(total) if total is not None or calibration is None else (
        f">= {_number(estimate.partial_total('seconds') / 3600)}")
    left = estimate.total("seconds_left")
    left_text = hours(left) if left is not None or calibration is None else (
        f">= {_number(estimate.partial_total('seconds_left') / 3600)}")
    lines.append(f"  {'total':29} {runs:5} {sum(c.tuning_runs for c in estimate.cells):6} "
                 f"{sum(c.shared_p1 for c in estimate.cells):4} {pflop(estimate.total('train_flops')):>12} "
                 f"{total_text:>10} {left_text:>12}")
    if calibration is not None:
        lines.append(f"total: {runs} runs, {total_text} {unit} on {calibration.device_name} "
                     f"({left_text} still to run)")
    if calibration is not None and calibration.device_type == device_type == "cpu" and left is not None and jobs:
        used = sorted({str(r["threads"]) for r in calibration.rows})
        at_a_time = f"{jobs} runs at a time" if jobs > 1 else "one run at a time"
        lines.append(f"estimated wall time on this machine: {_clock(left / jobs)} still to run ({_clock(total / jobs)} "
                     f"from empty), training, evaluation and the per-run analyses, {at_a_time} with "
                     f"{calibration.run_threads} thread(s) each as this `bench run` runs them (calibrated with "
                     f"{'/'.join(used)} thread(s))")
    missing = estimate.uncalibrated_cells
    if calibration is not None and missing:
        lines.append(f"n/c: {len(missing)} cells have no calibration row on {calibration.device_name} "
                     f"({', '.join(f'{c.dataset}/{c.arch}' for c in missing)}): the total leaves them out; "
                     f"calibrate them with `bench calibrate --grid {grid} --device {calibration.device_type}` on "
                     f"that device")
    if estimate.unknown_objectives:
        lines.append(f"note: objectives {', '.join(sorted(estimate.unknown_objectives))} have no FLOPs multiplier "
                     f"(STEP_MULTIPLIERS): counted as 1x a joint step")
    if estimate.unknown_datasets:
        lines.append(f"note: the sizes of {', '.join(sorted(estimate.unknown_datasets))} are unknown without their "
                     f"files: their cells are not estimated")
    cuda_calibrated = calibration is not None and calibration.device_type == "cuda"
    if device_type == "cuda" and calibration is not None and cuda_calibrated and \
            calibration.device_name != this_device_name("cuda"):
        lines.append(f"note: this GPU ({this_device_name('cuda')}) is not calibrated; the hours above are "
                     f"{calibration.device_name}'s: run `{command}` here for its own")
    if not cuda_calibrated:
        where = f"this GPU ({this_device_name('cuda')})" if device_type == "cuda" else "any CUDA device"
        lines.append(f"GPU-hours: not calibrated yet for {where} (no CUDA rows in {calibration_path().name}); on the "
                     f"GPU the grid will run on, run `{command}` and commit the rows it adds")
    return lines


def grid_estimate(grid, specs: list[RunSpec], grid_name: str, device_type: str,
                  calibration_file: Path | None = None) -> list[str]:
    """`format_estimate`'s lines for `specs` of `grid` without the run listing (`bench calibrate --estimate`): the
    tuning and reported runs its results/<grid> plans, from `calibration_file` [default: `calibration_path()`]."""
    from benchmark.store import ResultsStore
    from benchmark.tuning import make_plan
    from benchmark.worker_start import resolve_executor, threads_per_run
    plan = make_plan(specs, grid.tuning, ResultsStore(Path("results") / grid.name))
    runs = [("tune", s) for s in plan.tuning] + [("report", s) for s in plan.reported + plan.awaiting]
    executor, jobs = resolve_executor("auto", None, None, device_type)        # as a plain `bench run` runs them
    calibration = choose_calibration(read_calibration(calibration_file), device_type,
                                     run_threads=threads_per_run(executor, jobs, None, device_type))
    return format_estimate(estimate(runs, calibration), grid_name, device_type, jobs)


# --------------------------------------------------------------------------------------------------------------
# Calibrating


@dataclass(frozen=True)
class CalibrationCell:
    arch: str
    input_shape: tuple[int, ...]
    num_classes: int
    train: tuple                       # the cell's training settings, as sorted items
    head: str
    exits: str | tuple[int, ...]

    @property
    def batch_size(self) -> int:
        return dict(self.train)["batch_size"]


def calibration_cells(specs: Iterable[RunSpec]) -> list[CalibrationCell]:
    """One cell per (arch, input shape, batch size, optimizer) of `specs`; of datasets sharing an input shape, the
    one with the most classes (the widest heads)."""
    cells: dict[tuple, CalibrationCell] = {}
    for spec in specs:
        geometry = dataset_geometry(spec.dataset)
        if geometry is None:
            continue
        exits = tuple(spec.model["exits"]) if isinstance(spec.model["exits"], list) else spec.model["exits"]
        cell = CalibrationCell(spec.arch, geometry.input_shape, geometry.num_classes,
                               tuple(sorted(spec.train.items())), spec.model["head"], exits)
        key = (spec.arch, geometry.input_shape, spec.train["batch_size"], spec.train["optimizer"])
        if key not in cells or cells[key].num_classes < cell.num_classes:
            cells[key] = cell
    return list(cells.values())


def activation_bytes(model, input_shape: tuple[int, ...], batch_size: int) -> float:
    """Bytes one joint training step at `batch_size` needs on the CPU, to refuse one that would exhaust the
    machine's memory: 1.5 x what autograd saves for the backward (counted from a forward at batch 2, once per
    storage, weights excluded; the 1.5 covers the backward's own buffers: resnet18 and mobilenet_v2 at 32 px peaked
    at 1.1-1.4 x the saved bytes), plus four copies of the parameters (weights, gradients, optimizer state, slack)."""
    import torch
    seen, saved = {p.untyped_storage().data_ptr() for p in model.parameters()}, [0]    # weights: not per example

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            saved[0] += storage.nbytes()
        return tensor

    x = torch.zeros(2, *input_shape)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        outputs = model(x)
    del outputs
    parameters = sum(p.numel() * p.element_size() for p in model.parameters())
    return 1.5 * saved[0] / 2 * batch_size + 4 * parameters


def available_memory_bytes() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return math.inf


def measure_step(cell: CalibrationCell, device, warmup: int, steps: int) -> float:
    """Median seconds of `steps` timed joint training steps after `warmup` untimed ones, as the trainer runs them."""
    import torch
    from contextlib import nullcontext

    from benchmark.determinism import seed_everything
    from benchmark.models import arch_task, build_model
    from benchmark.train import make_optimizer
    from regimes.base import StepContext
    from regimes.registry import build_regime

    seed_everything(0)
    train = dict(cell.train)
    model = build_model(cell.arch, cell.num_classes, cell.input_shape, head=cell.head,
                        exits=list(cell.exits) if isinstance(cell.exits, tuple) else cell.exits).to(device)
    image = len(cell.input_shape) == 3
    if device.type == "cuda" and image:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = make_optimizer(list(model.parameters()), train)
    objective = build_regime("joint").objective
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(cell.batch_size, *cell.input_shape, generator=generator).to(device)
    if device.type == "cuda" and image:
        x = x.contiguous(memory_format=torch.channels_last)
    labels = (cell.batch_size, *cell.input_shape[1:]) if arch_task(cell.arch) == "segmentation" else (cell.batch_size,)
    y = torch.randint(0, cell.num_classes, labels, generator=generator).to(device)      # label maps for segmentation
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext
    ctx = StepContext(phase="P2", epoch=0, epochs=1, step=0, num_exits=model.num_exits,
                      generator=torch.Generator().manual_seed(1), data_kind="image" if image else "series")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for step in range(warmup + steps):
        sync()
        started = time.perf_counter()
        with autocast():
            out = objective.step(model, x, y, optimizer, ctx)
        out["loss"].item()                          # the trainer syncs once per epoch; a step's end is its loss
        sync()
        if step >= warmup:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def calibrate(specs: list[RunSpec], device_type: str, *, threads: int, warmup: int, steps: int,
              memory_fraction: float, output: Path, echo=print) -> list[dict]:
    """Measure every calibration cell of `specs` and merge the rows into `output`; returns the new rows."""
    import torch

    from benchmark.determinism import configure, resolve_device

    device = resolve_device(device_type)
    configure(device, threads)
    name = this_device_name(device.type)
    rows = []
    for cell in calibration_cells(specs):
        label = f"{cell.arch} at {shape_text(cell.input_shape)}, batch {cell.batch_size}"
        if device.type == "cpu":
            from benchmark.models import build_model
            with torch.random.fork_rng():
                probe = build_model(cell.arch, cell.num_classes, cell.input_shape, head=cell.head,
                                    exits=list(cell.exits) if isinstance(cell.exits, tuple) else cell.exits).train()
            needed, available = activation_bytes(probe, cell.input_shape, cell.batch_size), available_memory_bytes()
            del probe
            if needed > memory_fraction * available:
                echo(f"skipped {label}: a step needs ~{needed / 2**30:.1f} GiB, {available / 2**30:.1f} GiB is "
                     f"available (--memory-fraction {memory_fraction}); calibrate it on a machine with more memory")
                continue
        try:
            seconds = measure_step(cell, device, warmup, steps)
        except torch.cuda.OutOfMemoryError:
            echo(f"skipped {label}: out of GPU memory")
            torch.cuda.empty_cache()
            continue
        flops = step_flops_per_example(cell.arch, cell.num_classes, cell.input_shape, cell.head, cell.exits)
        row = {"device_type": device.type, "device_name": name, "arch": cell.arch,
               "input_shape": shape_text(cell.input_shape), "num_classes": cell.num_classes,
               "batch_size": cell.batch_size, "optimizer": dict(cell.train)["optimizer"], "head": cell.head,
               "exits": cell.exits if isinstance(cell.exits, str) else " ".join(map(str, cell.exits)),
               "threads": threads if device.type == "cpu" else "", "warmup_steps": warmup, "timed_steps": steps,
               "seconds_per_step": f"{seconds:.6g}",
               "step_flops_per_example": "" if flops is None else f"{flops:.6g}",
               "torch": torch.__version__, "date": datetime.date.today().isoformat()}
        rows.append(row)
        achieved = "" if flops is None else f", {flops * cell.batch_size / seconds / 1e12:.3g} TFLOP/s"
        echo(f"{label}: {seconds:.4g} s/step{achieved}")
        write_calibration([row], output)            # row by row: an interrupted calibration keeps what it measured
    return rows
