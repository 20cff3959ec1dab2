"""`bench latency`: real early exit at inference, timed per operating point beside the speed-up its FLOPs predict.

Every other number of the suite is computed from stored logits, where "a sample leaves at exit k" is bookkeeping:
the cost of leaving is counted in FLOPs, never spent. Here the trained model (runs/<id>/model.pt) runs an
early-exit forward that really stops: blocks in order, and at each internal exit that can be left the head, its
confidence, and the decision; a sample that leaves runs nothing after that head.

- **The exit rule is evaluate.py's**, for the same operating point: the score and prediction of the point's policy
  rule by `evaluate.exit_scores` (float64, from the float32 logits the heads return; the max softmax, entropy,
  patience or the exits' ensemble), leave at the first exit whose score is >= its threshold (ties leave, as in
  `evaluate.exit_decisions`); the last exit takes the rest. The thresholds are rebuilt by the function that built
  them, `evaluate.policy_thresholds` (`budgeted`'s fit on the stored *validation* logits; `exit` k opens exit k
  only). The forward runs float32 without TF32 or autocast, as `collect_logits`
  did when the logits were stored. What the forward decides is compared with `exit_decisions` on the stored test
  logits, sample by sample; logits computed at another batch size can differ in the last bits, so a sample whose
  score sits on a threshold may go the other way: the disagreements are counted, never hidden.
- **Operating points**: the ones validation selected (`selected.csv`, the budgets at_25/50/75/100pct, selected by
  `evaluate.preference_order` when the run was evaluated; one measurement per distinct point, one row per budget
  that chose it), every internal exit alone (`exit_k`: data-independent early exit), and the baseline.
- **The baseline is the backbone alone** (`MultiExitNet.forward_final`: every block and the classifier, no head),
  what one deploys without early exit and the 100 % of every FLOPs budget. An early-exit point pays for everything it
  runs: each head it evaluates, the confidence and the decision (a host round trip per open exit), dropping finished
  rows. A closed exit (threshold +inf: nobody can leave there, e.g. a budgeted share of 0 or the exits before a fixed
  exit) is not evaluated, so the forward can run fewer FLOPs than evaluate's accounting charges (every head up to the
  exit); `flops` is what the forward runs, `evaluated_flops` what evaluate charged.
- **Two regimes of inference.** Batch size 1: each of the first `samples` test samples alone, truly stopping.
  Batched: the whole test split in batches of `batch_size`; at each open exit the rows that leave are dropped
  (`index_select` of the rest) before the next block. Points are timed interleaved (every point once per repeat) so
  a change of machine load hits them alike; the median over repeats is reported, after one warm-up pass per point.

latency.csv (one row per run x operating point; raw numbers): `predicted_speedup` = backbone FLOPs / `flops`
(mean per test sample, from the stored decisions), `predicted_speedup_bs1` the same on the timed samples;
`latency_bs1_ms` (mean per sample, median over repeats) and `measured_speedup_bs1` = the baseline's / the point's;
`throughput` (samples/s, batched) and `measured_speedup_batched`; `accuracy` of the early-exit forward on test beside
`stored_accuracy` (evaluate's, from the stored logits); exit and prediction disagreements with the stored decisions;
the device, thread count and CPU it was measured on.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from benchmark import flops as flop_count
from benchmark.errors import UserError
from benchmark.evaluate import (BUDGET_FRACTIONS, HISTORY_RULES, POLICY_RULE, ExitOutputs, exit_decisions,
                                exit_scores, operating_point, policy_params, policy_thresholds)
from benchmark.models.eval_mode import evaluating
from benchmark.spec import RunSpec
from benchmark.store import DONE, FAILED, CorruptFile, ResultsStore, read_csv, read_json, read_logits, write_csv

DEFAULT_SAMPLES = 200
DEFAULT_REPEATS = 5
DEFAULT_BATCH_SIZE = 256
WARMUP_SAMPLES = 20
FILE = "latency.csv"

LABEL_COLUMNS = ["run_id", "dataset", "arch", "regime", "seed", "selection", "policy", "point", "param", "thresholds"]
COLUMNS = [
    *LABEL_COLUMNS,
    "backbone_flops", "evaluated_flops", "flops", "predicted_speedup", "predicted_speedup_bs1",
    "latency_bs1_ms", "latency_bs1_ms_min", "measured_speedup_bs1",
    "throughput", "measured_speedup_batched",
    "stored_accuracy", "accuracy", "exit_shares",
    "exit_disagreements", "prediction_disagreements", "exit_disagreements_bs1", "prediction_disagreements_bs1",
    "test_samples", "timed_samples", "repeats", "batch_size",
    "device", "device_name", "threads", "torch", "cpu_model", "cpu_capability",
]


SHOWN = {"selection": "selection", "policy": "policy", "accuracy": "accuracy", "predicted_speedup": "FLOPs speed-up",
         "measured_speedup_bs1": "measured bs1", "measured_speedup_batched": "measured batched",
         "latency_bs1_ms": "ms/sample bs1"}
"""The columns `bench latency` prints (latency.csv has every column)."""


def latency_summary(table: pd.DataFrame) -> str:
    """The printed view of a latency table: per operating point, the speed-up its FLOPs predict beside the
    measured ones — per run, or for a grid the mean over seeds per (dataset, arch, regime, selection)."""
    keys = ["dataset", "arch", "regime"] if table["run_id"].nunique() > 1 else []
    numbers = [c for c in SHOWN if c not in ("selection", "policy")]
    view = (table.groupby([*keys, "selection"], sort=False)[numbers].mean().reset_index() if keys
            else table[list(SHOWN)])
    return view.rename(columns=SHOWN).to_string(index=False, float_format=lambda v: f"{v:.3g}")


# --------------------------------------------------------------------------------------------- the forward

def early_exit_forward(model, x: torch.Tensor, thresholds: np.ndarray,
                       rule: str = "max_softmax") -> tuple[np.ndarray, np.ndarray]:
    """(prediction, exit) per row of `x`, from a forward that stops every row at the exit it leaves from.

    Blocks run in order; after the block of internal exit k whose threshold is finite, head k runs on the rows
    still in flight, and the rows whose score under `rule` (`evaluate.exit_scores`, from the heads run so far) is
    >= thresholds[k] leave with that rule's prediction; the rest go on (`index_select`), so no later block or head
    sees a row that left. Rows left after the last block take the rule's prediction with the classifier's logits.
    A closed exit (threshold +inf) costs nothing, unless the rule reads every earlier head (HISTORY_RULES:
    patience, ensemble) or the model's exits combine every earlier head (`MultiExitNet.combiner`: boosted, ztw),
    which runs them all. With one row this is the batch-size-1 early exit: nothing runs
    after the exit it leaves from. A multi-scale hidden state (a list of feature maps) loses the rows of every
    scale. Call under `evaluating(model)`.
    """
    n, last, device = x.shape[0], len(model.blocks) - 1, x.device
    thresholds = np.asarray(thresholds, dtype=np.float64)
    needs_history = rule in HISTORY_RULES
    open_exit = {block: k for k, block in enumerate(model.exit_blocks)
                 if needs_history or model.combiner is not None or np.isfinite(thresholds[k])}
    prediction = np.empty(n, dtype=np.int64)
    exits = np.empty(n, dtype=np.int64)
    remaining = np.arange(n)
    history = []                                    # head logits of the rows in flight, for HISTORY_RULES
    state = None                                    # the combiner's state for the rows in flight

    def output(k: int, head_logits: torch.Tensor) -> np.ndarray:
        """Exit k's output for the rows in flight: its head's logits, or what the model's combiner makes of them."""
        nonlocal state
        if model.combiner is not None:
            head_logits, state = model.combiner.step(k, head_logits, state)
        return head_logits.float().cpu().numpy()

    def scored(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Score and prediction of the newest exit, under `rule`, for the rows in flight."""
        if needs_history:
            history.append(logits)
        score, predicted = exit_scores(rule, np.stack(history) if needs_history else logits[None])
        return score[-1], predicted[-1]

    for i, block in enumerate(model.blocks):
        x = block(x)
        if i == last:
            break
        k = open_exit.get(i)
        if k is None:
            continue
        score, predicted = scored(output(k, model.heads[k](x)))
        leave = score >= thresholds[k]
        if not leave.any():
            continue
        prediction[remaining[leave]], exits[remaining[leave]] = predicted[leave], k
        if leave.all():
            return prediction, exits
        stay = np.flatnonzero(~leave)
        remaining = remaining[stay]
        history[:] = [logits[stay] for logits in history]
        rows = torch.from_numpy(stay).to(device)
        state = None if state is None else _rows(state, rows)
        x = _rows(x, rows)
    prediction[remaining] = scored(output(model.num_exits - 1, model.classifier(x)))[1]
    exits[remaining] = model.num_exits - 1
    return prediction, exits


def _rows(hidden, index: torch.Tensor):
    """The rows `index` of a hidden state or a combiner's state: a tensor, or each tensor of a (nested) list or
    tuple of them — the scales of a multi-scale hidden state (MSDNet), ztw's (previous exit, log-probabilities)."""
    if isinstance(hidden, torch.Tensor):
        return hidden.index_select(0, index)
    return type(hidden)(_rows(part, index) for part in hidden)


def backbone_forward(model, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The baseline: the backbone alone (`forward_final`: blocks and classifier, no head), its argmax."""
    prediction = model.forward_final(x).argmax(dim=-1).cpu().numpy()
    return prediction, np.full(len(prediction), model.num_exits - 1, dtype=np.int64)


# ---------------------------------------------------------------------------------------- operating points

@dataclass(frozen=True)
class Point:
    """One operating point to time: its policy and point index in curves.csv, and the selections that chose it."""

    policy: str            # "backbone" (the baseline) or a policy of evaluate.POLICY_RULE
    point: int
    param: float
    thresholds: np.ndarray  # (K-1,), +inf = closed
    selections: tuple[str, ...]


def curve_thresholds(policy: str, point: int, param: float, val_confidence: np.ndarray) -> np.ndarray:
    """The K-1 thresholds of curves.csv's point (policy, point), by `evaluate.policy_thresholds`, the function that
    built them; val_confidence is the validation max softmax (K, N) that `budgeted` fits on.

    `param` (read back from a table) must match the sweep value the point index names: a run evaluated with other
    sweeps than this code's cannot be re-enacted."""
    n_exits = val_confidence.shape[0]
    params = policy_params(policy, n_exits)
    if policy == "exit" and not 0 <= point < n_exits:
        raise ValueError(f"exit {point} does not exist (the run has {n_exits} exits)")
    if not 0 <= point < len(params) or not np.isclose(params[point], param, rtol=1e-12, atol=0):
        raise ValueError(f"{policy} point {point} with param {param} is not on this exitbench's {policy} sweep")
    return policy_thresholds(policy, params[point:point + 1], val_confidence)[0]


def operating_points(selected: pd.DataFrame, val_confidence: np.ndarray) -> list[Point]:
    """The baseline, every internal exit alone, and each distinct point validation selected at a budget."""
    n_exits = val_confidence.shape[0]
    points = {("backbone", n_exits - 1): ["baseline"]}
    params = {("backbone", n_exits - 1): float("nan")}
    for k in range(n_exits - 1):
        points[("exit", k)] = [f"exit_{k}"]
        params[("exit", k)] = float(k)
    budgets = selected[selected["selection"].str.startswith("at_") & selected["policy"].notna()]
    for row in budgets.itertuples(index=False):
        key = (row.policy, int(row.point))
        points.setdefault(key, []).append(row.selection)
        params[key] = float(row.param)
    out = []
    for (policy, point), selections in points.items():
        thresholds = (np.full(n_exits - 1, np.inf) if policy == "backbone"
                      else curve_thresholds(policy, point, params[(policy, point)], val_confidence))
        out.append(Point(policy, point, params[(policy, point)], thresholds, tuple(selections)))
    return out


def executed_exit_costs(profile: flop_count.FlopsProfile, exit_blocks: list[int], thresholds: np.ndarray,
                        every_head: bool = False) -> np.ndarray:
    """Per-sample FLOPs the early-exit forward runs for a sample leaving at each exit: evaluate's exit costs with
    the heads of closed exits (threshold +inf) left out, since the forward never evaluates them — unless the rule
    reads every earlier head (`every_head`: patience, ensemble, or a model whose exits combine them: boosted, ztw)."""
    heads = [h if every_head or np.isfinite(t) else 0.0 for h, t in zip(profile.heads, thresholds)]
    return np.asarray(flop_count.exit_costs_of(dataclasses.replace(profile, heads=heads), exit_blocks))


# ------------------------------------------------------------------------------------------------ timing

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(forward: Callable, chunks: list[torch.Tensor], device: torch.device) -> tuple[float, list]:
    """Seconds to run `forward` over `chunks` in order, and its outputs."""
    outputs = []
    _synchronize(device)
    started = time.perf_counter()
    for chunk in chunks:
        outputs.append(forward(chunk))
    _synchronize(device)
    return time.perf_counter() - started, outputs


def _joined(outputs: list) -> tuple[np.ndarray, np.ndarray]:
    return np.concatenate([p for p, _ in outputs]), np.concatenate([e for _, e in outputs])


# -------------------------------------------------------------------------------------------- one run

def measurable_spec(store: ResultsStore, run_id: str) -> RunSpec:
    """The spec of a done run that has a model.pt; otherwise a UserError naming the problem and the fix."""
    folder = store.run_dir(run_id)
    if not folder.is_dir():
        raise UserError(f"no run '{run_id}' in {store.root}; `bench run --grid NAME --dry-run` lists run ids")
    state, problem = store.inspect(run_id)
    if problem:
        raise UserError(f"{problem}: the run counts as not done; rerun its grid with `bench run --save-models` to "
                        f"recompute it")
    if state == FAILED:
        raise UserError(f"run {run_id} failed ({store.error(run_id)}); fix the cause and rerun it with "
                        f"`bench run --retry-failed --save-models`")
    if state != DONE:
        raise UserError(f"run {run_id} in {store.root} is not done; finish it with `bench run --save-models`")
    if not (folder / "model.pt").is_file():
        raise UserError(f"run {run_id} has no model.pt (models are kept only by `bench run --save-models`): delete "
                        f"{folder} and rerun its grid with --save-models")
    return RunSpec.from_json(read_json(folder / "spec.json"))


def find_run(run_id: str, roots: list[Path]) -> ResultsStore:
    """The results folder among `roots` that holds run `run_id`."""
    for root in roots:
        if ResultsStore(root).run_dir(run_id).is_dir():
            return ResultsStore(root)
    where = ", ".join(map(str, roots)) or "results/*"
    raise UserError(f"no run '{run_id}' in {where}; `bench run --grid NAME --dry-run` lists run ids "
                    f"(or pass --results DIR)")


def measure_run(spec: RunSpec, store: ResultsStore, *, data_root: Path, device: torch.device, threads: int,
                repeats: int = DEFAULT_REPEATS, samples: int = DEFAULT_SAMPLES,
                batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True) -> pd.DataFrame:
    """Time every operating point of one done run (with model.pt) and write runs/<id>/latency.csv; return it."""
    from benchmark.analyze import load_trained
    from benchmark.data import load_dataset
    from benchmark.determinism import configure

    folder = store.run_dir(spec.run_id)
    environment = configure(device, threads)
    data = load_dataset(spec.dataset, data_root).to(device)
    try:
        model = load_trained(spec, store, data, device)
    except RuntimeError as error:       # a readable model.pt of another architecture or exit placement
        raise CorruptFile(f"{folder / 'model.pt'} does not fit run {spec.run_id}'s model "
                          f"({str(error).splitlines()[0]}); delete it and rerun the run with --save-models") from None
    stored = read_logits(folder / "logits.npz", model.num_exits, len(data.y_val), len(data.y_test))
    test_y = data.y_test.cpu().numpy()
    if not np.array_equal(stored["test_y"], test_y):
        raise UserError(f"{folder / 'logits.npz'} holds other test labels than dataset '{spec.dataset}' gives now; "
                        f"rerun the run")
    profile = flop_count.profile_flops(model, data.input_shape)
    backbone_flops = sum(profile.blocks) + profile.classifier
    val = ExitOutputs.from_logits(stored["val"], stored["val_y"])
    test = {rule: ExitOutputs.from_logits(stored["test"], stored["test_y"], rule)
            for rule in dict.fromkeys(POLICY_RULE.values())}
    selected = read_csv(folder / "selected.csv")
    points = operating_points(selected, val.score)

    x_test = data.x_test
    n_timed = min(samples, len(x_test))
    singles = list(x_test[:n_timed].split(1))
    batches = list(x_test.split(batch_size))

    def forward_of(point: Point) -> Callable:
        if point.policy == "backbone":
            return lambda x: backbone_forward(model, x)
        return lambda x, t=point.thresholds, r=POLICY_RULE[point.policy]: early_exit_forward(model, x, t, r)

    forwards = [forward_of(p) for p in points]
    bs1_seconds = [[] for _ in points]
    batch_seconds = [[] for _ in points]
    bs1_out, batch_out = [None] * len(points), [None] * len(points)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False   # as collect_logits
    bar = tqdm(total=repeats * len(points), desc=f"latency {spec.run_id} {spec.arch}", unit="point",
               leave=False, dynamic_ncols=True, disable=None if progress else True)
    try:
        with evaluating(model):
            for forward in forwards:                                        # warm-up, untimed
                _timed(forward, singles[:WARMUP_SAMPLES], device)
                _timed(forward, batches[:1], device)
            for repeat in range(repeats):
                for p, forward in enumerate(forwards):                      # interleaved: load hits all alike
                    seconds, out = _timed(forward, singles, device)
                    bs1_seconds[p].append(seconds / n_timed)
                    if repeat == 0:
                        bs1_out[p] = _joined(out)
                    seconds, out = _timed(forward, batches, device)
                    batch_seconds[p].append(seconds)
                    if repeat == 0:
                        batch_out[p] = _joined(out)
                    bar.update(1)
    finally:
        bar.close()
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    base = next(p for p, point in enumerate(points) if point.policy == "backbone")
    base_latency = float(np.median(bs1_seconds[base]))
    base_throughput = len(x_test) / float(np.median(batch_seconds[base]))
    exit_costs = np.asarray(stored["exit_flops"], dtype=np.float64)
    rows = []
    for p, point in enumerate(points):
        outputs = test[POLICY_RULE.get(point.policy, "max_softmax")]
        decided = exit_decisions(outputs.score, point.thresholds)
        stored_prediction = outputs.prediction[decided, np.arange(len(decided))]
        stored_accuracy, evaluated_flops = operating_point(decided, outputs, exit_costs)
        _check_against_selected(selected, point, float(stored_accuracy), float(evaluated_flops), folder)
        if point.policy == "backbone":
            evaluated_flops = backbone_flops
        executed = executed_exit_costs(profile, model.exit_blocks, point.thresholds,
                                       POLICY_RULE.get(point.policy) in HISTORY_RULES
                                       or model.combiner is not None)[decided]
        latency = float(np.median(bs1_seconds[p]))
        throughput = len(x_test) / float(np.median(batch_seconds[p]))
        prediction, exits = batch_out[p]
        prediction_bs1, exits_bs1 = bs1_out[p]
        shares = np.bincount(exits, minlength=model.num_exits) / len(exits)
        measured = {
            "backbone_flops": backbone_flops, "evaluated_flops": float(evaluated_flops),
            "flops": float(executed.mean()), "predicted_speedup": backbone_flops / executed.mean(),
            "predicted_speedup_bs1": backbone_flops / executed[:n_timed].mean(),
            "latency_bs1_ms": 1e3 * latency, "latency_bs1_ms_min": 1e3 * min(bs1_seconds[p]),
            "measured_speedup_bs1": base_latency / latency,
            "throughput": throughput, "measured_speedup_batched": throughput / base_throughput,
            "stored_accuracy": float(stored_accuracy), "accuracy": float(np.mean(prediction == test_y)),
            "exit_shares": " ".join(f"{s:.6g}" for s in shares),
            "exit_disagreements": int(np.sum(exits != decided)),
            "prediction_disagreements": int(np.sum(prediction != stored_prediction)),
            "exit_disagreements_bs1": int(np.sum(exits_bs1 != decided[:n_timed])),
            "prediction_disagreements_bs1": int(np.sum(prediction_bs1 != stored_prediction[:n_timed])),
            "test_samples": len(x_test), "timed_samples": n_timed, "repeats": repeats, "batch_size": batch_size,
            "device": environment["device"], "device_name": environment["device_name"],
            "threads": environment["threads"], "torch": environment["torch"],
            "cpu_model": environment["cpu_model"], "cpu_capability": environment["cpu_capability"],
        }
        for selection in point.selections:
            rows.append({**spec.labels, "selection": selection, "policy": point.policy, "point": point.point,
                         "param": point.param, "thresholds": " ".join(f"{t:.17g}" for t in point.thresholds),
                         **measured})
    rows.sort(key=lambda row: _selection_rank(row["selection"]))
    table = pd.DataFrame(rows, columns=COLUMNS)
    write_csv(folder / FILE, table)
    return table


def _selection_rank(selection: str) -> tuple[int, int]:
    """Rows in reading order: the baseline, each exit alone, then the budgets from the smallest."""
    if selection == "baseline":
        return 0, 0
    if selection.startswith("exit_"):
        return 1, int(selection.removeprefix("exit_"))
    return 2, list(BUDGET_FRACTIONS).index(selection.removeprefix("at_"))


def _check_against_selected(selected: pd.DataFrame, point: Point, accuracy: float, flops: float,
                            folder: Path) -> None:
    """The rebuilt thresholds must give, from the stored logits, the test numbers selected.csv recorded."""
    rows = selected[(selected["policy"] == point.policy) & (selected["point"] == point.point)]
    for row in rows.itertuples(index=False):
        if not (np.isclose(row.test_accuracy, accuracy, rtol=1e-9, atol=0)
                and np.isclose(row.test_flops, flops, rtol=1e-9, atol=0)):
            raise UserError(f"{folder / 'selected.csv'}: {point.policy} point {point.point} gives test accuracy "
                            f"{accuracy} at {flops} FLOPs from the stored logits, the file says {row.test_accuracy} "
                            f"at {row.test_flops}; it was evaluated by another version of the exit policies: rerun "
                            f"the run")


# ------------------------------------------------------------------------------------------------ a grid

def measure_grid(specs: list[RunSpec], store: ResultsStore, **settings) -> tuple[pd.DataFrame, dict[str, str]]:
    """Measure every done run of `specs` that has a model.pt, write each run's latency.csv and
    tables/latency.csv (the measured runs concatenated). Returns the table and {run id: why it was skipped}."""
    skipped, todo = {}, []
    for spec in specs:
        try:
            todo.append(measurable_spec(store, spec.run_id))
        except UserError as error:
            skipped[spec.run_id] = str(error)
    frames = []
    for spec in tqdm(todo, desc="latency runs", unit="run", dynamic_ncols=True, disable=None):
        try:
            table = measure_run(spec, store, **settings)
        except CorruptFile as error:
            skipped[spec.run_id] = str(error)
            continue
        frames.append(table)
        best = table.loc[table["selection"].str.startswith("at_")]
        line = (f"measured {spec.run_id} {spec.regime} {spec.dataset}/{spec.arch} seed {spec.seed}: baseline "
                f"{table.loc[table.selection == 'baseline', 'latency_bs1_ms'].iloc[0]:.3f} ms at batch size 1")
        if not best.empty:
            row = best.iloc[0]
            line += (f"; {row.selection}: predicted x{row.predicted_speedup:.2f}, measured x"
                     f"{row.measured_speedup_bs1:.2f} (bs 1), x{row.measured_speedup_batched:.2f} (batched)")
        tqdm.write(line, file=sys.stderr)
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)
    if frames:
        write_csv(store.tables_dir / FILE, table)
    return table, skipped
