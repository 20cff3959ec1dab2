"""Robustness: each run's exits, validation-selected operating points and primary area on corrupted test data.

Why: clean accuracy cannot check the claim that an objective's exits "generalize better when confronted with
increasing uncertainty" (arXiv 2109.13192). Every run is evaluated on the corrupted copies of its test split
(benchmark/corruptions.py: the same corrupted samples for every regime) by `benchmark.evaluate.evaluate` itself,
with the clean *validation* logits: every threshold and operating point is still fit and chosen on clean
validation, as a deployed model would be, and only the test side is corrupted. Severity 0 is the stored clean test
logits, so its rows are the run's own clean numbers exactly. A segmentation run (`run_dense_robustness`) is the same
from its per-image outputs (dense.npz's arrays): its `accuracy` is mIoU — the corruptions are photometric, so the
label maps stay as they are — and its calibration is over labelled pixels.

Per run (robustness.csv, one row per corruption x severity x point): `point` is `exit_k` (everyone leaves at exit
k: accuracy, macro-F1, the exit's FLOPs fraction, and its calibration — ECE with 15 equal-width bins, KS error, NLL,
Brier), `at_25pct` ... `at_100pct` (the validation-selected point within that budget: its policy and point, test
accuracy, macro-F1 and mean FLOPs fraction on the corrupted data) and `area` (the primary metric, the
validation-selected area, on the corrupted data). Severity 0 appears once, as corruption "none".

Summary (robustness_summary.csv), after Hendrycks & Dietterich (2019): per (dataset, arch, regime, point), seed-mean
accuracies; `clean_accuracy`; `corrupted_accuracy`, the mean over corruptions and severities 1..5;
`relative_mce`, the mean over corruptions of sum_s error(regime) / sum_s error(joint) (error = 1 - accuracy; 1 = as
robust as joint, lower is better); and `drop`, clean minus corrupted accuracy.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from analysis.calibration import exit_calibration, pixel_calibration, shown_exits
from analysis.style import (new_figure, place_legend, quality_word, regime_handles, regime_order, regime_style,
                            save)
from benchmark.evaluate import BUDGET_FRACTIONS, POLICY_RULE, evaluate, macro_f1, point_outcome

CLEAN = "none"
"""The corruption label of the severity-0 rows (the clean test split)."""
BUDGET_POINTS = [f"at_{name}" for name in BUDGET_FRACTIONS]
RUN_COLUMNS = ["corruption", "severity", "point", "exit", "policy", "policy_point", "param", "accuracy", "macro_f1",
               "flops_fraction", "ece", "ks", "nll", "brier"]


def run_robustness(val_logits: np.ndarray, val_y: np.ndarray, clean_test_logits: np.ndarray, test_y: np.ndarray,
                   corrupted: dict[tuple[str, int], np.ndarray], exit_costs: np.ndarray,
                   backbone_cost: float) -> pd.DataFrame:
    """robustness.csv rows of one run: the clean test logits as severity 0, then every (corruption, severity) of
    `corrupted` (test logits (K, N, C) each), each evaluated against the clean validation logits."""
    def case(test_logits):
        evaluation = evaluate(val_logits, val_y, test_logits, test_y, exit_costs, backbone_cost)

        def point_macro_f1(chosen) -> float:
            _, prediction = point_outcome(chosen.policy, chosen.param, *evaluation.outputs[POLICY_RULE[chosen.policy]])
            return macro_f1(test_y, prediction)
        return _case_rows(evaluation, exit_calibration(test_logits, test_y)[0], point_macro_f1, backbone_cost)
    return _cases(case, clean_test_logits, corrupted)


def run_dense_robustness(val: dict[str, np.ndarray], clean_test: dict[str, np.ndarray],
                         corrupted: dict[tuple[str, int], dict[str, np.ndarray]], exit_costs: np.ndarray,
                         backbone_cost: float) -> pd.DataFrame:
    """`run_robustness` for a segmentation run, from per-(exit, image) outputs (`pipeline.collect_dense`: confusion,
    summaries, calibration sums) instead of logits: `accuracy` is mIoU, the calibration columns are over labelled
    pixels (`pixel_calibration`; KS is NaN), and macro-F1, a classification metric, is NaN."""
    from benchmark.dense import evaluate_dense

    def case(test):
        evaluation = evaluate_dense(val, test, exit_costs, backbone_cost)
        calibration, _ = pixel_calibration(test["reliability"], test["likelihood"])
        return _case_rows(evaluation, calibration, None, backbone_cost)
    return _cases(case, clean_test, corrupted)


def _cases(case, clean_test, corrupted: dict) -> pd.DataFrame:
    """The rows of `case(test outputs)` for the clean test split (corruption "none", severity 0) and every
    corrupted one."""
    frames = [case(outputs).assign(corruption=corruption, severity=severity)
              for (corruption, severity), outputs in [((CLEAN, 0), clean_test), *corrupted.items()]]
    return pd.concat(frames, ignore_index=True)[RUN_COLUMNS]


def _case_rows(evaluation, calibration: pd.DataFrame, point_macro_f1, backbone_cost: float) -> pd.DataFrame:
    """One case's rows from its evaluation and per-exit calibration: every exit, the validation-selected budget
    points (macro-F1 of a point by `point_macro_f1`, NaN where None) and the area."""
    exits = evaluation.exits.merge(calibration[["exit", "ece", "ks", "nll", "brier"]], on="exit")
    rows = [{"point": f"exit_{e.exit}", "exit": e.exit, "policy": "exit", "policy_point": e.exit, "param": e.exit,
             "accuracy": e.test_accuracy, "macro_f1": getattr(e, "test_macro_f1", np.nan),
             "flops_fraction": e.flops_fraction, "ece": e.ece, "ks": e.ks, "nll": e.nll, "brier": e.brier}
            for e in exits.itertuples(index=False)]
    for chosen in evaluation.selected[evaluation.selected.selection.isin(BUDGET_POINTS)].itertuples(index=False):
        row = {"point": chosen.selection, "accuracy": chosen.test_accuracy}
        if isinstance(chosen.policy, str):                   # NaN: no point fits the budget
            row.update(policy=chosen.policy, policy_point=chosen.point, param=chosen.param,
                       macro_f1=point_macro_f1(chosen) if point_macro_f1 else np.nan,
                       flops_fraction=chosen.test_flops / backbone_cost)
        rows.append(row)
    rows.append({"point": "area", "accuracy": evaluation.summary["auc_normalised"]})
    return pd.DataFrame(rows)


def _seed_means(table: pd.DataFrame) -> pd.DataFrame:
    """Seed-mean accuracy per (dataset, arch, regime, point, corruption, severity), with the final exit also
    labelled "final" (cells differ in their number of exits)."""
    exit_rows = table[table.point.str.startswith("exit_")]
    last_exit = exit_rows.groupby(["dataset", "arch"]).exit.transform("max")
    final = exit_rows[exit_rows.exit == last_exit].assign(point="final")
    keys = ["dataset", "arch", "regime", "point", "corruption", "severity"]
    return pd.concat([table, final]).groupby(keys, sort=True)["accuracy"].mean().reset_index()


def robustness_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, arch, regime, point): clean_accuracy, corrupted_accuracy (mean over corruptions and severities
    >= 1), drop, relative_mce (vs joint in the same cell; NaN without joint) and the number of seeds."""
    means = _seed_means(table)
    clean = means[means.severity == 0].set_index(["dataset", "arch", "regime", "point"])["accuracy"]
    shifted = means[means.severity > 0]
    error_sums = (shifted.assign(error=1 - shifted.accuracy)
                  .groupby(["dataset", "arch", "regime", "point", "corruption"])["error"].sum())
    joint = error_sums.xs("joint", level="regime") if "joint" in set(shifted.regime) else None
    rows = []
    for (dataset, arch, regime, point), group in shifted.groupby(["dataset", "arch", "regime", "point"], sort=True):
        corrupted = group.accuracy.mean()
        relative = np.nan
        if joint is not None:
            mine = error_sums.loc[(dataset, arch, regime, point)]
            theirs = joint.reindex(pd.MultiIndex.from_product([[dataset], [arch], [point], mine.index]))
            with np.errstate(divide="ignore", invalid="ignore"):      # joint without errors: no ratio
                ratio = mine.to_numpy() / theirs.to_numpy()
            relative = float(np.mean(ratio)) if np.isfinite(ratio).all() else np.nan
        rows.append({"dataset": dataset, "arch": arch, "regime": regime, "point": point,
                     "clean_accuracy": clean.get((dataset, arch, regime, point), np.nan),
                     "corrupted_accuracy": corrupted,
                     "drop": clean.get((dataset, arch, regime, point), np.nan) - corrupted,
                     "relative_mce": relative,
                     "seeds": table[(table.dataset == dataset) & (table.arch == arch)
                                    & (table.regime == regime)].seed.nunique()})
    return pd.DataFrame(rows)


def plot_severity_curves(table: pd.DataFrame, figures: Path) -> list[Path]:
    """One figure per (dataset, arch): accuracy against severity (mean over corruptions and seeds; 0 = clean) at the
    first, a middle and the final exit and for the validation-selected area, one line per regime."""
    written = []
    means = _seed_means(table)
    for (dataset, arch), cell in means.groupby(["dataset", "arch"], sort=True):
        exits = sorted(int(p.removeprefix("exit_")) for p in cell.point.unique() if p.startswith("exit_"))
        panels = [(f"exit_{k}", f"exit {k}" + (" (final)" if k == exits[-1] else "")) for k in shown_exits(exits)]
        panels.append(("area", "validation-selected area"))
        fig, axes = new_figure(ncols=len(panels), nrows=1, width=3.6, height=3.3, layout="constrained")
        regimes = regime_order(cell.regime)
        for ax, (point, title) in zip(np.ravel(axes), panels):
            for regime in regimes:
                curve = cell[(cell.regime == regime) & (cell.point == point)]
                by_severity = curve.groupby("severity").accuracy.mean()
                ax.plot(by_severity.index, 100 * by_severity.to_numpy(), linewidth=1.5, markersize=4,
                        **regime_style(regime))
            ax.set_title(title)
            ax.set_xlabel("severity (0 = clean)")
            ax.set_xticks(range(0, int(cell.severity.max()) + 1))
            ax.grid(alpha=0.3)
        np.ravel(axes)[0].set_ylabel(f"test {quality_word([dataset])} (%)")
        place_legend(fig, regime_handles(regimes), title="regime")
        corruptions = ", ".join(sorted(set(cell.corruption) - {CLEAN}))
        fig.suptitle(f"{dataset} / {arch}: {quality_word([dataset])} under corruption, mean over {corruptions} and seeds;\n"
                     "thresholds and operating points chosen on clean validation")
        path = figures / f"robustness_{dataset}_{arch}.png"
        save(fig, path)
        written.append(path)
    return written
