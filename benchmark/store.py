"""Results on disk: one folder per run, every file written atomically, `metrics.json` last (= done).

    results/<grid>/runs/<run_id>/      spec.json, history.csv, logits.npz, metrics.json | error.json
    results/<grid>/backbones/<p1_id>/  the shared P1 backbone: spec.json, history.csv, model.pt, cost.json (last)
    results/<grid>/tables/             runs.csv, exits.csv, curves.csv — regenerated from the run folders

A half-written file is never read as a result: writers go to a temporary name in the same folder and rename.
A results folder is locked while a `bench run` uses it, so two runs cannot interleave their writes.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch

from benchmark.errors import UserError

DONE, FAILED, PENDING = "done", "failed", "pending"


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)                 # mkstemp makes 0600; results are meant to be read
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json_safe(value: Any) -> Any:
    """NaN/inf are not JSON: store them as null so every reader can parse the file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _json_safe(value.item())
    return value


def write_json(path: Path, data: Any) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(_json_safe(data), indent=2, sort_keys=True) + "\n"))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    _atomic(path, lambda tmp: frame.to_csv(tmp, index=False))


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    _atomic(path, write)


def write_torch(path: Path, obj: Any) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def read_torch(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


class ResultsStore:
    """The folder of one grid's results."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def backbone_dir(self, p1_id: str) -> Path:
        return self.root / "backbones" / p1_id

    @property
    def tables_dir(self) -> Path:
        return self.root / "tables"

    def state(self, run_id: str) -> str:
        folder = self.run_dir(run_id)
        if (folder / "metrics.json").is_file():
            return DONE
        if (folder / "error.json").is_file():
            return FAILED
        return PENDING

    def error(self, run_id: str) -> str | None:
        path = self.run_dir(run_id) / "error.json"
        return read_json(path).get("error") if path.is_file() else None

    def start_run(self, run_id: str) -> Path:
        """Clear what an interrupted or failed attempt left (never a done run) and return the folder."""
        folder = self.run_dir(run_id)
        if (folder / "metrics.json").is_file():
            raise RuntimeError(f"run {run_id} is already done; refusing to overwrite it")
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            if stale.is_file():
                stale.unlink()
        return folder

    def done_run_ids(self) -> list[str]:
        runs = self.root / "runs"
        if not runs.is_dir():
            return []
        return sorted(p.name for p in runs.iterdir() if (p / "metrics.json").is_file())

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the results folder for one `bench run` (released if the process dies)."""
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.root / ".lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(f"another `bench run` is using {self.root}; wait for it to finish, "
                            f"or pass a different --results folder") from None
        try:
            handle.write(str(os.getpid()))
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    @contextmanager
    def backbone_lock(self, p1_id: str) -> Iterator[None]:
        """Serialises workers that need the same P1 backbone (the process executor schedules P1s first,
        this is the safety net)."""
        folder = self.backbone_dir(p1_id)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
