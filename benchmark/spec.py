"""RunSpec: the semantic identity of one run, and the keys that pair runs and share P1 backbones.

The run id hashes only what changes the numbers (dataset, arch, regime, seed, budget, resolved hyperparameters,
protocol version) — never paths, hosts or devices — so the same spec gets the same id on every machine.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
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

    @property
    def run_id(self) -> str:
        return _digest(asdict(self))

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
        reused by a CPU run, nor the reverse."""
        train = {k: v for k, v in self.train.items() if k not in ("epochs", "p1_epochs")}
        return _digest({"dataset": self.dataset, "arch": self.arch, "seed": self.seed, "p1_epochs": p1_epochs,
                        "train": train, "model": self.model, "protocol": self.protocol, "device": device_type})

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, **asdict(self)}

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
