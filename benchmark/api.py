"""The Python API: the suite's evaluation, claims and figures without the command line, for notebooks.

Everything here calls the code the CLI runs — no second implementation of any rule:
- `evaluate_outputs(...)`: per-exit validation and test logits (or probabilities) → an `Evaluated`: every exit,
  every policy's curve, the operating points validation selects, the areas, calibration, robustness (the checks and
  evaluation of `bench evaluate`, benchmark/external.py).
- `evaluate_model(model, val, test, ...)`: the same from any `nn.Module` whose forward returns a list of per-exit
  logits (through the suite's one eval-forward, `benchmark.pipeline.collect_logits`). Exit FLOPs are given, or
  counted when the model is a `MultiExitNet` (benchmark/models/multi_exit.py).
- `train_model(model, regime, train, val, ...)`: a `MultiExitNet` — the suite's, or one built from your own blocks,
  exit heads and classifier — trained in place under any registered regime's schedule and objective, by the suite's
  trainer (`benchmark.train.run_phase`).
- `claim(a, b, ...)`: "a beats b" (or "is not worse") on two result tables, by the shipped claims' rules.
- `draw_pareto(ax, curves)`, `draw_critical_difference(ax, runs)`: the report's figures on a matplotlib axis.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

PAIR_COLUMNS = ("dataset", "arch", "seed")
"""What pairs two result tables' rows in `claim`: the same cell and seed."""


@dataclass(frozen=True)
class Evaluated:
    """One model's evaluation, as the suite's tables hold a run's (`dataset`, `arch`, `regime` = the name, `seed`
    columns first, so several can be concatenated and passed to `claim` or `draw_pareto`).

    exits: one row per exit (FLOPs, validation and test accuracy, macro-F1); curves: every policy's operating
    points; selected: the points validation selects (budgets and staircase); calibration: per exit (ECE, KS, NLL,
    Brier); robustness: per corruption, severity and point, or None without corrupted outputs; summary: the
    numbers of runs.csv (`auc_normalised`, the area, is the primary one)."""

    exits: pd.DataFrame
    curves: pd.DataFrame
    selected: pd.DataFrame
    calibration: pd.DataFrame
    robustness: pd.DataFrame | None
    summary: dict

    def row(self) -> pd.DataFrame:
        """The summary as one runs.csv-like row (identity columns and summary numbers): what `claim` pairs."""
        identity = self.curves.iloc[0][["dataset", "arch", "regime", "seed"]].to_dict()
        return pd.DataFrame([{**identity, **self.summary}])


def evaluate_outputs(val_logits, val_labels, test_logits, test_labels, exit_flops, *, backbone_flops=None,
                     probabilities: bool = False, corrupted: dict | None = None, name: str = "model",
                     dataset: str = "", arch: str = "", seed: int | None = None) -> Evaluated:
    """Evaluate per-exit outputs: (K, N, C) logits per split (`probabilities=True`: softmax outputs, each row summing
    to 1), labels (N,), the FLOPs per sample of leaving at each exit (K,), `backbone_flops` the 100 % of the budgets
    (default: the last exit's), `corrupted` {(corruption, severity): test outputs}. Checked as `bench evaluate`
    checks a file: a ValueError names the problem."""
    from benchmark.external import checked_outputs, format_arrays
    arrays = format_arrays(val_logits=val_logits, val_labels=val_labels, test_logits=test_logits,
                           test_labels=test_labels, exit_flops=exit_flops, num_classes=np.shape(val_logits)[-1],
                           backbone_flops=backbone_flops, corrupted=corrupted, kind="probs" if probabilities
                           else "logits", dataset=dataset or None, arch=arch or None, seed=seed)
    return _evaluated(checked_outputs(arrays, "evaluate_outputs", name, name))


def _evaluated(outputs) -> Evaluated:
    from benchmark.external import entry_labels, evaluate_outputs as evaluate_external
    tables, summary = evaluate_external(outputs)
    labels = entry_labels(outputs)
    labelled = {name: frame.drop(columns="run_id").assign(**labels)[[*labels, *frame.columns.drop("run_id")]]
                for name, frame in tables.items()}
    return Evaluated(exits=labelled["exits"], curves=labelled["curves"], selected=labelled["selected"],
                     calibration=labelled["calibration"], robustness=labelled.get("robustness"), summary=summary)


def exit_flops_of(model, input_shape: tuple[int, ...]) -> tuple[list[float], float]:
    """(FLOPs per sample of leaving at each exit, the backbone's FLOPs) of a `MultiExitNet`, counted as every run's
    are (`benchmark.flops`: 1 multiply-add = 2 FLOPs, batch 1, a meta-device copy)."""
    from benchmark import flops
    from benchmark.models.multi_exit import MultiExitNet
    if not isinstance(model, MultiExitNet):
        raise ValueError(f"cannot count the FLOPs of each exit of a {type(model).__name__}: pass exit_flops, or build "
                         f"the model as benchmark.models.multi_exit.MultiExitNet(blocks, classifier, heads, "
                         f"exit_blocks) so its blocks and heads are known")
    profile = flops.profile_flops(model, tuple(input_shape))
    return flops.exit_costs_of(profile, model.exit_blocks), sum(profile.blocks) + profile.classifier


def evaluate_model(model, val, test, *, exit_flops=None, backbone_flops=None, batch_size: int = 256,
                   name: str = "model", dataset: str = "", arch: str = "", seed: int | None = None) -> Evaluated:
    """Evaluate a multi-exit model: `val` and `test` are (inputs, labels) pairs (tensors or arrays, inputs as the
    model takes them, on its device); `model(x)` must return a list of per-exit logits (N, C), the last exit last.
    `exit_flops` may be left out for a `MultiExitNet` (counted: `exit_flops_of`)."""
    import torch

    from benchmark.pipeline import collect_logits
    device = next(model.parameters()).device
    splits = {}
    for split, (x, y) in (("val", val), ("test", test)):
        x = torch.as_tensor(x).to(device)
        splits[split] = collect_logits(model, x, batch_size), np.asarray(torch.as_tensor(y).cpu())
    if exit_flops is None:
        exit_flops, counted_backbone = exit_flops_of(model, tuple(torch.as_tensor(val[0]).shape[1:]))
        backbone_flops = counted_backbone if backbone_flops is None else backbone_flops
    return evaluate_outputs(*splits["val"], *splits["test"], exit_flops, backbone_flops=backbone_flops, name=name,
                            dataset=dataset, arch=arch, seed=seed)


def train_model(model, regime: str, data, *, epochs: int, lr: float, batch_size: int = 64, optimizer: str = "sgd",
                weight_decay: float = 5e-4, momentum: float = 0.9, p1_epochs: int | None = None,
                hparams: dict | None = None, seed: int = 0) -> pd.DataFrame:
    """Train a `MultiExitNet` in place under `regime` (any name `bench list regimes` shows: joint, disjoint, mixed,
    alone or with an objective, e.g. "mixed+distill"), as a run of the suite trains — by the same trainer: the
    regime's phases (P1 the backbone alone, then everything or the heads; the epochs split as `Budget` splits
    them), its objective's steps, cosine lr decay per phase, batches and augmentation drawn by (seed, epoch).
    `data`: a `benchmark.data.Dataset` (`load_dataset(name, root)`: its augmentation applies), or
    ((x_train, y_train), (x_val, y_val)) with inputs as the model takes them and no augmentation. Returns the
    per-epoch history (phase, loss, per-exit validation accuracy).

    What the model must expose is `MultiExitNet`'s interface: `blocks` (applied in order), `heads` and
    `exit_blocks` (head k reads the output of block exit_blocks[k]), `classifier` (the last exit)."""
    from benchmark.data import Dataset
    from benchmark.determinism import derive_seed, seed_everything
    from benchmark.models.multi_exit import MultiExitNet
    from benchmark.train import run_phase
    from regimes.base import Budget
    from regimes.registry import build_regime
    if not isinstance(model, MultiExitNet):
        raise ValueError(f"train_model trains a MultiExitNet (its blocks, heads and classifier are what the "
                         f"schedules freeze and train), not a {type(model).__name__}: wrap your modules as "
                         f"MultiExitNet(blocks, classifier, heads, exit_blocks)")
    device = next(model.parameters()).device
    data = data.to(device) if isinstance(data, Dataset) else _arrays_dataset(*data, device)
    built = build_regime(regime, hparams or {})
    model.combiner = built.objective.exit_combiner(model, data.num_classes)
    model.to(device)
    settings = {"epochs": epochs, "p1_epochs": p1_epochs, "batch_size": batch_size, "optimizer": optimizer, "lr": lr,
                "momentum": momentum, "nesterov": True, "weight_decay": weight_decay, "eval_every": 1}
    history, offset = [], 0
    for phase in built.phases(Budget(epochs, p1_epochs)):
        if phase.epochs == 0:
            continue
        seed_everything(derive_seed(seed, "phase", phase.name))
        result = run_phase(model, phase, None if phase.trains == "backbone" else built.objective, data, settings,
                           pairing_seed=seed, epoch_offset=offset, device=device)
        history += result.history
        offset += phase.epochs
    return pd.DataFrame(history)


def _arrays_dataset(train, val, device):
    """A `Dataset` of the user's (inputs, labels) pairs, held as given (already model inputs), no augmentation;
    validation stands in for the test split, which training never reads."""
    import torch

    from benchmark.data import Dataset
    (x_train, y_train), (x_val, y_val) = ((torch.as_tensor(x).float().to(device), torch.as_tensor(y).long().to(device))
                                          for x, y in (train, val))
    return Dataset(name="user", kind="image" if x_train.dim() == 4 else "series",
                   num_classes=int(max(y_train.max(), y_val.max())) + 1, input_shape=tuple(x_train.shape[1:]),
                   x_train=x_train, y_train=y_train, x_val=x_val, y_val=y_val, x_test=x_val, y_test=y_val,
                   augmentation="none")


def claim(a: pd.DataFrame, b: pd.DataFrame, metric: str = "auc_normalised", direction: str = "greater",
          margin: float | None = None, names: tuple[str, str] = ("a", "b")) -> pd.Series:
    """Test "a beats b on `metric`" (direction "greater"), or "a is not worse than b by more than `margin`"
    ("not_less"), over the rows of two result tables paired by dataset, arch and seed (runs.csv rows of two
    regimes, or `Evaluated.row()`s concatenated), by the shipped claims' rules: a one-sided paired t-test, the 95 %
    CI against the margin, the smallest effect the pairs could detect. Returns the claim's row (verdict, n_pairs,
    mean_difference, ci_low, ci_high, p_value, ...)."""
    from benchmark.claims import test_claim
    from benchmark.store import DONE
    sides = []
    for name, table in zip(names, (a, b)):
        missing = [c for c in (*PAIR_COLUMNS, metric) if c not in table.columns]
        if missing:
            raise ValueError(f"table {name} has no column {', '.join(missing)}: each row needs dataset, arch, seed "
                             f"and the metric")
        rows = table.assign(regime=name, status=DONE)
        sides.append(rows.assign(run_id=[f"{name}-{i}" for i in range(len(rows))]) if "run_id" not in rows else rows)
    runs = pd.concat(sides, ignore_index=True)
    return test_claim(runs, pd.DataFrame(columns=["run_id", "exit"]), names[0], names[1], metric, direction, margin,
                      entries=tuple(names))


def draw_pareto(ax, curves: pd.DataFrame, policy: str = "threshold", legend: bool = True) -> None:
    """The report's Pareto panel on `ax`: each regime's seed-mean test accuracy against FLOPs under `policy`, and
    the union front chosen on validation, for the one (dataset, arch) cell of `curves` (curves.csv rows, or
    `Evaluated.curves` concatenated)."""
    from analysis.pareto import draw_front_panel, front_legend_handles, mean_curves, pareto_table
    from analysis.style import quality_word
    points = mean_curves(curves)
    cells = points[["dataset", "arch"]].drop_duplicates()
    if len(cells) != 1:
        raise ValueError(f"draw_pareto draws one cell; `curves` has {len(cells)}: select one dataset and arch")
    draw_front_panel(ax, points, pareto_table(curves), points["regime"].unique(), policy)
    ax.set_xlabel("test FLOPs ÷ backbone's (log)")
    ax.set_ylabel(f"test {quality_word(points['dataset'])}")
    if legend:
        ax.legend(handles=front_legend_handles(points["regime"]), fontsize="small", title=f"{policy} policy")


def draw_critical_difference(ax, runs: pd.DataFrame, metric: str = "auc_normalised", title: str = "") -> None:
    """The report's critical-difference diagram on `ax`: average rank by `metric` over the cells of `runs`
    (runs.csv rows; a regime is ranked in the cells where every regime has a value), Friedman + Nemenyi."""
    from analysis.critical_difference import draw_critical_difference as draw, rank_test
    draw(ax, rank_test(runs, metric), title or f"Average rank by {metric}")
