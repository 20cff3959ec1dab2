"""The regime interface: a Schedule says which parameters train when, an Objective how exit losses combine.

A regime is `Schedule + Objective`, named `schedule` or `schedule+objective` (REGIMES.md). Schedules and
objectives know nothing of the runner, the store or the CLI; the trainer (`benchmark/train.py`) runs them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor
from benchmark.models.multi_exit import Hidden
from regimes.losses import cross_entropy

TRAINS = ("backbone", "all", "heads", "combiner")


@dataclass(frozen=True)
class Phase:
    """One entry of a schedule. P1: backbone alone, P2: backbone and heads, P3: heads on a frozen backbone; an
    objective may add a last phase that fits its exit combiner's own parameters on the frozen network (`combiner`).

    `train` replaces the run's training settings for this phase where it names them (ztw's ensemble stage has its
    own optimizer, as in the official code); None: the run's."""

    name: str
    trains: str
    epochs: int
    train: dict[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.trains not in TRAINS:
            raise ValueError(f"Phase.trains must be one of {TRAINS}, got {self.trains!r}")


@dataclass(frozen=True)
class Budget:
    """Epoch budget of a run. `epochs` is the total E; schedules with a P1 give it `p1_epochs` (default E // 2)
    and the rest to their second phase, so joint (E) and mixed (E/2 + E/2) train the backbone equally long."""

    epochs: int
    p1_epochs: int | None = None

    @property
    def first(self) -> int:
        return self.epochs // 2 if self.p1_epochs is None else self.p1_epochs

    @property
    def second(self) -> int:
        return self.epochs - self.first


@dataclass
class StepContext:
    """What an objective may read during a step (REGIMES.md: epoch, total epochs, perturbation, phase)."""

    phase: str
    epoch: int                 # 0-based epoch within the phase
    epochs: int                # epochs in the phase
    step: int                  # 0-based optimizer step within the phase
    num_exits: int
    generator: torch.Generator | None = None            # seeded per (pairing seed, epoch): draw randomness from it
    data_kind: str = "image"                             # "image" (N,C,H,W) | "series" (N,C,T)
    extra: dict[str, Any] = field(default_factory=dict)


class Schedule:
    """Which parameters train in which phase; subclasses set `name`, `description` and `phases`."""

    name: ClassVar[str]
    description: ClassVar[str]
    source: ClassVar[str] = "arXiv 2407.14320 (ICML 2025)"

    def phases(self, budget: Budget) -> list[Phase]:
        raise NotImplementedError

    @property
    def uses_p1(self) -> bool:
        return self.phases(Budget(2))[0].trains == "backbone"


@dataclass(frozen=True)
class HParam:
    """An objective's hyperparameter, declared once: its default, meaning and allowed values, so that a wrong value
    is refused when a grid loads (`check_hparam`), not when a run trains.

    Numbers: `kind` float (ints accepted) or int, within `low` (exclusive if `low_open`) and `high`; bools are never
    numbers. Strings: `choices`.
    """

    default: Any
    meaning: str
    kind: type = float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    choices: tuple[str, ...] | None = None

    @property
    def allowed(self) -> str:
        """The allowed values in words, e.g. 'a number in [0, 1]', 'an integer >= 1', 'one of last | next'."""
        if self.choices is not None:
            return "one of " + " | ".join(self.choices)
        noun = "an integer" if self.kind is int else "a number"
        if self.low is not None and self.high is not None:
            return f"{noun} in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"{noun} {'>' if self.low_open else '>='} {self.low:g}"
        return noun if self.high is None else f"{noun} <= {self.high:g}"


def check_hparam(objective: type[Objective] | Objective, key: str, value: Any) -> None:
    """Raise ValueError naming the objective, the key, the value and what is allowed, unless `objective`'s
    declaration of `key` allows `value`."""
    declared = objective.hparams[key]
    if declared.choices is not None:
        ok = isinstance(value, str) and value in declared.choices
    else:
        low, high = declared.low, declared.high
        ok = (isinstance(value, int if declared.kind is int else (int, float)) and not isinstance(value, bool)
              and math.isfinite(value)
              and (low is None or (value > low if declared.low_open else value >= low))
              and (high is None or value <= high))
    if not ok:
        raise ValueError(f"{objective.name}.{key} must be {declared.allowed}, got {value!r}")


class Objective:
    """How the exits' losses are built in the phases that train heads (P2, P3).

    Subclasses declare `hparams` once: name -> HParam. Overrides are checked against it; the resolved values are in
    `self.hp`.
    Most objectives override only `loss`; objectives that need their own optimisation step (l2w, cet) override `step`.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    source: ClassVar[str]
    reconstructed: ClassVar[bool] = False
    hparams: ClassVar[dict[str, HParam]] = {}
    uses_between: ClassVar[bool] = False      # True if `between` must be passed to the model's forward
    uses_after_block: ClassVar[bool] = False  # True if `after_block` must be passed to the model's forward
    requires_shared_training: ClassVar[bool] = False  # True if it acts only where blocks and heads train together

    def __init__(self, **overrides: Any):
        unknown = set(overrides) - set(self.hparams)
        if unknown:
            raise KeyError(f"objective '{self.name}' has no hyperparameter(s) {sorted(unknown)}; "
                           f"it has: {sorted(self.hparams) or 'none'}")
        for key, value in overrides.items():
            check_hparam(self, key, value)
        self.hp = {k: overrides.get(k, declared.default) for k, declared in self.hparams.items()}

    def between(self, i: int, hidden: Hidden) -> Hidden:
        """Acts on the hidden state after block i on its way into block i+1 only (bdl detaches there). `hidden` is a
        tensor or a multi-scale list (MSDNet): the objective chooses the scales (`every_scale`, `on_coarsest_scale`)."""
        return hidden

    def after_block(self, i: int, hidden: Hidden) -> Hidden:
        """Acts on the hidden state after block i before the head at i reads it (ge rescales there)."""
        return hidden

    def exit_combiner(self, model, num_classes: int) -> torch.nn.Module | None:
        """How the heads' logits become the exits' outputs, in training and at inference (`MultiExitNet.combiner`,
        installed by `pipeline.initial_model` on the freshly built `model`, whose heads it may read): None, each exit
        outputs its head's logits. A combiner has a causal
        `step(k, head_logits, state) -> (output, state)` (state None before exit 0), so early exit can run it. Its
        parameters train with the heads, except those it returns from `last_phase_parameters()` (if it has that
        method): only a `combiner` phase trains them (`final_phases`), after calling its `begin_last_phase()`."""
        return None

    def final_phases(self) -> list[Phase]:
        """Phases this objective adds after the schedule's (ztw fits its exit ensembles on the frozen network)."""
        return []

    def forward(self, model, x: Tensor) -> list[Tensor]:
        """All exits' logits with this objective's hooks in place."""
        return model(x, between=self.between if self.uses_between else None,
                     after_block=self.after_block if self.uses_after_block else None)

    def loss(self, logits: list[Tensor], y: Tensor, ctx: StepContext) -> Tensor:
        raise NotImplementedError

    def step_kind(self, ctx: StepContext) -> str:
        """Which kind of work `step` does at `ctx.step`. The trainer counts the FLOPs of the first step of each
        kind and charges that count to every step of the kind, so an objective whose work varies between steps
        (l2w's meta step every k steps) must name the variants here and branch on this in `step`."""
        return "step"

    def state_dict(self) -> dict:
        """What this objective carries from one step to the next beyond the model and its optimizer (l2w's weighting
        net and its Adam): saved with a tuning rung's checkpoint so the run can go on bitwise. Tensors and plain values
        only (loaded with `weights_only=True`). Stateless objectives keep nothing."""
        return {}

    def load_state_dict(self, state: dict, model) -> None:
        """Restore `state_dict()`'s output for `model` (the trainer restores the RNG afterwards, so creating modules
        here may draw random numbers)."""
        if state:
            raise ValueError(f"objective '{self.name}' keeps no state between steps, but a checkpoint holds {sorted(state)}")

    def step(self, model, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        """One optimisation step; returns detached tensors (no host sync): `loss` and per-exit `exit_ce`, and
        optionally `optimizer_steps` (a Python int, default 1) if it steps the optimizer more than once."""
        logits = self.forward(model, x)
        loss = self.loss(logits, y, ctx)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return {"loss": loss.detach(), "exit_ce": exit_cross_entropies(logits, y)}


def exit_cross_entropies(logits: list[Tensor], y: Tensor) -> Tensor:
    """Per-exit mean cross-entropy (over samples, or labelled pixels), detached: what history.csv logs whatever the
    objective."""
    with torch.no_grad():
        return torch.stack([cross_entropy(z.float(), y) for z in logits])


@dataclass(frozen=True)
class Regime:
    """A schedule combined with an objective, e.g. `mixed+sdn`; plain `mixed` means `mixed+uniform`."""

    name: str
    schedule: Schedule
    objective: Objective

    def phases(self, budget: Budget) -> list[Phase]:
        """The schedule's phases, then any the objective adds."""
        return self.schedule.phases(budget) + self.objective.final_phases()
