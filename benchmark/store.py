"""Results on disk: one folder per run, every file written atomically, `metrics.json` last (= done).

    results/<grid>/runs/<run_id>/      spec.json, history.csv, logits.npz, ..., metrics.json | error.json
    results/<grid>/backbones/<p1_id>/  the shared P1 backbone: spec.json, history.csv, model.pt, cost.json (last)
    results/<grid>/tables/             runs.csv, exits.csv, curves.csv — regenerated from the run folders

A half-written file is never read as a result: writers go to a temporary name in the same folder and rename.
A run is done only if its metrics.json parses, names the run of its folder (as does spec.json) and holds the
SHA-256 of every other file the run wrote, and those files still match: a file truncated, replaced or edited
afterwards makes the run not done (with one line saying which file), so the next `bench run` recomputes it.
A shared backbone is stored only if its cost.json parses and its model.pt matches the checksum in it.
A results folder is locked while a `bench` command writes to it, so two commands cannot interleave their writes.
A run trained elsewhere (a Ray worker without a shared filesystem) arrives as its folder's files (`pack_folder`);
`receive` unpacks them beside the store under a temporary name and renames the whole folder into place.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import math
import os
import pickle
import shutil
import tempfile
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pandas as pd
import torch

from benchmark.errors import UserError
from benchmark.spec import RunSpec

DONE, FAILED, PENDING = "done", "failed", "pending"
RESOURCE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM})
"""Errors of the machine, not of the run: a run hit by one stays pending (never failed), so a rerun retries it."""


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


def write_text(path: Path, text: str) -> None:
    _atomic(path, lambda tmp: tmp.write_text(text))


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    _atomic(path, lambda tmp: frame.to_csv(tmp, index=False))


ID_COLUMNS = ("run_id", "run_id_a", "p1_id", "git_commit")
"""Columns of hexadecimal ids: always read as text. pandas reads a run id like 0077569e8576 as the float inf and
628798375431 as an integer, so a table gathered from per-run files lost those runs' ids (1 run in ~120)."""


def read_csv(path: Path, **kwargs) -> pd.DataFrame:
    """A table of the suite, its id columns as text (ID_COLUMNS). Every table and per-run CSV is read through this."""
    return pd.read_csv(path, dtype={column: str for column in ID_COLUMNS}, **kwargs)


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    _atomic(path, write)


def read_logits(path: Path, num_exits: int, val_size: int, test_size: int) -> dict[str, np.ndarray]:
    """logits.npz, checked against the run it belongs to: (K, N, C) logits per split, N labels, K exit costs."""
    arrays = _load_npz(path, ("val", "val_y", "test", "test_y", "exit_flops"))
    expected = {"val": (num_exits, val_size), "val_y": (val_size,), "test": (num_exits, test_size),
                "test_y": (test_size,), "exit_flops": (num_exits,)}
    for key, shape in expected.items():
        if arrays[key].shape[:len(shape)] != shape or arrays[key].ndim != len(shape) + (key in ("val", "test")):
            raise CorruptFile(f"{path}: '{key}' has shape {arrays[key].shape}, expected {shape}"
                              f"{' + (classes,)' if key in ('val', 'test') else ''} for this run")
    return arrays


def read_run_logits(folder: Path, num_exits: int) -> dict[str, np.ndarray]:
    """A run folder's logits.npz with `read_logits`'s shape checks, the split sizes taken from its own label arrays
    (K from the run's metrics.json)."""
    with np.load(folder / "logits.npz") as sizes:
        val_size, test_size = len(sizes["val_y"]), len(sizes["test_y"])
    return read_logits(folder / "logits.npz", num_exits, val_size, test_size)


def read_dense(path: Path, num_exits: int, val_size: int, test_size: int, num_classes: int,
               rules: tuple[str, ...], n_bins: int) -> dict:
    """dense.npz (a segmentation run's outputs, `benchmark.dense`), checked against the run it belongs to: per split
    `<split>_confusion` (K, N, C, C) pixel counts, `<split>_<rule>` (K, N) confidence summaries,
    `<split>_reliability` (K, N, bins, 3) and `<split>_likelihood` (K, N, 2) calibration sums; K exit costs.
    Returned per split, as `pipeline.collect_dense` gives them — {"val": {"confusion": ..., rule: ...}, "test": {...},
    "exit_flops": ...} — so what is evaluated from the file and what was computed in memory read alike."""
    sizes = {"val": val_size, "test": test_size}
    expected = {"exit_flops": (num_exits,)}
    for split, n in sizes.items():
        expected[f"{split}_confusion"] = (num_exits, n, num_classes, num_classes)
        expected[f"{split}_reliability"] = (num_exits, n, n_bins, 3)
        expected[f"{split}_likelihood"] = (num_exits, n, 2)
        expected.update({f"{split}_{rule}": (num_exits, n) for rule in rules})
    arrays = _load_npz(path, tuple(expected))
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            raise CorruptFile(f"{path}: '{key}' has shape {arrays[key].shape}, expected {shape} for this run")
    per_split = {split: {key.removeprefix(f"{split}_"): value for key, value in arrays.items()
                         if key.startswith(f"{split}_")} for split in sizes}
    return {"exit_flops": arrays["exit_flops"], **per_split}


def _load_npz(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The arrays `keys` of an .npz file; a damaged or incomplete file is a CorruptFile naming it."""
    try:
        with np.load(path) as stored:
            return {key: stored[key] for key in keys}
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as error:
        if isinstance(error, OSError) and error.errno in RESOURCE_ERRNOS:
            raise
        raise CorruptFile(f"{path} is truncated or corrupt ({type(error).__name__}: {error})") from None


def write_torch(path: Path, obj: Any) -> None:
    """Saved through a buffer: torch.save names a file's zip archive root after the file, which for the atomic
    write is a random temporary name, so identical runs stored different bytes (and checksums); a buffer's root is
    always "archive"."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    _atomic(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def read_torch(path: Path) -> Any:
    """A checkpoint, loaded safely (tensors only); a damaged file is named, never loaded unsafely."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, ValueError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        if isinstance(error, OSError) and error.errno in RESOURCE_ERRNOS:
            raise
        raise CorruptFile(f"{path} is truncated or corrupt ({type(error).__name__}); delete it and rerun "
                          f"`bench run` to recompute it") from None


def copy_file(source: Path, target: Path) -> None:
    """Copy `source` to `target` atomically (a reader never sees half a file)."""
    _atomic(target, lambda tmp: shutil.copyfile(source, tmp))


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file in `folder` (temporaries excluded): what metrics.json records as the run's files."""
    return {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


class CorruptFile(UserError):
    """A stored file that cannot be read back (truncated by a kill or a full disk, or damaged since)."""


class ResultsStore:
    """The folder of one grid's results."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._lock_depth = 0
        self._verified: dict[Path, tuple[tuple, str | None]] = {}

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def backbone_dir(self, p1_id: str) -> Path:
        return self.root / "backbones" / p1_id

    @property
    def tables_dir(self) -> Path:
        return self.root / "tables"

    def inspect(self, run_id: str) -> tuple[str, str | None]:
        """(state, problem): `problem` names the damaged file of a run that would be done or failed but for it;
        such a run is pending, so the next `bench run` recomputes it."""
        folder = self.run_dir(run_id)
        if (folder / "metrics.json").is_file():
            problem = self._checked(folder, lambda: self._done_problem(folder, run_id))
            return (DONE, None) if problem is None else (PENDING, problem)
        if (folder / "error.json").is_file():
            problem = self._checked(folder, lambda: self._failed_problem(folder, run_id))
            return (FAILED, None) if problem is None else (PENDING, problem)
        return PENDING, None

    def state(self, run_id: str) -> str:
        return self.inspect(run_id)[0]

    def error(self, run_id: str) -> str | None:
        return read_json(self.run_dir(run_id) / "error.json")["error"] if self.state(run_id) == FAILED else None

    def backbone_inspect(self, p1_id: str) -> tuple[bool, str | None]:
        """(stored, problem) of a shared P1 backbone; a damaged one is not stored, so the next run retrains it."""
        folder = self.backbone_dir(p1_id)
        if not (folder / "cost.json").is_file():
            return False, None
        problem = self._checked(folder, lambda: self._backbone_problem(folder))
        return problem is None, problem

    def _checked(self, folder: Path, check: Callable[[], str | None]) -> str | None:
        """`check()`, remembered while the folder's files keep their sizes and modification times (hashing every
        run's files once per command is cheap; once per question would not be)."""
        stamp = tuple((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in sorted(os.scandir(folder),
                                                                                      key=lambda e: e.name))
        cached = self._verified.get(folder)
        if cached is None or cached[0] != stamp:
            cached = self._verified[folder] = (stamp, check())
        return cached[1]

    @staticmethod
    def _done_problem(folder: Path, run_id: str) -> str | None:
        metrics, problem = _parsed(folder / "metrics.json")
        if problem:
            return problem
        if not isinstance(metrics, dict) or metrics.get("run_id") != run_id:
            return f"{folder / 'metrics.json'} does not belong to run {run_id}"
        problem = _spec_problem(folder, run_id)
        if problem:
            return problem
        files = metrics.get("files")
        if not isinstance(files, dict) or "spec.json" not in files:
            return f"{folder / 'metrics.json'} records no checksums of the run's files (written by an older exitbench)"
        for name, digest in files.items():
            path = folder / name
            if not path.is_file():
                return f"{path} is missing"
            if file_digest(path) != digest:
                return f"{path} does not match its checksum in metrics.json (truncated, replaced or edited since)"
        return None

    @staticmethod
    def _failed_problem(folder: Path, run_id: str) -> str | None:
        error, problem = _parsed(folder / "error.json")
        if problem:
            return problem
        if not isinstance(error, dict) or not isinstance(error.get("error"), str):
            return f"{folder / 'error.json'} holds no error message"
        return _spec_problem(folder, run_id)

    @staticmethod
    def _backbone_problem(folder: Path) -> str | None:
        cost, problem = _parsed(folder / "cost.json")
        if problem:
            return problem
        if not isinstance(cost, dict) or "model_sha256" not in cost:
            return f"{folder / 'cost.json'} records no checksum of model.pt (written by an older exitbench)"
        if not (folder / "model.pt").is_file() or file_digest(folder / "model.pt") != cost["model_sha256"]:
            return f"{folder / 'model.pt'} is missing or does not match its checksum in cost.json"
        return None

    def problems(self, run_ids) -> list[str]:
        """One line per run among `run_ids` whose files are damaged, naming the file."""
        lines = []
        for run_id in run_ids:
            problem = self.inspect(run_id)[1]
            if problem:
                lines.append(f"{problem}: the run counts as not done and the next `bench run` recomputes it")
        return lines

    def start_run(self, run_id: str) -> Path:
        """Clear what an interrupted, failed or damaged attempt left (never a done run) and return the folder."""
        if self.state(run_id) == DONE:
            raise RuntimeError(f"run {run_id} is already done; refusing to overwrite it")
        folder = self.run_dir(run_id)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.iterdir():
            if stale.is_file():
                stale.unlink()
        return folder

    def run_ids(self) -> list[str]:
        """Every run folder, whatever its state."""
        runs = self.root / "runs"
        return sorted(p.name for p in runs.iterdir() if p.is_dir()) if runs.is_dir() else []

    def done_run_ids(self) -> list[str]:
        return [run_id for run_id in self.run_ids() if self.state(run_id) == DONE]

    def remove_stale_temporaries(self) -> int:
        """Delete the `.*.tmp` files and folders a killed writer left (only while the folder is locked: no writer
        is alive)."""
        assert self._lock_depth, "only under lock()"
        stale = list(self.root.rglob(".*.tmp"))
        for path in stale:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        return len(stale)

    def receive(self, folder: Path, files: dict[str, bytes]) -> None:
        """Put a run or backbone folder packed elsewhere (`pack_folder`) at `folder`, whole or not at all: the files
        are written and synced in a temporary folder of the store, which then replaces what an earlier attempt left
        (never a done run or a stored backbone: those are not trained again)."""
        assert self._lock_depth, "only under lock()"
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".incoming.", suffix=".tmp"))
        try:
            for name, content in files.items():
                if Path(name).name != name or name.startswith("."):
                    raise ValueError(f"refusing to unpack a file named {name!r} into {folder}")
                with open(staging / name, "wb") as handle:
                    handle.write(content)
                    handle.flush()
                    os.fsync(handle.fileno())
            folder.parent.mkdir(parents=True, exist_ok=True)
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(staging, folder)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def check_writable(self, write: bool = True) -> None:
        """Fail with one line naming the folder and the fix if results cannot be written there. With `write=False`
        (`--dry-run`) nothing is created: the folder, or the nearest existing folder it would be made in, is asked
        with access(2), which also refuses read-only mounts and immutable folders."""
        if not write:
            problem = _unwritable_without_writing(self.root)
            if problem is not None:
                raise UserError(unwritable_message(f"results folder {self.root}", problem))
            return
        probe = None
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.root, prefix=".write-probe.", suffix=".tmp")
            os.close(fd)
        except OSError as error:
            raise UserError(unwritable_message(f"results folder {self.root}", error)) from None
        finally:
            if probe:
                Path(probe).unlink(missing_ok=True)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive use of the results folder for one command (released if the process dies); re-entrant within
        the command, so it holds the folder from its first write to its last."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        self.check_writable()
        handle = open(self.root / ".lock", "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise UserError(f"another `bench` command is writing to {self.root}; wait for it to finish, "
                            f"or pass a different --results folder") from None
        self._lock_depth = 1
        try:
            handle.write(str(os.getpid()))
            handle.flush()
            yield
        finally:
            self._lock_depth = 0
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


def pack_folder(folder: Path) -> dict[str, bytes]:
    """The files of a run or backbone folder (flat; lock and temporary files left out), to send to another machine."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")}


def _parsed(path: Path) -> tuple[Any, str | None]:
    try:
        return read_json(path), None
    except (ValueError, UnicodeDecodeError):
        return None, f"{path} is not valid JSON (truncated by a kill or a full disk?)"


def _spec_problem(folder: Path, run_id: str) -> str | None:
    spec, problem = _parsed(folder / "spec.json") if (folder / "spec.json").is_file() else (None, None)
    if problem:
        return problem
    try:
        matches = RunSpec.from_json(spec).run_id == run_id
    except (TypeError, AttributeError):
        matches = False
    return None if matches else f"{folder / 'spec.json'} is missing or does not describe run {run_id}"


def _unwritable_without_writing(root: Path) -> OSError | None:
    """Why `root` could not be created or written, found without writing: None if it could."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        code = errno.EEXIST if existing == root else errno.ENOTDIR
        return OSError(code, os.strerror(code), str(existing))
    if os.access(existing, os.W_OK | os.X_OK):
        return None
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        code = errno.EROFS
    else:                          # root passes permission bits: only an immutable flag refuses it
        code = errno.EPERM if os.geteuid() == 0 else errno.EACCES
    return OSError(code, os.strerror(code), str(existing))


def unwritable_message(what: str, error: OSError) -> str:
    """One line for an OSError met writing results: which folder or file, why, and what to do."""
    reason = {errno.EROFS: "is on a read-only file system", errno.ENOTDIR: "has a regular file where a folder should be",
              errno.EEXIST: "is a regular file, not a folder", errno.EACCES: "is not writable (permission denied)",
              errno.EPERM: "is not writable (operation not permitted: an immutable folder?)",
              errno.ENOSPC: "is on a full disk", errno.EDQUOT: "is over its disk quota"}.get(
        error.errno, f"cannot be written ({error.strerror})")
    fix = ("free space and rerun the same command (finished runs are kept, an interrupted one restarts)"
           if error.errno in (errno.ENOSPC, errno.EDQUOT) else
           "fix that, or pass --results with a writable folder")
    return f"{what} {reason}: {fix}"
