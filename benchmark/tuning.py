"""The declared tuning protocol: which values the reported runs train with, chosen on validation only.

DomainBed's lesson — the selection rule is part of the method — applied per (dataset, arch, regime) cell:
the grid's [tuning] table declares, before anything is measured, the candidate learning rates of the regime's
own phases (P2/P3; the shared P1 keeps the grid's lr) and at most one objective knob, and the tuning seeds,
which are never reported seeds. Every candidate trains on every tuning seed as an ordinary run of the store
(cached, resumable, listed by `--dry-run`). The candidate with the highest seed-mean `TUNING_METRIC` wins —
a validation-only number — ties going to the candidate declared first; a run that failed (e.g. diverged)
counts as the worst possible score. The reported seeds then train with the winner. Grids without [tuning]
fix every value by hand, and the tables say "not tuned".
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace
from typing import Any

import pandas as pd

from benchmark.spec import RunSpec
from benchmark.store import DONE, FAILED, ResultsStore, read_json
from regimes.base import Budget
from regimes.registry import OBJECTIVES, build_regime, parse_regime_name

TUNING_METRIC = "val_auc_normalised"
"""Area under the validation-selected accuracy–FLOPs staircase, with *validation* accuracies: no test data."""

NOT_TUNED = "not tuned"


def cell_of(spec: RunSpec) -> tuple[str, str, str]:
    return spec.dataset, spec.arch, spec.regime


def learning_rates(spec: RunSpec, tuning: dict[str, Any]) -> list[float]:
    """The candidate learning rates declared for the optimizer of the cell's own phases (SGD and AdamW need
    different scales; `[tuning] lr` is one list for every optimizer or one per optimizer)."""
    return tuning["lr"][spec.own_phase_train["optimizer"]]


def candidates(spec: RunSpec, tuning: dict[str, Any]) -> list[dict[str, Any]]:
    """The declared candidate values of a cell, in declaration order: lr x (the objective's knob, if any)."""
    _, objective = parse_regime_name(spec.regime)
    knob = tuning["hparams"].get(objective, {})
    knob_values = [{f"{objective}.{name}": value} for name, values in knob.items() for value in values] or [{}]
    return [{"lr": lr, **extra} for lr, extra in itertools.product(learning_rates(spec, tuning), knob_values)]


def with_values(spec: RunSpec, values: dict[str, Any], seed: int | None = None) -> RunSpec:
    """`spec` training with candidate `values` (own-phase lr, objective knob), optionally on another seed."""
    _, objective = parse_regime_name(spec.regime)
    knobs = {key.split(".", 1)[1]: value for key, value in values.items() if key != "lr"}
    hparams = OBJECTIVES[objective](**{**spec.hparams, **knobs}).hp if knobs else spec.hparams
    return replace(spec, seed=spec.seed if seed is None else seed, hparams=hparams,
                   own_phases={**spec.own_phases, "lr": values["lr"]})


@dataclass
class Plan:
    """The runs of a grid under its tuning protocol, as far as the store lets them be known now."""

    tuning: list[RunSpec] = field(default_factory=list)      # every tuning run (candidate x tuning seed)
    reported: list[RunSpec] = field(default_factory=list)    # reported runs whose values are settled
    awaiting: list[RunSpec] = field(default_factory=list)    # reported runs of cells still being tuned (grid values)
    expected: list[RunSpec] = field(default_factory=list)    # stand-ins for tuning stages not reached yet (estimates)
    untunable: dict[tuple, str] = field(default_factory=dict)  # cell -> why no candidate can be chosen
    at_edge: list[str] = field(default_factory=list)         # cells whose chosen lr is the smallest or largest declared
    choices: pd.DataFrame = field(default_factory=pd.DataFrame)  # tuning.csv: one row per tuning run
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)  # reported run id -> what was tuned

    @property
    def complete(self) -> bool:
        return not self.awaiting and not self.untunable


def rung_epochs(spec: RunSpec, tuning: dict[str, Any]) -> list[int]:
    """The epochs after which the cell's candidates are compared before the end, from the declared `rungs`
    (fractions of the tuned phases' epochs — those after the shared P1, before an objective's own last phase —
    counted from the end of P1, where candidates start to differ). Distinct, increasing, each inside the tuned
    phases; [] without successive halving."""
    schedule = build_regime(spec.regime, spec.hparams).schedule.phases(Budget(spec.train["epochs"],
                                                                             spec.train["p1_epochs"]))
    shared = schedule[0].epochs if schedule[0].trains == "backbone" else 0
    tuned = sum(p.epochs for p in schedule) - shared
    epochs = {shared + max(1, round(fraction * tuned)) for fraction in tuning.get("rungs", [])}
    return sorted(e for e in epochs if e < shared + tuned)


def make_plan(specs: list[RunSpec], tuning: dict[str, Any] | None, store: ResultsStore) -> Plan:
    """Resolve the reported runs of `specs` (a grid's, with its hand-set values) against the tuning runs stored.

    With `rungs` and `keep` declared (successive halving, Jamieson & Talwalkar 2016): every candidate trains to the
    first rung; the best `ceil(keep x n)` by seed-mean validation area (never a failed one) go on to the next rung,
    resuming from the rung's checkpoint on the full budget's schedule; the survivors of the last rung train to the
    end, where the best wins. A cell left with one candidate is decided at that rung. Without rungs every candidate
    trains the whole budget (exhaustive). `plan.tuning` lists the runs of the stages reached so far; the next stage's
    runs are known once the current stage is done (`bench run` loops until no stage is left)."""
    plan = Plan()
    if tuning is None:
        plan.reported = list(specs)
        plan.provenance = {s.run_id: {"tuned": NOT_TUNED} for s in specs}
        return plan
    rows = []
    cells: dict[tuple, list[RunSpec]] = {}
    for spec in specs:
        cells.setdefault(cell_of(spec), []).append(spec)
    for cell, reported in cells.items():
        options = candidates(reported[0], tuning)
        alive, best, cell_rows = list(range(len(options))), None, []
        stops = [*rung_epochs(reported[0], tuning), None]
        for stage, stop in enumerate(stops):
            scores = {}
            for index in alive:
                runs = [with_values(reported[0], options[index], seed).at_epoch(stop) for seed in tuning["seeds"]]
                plan.tuning += runs
                metrics = [_score(store, run) for run in runs]
                for run, metric in zip(runs, metrics):
                    cell_rows.append({"dataset": cell[0], "arch": cell[1], "regime": cell[2], "candidate": index,
                                      **options[index], "seed": run.seed,
                                      "stop_after_epochs": run.stop_after or run.train["epochs"],
                                      "run_id": run.run_id, "state": store.state(run.run_id), TUNING_METRIC: metric,
                                      "wall_seconds": _segment_seconds(store, run), "continued": False,
                                      "chosen": False})
                scores[index] = None if None in metrics else sum(metrics) / len(metrics)
            if None in scores.values():
                break
            ranked = sorted(alive, key=lambda i: (-scores[i], i))          # ties: the first declared
            survivors = [i for i in ranked if scores[i] > -math.inf]
            if not survivors:
                break
            if stop is None:
                best = survivors[0]
                break
            alive = sorted(survivors[:max(1, math.ceil(tuning["keep"] * len(alive)))])
            if len(alive) == 1:                                             # decided at this rung
                best = alive[0]
                break
            for row in cell_rows:
                row["continued"] = row["continued"] or (row["stop_after_epochs"] == stop and row["candidate"] in alive)
        rows += cell_rows
        if best is None and None in scores.values():
            plan.awaiting += reported
            plan.expected += _later_stages(reported[0], options, alive, stops[stage + 1:], tuning)
            continue
        if best is None:
            plan.untunable[cell] = f"every tuning candidate of {'/'.join(cell)} failed (see tuning.csv)"
            continue
        for row in cell_rows:
            row["chosen"] = row["candidate"] == best
        declared = learning_rates(reported[0], tuning)
        if len(declared) > 1 and options[best]["lr"] in (min(declared), max(declared)):
            plan.at_edge.append(f"{'/'.join(cell)}: lr {options[best]['lr']:g}")
        tuned = ", ".join(options[best])
        for spec in reported:
            final = with_values(spec, options[best])
            plan.reported.append(final)
            plan.provenance[final.run_id] = {"tuned": tuned, **{k: v for k, v in options[best].items() if k != "lr"}}
    plan.choices = pd.DataFrame(rows)
    if not plan.choices.empty:
        plan.choices["seed_mean_" + TUNING_METRIC] = plan.choices.groupby(
            ["dataset", "arch", "regime", "candidate", "stop_after_epochs"])[TUNING_METRIC].transform("mean")
    return plan


def _later_stages(spec: RunSpec, options: list[dict], alive: list[int], stops: list[int | None],
                  tuning: dict[str, Any]) -> list[RunSpec]:
    """Stand-ins for the runs of the stages not reached yet (their number is known, not which candidates): the first
    survivors in declaration order, for cost estimates."""
    runs, count = [], len(alive)
    for stop in stops:
        count = max(1, math.ceil(tuning["keep"] * count))
        if count == 1:                                   # decided at the stage before
            break
        runs += [with_values(spec, options[i], seed).at_epoch(stop) for i in alive[:count] for seed in tuning["seeds"]]
    return runs


def _segment_seconds(store: ResultsStore, spec: RunSpec) -> float | None:
    """Wall seconds the process that trained a done tuning run spent on it (a resumed run: since its rung)."""
    if store.state(spec.run_id) != DONE:
        return None
    cost = read_json(store.run_dir(spec.run_id) / "metrics.json").get("cost", {})
    seconds = cost.get("segment_wall_seconds", cost.get("run_wall_seconds"))     # older runs: never resumed
    return None if seconds is None else float(seconds)


def _score(store: ResultsStore, spec: RunSpec) -> float | None:
    """A tuning run's validation metric; -inf if it failed (a diverged candidate loses); None while pending."""
    state = store.state(spec.run_id)
    if state == DONE:
        return float(read_json(store.run_dir(spec.run_id) / "metrics.json")["summary"][TUNING_METRIC])
    if state == FAILED:
        return -math.inf
    return None
