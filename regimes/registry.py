"""Name -> schedule / objective registries. Every module in `regimes/` is imported on first use, so a new
regime is one file with a `@register_schedule` or `@register_objective` class: nothing else changes."""
from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from benchmark.errors import UnknownName, UserError
from regimes.base import Budget, Objective, Regime, Schedule

SCHEDULES: dict[str, type[Schedule]] = {}
OBJECTIVES: dict[str, type[Objective]] = {}
_INFRASTRUCTURE = {"base", "registry", "exit_gradients", "perturbations"}
_loaded = False


def register_schedule(cls: type[Schedule]) -> type[Schedule]:
    SCHEDULES[cls.name] = cls
    return cls


def register_objective(cls: type[Objective]) -> type[Objective]:
    OBJECTIVES[cls.name] = cls
    return cls


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    import regimes
    for info in pkgutil.iter_modules(regimes.__path__):
        if info.name not in _INFRASTRUCTURE:
            importlib.import_module(f"regimes.{info.name}")
    _loaded = True


def schedule_names() -> list[str]:
    _load_all()
    return sorted(SCHEDULES)


def objective_names() -> list[str]:
    _load_all()
    return sorted(OBJECTIVES)


def regime_names() -> list[str]:
    """Every schedule x objective pair that composes (`incompatibility`); `X+uniform` is spelled `X`."""
    return [s if o == "uniform" else f"{s}+{o}" for s in schedule_names() for o in objective_names()
            if incompatibility(s, o) is None]


def incompatibility(schedule: str, objective: str) -> str | None:
    """Why `schedule+objective` is refused, or None. An objective that only combines the exits' gradients on the
    shared blocks needs a phase that trains blocks and heads together; without one it would be `uniform`."""
    phases = SCHEDULES[schedule]().phases(Budget(2))
    if OBJECTIVES[objective].requires_shared_training and not any(p.trains == "all" for p in phases):
        return (f"{objective} combines the exits' gradients on the shared backbone, which {schedule} never trains "
                f"together with the heads; use joint+{objective} or mixed+{objective}")
    return None


def parse_regime_name(name: str) -> tuple[str, str]:
    """'mixed+sdn' -> ('mixed', 'sdn'); 'mixed' -> ('mixed', 'uniform'). Raises UnknownName for either part and
    UserError for a pair that does not compose."""
    _load_all()
    schedule, _, objective = name.partition("+")
    objective = objective or "uniform"
    if schedule not in SCHEDULES:
        raise UnknownName("regime", name, regime_names())
    if objective not in OBJECTIVES:
        raise UnknownName("regime", name, regime_names())
    reason = incompatibility(schedule, objective)
    if reason is not None:
        raise UserError(f"regime '{name}': {reason}")
    return schedule, objective


def objective_hparams(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Resolved hyperparameters of a regime's objective: declared defaults updated by `overrides`."""
    schedule, objective = parse_regime_name(name)
    try:
        return OBJECTIVES[objective](**overrides).hp
    except (KeyError, ValueError) as e:
        raise UserError(str(e).strip('"')) from None


def build_regime(name: str, hparams: dict[str, Any] | None = None) -> Regime:
    schedule, objective = parse_regime_name(name)
    try:
        obj = OBJECTIVES[objective](**(hparams or {}))
    except (KeyError, ValueError) as e:
        raise UserError(str(e).strip('"')) from None
    return Regime(name=name, schedule=SCHEDULES[schedule](), objective=obj)
