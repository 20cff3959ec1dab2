"""RunSpec: the semantic identity of one run, and the keys that pair runs and share P1 backbones.

The run id hashes only what changes the numbers (dataset, arch, regime, seed, budget, resolved hyperparameters,
protocol version) — never paths, hosts or devices — so the same spec gets the same id on every machine.

`fast` (`bench run --fast`: torch.compile, and on CUDA cuDNN's benchmarked, non-deterministic algorithms) enters
the hashed payload only when set: compiled kernels fuse and reorder floating-point operations on every device, so
a fast run's numbers may differ from the eager run's and it must not share its id. A spec without it hashes, and
writes spec.json, byte for byte as before the flag existed, so no existing run id changed.

`stop_after` (a rung of successive-halving tuning, `benchmark.tuning`) likewise enters the payload only when set:
the run trains the trajectory of the full spec — the same schedule, batches and learning rates — but stops after
that many epochs and keeps its state (`checkpoint.pt`), so a later rung or the full run resumes from it. The full
run of a trajectory therefore has exactly the id (and, resumed or not, the numbers) it has without tuning rungs.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from benchmark import PROTOCOL_VERSION


def _digest(payload: Any, length: int = 12) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@dataclass(frozen=True)
class RunSpec:
    dataset: str
    arch: str
    regime: str
    seed: int
    train: dict[str, Any]          # epochs, p1_epochs, batch_size, optimizer settings
    model: dict[str, Any]          # head, exits
    hparams: dict[str, Any] = field(default_factory=dict)   # the objective's resolved hyperparameters
    own_phases: dict[str, Any] = field(default_factory=dict)  # train keys overridden in P2/P3, never in shared P1
    protocol: int = PROTOCOL_VERSION
    fast: bool = False             # --fast: compiled model (and on CUDA non-deterministic cuDNN); hashed only if set
    stop_after: int | None = None  # a tuning rung: stop after this many epochs of the run's budget; hashed only if set

    def semantic(self) -> dict[str, Any]:
        """What the run id hashes: every field, `fast` and `stop_after` only when set (module docstring)."""
        payload = asdict(self)
        if not self.fast:
            del payload["fast"]
        if self.stop_after is None:
            del payload["stop_after"]
        return payload

    @property
    def trajectory(self) -> "RunSpec":
        """The full run this (rung) run is a prefix of: itself when it is not a rung."""
        return replace(self, stop_after=None) if self.stop_after is not None else self

    def at_epoch(self, epochs: int | None) -> "RunSpec":
        """The rung of this run's trajectory that stops after `epochs` (None: the full run)."""
        return replace(self, stop_after=epochs)

    @property
    def labels(self) -> dict[str, Any]:
        """What every per-run table row and metrics.json name the run by, in this column order."""
        return {"run_id": self.run_id, "dataset": self.dataset, "arch": self.arch, "regime": self.regime,
                "seed": self.seed}

    @property
    def run_id(self) -> str:
        return _digest(self.semantic())

    @property
    def pairing_seed(self) -> int:
        """Seeds initial weights and batch order. Depends on (dataset, arch, seed) only — not on the regime —
        so every regime starts from the same weights and sees the same batches (paired comparisons)."""
        return int(_digest([self.dataset, self.arch, self.seed], 8), 16)

    @property
    def own_phase_train(self) -> dict[str, Any]:
        """Training settings of the regime's own phases (P2, P3): the grid's, with its regime overrides."""
        return {**self.train, **self.own_phases}

    def p1_id(self, p1_epochs: int, device_type: str) -> str:
        """Key of the shared P1 backbone: everything P1 depends on, nothing that only later phases use — including
        the device type, which sets the precision (bf16 autocast on cuda, float32 on cpu): a GPU backbone is never
        reused by a CPU run, nor the reverse. Likewise a --fast backbone (compiled) is shared by --fast runs only;
        without `fast` the key is what it always was."""
        train = {k: v for k, v in self.train.items() if k not in ("epochs", "p1_epochs")}
        key = {"dataset": self.dataset, "arch": self.arch, "seed": self.seed, "p1_epochs": p1_epochs,
               "train": train, "model": self.model, "protocol": self.protocol, "device": device_type}
        return _digest({**key, "fast": True} if self.fast else key)

    def to_json(self) -> dict[str, Any]:
        """spec.json: the run id and the semantic spec (`"fast": true` appears only in fast runs)."""
        return {"run_id": self.run_id, **self.semantic()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunSpec":
        data = {k: v for k, v in data.items() if k != "run_id"}
        return cls(**data)

    def matches(self, key: str, pattern: str) -> bool:
        from fnmatch import fnmatchcase
        value = {"dataset": self.dataset, "arch": self.arch, "regime": self.regime, "seed": self.seed,
                 "run_id": self.run_id}[key]
        return fnmatchcase(str(value), pattern)


FILTER_KEYS = ("dataset", "arch", "regime", "seed", "run_id")
