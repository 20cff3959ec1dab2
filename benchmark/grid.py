"""Grid files (TOML, data only — never evaluated) -> validated list of RunSpecs.

A grid names datasets x archs x regimes x seeds and the settings they share:

    description = "..."
    datasets = ["digits"]; archs = ["small_cnn"]; regimes = ["joint", "mixed"]; seeds = [0, 1, 2]
    optional_datasets = ["basicmotions"]   # included only where their package or files are present
    exclude = [{dataset = "mnist5k", arch = "cifar_resnet8"}]   # (dataset, arch) cells left out
    [train]   epochs (total E), p1_epochs (default E // 2), batch_size, optimizer, lr, momentum, weight_decay, ...
    [model]   head, exits
    [hparams.<objective>]        objective hyperparameters, e.g. [hparams.sdn]
    [arch_overrides.<arch>]      train/model keys that differ for one arch (e.g. AdamW for ViTs)
    [cell_overrides."<glob>"]    train/model keys for the (dataset, arch) cells whose "dataset/arch" matches the
                                 glob (e.g. "mnist5k/*": a per-dataset batch size or epoch budget); after arch_overrides
    [regime_overrides."<glob>"]  optimizer keys (OPTIMIZER_KEYS) that differ in the own phases (P2, P3) of the
                                 regimes matching a glob (e.g. "*+l2w"); never in the shared P1, never anything
                                 that would break pairing (batch size, budget)
    [tuning]                     the declared tuning protocol (benchmark/tuning.py): seeds, lr = [...] (or one
                                 list per optimizer: [tuning.lr] sgd = [...] adamw = [...]), and at most one
                                 knob per objective in [tuning.hparams.<objective>]; successive halving:
                                 rungs = [fractions of the tuned epochs], keep = share going on per rung
    [screen]                     the difficulty screen (benchmark/screen.py): regime, min_gap, max_final — which
                                 cells are worth a leaderboard, decided on validation before other regimes train
    [resources]                  what each run declares to the Ray executor: cpus_per_run, gpus_per_run (the
                                 --cpus-per-run / --gpus-per-run flags win); no effect on results

Runs pair every dataset with every arch of the same input kind (images with image nets, sensor series with
1-D nets). Every mistake is reported with the file and the offending key.
"""
from __future__ import annotations

import difflib
import math
from fnmatch import fnmatchcase
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmark.errors import UserError
from benchmark.spec import RunSpec

GRIDS_DIR = Path(__file__).parent / "grids"

TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": None,            # required: the total budget E
    "p1_epochs": None,         # schedules with a P1 phase: E1 (default E // 2)
    "batch_size": 128,
    "optimizer": "sgd",        # "sgd" | "adamw"
    "lr": 0.05,
    "momentum": 0.9,           # sgd only
    "nesterov": True,          # sgd only
    "weight_decay": 5e-4,
    "eval_every": 1,           # validation accuracy per exit every k epochs (history.csv)
}
MODEL_DEFAULTS: dict[str, Any] = {"head": "auto", "exits": "flops:0.25,0.5,0.75"}
MODEL_KEYS: dict[str, Any] = {**MODEL_DEFAULTS, "weights": ""}
"""What a [model] table may set: MODEL_DEFAULTS, and `weights`, the pretrained backbone (benchmark/weights.py: a
state-dict file, relative to the grid file, or "imagenet"), which enters a run's `model` only when set."""
OPTIMIZER_KEYS = ("optimizer", "lr", "momentum", "nesterov", "weight_decay")
"""What [regime_overrides] may change: settings of a regime's own optimizer, never batches or budgets (pairing)."""
LIST_KEYS = ("datasets", "archs", "regimes", "seeds")
TOP_KEYS = {"description", *LIST_KEYS, "optional_datasets", "exclude", "train", "model", "hparams",
            "arch_overrides", "cell_overrides", "regime_overrides", "tuning", "screen", "analyses", "resources"}
RESOURCE_DEFAULTS: dict[str, Any] = {"cpus_per_run": None, "gpus_per_run": None}
"""None: the executor decides (1 CPU; 1 GPU when --device asks for or finds one)."""
OPTIMIZERS = ("sgd", "adamw")
CHECK_INPUT = {"image": (3, 32, 32), "series": (6, 100)}
"""The input shape, per input kind, that heads and exits are checked at when a grid loads: the data registry knows
no dataset's shape without loading it, and an exit's validity depends on the backbone's blocks, not the shape."""


@dataclass(frozen=True)
class Grid:
    name: str
    path: Path
    description: str
    specs: list[RunSpec]
    raw: dict[str, Any]
    analyses: dict[str, Any]       # the [analyses] table merged over benchmark.analyze.ANALYSIS_DEFAULTS
    tuning: dict[str, Any] | None  # the validated [tuning] table, or None: every value fixed by hand
    resources: dict[str, Any]      # the [resources] table merged over RESOURCE_DEFAULTS
    screen: dict[str, Any] | None = None   # the validated [screen] table (benchmark/screen.py), or None: no screen
    weights: dict[str, Path] = field(default_factory=dict)   # "sha256:<hex>" -> the [model] weights file it hashes


def grid_names() -> list[str]:
    return sorted(p.stem for p in GRIDS_DIR.glob("*.toml"))


def resolve_grid_path(name_or_path: str) -> Path:
    """A registered grid name (`quick`) or a path to the user's own TOML file."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".toml" or candidate.is_file():   # a folder named like a grid is not a grid file
        if not candidate.is_file():
            raise UserError(f"grid file '{candidate}' does not exist")
        return candidate
    path = GRIDS_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        raise UserError(f"unknown grid '{name_or_path}'. Valid grids: {', '.join(grid_names())} "
                        f"(or pass the path of your own .toml grid file)")
    return path


def _bad(path: Path, key: str, problem: str) -> UserError:
    return UserError(f"grid file {path}: key '{key}': {problem}")


def _suggest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(sorted(valid))})"


def _check_table(path: Path, where: str, table: Any, defaults: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise _bad(path, where, "must be a table, e.g. [" + where + "]")
    for key, value in table.items():
        if key not in defaults:
            raise _bad(path, f"{where}.{key}", "unknown key" + _suggest(key, defaults))
        default = defaults[key]
        if default is None or (key == "exits" and isinstance(value, list)):
            continue
        widened = isinstance(default, float) and isinstance(value, int)        # an int where a float is declared
        # a bool is an int to Python, never a number in a grid (batch_size = true was taken as 1)
        if isinstance(value, bool) != isinstance(default, bool) or not (isinstance(value, type(default)) or widened):
            raise _bad(path, f"{where}.{key}", f"expected {type(default).__name__}, got {value!r}")
    return table


def _numbers(table: Any, prefix: str = "") -> list[tuple[str, float]]:
    """Every float of a parsed TOML value with its dotted key (list items as key[i])."""
    if isinstance(table, float):
        return [(prefix, table)]
    if isinstance(table, dict):
        return [found for key, value in table.items()
                for found in _numbers(value, f"{prefix}.{key}" if prefix else key)]
    if isinstance(table, list):
        return [found for i, value in enumerate(table) for found in _numbers(value, f"{prefix}[{i}]")]
    return []


def _validate_train(path: Path, where: str, train: dict[str, Any]) -> None:
    epochs, p1 = train.get("epochs"), train.get("p1_epochs")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise _bad(path, f"{where}.epochs", f"the total epoch budget must be an integer >= 1, got {epochs!r}")
    if p1 is not None and (not isinstance(p1, int) or not 1 <= p1 < epochs):
        raise _bad(path, f"{where}.p1_epochs", f"must be an integer in [1, epochs - 1] = [1, {epochs - 1}], got {p1!r}")
    if p1 is None and epochs < 2:
        raise _bad(path, f"{where}.epochs", "must be >= 2 so that two-phase schedules get an epoch per phase")
    if train["optimizer"] not in OPTIMIZERS:
        raise _bad(path, f"{where}.optimizer", f"must be one of {OPTIMIZERS}, got {train['optimizer']!r}")
    for key in ("batch_size", "eval_every"):
        if train[key] < 1:
            raise _bad(path, f"{where}.{key}", f"must be an integer >= 1, got {train[key]!r}")
    for key, low, strict in (("lr", 0.0, True), ("momentum", 0.0, False), ("weight_decay", 0.0, False)):
        value = train[key]
        if value < low or (strict and value == low):
            raise _bad(path, f"{where}.{key}", f"must be a number {'>' if strict else '>='} {low:g}, got {value!r} "
                                               f"(torch's optimizers refuse it)")
    if train["optimizer"] == "sgd" and train["nesterov"] and train["momentum"] == 0:
        raise _bad(path, f"{where}.nesterov", "Nesterov momentum needs momentum > 0 (torch's SGD refuses "
                                              "nesterov = true with momentum = 0): set momentum or nesterov = false")


def _names(path: Path, raw: dict, key: str, valid: list[str]) -> list:
    values = raw.get(key)
    if not isinstance(values, list) or not values:
        raise _bad(path, key, f"must be a non-empty list, e.g. {key} = [...]")
    if len(set(map(str, values))) != len(values):
        raise _bad(path, key, "lists a value twice")
    if key == "seeds":
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in values):
            raise _bad(path, key, f"seeds must be non-negative integers, got {values}")
        return values
    for value in values:
        if value not in valid:
            raise _bad(path, key, f"unknown name '{value}'. Valid: {', '.join(valid)}")
    return values


def _data_kind(kind_and_task: tuple[str, str]) -> str:
    """"image inputs" or "image inputs with per-pixel labels (segmentation)"."""
    kind, task = kind_and_task
    return f"{kind} inputs" + ("" if task == "classification" else f" with per-pixel labels ({task})")


def _takers(kind_and_task: tuple[str, str]) -> str:
    """The registered archs that take such data, for an error message."""
    from benchmark.models import arch_input_kind, arch_names, arch_task
    names = [a for a in arch_names() if (arch_input_kind(a), arch_task(a)) == kind_and_task]
    return f" (registered archs that do: {', '.join(names)})" if names else " (no registered arch does yet)"


def load_grid(name_or_path: str, data_root: str | Path | None = None, *, check_models: bool = True) -> Grid:
    """Parse and validate a grid; `data_root` decides which `optional_datasets` are present. `check_models=False`
    skips checking each cell's head and exits against its arch (it builds the backbones): only for listing grids."""
    from benchmark.data import dataset_available, dataset_names, dataset_table
    from benchmark.models import arch_input_kind, arch_names, arch_task
    from regimes.registry import objective_names, parse_regime_name, regime_names, OBJECTIVES

    path = resolve_grid_path(name_or_path)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"grid file {path} is not valid TOML: {e}") from None
    for key in raw:
        if key not in TOP_KEYS:
            raise _bad(path, key, "unknown key" + _suggest(key, TOP_KEYS))
    for key, value in _numbers(raw):
        if not math.isfinite(value):
            raise _bad(path, key, f"must be a finite number, got {value} (a run cannot train with it, and JSON "
                                  "cannot store it in spec.json)")

    datasets = _names(path, raw, "datasets", dataset_names())
    archs = _names(path, raw, "archs", arch_names())
    optional = _names(path, raw, "optional_datasets", dataset_names()) if "optional_datasets" in raw else []
    kind = {row["name"]: (row["kind"], row["task"]) for row in dataset_table()}
    takes = {arch: (arch_input_kind(arch), arch_task(arch)) for arch in archs}
    for dataset in datasets:
        if not any(takes[a] == kind[dataset] for a in archs):
            raise _bad(path, "datasets", f"'{dataset}' holds {_data_kind(kind[dataset])} but no arch in archs takes "
                                         f"them{_takers(kind[dataset])}")
    for arch in archs:
        if not any(takes[arch] == kind[d] for d in datasets + optional):
            raise _bad(path, "archs", f"'{arch}' takes {_data_kind(takes[arch])} but no dataset holds them")
    datasets = datasets + [d for d in optional if d not in datasets and dataset_available(d, data_root)]
    regimes = _names(path, raw, "regimes", regime_names())
    seeds = _names(path, raw, "seeds", [])
    train_base = {**TRAIN_DEFAULTS, **_check_table(path, "train", raw.get("train", {}), TRAIN_DEFAULTS)}
    model_base = {**MODEL_DEFAULTS, **_check_table(path, "model", raw.get("model", {}), MODEL_KEYS)}
    _validate_train(path, "train", train_base)

    hparams = raw.get("hparams", {})
    if not isinstance(hparams, dict):
        raise _bad(path, "hparams", "must be a table of [hparams.<objective>] tables")
    for objective, values in hparams.items():
        if objective not in OBJECTIVES and objective not in objective_names():
            raise _bad(path, f"hparams.{objective}", "unknown objective" + _suggest(objective, objective_names()))
        if not isinstance(values, dict):
            raise _bad(path, f"hparams.{objective}", f"must be a table, e.g. [hparams.{objective}]")
        declared = OBJECTIVES[objective].hparams
        for key, value in values.items():
            if key not in declared:
                raise _bad(path, f"hparams.{objective}.{key}", "unknown hyperparameter" + _suggest(key, declared))
            _check_hparam(path, f"hparams.{objective}.{key}", OBJECTIVES[objective], key, value)

    overrides = raw.get("arch_overrides", {})
    for arch, table in overrides.items():
        if arch not in archs:
            raise _bad(path, f"arch_overrides.{arch}", f"arch '{arch}' is not in this grid's archs {archs}")
        _check_table(path, f"arch_overrides.{arch}", table, {**TRAIN_DEFAULTS, **MODEL_KEYS})

    cell_overrides = raw.get("cell_overrides", {})
    for pattern, table in cell_overrides.items():
        if not any(fnmatchcase(f"{d}/{a}", pattern) for d in datasets + optional for a in archs):
            raise _bad(path, f"cell_overrides.{pattern}", "matches no 'dataset/arch' cell of this grid")
        _check_table(path, f"cell_overrides.{pattern}", table, {**TRAIN_DEFAULTS, **MODEL_KEYS})

    regime_overrides = raw.get("regime_overrides", {})
    for pattern, table in regime_overrides.items():
        if not any(fnmatchcase(r, pattern) for r in regimes):
            raise _bad(path, f"regime_overrides.{pattern}", f"matches none of the grid's regimes {regimes}")
        _check_table(path, f"regime_overrides.{pattern}", table, TRAIN_DEFAULTS)
        for key in table:
            if key not in OPTIMIZER_KEYS:
                raise _bad(path, f"regime_overrides.{pattern}.{key}",
                           f"only the regime's own optimizer settings ({', '.join(OPTIMIZER_KEYS)}) may differ "
                           f"between regimes; '{key}' would break pairing — set it in [train] or [cell_overrides]")
    used_optimizers = {train_base["optimizer"], *(table.get("optimizer", train_base["optimizer"]) for table in
                                                  [*overrides.values(), *cell_overrides.values(),
                                                   *regime_overrides.values()])}
    tuning = _tuning(path, raw.get("tuning"), seeds, regime_overrides, objective_names(), used_optimizers)
    screen = _screen(path, raw.get("screen"), regimes, tuning)

    excluded = set()
    for entry in raw.get("exclude", []):
        if not isinstance(entry, dict) or set(entry) != {"dataset", "arch"}:
            raise _bad(path, "exclude", f"entries must look like {{dataset = \"...\", arch = \"...\"}}, got {entry!r}")
        excluded.add((entry["dataset"], entry["arch"]))

    classes = {row["name"]: row["classes"] for row in dataset_table()}
    specs, checked_models, weights_files = [], set(), {}
    for dataset in datasets:
        for arch in archs:
            if takes[arch] != kind[dataset] or (dataset, arch) in excluded:
                continue
            override, origin = {}, {}    # origin: key -> the table it came from, for error messages
            for where, table in [(f"arch_overrides.{arch}", overrides.get(arch, {})),
                                 *((f'cell_overrides."{pattern}"', table) for pattern, table in cell_overrides.items()
                                   if fnmatchcase(f"{dataset}/{arch}", pattern))]:
                override.update(table)
                origin.update(dict.fromkeys(table, where))
            train = {**train_base, **{k: v for k, v in override.items() if k in TRAIN_DEFAULTS}}
            model = {**model_base, **{k: v for k, v in override.items() if k in MODEL_KEYS}}
            weights = model.pop("weights", "")
            if weights:
                model["weights"] = _weights(path, origin.get("weights", "model"), weights, dataset, arch,
                                            classes[dataset], regimes, weights_files,
                                            data_root if check_models else None)
            _validate_train(path, f"overrides of {dataset}/{arch}", train)
            if isinstance(model["exits"], list) and not model["exits"]:
                raise _bad(path, f"{origin.get('exits', 'model')}.exits", "lists no exit: a multi-exit benchmark needs "
                                                                         "at least one early exit before the last")
            check = (arch, classes[dataset], kind[dataset], model["head"], repr(model["exits"]))
            if check_models and check not in checked_models:
                _check_model(path, dataset, arch, model, origin, classes[dataset], kind[dataset][0])
                checked_models.add(check)
            for regime in regimes:
                _, objective = parse_regime_name(regime)
                own_phases = {}
                for pattern, table in regime_overrides.items():
                    if fnmatchcase(regime, pattern):
                        own_phases.update(table)
                _validate_train(path, f"regime_overrides for {regime}", {**train, **own_phases})
                try:
                    resolved = OBJECTIVES[objective](**hparams.get(objective, {})).hp
                except (KeyError, ValueError) as e:
                    raise _bad(path, f"hparams.{objective}", str(e).strip('"')) from None
                for seed in seeds:
                    specs.append(RunSpec(dataset=dataset, arch=arch, regime=regime, seed=seed,
                                         train=dict(train), model=dict(model), hparams=resolved,
                                         own_phases=dict(own_phases)))
    if not specs:
        raise _bad(path, "exclude", "removes every (dataset, arch) cell: the grid has no runs")
    return Grid(name=path.stem, path=path, description=str(raw.get("description", "")), specs=specs, raw=raw,
                analyses=_analyses(path, raw.get("analyses", {})), tuning=tuning,
                resources=_resources(path, raw.get("resources", {})), screen=screen, weights=weights_files)


def _weights(path: Path, where: str, value: str, dataset: str, arch: str, num_classes: int, regimes: list[str],
             files: dict[str, Path], data_root: str | Path | None) -> str:
    """A cell's `weights` as its runs hold it ("imagenet", or "sha256:<hex>" of the file, recorded in `files`),
    checked: the arch has ImageNet weights, or the file exists and, with `data_root` (not when only listing), fits
    the cell's network — every block tensor in shape, and a classifier for the dataset's classes where a regime
    keeps the backbone frozen after P1 (disjoint)."""
    from benchmark import weights as pretrained
    from benchmark.models.registry import _ARCHS
    from benchmark.store import file_digest
    from regimes.base import Budget
    from regimes.registry import build_regime
    bad = lambda problem: _bad(path, f"{where}.weights", f"{problem} (cell {dataset}/{arch})")  # noqa: E731
    if value == pretrained.IMAGENET:
        if not _ARCHS[arch].has_pretrained_weights:
            raise bad(f"{arch} is defined by exitbench and has no ImageNet weights; give a state-dict file instead")
        return value
    file = Path(value).expanduser()
    file = file if file.is_absolute() else path.parent / file
    if not file.is_file():
        raise bad(f"no file {file} (a path relative to the grid file, or \"{pretrained.IMAGENET}\")")
    digest = pretrained.DIGEST_PREFIX + file_digest(file)
    files[digest] = file
    if data_root is not None:
        import torch

        from benchmark.data import load_dataset
        from benchmark.models import build_model
        data = load_dataset(dataset, data_root)
        with torch.device("meta"):
            model = build_model(arch, num_classes, data.input_shape, head="auto", exits=[])
        try:
            state = pretrained.read_weights(file)
        except UserError as error:
            raise bad(str(error)) from None
        try:
            with_classifier = pretrained.classifier_fits(state, model)
        except UserError as error:
            raise bad(f"{file} {error}") from None
        frozen = [r for r in regimes if not any(phase.trains == "all" for phase in build_regime(r).phases(Budget(2)))]
        if frozen and not with_classifier:
            raise bad(f"{file} has no classifier for {dataset}'s {num_classes} classes, which {', '.join(frozen)} "
                      f"would never train (only heads train after P1): save the classifier with the backbone, or "
                      f"leave {', '.join(frozen)} out")
    return digest


def _screen(path: Path, table: Any, regimes: list[str], tuning: dict[str, Any] | None) -> dict[str, Any] | None:
    """Validate [screen] (benchmark/screen.py): the regime whose tuning decides, the least gap between the first and
    the final exit, the ceiling of the final exit — validation accuracies, declared before anything trains."""
    from benchmark.screen import SCREEN_DEFAULTS
    if table is None:
        return None
    screen = {**SCREEN_DEFAULTS, **_check_table(path, "screen", table, SCREEN_DEFAULTS)}
    if screen["regime"] not in regimes:
        raise _bad(path, "screen.regime", f"'{screen['regime']}' is not one of the grid's regimes "
                                          f"({', '.join(regimes)}): the screen trains it first, in every cell")
    if tuning is None:
        raise _bad(path, "screen", "the screen reads the screen regime's tuning winner at the cell's budget: "
                                   "declare [tuning] too")
    for key, low, high in (("min_gap", 0.0, 1.0), ("max_final", 0.0, 1.0)):
        value = screen[key]                    # a number (`_check_table`), finite (`_numbers`)
        if not low <= value <= high:
            raise _bad(path, f"screen.{key}", f"must be a validation accuracy in [{low:g}, {high:g}], got {value!r}")
    return screen


def _check_hparam(path: Path, where: str, objective, key: str, value: Any) -> None:
    """`value` of `objective`'s hyperparameter `key` against its declaration, reported as the grid's key `where`."""
    from regimes.base import check_hparam
    try:
        check_hparam(objective, key, value)
    except ValueError as e:
        raise _bad(path, where, str(e)) from None


def _check_model(path: Path, dataset: str, arch: str, model: dict[str, Any], origin: dict[str, str],
                 num_classes: int, kind: str) -> None:
    """A cell's head and exits against its arch, as `build_model` will check them, so that a wrong one fails here
    and not in every run of the cell; `origin` names the table each model key came from (default: [model])."""
    from benchmark.models import exit_placement
    from benchmark.models.heads import resolve_head_kind
    from benchmark.models.registry import _ARCHS

    def bad(key: str, error: UserError) -> UserError:
        return _bad(path, f"{origin.get(key, 'model')}.{key}", f"{error} (cell {dataset}/{arch})")

    try:
        resolve_head_kind(model["head"], _ARCHS[arch].tokens, arch, multi_scale=_ARCHS[arch].multi_scale,
                          task=_ARCHS[arch].task)
    except UserError as e:
        raise bad("head", e) from None
    try:
        exit_placement(arch, num_classes, CHECK_INPUT[kind], model["exits"])
    except UserError as e:
        raise bad("exits", e) from None


def _tuning(path: Path, table: Any, seeds: list[int], regime_overrides: dict, objectives: list[str],
            used_optimizers: set[str]) -> dict | None:
    """Validate [tuning]: seeds (not reported ones), lr candidates, at most one knob per objective, and successive
    halving's rungs (increasing fractions of the tuned phases, in (0, 1)) with the share `keep` in (0, 1) of the
    candidates that go on at each rung — both or neither."""
    if table is None:
        return None
    allowed = {"seeds", "lr", "hparams", "rungs", "keep"}
    if not isinstance(table, dict):
        raise _bad(path, "tuning", "must be a table: [tuning] seeds = [...] lr = [...]")
    for key in table:
        if key not in allowed:
            raise _bad(path, f"tuning.{key}", "unknown key" + _suggest(key, allowed))
    tuning_seeds = _names(path, table, "seeds", [])
    shared = sorted(set(tuning_seeds) & set(seeds))
    if shared:
        raise _bad(path, "tuning.seeds", f"seeds {shared} are also reported seeds; tuning must use other seeds")
    declared = table.get("lr")
    if isinstance(declared, dict):          # one list per optimizer: [tuning.lr] sgd = [...] adamw = [...]
        for optimizer in declared:
            if optimizer not in OPTIMIZERS:
                raise _bad(path, f"tuning.lr.{optimizer}", "unknown optimizer" + _suggest(optimizer, OPTIMIZERS))
        missing = sorted(set(used_optimizers) - set(declared))
        if missing:
            raise _bad(path, "tuning.lr", f"declares no learning rates for {', '.join(missing)}, which cells of this "
                                          f"grid train with; add `{missing[0]} = [...]`")
        lrs_of = {optimizer: _learning_rates(path, f"tuning.lr.{optimizer}", lrs)
                  for optimizer, lrs in declared.items()}
    else:
        lrs = _learning_rates(path, "tuning.lr", declared)
        lrs_of = dict.fromkeys(OPTIMIZERS, lrs)
    for pattern, override in regime_overrides.items():
        if "lr" in override:
            raise _bad(path, f"regime_overrides.{pattern}.lr", "the lr is tuned ([tuning] lr); do not also fix it")
    knobs = table.get("hparams", {})
    if not isinstance(knobs, dict):
        raise _bad(path, "tuning.hparams", "must be a table of [tuning.hparams.<objective>] tables")
    from regimes.registry import OBJECTIVES
    for objective, values in knobs.items():
        if objective not in objectives:
            raise _bad(path, f"tuning.hparams.{objective}", "unknown objective" + _suggest(objective, objectives))
        if not isinstance(values, dict) or len(values) != 1:
            raise _bad(path, f"tuning.hparams.{objective}", "tune at most one knob per objective, as "
                       "`knob = [v1, v2]`")
        (knob, candidates), = values.items()
        if knob not in OBJECTIVES[objective].hparams:
            raise _bad(path, f"tuning.hparams.{objective}.{knob}",
                       "unknown hyperparameter" + _suggest(knob, OBJECTIVES[objective].hparams))
        if not isinstance(candidates, list) or not candidates or len(set(map(repr, candidates))) != len(candidates):
            raise _bad(path, f"tuning.hparams.{objective}.{knob}", "must be a non-empty list of distinct values")
        for value in candidates:
            _check_hparam(path, f"tuning.hparams.{objective}.{knob}", OBJECTIVES[objective], knob, value)
    return {"seeds": tuning_seeds, "lr": lrs_of, "hparams": knobs, **_halving(path, table)}


def _halving(path: Path, table: dict) -> dict:
    if ("rungs" in table) != ("keep" in table):
        raise _bad(path, "tuning.rungs" if "keep" in table else "tuning.keep",
                   "successive halving needs both `rungs = [fractions]` and `keep = share`; declare both or neither")
    if "rungs" not in table:
        return {}
    rungs, keep = table["rungs"], table["keep"]
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1  # noqa: E731
    if not isinstance(rungs, list) or not rungs or not all(map(number, rungs)) or sorted(set(rungs)) != rungs:
        raise _bad(path, "tuning.rungs", f"must be increasing fractions of the tuned epochs in (0, 1), e.g. "
                                         f"[0.25, 0.5], got {rungs!r}")
    if not number(keep):
        raise _bad(path, "tuning.keep", f"must be the share of candidates kept at each rung, in (0, 1), got {keep!r}")
    return {"rungs": [float(r) for r in rungs], "keep": float(keep)}


def _learning_rates(path: Path, key: str, lrs: Any) -> list[float]:
    if not isinstance(lrs, list) or not lrs or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in lrs):
        raise _bad(path, key, f"must be a non-empty list of learning rates > 0, got {lrs!r}")
    if len(set(lrs)) != len(lrs):
        raise _bad(path, key, "lists a value twice")
    return [float(v) for v in lrs]


def _resources(path: Path, table: Any) -> dict[str, Any]:
    settings = {**RESOURCE_DEFAULTS, **_check_table(path, "resources", table, RESOURCE_DEFAULTS)}
    for key, value in settings.items():
        if value is None:
            continue
        whole = key == "cpus_per_run"
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)) or value < (1 if whole else 0):
            raise _bad(path, f"resources.{key}", f"must be {'a whole number >= 1' if whole else 'a number >= 0'}, "
                                                 f"got {value!r}")
    return settings


def _analyses(path: Path, table: Any) -> dict[str, Any]:
    from benchmark.analyze import ANALYSIS_DEFAULTS, MODEL_ANALYSES
    settings = {**ANALYSIS_DEFAULTS, **_check_table(path, "analyses", table, ANALYSIS_DEFAULTS)}
    unknown = set(settings["model"]) - set(MODEL_ANALYSES)
    if unknown:
        raise _bad(path, "analyses.model", f"unknown analyses {sorted(unknown)}; valid: {', '.join(MODEL_ANALYSES)}")
    for key, value in settings.items():
        if isinstance(value, int) and not isinstance(value, bool) and value < 0:
            raise _bad(path, f"analyses.{key}", f"must be >= 0, got {value}")
    from benchmark.corruptions import SEVERITIES, unknown_corruptions
    unknown = unknown_corruptions(settings["corruptions"])
    if unknown:
        raise _bad(path, "analyses.corruptions", f"unknown corruptions {unknown}; valid: "
                   f"{', '.join(ANALYSIS_DEFAULTS['corruptions'])}")
    if not settings["severities"] or any(s not in SEVERITIES for s in settings["severities"]):
        raise _bad(path, "analyses.severities", f"must be a non-empty list of severities in {list(SEVERITIES)}, "
                   f"got {settings['severities']!r}")
    return settings


def parse_filters(only: tuple[str, ...]) -> list[tuple[str, str]]:
    """`--only regime=mixed*` -> [("regime", "mixed*")]."""
    from benchmark.spec import FILTER_KEYS
    filters = []
    for item in only:
        key, sep, pattern = item.partition("=")
        if not sep or key not in FILTER_KEYS or not pattern:
            raise UserError(f"--only '{item}': expected KEY=GLOB with KEY one of {', '.join(FILTER_KEYS)}, "
                            f"e.g. --only 'regime=mixed*'")
        filters.append((key, pattern))
    return filters


def select(specs: list[RunSpec], filters: list[tuple[str, str]]) -> list[RunSpec]:
    """Runs matching every filter (filters on the same key are alternatives)."""
    by_key: dict[str, list[str]] = {}
    for key, pattern in filters:
        by_key.setdefault(key, []).append(pattern)
    return [s for s in specs if all(any(s.matches(k, p) for p in ps) for k, ps in by_key.items())]
