"""Per-exit outputs of a model trained elsewhere, evaluated under the suite's protocol (`bench evaluate`).

Researchers arrive with per-exit logits of models the suite did not train (an official MSDNet or L2W checkpoint, the
logits a paper ships for reproducibility). One such model is one file, an `.npz` of plain arrays (read with
`allow_pickle=False`), FORMAT below; `read_outputs` checks it whole before anything is computed or written and says
in one line what is wrong. Its evaluation is the suite's own (`benchmark.evaluate.evaluate`: every policy, the
validation-selected points and areas; `analysis.calibration.exit_calibration`; `analysis.robustness.run_robustness`
when corrupted test outputs are given), so an entry's numbers mean what a trained run's mean: `export_run` writes a
suite run in this format, and evaluating that file gives the run's own tables back (tests/test_external.py).

Keys (K exits, N samples per split, C classes; the last exit is the model's final classifier):
    format                   "exitbench-exit-outputs/1"
    val_logits, test_logits  (K, N, C) float, finite — or val_probs, test_probs: (K, N, C) probabilities, each row
                             summing to 1 (evaluated as their logarithms, which every exit rule reads alike)
    val_labels, test_labels  (N,) integers in [0, C)
    exit_flops               (K,) FLOPs per sample of leaving at exit k (backbone up to k and every head up to k;
                             1 multiply-add = 2 FLOPs), strictly increasing
    num_classes              C
  optional:
    backbone_flops           FLOPs of the plain backbone, the 100 % of every budget (default: exit_flops[-1])
    test_logits@CORRUPTION@SEVERITY (or test_probs@...)   test outputs on a corrupted copy of the test split
    name, provenance, url    strings: what the model is, where it came from (free text, a URL)
    dataset, arch, seed      the suite's dataset name (needed to join a grid's report), an architecture label, a seed
                             (entries of the same dataset, arch and seed as a grid's runs pair with them in
                             `bench claim`)
    run_id                   kept as the entry's id (an exported suite run keeps its own)
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.errors import UserError
from benchmark.store import file_digest

FORMAT = "exitbench-exit-outputs/1"
EXTERNAL_FOLDER = "external"
"""Where `bench evaluate --grid G --as NAME` writes entries (results/<grid>/external/<entry id>/), and the default
results folder of `bench evaluate` without a grid (results/external)."""
SPLITS = ("val", "test")
TEXT_KEYS = ("name", "provenance", "url", "dataset", "arch", "run_id")
PROBABILITY_TOLERANCE = 1e-3
"""How far a row of given probabilities may sum from 1 (float32 softmax outputs of 1000 classes sum within ~1e-5)."""


class BadOutputs(UserError, ValueError):
    """Per-exit outputs that do not follow FORMAT; the message names the file (or function) and the problem."""


@dataclass(frozen=True)
class ExternalOutputs:
    """One external model's per-exit outputs, checked (`read_outputs`): logits (probabilities already turned into
    log-probabilities), labels, costs and what the file says about where the model came from."""

    name: str
    val_logits: np.ndarray
    val_labels: np.ndarray
    test_logits: np.ndarray
    test_labels: np.ndarray
    exit_flops: np.ndarray
    backbone_flops: float
    num_classes: int
    corrupted: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    provenance: str = ""
    url: str = ""
    dataset: str | None = None
    arch: str | None = None
    seed: int | None = None
    run_id: str | None = None
    sha256: str = ""

    @property
    def num_exits(self) -> int:
        return len(self.exit_flops)

    @property
    def entry_id(self) -> str:
        """The entry's folder name and run_id column: the file's own run_id, else external-NAME[-sSEED]."""
        return self.run_id or f"external-{self.name}" + ("" if self.seed is None else f"-s{self.seed}")


def read_outputs(path: str | Path, name: str | None = None) -> ExternalOutputs:
    """The file at `path`, checked against FORMAT; `name` overrides the file's own name (default: the file's stem).
    Raises BadOutputs with one line naming the problem."""
    path = Path(path)
    fail = lambda problem: BadOutputs(f"{path}: {problem}")  # noqa: E731
    if not path.is_file():
        raise fail("no such file")
    if not zipfile.is_zipfile(path):
        raise fail("is not a readable .npz file (not a zip archive of arrays: write it with np.savez)")
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in stored.files}
    except ValueError as error:
        raise fail(f"holds pickled objects ({error}); store plain numeric and string arrays (np.savez)") from None
    except (OSError, EOFError, zipfile.BadZipFile) as error:
        raise fail(f"is not a readable .npz file ({type(error).__name__}: {error})") from None
    return checked_outputs(arrays, str(path), name, path.stem, file_digest(path))


def checked_outputs(arrays: dict[str, np.ndarray], where: str, name: str | None, fallback_name: str,
                    sha256: str = "") -> ExternalOutputs:
    """`arrays` (FORMAT's keys) checked whole and turned into ExternalOutputs, named `name`, else by the arrays'
    own name, else `fallback_name`; a BadOutputs error starts with `where` (the file, or the function given them)."""
    fail = lambda problem: BadOutputs(f"{where}: {problem}")  # noqa: E731
    declared = _text(arrays, "format", fail)
    if declared != FORMAT:
        raise fail(f"format is {declared!r}, expected {FORMAT!r} (BENCHMARK.md, 'Models trained elsewhere')")
    texts = {key: _text(arrays, key, fail) for key in TEXT_KEYS if key in arrays}
    num_classes = _integer(arrays, "num_classes", fail)
    if num_classes < 2:
        raise fail(f"num_classes is {num_classes}; an early-exit classifier needs at least 2 classes")
    kind = _output_kind(arrays, fail)
    outputs = {split: _outputs(arrays, f"{split}_{kind}", kind, num_classes, fail) for split in SPLITS}
    exits = {split: len(outputs[split]) for split in SPLITS}
    exit_flops = _numeric(arrays, "exit_flops", fail).astype(np.float64)
    if exit_flops.ndim != 1 or not exits["val"] == exits["test"] == len(exit_flops):
        raise fail(f"exit counts disagree: val_{kind} has {exits['val']}, test_{kind} {exits['test']}, exit_flops "
                   f"{exit_flops.shape}; every one needs one entry per exit")
    if len(exit_flops) < 2:
        raise fail("one exit only: an early-exit model needs at least two")
    if not np.isfinite(exit_flops).all() or exit_flops[0] <= 0 or (np.diff(exit_flops) <= 0).any():
        raise fail(f"exit_flops must be positive and strictly increasing across exits (leaving later costs more), "
                   f"got {exit_flops.tolist()}")
    backbone = float(_numeric(arrays, "backbone_flops", fail)) if "backbone_flops" in arrays else exit_flops[-1]
    if not np.isfinite(backbone) or backbone <= 0:
        raise fail(f"backbone_flops must be a positive number, got {backbone}")
    labels = {split: _labels(arrays, f"{split}_labels", outputs[split].shape[1], num_classes, fail)
              for split in SPLITS}
    _check_validation_size(labels["val"], num_classes, fail)
    corrupted = {}
    for key in (k for k in arrays if k.startswith(("test_logits@", "test_probs@"))):     # in the file's order
        parts = key.split("@")
        if len(parts) != 3 or not parts[1] or not parts[2].isdigit():
            raise fail(f"'{key}' is not test_{kind}@CORRUPTION@SEVERITY (severity a positive integer)")
        if parts[0] != f"test_{kind}":
            raise fail(f"'{key}' mixes {parts[0].split('_')[1]} with the file's {kind}; give every output as {kind}")
        case = (parts[1], int(parts[2]))
        corrupted[case] = _outputs(arrays, key, kind, num_classes, fail)
        if corrupted[case].shape != outputs["test"].shape:
            raise fail(f"'{key}' has shape {corrupted[case].shape}, test_{kind} {outputs['test'].shape}: a corrupted "
                       f"copy of the test split has its shape")
    seed = _integer(arrays, "seed", fail) if "seed" in arrays else None
    return ExternalOutputs(
        name=name or texts.get("name") or fallback_name, val_logits=outputs["val"], val_labels=labels["val"],
        test_logits=outputs["test"], test_labels=labels["test"], exit_flops=exit_flops, backbone_flops=float(backbone),
        num_classes=num_classes, corrupted=corrupted, provenance=texts.get("provenance", ""),
        url=texts.get("url", ""), dataset=texts.get("dataset"), arch=texts.get("arch"), seed=seed,
        run_id=texts.get("run_id"), sha256=sha256)


def _text(arrays: dict, key: str, fail) -> str:
    if key not in arrays:
        raise fail(f"no '{key}' array")
    value = arrays[key]
    if value.dtype.kind != "U" or value.ndim != 0:
        raise fail(f"'{key}' must be a string (np.str_), got a {value.dtype} array of shape {value.shape}")
    return str(value)


def _numeric(arrays: dict, key: str, fail) -> np.ndarray:
    if key not in arrays:
        raise fail(f"no '{key}' array")
    value = arrays[key]
    if value.dtype.kind not in "iuf":
        raise fail(f"'{key}' must be numeric, got dtype {value.dtype}")
    return value


def _integer(arrays: dict, key: str, fail) -> int:
    value = _numeric(arrays, key, fail)
    if value.ndim != 0 or value != np.round(value):
        raise fail(f"'{key}' must be one integer, got {value.tolist()}")
    return int(value)


def _output_kind(arrays: dict, fail) -> str:
    kinds = [kind for kind in ("logits", "probs") if f"val_{kind}" in arrays or f"test_{kind}" in arrays]
    if len(kinds) != 1:
        raise fail("needs val_logits and test_logits (or val_probs and test_probs), one kind for both splits; "
                   f"found {sorted(k for k in arrays if k.startswith(('val_', 'test_')))}")
    return kinds[0]


def _outputs(arrays: dict, key: str, kind: str, num_classes: int, fail) -> np.ndarray:
    value = _numeric(arrays, key, fail)
    if value.ndim != 3:
        raise fail(f"'{key}' has shape {value.shape}; expected (exits, samples, classes)")
    if value.shape[2] != num_classes:
        raise fail(f"'{key}' has {value.shape[2]} classes, num_classes is {num_classes}")
    if value.shape[1] == 0:
        raise fail(f"'{key}' holds no samples")
    if not np.isfinite(value).all():
        bad = np.argwhere(~np.isfinite(value))[0]
        raise fail(f"'{key}' is not finite at exit {bad[0]}, sample {bad[1]} (NaN or inf outputs cannot be ranked)")
    if kind == "logits":
        return value
    sums = value.sum(axis=-1, dtype=np.float64)
    if (value < 0).any() or (value > 1).any() or (np.abs(sums - 1) > PROBABILITY_TOLERANCE).any():
        raise fail(f"'{key}' are not probabilities (each in [0, 1], each row summing to 1 within "
                   f"{PROBABILITY_TOLERANCE:g}); give logits as {key.replace('probs', 'logits')} instead")
    return np.log(np.maximum(value, np.finfo(value.dtype).tiny if value.dtype.kind == "f" else 1e-300))


def _labels(arrays: dict, key: str, samples: int, num_classes: int, fail) -> np.ndarray:
    value = _numeric(arrays, key, fail)
    if value.dtype.kind == "f" and (value != np.round(value)).any():
        raise fail(f"'{key}' must hold integer class indices")
    if value.shape != (samples,):
        raise fail(f"'{key}' has shape {value.shape}, the outputs have {samples} samples")
    if value.min() < 0 or value.max() >= num_classes:
        raise fail(f"'{key}' has labels outside [0, {num_classes}) (min {value.min()}, max {value.max()})")
    return value.astype(np.int64)


def _check_validation_size(labels: np.ndarray, num_classes: int, fail) -> None:
    from benchmark.checks import MIN_VAL_PER_CLASS
    smallest = int(np.bincount(labels, minlength=num_classes).min())
    if smallest < MIN_VAL_PER_CLASS:
        raise fail(f"the validation split has {smallest} samples in its smallest class (minimum {MIN_VAL_PER_CLASS}): "
                   f"thresholds and operating points are chosen on validation and would be noise; give a larger one")


def write_outputs(path: str | Path, *, val_logits, val_labels, test_logits, test_labels, exit_flops, num_classes: int,
                  backbone_flops: float | None = None, corrupted: dict[tuple[str, int], np.ndarray] | None = None,
                  **text) -> Path:
    """Write a file in FORMAT (logits; `text`: any of name, provenance, url, dataset, arch, run_id, and seed)."""
    from benchmark.store import write_npz
    path = Path(path)
    write_npz(path, **format_arrays(val_logits=val_logits, val_labels=val_labels, test_logits=test_logits,
                                    test_labels=test_labels, exit_flops=exit_flops, num_classes=num_classes,
                                    backbone_flops=backbone_flops, corrupted=corrupted, **text))
    return path


def format_arrays(*, val_logits, val_labels, test_logits, test_labels, exit_flops, num_classes: int,
                  backbone_flops: float | None = None, corrupted: dict[tuple[str, int], np.ndarray] | None = None,
                  kind: str = "logits", **text) -> dict[str, np.ndarray]:
    """FORMAT's arrays of the given outputs (`kind` "logits" or "probs"), unchecked (`checked_outputs` checks
    them)."""
    unknown = set(text) - {*TEXT_KEYS, "seed"}
    if unknown:
        raise TypeError(f"unknown keys {sorted(unknown)}; known: {[*TEXT_KEYS, 'seed']}")
    arrays = {"format": np.str_(FORMAT), f"val_{kind}": np.asarray(val_logits), "val_labels": np.asarray(val_labels),
              f"test_{kind}": np.asarray(test_logits), "test_labels": np.asarray(test_labels),
              "exit_flops": np.asarray(exit_flops, dtype=np.float64), "num_classes": np.int64(num_classes),
              **{key: np.str_(value) for key, value in text.items() if key != "seed" and value is not None}}
    if text.get("seed") is not None:
        arrays["seed"] = np.int64(text["seed"])
    if backbone_flops is not None:
        arrays["backbone_flops"] = np.float64(backbone_flops)
    for (corruption, severity), logits in (corrupted or {}).items():
        arrays[f"test_{kind}@{corruption}@{severity}"] = np.asarray(logits)
    return arrays


def export_run(store, run_id: str, path: str | Path, provenance: str = "") -> Path:
    """A done classification run of the suite as an external outputs file: its stored logits, costs and labels, its
    cached corrupted test logits (robustness_logits.npz) where analysed, and its identity."""
    from benchmark.store import DONE, read_json, read_run_logits
    if store.state(run_id) != DONE:
        raise UserError(f"run {run_id} is not done in {store.root}; `bench show {run_id}` says where it stands")
    folder = store.run_dir(run_id)
    if not (folder / "logits.npz").is_file():
        raise UserError(f"run {run_id} has no logits.npz: only classification runs can be exported")
    metrics = read_json(folder / "metrics.json")
    stored = read_run_logits(folder, metrics["num_exits"])
    corrupted = {}
    if (folder / "robustness_logits.npz").is_file():
        with np.load(folder / "robustness_logits.npz") as cached:
            corrupted = {(key.split("@")[0], int(key.split("@")[1])): cached[key] for key in cached.files}
    return write_outputs(path, val_logits=stored["val"], val_labels=stored["val_y"], test_logits=stored["test"],
                         test_labels=stored["test_y"], exit_flops=stored["exit_flops"],
                         num_classes=stored["val"].shape[-1],
                         backbone_flops=metrics["flops"]["backbone"], corrupted=corrupted,
                         name=metrics["regime"], provenance=provenance or f"exitbench run {run_id}",
                         dataset=metrics["dataset"], arch=metrics["arch"], seed=metrics["seed"], run_id=run_id)


# --------------------------------------------------------------------------------------------------------------
# Evaluation: the suite's per-run tables of one entry


def entry_labels(outputs: ExternalOutputs) -> dict:
    """What the entry's table rows are named by, in the order of a run's labels (`RunSpec.labels`): its id, the
    dataset and arch it declares ('' where it declares none), its name in the regime column, its seed."""
    return {"run_id": outputs.entry_id, "dataset": outputs.dataset or "", "arch": outputs.arch or "",
            "regime": outputs.name, "seed": outputs.seed}


def evaluate_outputs(outputs: ExternalOutputs) -> tuple[dict[str, pd.DataFrame], dict]:
    """(the entry's per-run tables, its summary): exits, curves and selected as a trained run's folder holds them
    (`benchmark.evaluate.evaluate`), calibration and reliability as `bench analyze` computes them for the run
    (`exit_calibration` of the test outputs), robustness as its robustness analysis does when corrupted test outputs
    are given (`analysis.robustness.run_robustness`, thresholds still chosen on the clean validation outputs)."""
    from analysis.calibration import exit_calibration
    from analysis.robustness import run_robustness
    from benchmark.evaluate import evaluate
    labels = entry_labels(outputs)
    labelled = lambda frame: frame.assign(**labels)[[*labels, *frame.columns]]  # noqa: E731
    evaluation = evaluate(outputs.val_logits, outputs.val_labels, outputs.test_logits, outputs.test_labels,
                          outputs.exit_flops, outputs.backbone_flops)
    calibration, reliability = exit_calibration(outputs.test_logits, outputs.test_labels)
    tables = {"exits": evaluation.exits.assign(run_id=labels["run_id"]),
              "curves": evaluation.curves.assign(run_id=labels["run_id"]),
              "selected": evaluation.selected.assign(run_id=labels["run_id"]),
              "calibration": labelled(calibration), "reliability": labelled(reliability)}
    if outputs.corrupted:
        tables["robustness"] = labelled(run_robustness(
            outputs.val_logits, outputs.val_labels, outputs.test_logits, outputs.test_labels, outputs.corrupted,
            outputs.exit_flops, outputs.backbone_flops))
    return tables, evaluation.summary


def write_entry(root: Path, outputs: ExternalOutputs, source: Path, grid: str | None = None) -> tuple[Path, dict]:
    """Evaluate `outputs` and write its folder, root/<entry id>/: the tables of `evaluate_outputs`, metrics.json
    (summary, costs, where the outputs came from; written last, as a run's) and report.md, its report section.
    Everything is computed before the first file is written. Returns (the folder, the summary)."""
    from benchmark.report import entry_section
    from benchmark.store import write_csv, write_json, write_text
    tables, summary = evaluate_outputs(outputs)
    metrics = {**entry_labels(outputs), "summary": summary, "num_exits": outputs.num_exits,
               "flops": {"unit": "FLOPs (1 multiply-add = 2 FLOPs), per sample", "backbone": outputs.backbone_flops,
                         "exits": outputs.exit_flops.tolist()},
               "external": {"source": source.name, "sha256": outputs.sha256, "provenance": outputs.provenance,
                            "url": outputs.url, "grid": grid, "val_samples": len(outputs.val_labels),
                            "test_samples": len(outputs.test_labels), "num_classes": outputs.num_classes,
                            "corruptions": sorted({c for c, _ in outputs.corrupted})}}
    section = entry_section(metrics, tables)
    folder = root / outputs.entry_id
    folder.mkdir(parents=True, exist_ok=True)
    for name, frame in tables.items():
        write_csv(folder / f"{name}.csv", frame)
    write_text(folder / "report.md", "\n".join(section) + "\n")
    write_json(folder / "metrics.json", metrics)
    return folder, summary


def read_entries(root: Path) -> list[tuple[dict, dict[str, pd.DataFrame]]]:
    """(metrics, tables) of every written entry under `root` (`write_entry`'s folders), in id order."""
    from benchmark.store import read_csv, read_json
    entries = []
    for metrics_file in sorted(Path(root).glob("*/metrics.json")):
        folder = metrics_file.parent
        tables = {path.stem: read_csv(path) for path in sorted(folder.glob("*.csv"))}
        entries.append((read_json(metrics_file), tables))
    return entries


def entry_runs(entries: list[tuple[dict, dict[str, pd.DataFrame]]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Entries as rows of runs.csv (identity, status done, summary; no cost) and exits.csv: what `bench claim` pairs
    with the grid's runs, by dataset, arch and seed."""
    from benchmark.store import DONE
    keys = ("run_id", "dataset", "arch", "regime", "seed")
    runs = pd.DataFrame([{**{key: metrics[key] for key in keys}, "status": DONE, "num_exits": metrics["num_exits"],
                          **metrics["summary"], "backbone_flops": metrics["flops"]["backbone"]}
                         for metrics, _ in entries])
    exits = pd.concat([tables["exits"].assign(**{key: metrics[key] for key in keys[1:]}) for metrics, tables in entries],
                      ignore_index=True) if entries else pd.DataFrame()
    return runs, exits


def check_against_grid(path: Path, outputs: ExternalOutputs, grid, data_root: Path) -> None:
    """An entry joins a grid's report only if it is comparable: it declares one of the grid's datasets, its name is
    no regime's, and its test labels are that dataset's test split as the suite holds it, sample for sample (the
    grid's runs are tested on exactly those samples)."""
    from benchmark.data import load_dataset
    datasets = sorted({spec.dataset for spec in grid.specs})
    if outputs.dataset not in datasets:
        raise BadOutputs(f"{path}: declares dataset {outputs.dataset!r}; grid '{grid.name}' has "
                         f"{', '.join(datasets)} — give the file a 'dataset' string naming one of them")
    if outputs.name in {spec.regime for spec in grid.specs}:
        raise BadOutputs(f"{path}: its name '{outputs.name}' is a regime of grid '{grid.name}'; name the entry "
                         f"apart with --as")
    data = load_dataset(outputs.dataset, data_root)
    expected = data.y_test.cpu().numpy()
    if data.num_classes != outputs.num_classes or expected.shape != outputs.test_labels.shape \
            or not np.array_equal(expected, outputs.test_labels):
        found = (f"{len(outputs.test_labels)} test samples against {len(expected)}"
                 if expected.shape != outputs.test_labels.shape else
                 f"{outputs.num_classes} classes against {data.num_classes}" if data.num_classes != outputs.num_classes
                 else f"{int((expected != outputs.test_labels).sum())} labels differ")
        raise BadOutputs(f"{path}: its test labels are not {outputs.dataset}'s test split as exitbench holds it "
                         f"({found}); entries are compared on the grid's test samples, in the order of "
                         f"benchmark.data.load_dataset({outputs.dataset!r}).y_test")
