"""`bench report`: results/<grid>/REPORT.md and the figures it embeds, from the stored runs and tables only.

It trains nothing. Every number in it is read from the tables (`runs.csv`, `exits.csv`, `tuning.csv`, the analysis
tables) or computed from them here; every sentence of findings is written by code from those numbers. The same
leaderboard goes into BENCHMARK.md between LEADERBOARD_MARKERS with `--update-benchmark`.
"""
from __future__ import annotations

import datetime
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.critical_difference import plot_critical_difference, rank_test
from analysis.robustness import CLEAN, robustness_summary
from analysis.statistics import paired_tests, summary_table
from analysis.style import (cell_panels, place_legend, quality_word, regime_bar_style, regime_order, save,
                            task_kinds)
from benchmark import PROTOCOL_VERSION
from benchmark.analyze import leaderboard
from benchmark.claims import (CLAIMS_FILE, POWER, VERDICT_RULE, claim_findings, claims_phrase, evaluate_claims, holm,
                              load_claims)
from benchmark.errors import UserError
from benchmark.evaluate import DENSE_POLICY_RULE, POLICY_ORDER, POLICY_RULE
from benchmark.external import EXTERNAL_FOLDER, read_entries
from benchmark.store import DONE, FAILED, PENDING, ResultsStore, read_csv, write_text
from benchmark.tuning import NOT_TUNED

PRIMARY = "auc_normalised"
ALPHA = 0.05
ACCURACY_COLUMNS = [("auc_normalised", "area"), ("accuracy_at_25pct", "@25%"), ("accuracy_at_50pct", "@50%"),
                    ("accuracy_at_75pct", "@75%"), ("accuracy_at_100pct", "@100%"), ("final_accuracy", "final exit")]
COST_COLUMNS = [("train_wall_seconds", "wall s", "{:.1f}"), ("train_flops", "train FLOPs", "{:.3g}"),
                ("train_optimizer_steps", "steps", "{:.0f}")]
LEADERBOARD_MARKERS = ("<!-- leaderboard:start -->", "<!-- leaderboard:end -->")
FIGURES = [   # (file glob in figures/, caption: what to look at)
    ("pareto_fronts.png", "Test {metric} against mean FLOPs per sample (threshold policy, seed means), one row per "
                          "cell and a few regimes per panel beside joint, with the cell's front chosen on validation: "
                          "look for the regime that sits highest at the budget you care about."),
    ("exit_accuracy.png", "Test {metric} of each exit, per regime: the early exits are where the regimes differ; the "
                          "final exit shows what training the heads cost the backbone."),
    ("critical_difference.png", "Average rank by the primary area over cells; regimes joined by a bar are not "
                                "resolved apart by the Nemenyi test at α = 0.05."),
    ("final_accuracy_ci.png", "Final-exit {metric}, mean and 95 % interval over seeds; a star marks a paired "
                              "difference from joint at p < 0.05."),
    ("rank_profiles.png", "Effective rank of each block's features (top: the three schedules; below: every regime "
                          "as a ratio to joint): where a regime's representation narrows or widens."),
    ("information_plane.png", "Each block's I(X;T) (horizontal) and I(T;Y) (vertical) over training, from the "
                              "hollow first snapshot to the last: higher means more label information kept."),
    ("landscape_1d_*.png", "Loss along a filter-normalised random direction, final exit: a wider basin is flatter."),
    ("interpolation_*.png", "Loss on the straight line from the joint to the mixed solution: a barrier means "
                            "separate basins."),
    ("landscape_2d_*.png", "Loss over a 2-D slice around each core regime's solution, final exit."),
    ("robustness_*.png", "Test {metric} against corruption severity (0 = clean; mean over corruptions and seeds) at "
                         "the first, a middle and the final exit and for the validation-selected area: a flatter "
                         "line holds up better when the inputs drift."),
    ("reliability_*.png", "Test accuracy against mean confidence per equal-width bin (seeds pooled) at the first, a "
                          "middle and the final exit, for joint, mixed and the best joint+objective: below the "
                          "diagonal is over-confident."),
]
FIGURE_ANALYSIS = {"rank_profiles.png": "rank", "information_plane.png": "information",
                   "landscape_1d_*.png": "landscape", "interpolation_*.png": "landscape",
                   "landscape_2d_*.png": "landscape", "robustness_*.png": "robustness"}
"""The per-run model analysis (a grid's [analyses] model list) each figure comes from; the others need none."""
SEGMENTATION_NOTE = ("On segmentation cells every accuracy of the tables, figures and claims is mIoU (exits.csv and "
                     "runs.csv keep their column names): per exit over the split's confusion matrix, at an operating "
                     "point over the images' pixels counted at the exits the images leave at, decided per image; "
                     "the primary area is the validation-selected staircase of mIoU over FLOPs. Calibration is over "
                     "labelled pixels. Information: I(T;Y) needs one label per sample and is not computed for label "
                     "maps (BENCHMARK.md).")


def provenance(runs: pd.DataFrame) -> dict[str, str]:
    """Who made these numbers: the commits the runs trained on (runs.csv, issue 21), versions, devices, timing
    batches, and today's date (UTC)."""
    def version(package: str) -> str:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return "not installed"
    devices = ", ".join(sorted(runs["device"].dropna().astype(str).unique())) if "device" in runs else "unknown"
    batches = runs["timing_batch"].dropna().nunique() if "timing_batch" in runs else 0
    recorded = sorted(runs["protocol"].dropna().astype(int).unique()) if "protocol" in runs else []
    protocol = (", ".join(map(str, recorded)) if recorded
                else f"not recorded in runs.csv (the code is at {PROTOCOL_VERSION})")
    return {"protocol version": protocol, "runs trained at": run_commits(runs),
            "timing batches": f"{batches} (wall times compare within a batch only)", "exitbench": version("exitbench"),
            "torch": version("torch"), "torchvision": version("torchvision"), "timm": version("timm"),
            "devices of the runs": devices or "none",
            "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")}


def run_commits(runs: pd.DataFrame) -> str:
    """The git commits the runs record, with how many runs each and how many trained on a dirty tree."""
    if runs.empty:
        return "no runs"
    commits = runs["git_commit"] if "git_commit" in runs else pd.Series(np.nan, index=runs.index)
    dirty = runs["git_dirty"].fillna(False).astype(bool) if "git_dirty" in runs else pd.Series(False, index=runs.index)
    parts = []
    for commit, count in commits.dropna().value_counts().sort_index().items():
        dirty_runs = int(dirty[commits == commit].sum())
        parts.append(f"{commit[:12]} ({count} runs{f', {dirty_runs} on a dirty tree' if dirty_runs else ''})")
    unknown = int(commits.isna().sum())
    if unknown:
        parts.append(f"{unknown} runs without a record (trained before runs recorded their commit)")
    return "; ".join(parts)


def _percent(value: float) -> str:
    return "–" if value is None or not np.isfinite(value) else f"{100 * value:.1f}"


def _mean_std(values: pd.Series, scale: float = 100.0, digits: int = 1) -> str:
    values = values.dropna()
    if values.empty:
        return "–"
    std = values.std(ddof=1) if len(values) > 1 else float("nan")
    text = f"{scale * values.mean():.{digits}f}"
    return text if not np.isfinite(std) else f"{text} ± {scale * std:.{digits}f}"


def _count(value: float, form: str) -> str:
    return "–" if not np.isfinite(value) else form.format(value)


def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> list[str]:
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else ":---" for a in align]
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |",
            *("| " + " | ".join(row) + " |" for row in rows)]


def completeness(grid, runs_all: pd.DataFrame, tuning: pd.DataFrame | None) -> list[str]:
    """What is done, failed (with the reason) and missing (with why), from the tables: the report also works on a
    clone that has the committed tables but not the run folders."""
    done, failed = runs_all[runs_all.status == DONE], runs_all[runs_all.status == FAILED]
    declared = len(grid.specs)
    lines = [f"- Reported runs: **{len(done)} done**, {len(failed)} failed, {max(0, declared - len(runs_all))} "
             f"missing of the {declared} that grid `{grid.name}` declares."]
    if tuning is not None and not tuning.empty:
        states = tuning["state"].value_counts()
        lines.append(f"- Tuning runs: {states.get(DONE, 0)} done, {states.get(FAILED, 0)} failed (a failed "
                     f"candidate loses the tuning), {states.get(PENDING, 0)} not yet run.")
    for _, run in failed.iterrows():
        lines.append(f"- Failed: `{run.run_id}` {run.regime} on {run.dataset}/{run.arch}, seed {run.seed}: "
                     f"{run.error}")
    have = set(map(tuple, done[["dataset", "arch"]].to_numpy()))
    for cell in sorted({(s.dataset, s.arch) for s in grid.specs}):
        if cell not in have:
            lines.append(f"- Missing cell {cell[0]}/{cell[1]}: no done run in runs.csv — `bench run --grid "
                         f"{grid.name}` trains it.")
    return lines


def cell_leaderboard(cell_runs: pd.DataFrame) -> tuple[list[str], pd.DataFrame]:
    """One (dataset, arch): regimes ranked by the seed-mean primary area, with spread, cost, tuned lr and a mark
    where the paired t-test against joint (by seed) on the primary area gives p < ALPHA after Holm's correction over
    the cell's comparisons with joint (one family per cell)."""
    means = cell_runs.groupby("regime")[PRIMARY].mean().sort_values(ascending=False, kind="stable")
    tests = (summary_table(cell_runs, [PRIMARY]).set_index("regime")
             if "joint" in set(cell_runs.regime) else pd.DataFrame())
    if not tests.empty:
        tests = tests.assign(p_holm=holm(tests["p_value"].where(tests.index != "joint")))
    rows = []
    for rank, regime in enumerate(means.index, start=1):
        group = cell_runs[cell_runs.regime == regime]
        mark = ""
        if regime != "joint" and not tests.empty and regime in tests.index:
            p, diff = tests.loc[regime, "p_holm"], tests.loc[regime, "mean_difference"]
            if np.isfinite(p) and p < ALPHA:
                mark = f"{'▲' if diff > 0 else '▼'} p_Holm={p:.2g}"
        lrs = sorted(group["lr"].dropna().unique())
        tuned = "tuned" in group and (group["tuned"].dropna().astype(str) != NOT_TUNED).any()
        knobs = [f"{c}={'/'.join(v if isinstance(v, str) else f'{v:g}' for v in group[c].dropna().unique())}"
                 for c in group.columns
                 if "." in c and group[c].notna().any()]     # a tuned objective knob: tuning.py's "objective.key"
        lr = "/".join(f"{v:g}" for v in lrs) + (" (tuned)" if tuned else "") + "".join(f"; {k}" for k in knobs)
        rows.append([str(rank), f"`{regime}`", *(_mean_std(group[c]) for c, _ in ACCURACY_COLUMNS),
                     *(_count(group[c].mean(), form) for c, _, form in COST_COLUMNS), lr, mark, str(len(group))])
    header = ["#", "regime", *(label for _, label in ACCURACY_COLUMNS), *(label for _, label, _ in COST_COLUMNS),
              "lr", "vs joint", "seeds"]
    return _table(header, rows, "rl" + "r" * (len(header) - 2)), means


def covered_range_line(cell_exits: pd.DataFrame, metric: str = "accuracy") -> str:
    """The budgets a cell's area averages over: from its first exit's cost to 100 % (exits.csv, exit 0)."""
    first = cell_exits.loc[cell_exits["exit"] == 0, "flops_fraction"]
    if first.empty:
        return "Area over budgets: not known (no exits.csv rows)."
    low, high = 100 * first.min(), 100 * first.max()
    span = f"{low:.1f} %" if np.isclose(low, high) else f"{low:.1f}–{high:.1f} % (by regime)"
    return f"Area = mean {metric} over budgets from the first exit's cost, {span} of the backbone's FLOPs, to 100 %."


def pretrained_lines(cell_runs: pd.DataFrame) -> list[str]:
    """Which pretrained backbone a cell's runs started from (`[model] weights`), and what that changes."""
    if "weights" not in cell_runs or cell_runs["weights"].isna().all():
        return []
    names = ", ".join(f"`{w[:19]}…`" if w.startswith("sha256:") else f"`{w}`"
                      for w in sorted(cell_runs.weights.dropna().unique()))
    return [f"Runs start from pretrained weights {names}: their P1 phase is skipped (the pretrained backbone is the "
            f"backbone-first result) — disjoint trains heads on it, joint and mixed fine-tune from it.", ""]


def resolved_text(test) -> str:
    """Which pairs of regimes the Nemenyi test resolves, said plainly (issue 21: 'no pair' is the usual answer)."""
    if not np.isfinite(test.critical_difference):
        return "No pair of regimes can be resolved: the critical difference is undefined."
    pairs = test.resolved_pairs()
    if not pairs:
        spread = float(test.ranks.max() - test.ranks.min()) if len(test.ranks) else 0.0
        return (f"**No pair of regimes is resolved**: no two average ranks differ by more than the critical "
                f"difference (they span {spread:.2f} ranks).")
    return (f"Resolved pairs ({len(pairs)}): " + ", ".join(f"`{a}` above `{b}`" for a, b in pairs) + ".")


def overall_ranking(runs: pd.DataFrame) -> tuple[list[str], object]:
    board = leaderboard(runs)
    test = rank_test(runs, PRIMARY, ALPHA)
    rows = []
    for _, row in board.iterrows():
        ratios = [f"{row[c]:.2f}x" if c in row and np.isfinite(row[c]) else "–"
                  for c in ("train_flops_vs_joint", "train_optimizer_steps_vs_joint", "train_wall_seconds_vs_joint")]
        if ratios[-1] != "–" and row.get("wall_time_one_sitting", 1.0) < 1:
            ratios[-1] += " †"
        rows.append([f"`{row.regime}`", f"{row.average_rank:.2f}", str(int(row.n_cells)), *ratios])
    lines = _table(["regime", "average rank", "cells", "train FLOPs vs joint", "steps vs joint",
                    "wall time vs joint"], rows)
    if "wall_time_one_sitting" in board and (board["wall_time_one_sitting"] < 1).any():
        lines += ["", "† wall time from runs not all timed in one sitting with joint's (different or unrecorded "
                      "timing batches, runs.csv `timing_batch`): compare training FLOPs instead."]
    p = "n/a (fewer than 2 complete cells or 3 regimes)" if not np.isfinite(test.friedman_p) else \
        f"{test.friedman_p:.3g}"
    lines += ["", f"Friedman test over the {test.n_cells} cells where every regime has runs: p = {p}; Nemenyi "
                  f"critical difference at α = {ALPHA:g}: {test.critical_difference:.2f} ranks. {resolved_text(test)}"]
    return lines, test


def plot_exit_accuracy(exits: pd.DataFrame, path) -> None:
    """Per cell, grouped bars: test accuracy (seed mean) of each exit, one bar per regime."""
    cells = sorted(exits.groupby(["dataset", "arch"]).groups)
    fig, axes = cell_panels(cells, max_cols=2, width=6.0, height=3.6)
    for ax, (dataset, arch) in zip(axes, cells):
        cell = exits[(exits.dataset == dataset) & (exits.arch == arch)]
        means = cell.groupby(["regime", "exit"])["test_accuracy"].mean().unstack("exit")
        regimes = regime_order(means.index)
        width = 0.8 / len(regimes)
        for i, regime in enumerate(regimes):
            xs = np.arange(means.shape[1]) + (i - (len(regimes) - 1) / 2) * width
            ax.bar(xs, 100 * means.loc[regime].to_numpy(), width=width, label=regime, **regime_bar_style(regime))
        ax.set_xticks(np.arange(means.shape[1]), [f"exit {k}" for k in means.columns])
        ax.set_ylim(0, 100)                     # bars from zero: a cut axis makes a 1-point gap look large
        ax.set_ylabel(f"test {quality_word([dataset])} (%)")
        ax.set_title(f"{dataset} / {arch}")
    handles, labels = axes[0].get_legend_handles_labels()
    place_legend(fig, handles, labels, ncol=2 if len(labels) > 8 else 1)
    save(fig, path)


def findings(runs: pd.DataFrame, cell_means: dict, claims: pd.DataFrame | None) -> list[str]:
    """Sentences computed from the tables: the best regime per cell, mixed vs joint at the smallest budget, and
    one per tested claim."""
    lines = []
    for (dataset, arch), means in cell_means.items():
        best = means.index[0]
        joint = "" if best == "joint" else f"; joint's is {_percent(means.get('joint', float('nan')))}"
        lines.append(f"- {dataset}/{arch}: `{best}` has the highest primary area ({100 * means.iloc[0]:.1f}){joint}.")
    cells = runs.pivot_table(index=["dataset", "arch"], columns="regime", values="accuracy_at_25pct", aggfunc="mean")
    if {"joint", "mixed"} <= set(cells.columns):
        both = cells[["joint", "mixed"]].dropna()
        wins = int((both["mixed"] > both["joint"]).sum())
        pairs = runs.pivot_table(index=["dataset", "arch", "seed"], columns="regime", values="accuracy_at_25pct")
        test = paired_tests(pairs["mixed"], pairs["joint"])
        p = "n/a" if not np.isfinite(test["p_value"]) else f"{test['p_value']:.2g}"
        better = "is more accurate than" if quality_word(runs.dataset) == "accuracy" else "scores higher than"
        lines.append(f"- At 25 % of the backbone's FLOPs, mixed {better} joint in {wins} of "
                     f"{len(both)} cells (seed means); over {test['n_pairs']} (cell, seed) pairs the mean difference "
                     f"is {100 * test['mean_difference']:+.1f} points (paired t, two-sided p = {p}).")
    if claims is not None:
        lines += [f"- {sentence}" for sentence in claim_findings(claims)]
    return lines


def calibration_section(path: Path, runs: pd.DataFrame, grid_name: str) -> list[str]:
    """Per cell: ECE (%, 15 equal-width bins) and NLL at the first and the final exit per regime, mean ± std over
    seeds, from calibration.csv (its done runs only); a line naming the command when the table is absent."""
    out = ["## Calibration", ""]
    calib = read_csv(path) if path.is_file() else pd.DataFrame()
    calib = calib[calib.run_id.isin(runs.run_id)] if not calib.empty else calib
    if calib.empty:
        return out + [f"Not computed yet: `calibration.csv` — `bench analyze --grid {grid_name}` computes it from "
                      f"the runs' stored test logits (no model needed).", ""]
    out += ["Test split, max-softmax confidence. ECE: expected calibration error with 15 equal-width bins (%); "
            "NLL: mean negative log-likelihood (nats); mean ± std over seeds. KS error and Brier score of every "
            "exit are in `tables/calibration.csv` (Brier summed over classes, range [0, 2], as Brier's 1950 "
            "score; divide by the number of classes for the per-class mean some calibration code reports)."
            + (" Segmentation cells: over the labelled pixels of the test split, from the per-image sums in "
               "dense.npz; their KS error needs every pixel's confidence and is not stored."
               if "segmentation" in task_kinds(calib.dataset) else ""), ""]
    for (dataset, arch), cell in calib.groupby(["dataset", "arch"], sort=True):
        first, last = cell.exit.min(), cell.exit.max()
        rows = []
        for regime in regime_order(cell.regime):
            group = cell[cell.regime == regime]
            at = {k: group[group.exit == k] for k in (first, last)}
            rows.append([f"`{regime}`", _mean_std(at[first].ece), _mean_std(at[last].ece),
                         _mean_std(at[first].nll, scale=1.0, digits=3), _mean_std(at[last].nll, scale=1.0, digits=3),
                         str(group.seed.nunique())])
        out += [f"### {dataset} / {arch}", "",
                *_table(["regime", f"ECE exit {first}", f"ECE exit {last} (final)", f"NLL exit {first}",
                         f"NLL exit {last} (final)", "seeds"], rows), ""]
    return out


def policies_section(tables: Path, runs: pd.DataFrame, grid_name: str) -> list[str]:
    """Which exit policy validation selects (share of the runs' budget selections and of the primary area's budget
    range, from selected.csv) and, per cell, who owns each segment of the validation-selected Pareto front (from
    pareto.csv): consecutive front points with the same owners merge into one segment."""
    tasks = task_kinds(runs["dataset"]) if "dataset" in runs else frozenset()
    out = ["## Exit policies", "",
           "Every policy's points compete in one validation selection (`evaluate.preference_order`): `exit` (each "
           "exit alone), `threshold` (max softmax), `budgeted` (MSDNet/L2W), `entropy`, `patience` (PBEE; its point p "
           "leaves once p consecutive exits agree, PABEE's patience p − 1) and "
           "`ensemble` (geometric mean of the exits so far, ZTW-style, equal weights)"
           + ("; segmentation runs decide per image from a confidence summary — `exit`, `threshold` and `budgeted` "
              "on the mean per-pixel max softmax, `quantile` on its 10 % quantile, `entropy` on the mean normalised "
              "entropy — and have no `patience` or `ensemble` (they need each pixel's class at every exit)"
              if "segmentation" in tasks else "") + ".", ""]
    if not (tables / "selected.csv").is_file():
        return out + [f"Not computed yet: `selected.csv` — `bench run --grid {grid_name}` regenerates the tables.", ""]
    selected = read_csv(tables / "selected.csv")
    selected = selected[selected.run_id.isin(runs.run_id) & selected.policy.notna()]
    budgets = selected[selected.selection.str.startswith("at_")]
    staircase = selected[selected.selection == "staircase"]
    width = staircase.budget_to - staircase.budget_from
    rules = {**(POLICY_RULE if tasks != {"segmentation"} else {}),
             **(DENSE_POLICY_RULE if "segmentation" in tasks else {})}
    rows = [[f"`{policy}`", _percent((budgets.policy == policy).mean()),
             _percent(width[staircase.policy == policy].sum() / width.sum() if width.sum() > 0 else np.nan)]
            for policy in POLICY_ORDER if policy in rules or policy in set(selected.policy)]
    out += ["Share of the selections validation made, over every done run: at the four budgets (25/50/75/100 %), "
            "and of the budget range the primary area averages over (first exit's cost to 100 %).", "",
            *_table(["policy", "budget selections (%)", "primary area's budget range (%)"], rows), ""]
    if not (tables / "pareto.csv").is_file():
        return out + [f"Front owners not computed yet: `pareto.csv` — `bench analyze --grid {grid_name}`.", ""]
    front = read_csv(tables / "pareto.csv")
    out += ["Who owns the front: the union front of each cell, chosen on validation from seed-mean points of every "
            "regime and policy, at its test numbers; consecutive points with the same owners form one segment "
            "(FLOPs in % of the backbone's; accuracy, or mIoU, of the test split in %).", ""]
    for (dataset, arch), cell in front.groupby(["dataset", "arch"], sort=True):
        out += [f"### {dataset} / {arch}", "", *_table(["test FLOPs (%)", f"test {quality_word([dataset])} (%)",
                                                        "owner"],
                                                        _front_segments(cell), "rrl"), ""]
    return out


def _front_segments(front: pd.DataFrame) -> list[list[str]]:
    """Rows (FLOPs range, accuracy range, owners) of a cell's front, sorted by test cost."""
    points = (front.assign(owner=front.regime.map(lambda r: f"`{r}`") + " " + front.policy)
              .groupby(["test_flops_fraction", "test_accuracy"], sort=True)["owner"]
              .agg(lambda owners: ", ".join(sorted(set(owners)))).reset_index())
    segment = (points.owner != points.owner.shift()).cumsum()
    rows = []
    for _, part in points.groupby(segment, sort=True):
        costs, accuracies = part.test_flops_fraction, part.test_accuracy
        rows.append([_span(costs.min(), costs.max()), _span(accuracies.min(), accuracies.max()), part.owner.iloc[0]])
    return rows


def _span(low: float, high: float) -> str:
    """'a–b' in percent, or one number where both round alike."""
    return _percent(low) if _percent(low) == _percent(high) else f"{_percent(low)}–{_percent(high)}"


def robustness_section(tables: Path, runs: pd.DataFrame, grid_name: str, declared: bool = True) -> list[str]:
    """Per cell: clean and corrupted accuracy (mean over corruptions and severities 1-5) at the final exit, at the
    25 % budget point and of the primary area, with the relative mCE against joint, from robustness.csv. `declared`:
    whether the grid's [analyses] model list has robustness."""
    out = ["## Robustness", ""]
    path = tables / "robustness.csv"
    table = read_csv(path) if path.is_file() else pd.DataFrame()
    table = table[table.run_id.isin(runs.run_id)] if not table.empty else table
    if table.empty and not declared:
        return out + [f"Not part of grid `{grid_name}`: its [analyses] model list leaves robustness out.", ""]
    if table.empty:
        return out + [f"Not computed yet: `robustness.csv` — `bench analyze --grid {grid_name}` computes it (it "
                      f"needs the runs' models: `run_after = true` in the grid's [analyses] or "
                      f"`bench run --save-models`).", ""]
    summary = robustness_summary(table)
    corruptions = ", ".join(f"`{c}`" for c in sorted(set(table.corruption) - {CLEAN}))
    out += [f"Test {quality_word(table.dataset)} (%) on clean data and under {corruptions} at severities "
            f"{', '.join(map(str, sorted(set(table.severity) - {0})))} (mean over corruptions and severities, then "
            "seeds), with every threshold and operating point still chosen on *clean* validation. rel. mCE: mean over "
            "corruptions of the regime's summed error over severities divided by joint's (< 1: more robust than "
            "joint). Every exit, budget, macro-F1 and calibration under corruption: `tables/robustness.csv`.", ""]
    points = [("final", "final exit"), ("at_25pct", "@25%"), ("area", "area")]
    for (dataset, arch), cell in summary.groupby(["dataset", "arch"], sort=True):
        rows = []
        for regime in regime_order(cell.regime):
            mine = cell[cell.regime == regime].set_index("point")
            row = [f"`{regime}`"]
            for point, _ in points:
                got = mine.loc[point] if point in mine.index else None
                row += ["–", "–", "–"] if got is None else [
                    _percent(got.clean_accuracy), _percent(got.corrupted_accuracy),
                    "–" if not np.isfinite(got.relative_mce) else f"{got.relative_mce:.2f}"]
            rows.append(row)
        header = ["regime"] + [f"{label} {what}" for _, label in points for what in ("clean", "corrupted", "rel. mCE")]
        out += [f"### {dataset} / {arch}", "", *_table(header, rows), ""]
    return out


def claims_section(claims: pd.DataFrame) -> list[str]:
    """The claims table: per claim the pairs, the raw and Holm-adjusted p, the CI against the margin, the verdict,
    and the smallest effect the pairs could detect; the verdict rule under it."""
    def points(value: float, sign: str = "+") -> str:
        return f"{100 * value:{sign}.2f}" if np.isfinite(value) else "–"

    def p_text(value: float) -> str:
        return "–" if not np.isfinite(value) else ("< 0.001" if value < 0.001 else f"{value:.2g}")

    rows = []
    for _, c in claims.iterrows():
        needed = "" if not np.isfinite(c.n_needed) else f"{int(c.n_needed)}"
        relation = ">" if c.direction == "greater" else f"≥ (margin {100 * c.margin:g})"
        rows.append([c.statement, f"`{c.a}` {relation} `{c.b}`", c.metric, str(int(c.n_pairs)),
                     points(c.mean_difference),
                     f"[{points(c.ci_low)}, {points(c.ci_high)}]" if np.isfinite(c.ci_low) else "–",
                     p_text(c.p_value), p_text(c.p_holm), f"**{c.verdict}**", points(c.detectable_effect, ""),
                     needed, c.source])
    family = int(claims["family_size"].max()) if len(claims) else 0
    return [*_table(["claim", "compared", "metric", "pairs", "mean diff (pts)", "95 % CI (pts)", "p", "p (Holm)",
                     "verdict", "detectable (pts)", "pairs needed", "source"], rows, "lllrrrrrlrrl"), "",
            f"Verdict rule: {VERDICT_RULE.format(alpha=ALPHA, m=claims_phrase(family))}. "
            "*p*: the claim's one-sided paired t-test; "
            f"*detectable*: the smallest true difference beyond the margin these pairs would show with "
            f"{100 * POWER:.0f} % power at α / {family} (Holm's strictest step), given the observed spread; "
            "*pairs needed*: for an inconclusive claim, the pairs that power would need at the observed difference."]


def build_report(grid, store: ResultsStore, figures: Path, stamp: dict[str, str] | None = None,
                 claims_file: Path | None = None) -> tuple[str, str]:
    """(REPORT.md's text, the leaderboard block for BENCHMARK.md). Figures it draws go to `figures`; the claims
    come from `claims_file` (default: the shipped benchmark/claims.toml)."""
    tables = store.tables_dir
    runs_all = read_csv(tables / "runs.csv")
    runs = runs_all[runs_all.status == DONE]
    exits = read_csv(tables / "exits.csv")
    stamp = stamp or provenance(runs)
    tuning = read_csv(tables / "tuning.csv") if (tables / "tuning.csv").is_file() else None
    status_lines = completeness(grid, runs_all, tuning)
    out = [f"# exitbench report — grid `{grid.name}`", "", grid.description, "",
           "## Provenance and completeness", "",
           *_table(["", ""], [[key, f"`{value}`"] for key, value in stamp.items()], "ll"), "", *status_lines, ""]
    if runs.empty:
        out += ["No run is done yet: `bench run --grid " + grid.name + "` trains them.", ""]
        return "\n".join(out), "\n".join(out)

    metric = quality_word(runs.dataset)
    note = [SEGMENTATION_NOTE, ""] if metric != "accuracy" else []
    out += ["## Leaderboards", "", *note,
            f"Ranked by the primary metric: **area** = the test {metric} of the point validation selects at each "
            f"budget, averaged over the budgets the exits cover, from the first exit's cost to 100 % of the "
            f"backbone's FLOPs (`{PRIMARY}`; it reads as an accuracy). Accuracy columns are test {metric} (%) at "
            f"the operating point validation selects within 25/50/75/100 % of the backbone's FLOPs, and of the final exit; mean ± std "
            f"over seeds. Cost: training wall time (s), measured training FLOPs and optimizer steps, seed means. "
            f"**vs joint**: ▲/▼ where a paired t-test against joint by seed gives p < {ALPHA:g} on the area after "
            f"Holm's correction over the cell's comparisons with joint. "
            f"lr: the regime's own-phase learning rate (tuned: chosen on tuning seeds by validation area), "
            f"with any tuned objective knob.", ""]
    cell_means = {}
    for (dataset, arch), cell in runs.groupby(["dataset", "arch"], sort=True):
        lines, means = cell_leaderboard(cell)
        cell_means[dataset, arch] = means
        out += [f"### {dataset} / {arch}", "",
                covered_range_line(exits[exits.run_id.isin(cell.run_id)], quality_word([dataset])), "",
                *pretrained_lines(cell), *lines, ""]

    figures.mkdir(parents=True, exist_ok=True)
    overall, test = overall_ranking(runs)
    plot_critical_difference(test, figures / "critical_difference.png", f"Average rank by {PRIMARY}, grid {grid.name}")
    plot_exit_accuracy(exits[exits.run_id.isin(runs.run_id)], figures / "exit_accuracy.png")
    overall_block = ["## Overall", "", "Average rank by the primary area across cells (1 = best), with each regime's "
                     "training cost as its mean ratio to joint's.", "", *overall, ""]
    out += overall_block

    claims = _claims(runs, exits[exits.run_id.isin(runs.run_id)], claims_file, tables / "robustness.csv")
    if claims is not None:
        declared = "benchmark/claims.toml" if claims_file is None else claims_file.name
        out += ["## The papers' claims, tested", "",
                f"Each claim is a row of `{declared}`, tested by a paired comparison over every (cell, seed) "
                "pair where both regimes are done; the claims are one family, corrected together (Holm). "
                f"Differences in points ({metric} × 100). A claim is tested on the cells of its task (`task` in "
                "the claims file); claims of a task this grid has no cell of are left out. Test a claim of your own "
                "with `bench claim`.", "",
                *claims_section(claims), ""]
    out += policies_section(tables, runs, grid.name)
    out += robustness_section(tables, runs, grid.name, declared="robustness" in grid.analyses["model"])
    out += calibration_section(tables / "calibration.csv", runs, grid.name)
    out += external_section(store.root / EXTERNAL_FOLDER, runs)
    out += ["## Findings", "", "Written by `bench report` from the tables above.", "",
            *findings(runs, cell_means, claims), ""]
    out += ["## Figures", ""]
    for pattern, caption in FIGURES:
        paths = sorted(figures.glob(pattern))
        for path in paths:
            out += [f"**{path.stem.replace('_', ' ')}** — {caption.format(metric=metric)}", "",
                    f"![{path.stem}](figures/{path.name})", ""]
    absent = [pattern for pattern, _ in FIGURES if not list(figures.glob(pattern))]
    undeclared = [p for p in absent if FIGURE_ANALYSIS.get(p, "") not in ("", *grid.analyses["model"])]
    missing = [p for p in absent if p not in undeclared]
    if missing:
        out += [f"Not drawn yet: {', '.join(f'`{m}`' for m in missing)} — `bench analyze --grid {grid.name}` draws "
                f"them (model analyses need the runs' models: `run_after = true` in the grid's [analyses] or "
                f"`bench run --save-models`).", ""]
    if undeclared:
        out += [f"Not part of grid `{grid.name}`: {', '.join(f'`{m}`' for m in undeclared)} — its [analyses] model "
                f"list leaves out {', '.join(sorted({FIGURE_ANALYSIS[p] for p in undeclared}))}.", ""]
    benchmark_block = [f"Grid `{grid.name}`, generated by `bench report --grid {grid.name} --update-benchmark` "
                       f"(protocol {stamp['protocol version']}; runs trained at {stamp['runs trained at']}). Per-cell tables and "
                       f"figures: [results/{grid.name}/REPORT.md](results/{grid.name}/REPORT.md).", "",
                       *overall, ""]
    if claims is not None:
        benchmark_block += ["Claims:", "", *(f"- {s}" for s in claim_findings(claims)), ""]
    return "\n".join(out).rstrip() + "\n", "\n".join(benchmark_block).rstrip()


def _claims(runs: pd.DataFrame, exits: pd.DataFrame, claims_file: Path | None,
            robustness_path: Path) -> pd.DataFrame | None:
    """The claims of the tasks the grid's runs are of, tested as one family (Holm over them)."""
    robustness = read_csv(robustness_path) if robustness_path.is_file() else None
    tasks = task_kinds(runs.dataset)
    claims = [claim for claim in load_claims(claims_file or CLAIMS_FILE) if claim.task in tasks]
    if not claims:
        return None
    table = evaluate_claims(runs, exits, claims, robustness)
    return table if not table.empty else None


def update_benchmark(path: Path, block: str) -> None:
    """Replace what lies between LEADERBOARD_MARKERS in BENCHMARK.md by `block`."""
    if not path.is_file():
        raise UserError(f"{path} not found: run `bench report --update-benchmark` from the repository root")
    text = path.read_text()
    start, end = LEADERBOARD_MARKERS
    if start not in text or end not in text:
        raise UserError(f"{path} has no {start} ... {end} markers; add them where the leaderboard goes")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    write_text(path, f"{head}{start}\n{block}\n{end}{tail}")


def write_report(grid, store: ResultsStore, *, stamp: dict[str, str] | None = None,
                 benchmark_file: Path | None = None, claims_file: Path | None = None) -> Path:
    """Write results/<grid>/REPORT.md (and its figures); with `benchmark_file`, update its leaderboard block."""
    text, block = build_report(grid, store, store.root / "figures", stamp, claims_file)
    path = store.root / "REPORT.md"
    write_text(path, text)
    if benchmark_file is not None:
        update_benchmark(benchmark_file, block)
    return path


# --------------------------------------------------------------------------------------------------------------
# Models trained elsewhere (`bench evaluate`, benchmark/external.py)


def entry_section(metrics: dict, tables: dict[str, pd.DataFrame]) -> list[str]:
    """An external entry's report section, from its metrics.json and tables: where it came from, its areas, every
    exit, the operating points validation selects and, where corrupted outputs were given, its robustness."""
    origin, summary = metrics["external"], metrics["summary"]
    declared = ", ".join(f"{key} `{metrics[key]}`" for key in ("dataset", "arch", "seed")
                         if metrics.get(key) not in (None, ""))
    lines = [f"### {metrics['regime']} (external: `{metrics['run_id']}`)", "",
             f"Trained elsewhere, evaluated by exitbench from its per-exit outputs: "
             f"{origin['provenance'] or 'no provenance given'}" + (f" ({origin['url']})" if origin["url"] else "")
             + f". File `{origin['source']}`, SHA-256 `{origin['sha256'][:16]}…`; "
             + (declared or "declares no dataset, arch or seed")
             + f"; {origin['val_samples']} validation and {origin['test_samples']} test samples, "
               f"{origin['num_classes']} classes. No training cost is measured for it.", "",
             f"Area **{_percent(summary['auc_normalised'])} %** (test accuracy of the points validation selects, over "
             f"the budgets the exits cover); validation area {_percent(summary['val_auc_normalised'])} %; oracle area "
             f"{_percent(summary['oracle_auc_normalised'])} % (best test point at each budget: ranks nothing).", ""]
    exits = tables["exits"].merge(tables["calibration"][["exit", "ece", "nll"]], on="exit")
    lines += _table(["exit", "FLOPs", "% backbone", "val acc %", "test acc %", "macro-F1 %", "ECE %", "NLL"],
                    [[str(int(r.exit)), f"{r.flops:.3g}", _percent(r.flops_fraction), _percent(r.val_accuracy),
                      _percent(r.test_accuracy), _percent(r.test_macro_f1), _percent(r.ece), f"{r.nll:.3f}"]
                     for r in exits.itertuples()]) + [""]
    chosen = tables["selected"][tables["selected"].selection != "staircase"]
    lines += ["Operating points validation selects within each budget (% of the backbone's FLOPs):", "",
              *_table(["budget", "policy", "param", "val acc %", "test acc %", "test FLOPs %"],
                      [[r.selection.removeprefix("at_").replace("pct", " %"),
                        str(r.policy) if pd.notna(r.policy) else "none fits",
                        f"{r.param:.3g}" if pd.notna(r.param) else "–", _percent(r.val_accuracy),
                        _percent(r.test_accuracy), _percent(r.test_flops / metrics["flops"]["backbone"])]
                       for r in chosen.itertuples()]), ""]
    if "robustness" in tables:
        robustness = tables["robustness"]
        area = robustness[robustness.point == "area"]
        final = robustness[robustness.point == f"exit_{metrics['num_exits'] - 1}"]
        rows = [[str(c), str(int(s)), _percent(a), _percent(f)] for (c, s, a), f in
                zip(area[["corruption", "severity", "accuracy"]].itertuples(index=False), final.accuracy)]
        lines += ["Under corrupted test inputs (thresholds still chosen on clean validation):", "",
                  *_table(["corruption", "severity", "area %", "final exit %"], rows, "lrrr"), ""]
    return lines


def external_section(folder: Path, runs: pd.DataFrame) -> list[str]:
    """The grid report's models trained elsewhere: per dataset, each entry beside joint and the best regime by
    area of every arch of the grid on that dataset (seed means), then each entry's own section. Empty without
    entries."""
    entries = read_entries(folder)
    if not entries:
        return []
    out = ["## Models trained elsewhere", "",
           "External entries (`bench evaluate FILE --grid GRID --as NAME`): per-exit outputs of models exitbench did "
           "not train, on the same test samples as the grid's runs, evaluated by the same code — every policy, "
           "thresholds and operating points chosen on the entry's own validation outputs. They carry no training "
           "cost and take no part in the claims above; `bench claim NAME REGIME` pairs an entry with the grid's "
           "runs where its dataset, arch and seed match a run's. Test %, mean over the entry's seeds.", ""]
    columns = [column for column, _ in ACCURACY_COLUMNS]
    header = ["", "kind", *(label for _, label in ACCURACY_COLUMNS)]
    for dataset in sorted({metrics["dataset"] for metrics, _ in entries}):
        rows = []
        for arch, cell in runs[runs.dataset == dataset].groupby("arch", sort=True):
            means = cell.groupby("regime")[columns].mean()
            for regime in dict.fromkeys(["joint", means[PRIMARY].idxmax()]):
                if regime in means.index:
                    rows.append([f"{regime} ({arch})", "grid", *(_percent(means.loc[regime, c]) for c in columns)])
        summaries = pd.DataFrame([{"regime": metrics["regime"], **metrics["summary"]} for metrics, _ in entries
                                  if metrics["dataset"] == dataset])
        for regime, mean in summaries.groupby("regime", sort=True)[columns].mean().iterrows():
            rows.append([f"**{regime}**", "external", *(_percent(mean[c]) for c in columns)])
        out += [f"### {dataset}", "", *_table(header, rows, "ll" + "r" * len(columns)), ""]
    for metrics, tables in entries:
        out += entry_section(metrics, tables)
    return out


def external_report(folder: Path) -> str:
    """REPORT.md of a folder of entries evaluated outside any grid (`bench evaluate FILE...`)."""
    out = ["# exitbench — models trained elsewhere", "",
           "Per-exit outputs evaluated by `bench evaluate` under the suite's protocol (BENCHMARK.md): every exit "
           "policy, thresholds and operating points chosen on validation only, test read for the final numbers.", ""]
    for metrics, tables in read_entries(folder):
        out += entry_section(metrics, tables)
    return "\n".join(out).rstrip() + "\n"
