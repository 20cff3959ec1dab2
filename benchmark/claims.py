"""The papers' claims (benchmark/claims.toml, data only) tested as paired comparisons over (cell, seed) pairs.

A claim says regime `a` beats regime `b` on a metric ("greater"), or is not worse than b by more than a margin
("not_less"), in the (dataset, arch) cells its globs match whose dataset is of the claim's task (`task`:
classification by default; a segmentation claim reads the same metrics as mIoU — exits.csv and runs.csv hold a
segmentation run's mIoU in their accuracy columns — so a claim stated for one task is never tested on the other's
cells). Runs pair by (dataset, arch, seed): within a cell the
two runs of a seed share data splits, initialisation and (disjoint/mixed) the P1 backbone, so the difference
d = metric(a) - metric(b) removes the seed's effect. Pairs from different cells are pooled: the claims are about
regimes in general, so the verdict is about the mean difference over the matched (cell, seed) pairs.

Statistics (one test decides):
- The one-sided paired t-test on d (scipy.stats.ttest_1samp, against 0 for "greater", against -margin for
  "not_less": non-inferiority). It decides because the 95 % t interval and the n needed for power (noncentral t)
  come from the same model, so the numbers of a row agree with each other. Wilcoxon is not computed: accuracies
  move in steps of 1 / N_test, so many differences tie or are exactly 0, and how the signed-rank test treats
  zeros (dropped or split) changes its answer; with 3 to 9 pairs it also has a coarse p floor (1 / 2^n).
- The claims of one file are one family (issue 21): their one-sided p values — for the claim (`p_value`) and for
  its opposite (`p_opposite`; greater: mean d < 0; not_less: mean d < -margin; for a t-test 1 - p_value) — are
  Holm-adjusted over every claim with at least 2 pairs (`p_holm`, `p_opposite_holm`), and the verdict (VERDICT_RULE)
  needs both the adjusted p and the interval: **reproduced** if p_holm < ALPHA and the whole 95 % interval lies on
  the claim's side of its margin (above -margin; above 0 for "greater"); **contradicted** if p_opposite_holm < ALPHA
  and the whole interval lies on the other side; else **inconclusive**. The interval is two-sided 95 %, as in
  analysis.statistics, so it is the stricter of the two conditions near the boundary.
- effect_size is Cohen's d_z = mean(d) / sd(d). detectable_effect is the smallest true mean difference beyond the
  margin (in metric units) this many pairs would show with POWER = 0.8 at the family's strictest Holm level
  ALPHA / m, if the differences spread as observed (sd(d)); n_needed (inconclusive rows only) the pairs needed for
  that power at the observed distance (mean(d) + margin) / sd(d); both exact from scipy's noncentral t. n_needed is
  NaN, with the note "no effect to power", when that distance is 0 or of the wrong sign.
- Zero-variance differences (spread within analysis.statistics.EQUAL_RTOL of the values: rounding only) have no
  t statistic; they are decided by the sign of mean(d) + margin: > 0 reproduced with p = 0, < 0 contradicted
  with p = 1, = 0 inconclusive with p NaN. Fewer than 2 pairs: inconclusive, p NaN.
- A claim tested on its own (`bench claim`, `test_claim`: the untold claims a reviewer checks) is a family of one;
  test several together by listing them in a claims file (`bench report --claims FILE`), and they are corrected
  together.
"""
from __future__ import annotations

import difflib
import math
import tomllib
from dataclasses import dataclass, replace
from fnmatch import fnmatchcase
from pathlib import Path

import numpy as np
import pandas as pd

from benchmark.errors import UserError

CLAIMS_FILE = Path(__file__).parent / "claims.toml"
ALPHA = 0.05
POWER = 0.80
DIRECTIONS = ("greater", "not_less")
RUN_METRICS = ("auc_normalised", "val_auc_normalised", "final_accuracy", "final_macro_f1",
               "accuracy_at_25pct", "accuracy_at_50pct", "accuracy_at_75pct", "accuracy_at_100pct")
"""runs.csv summary numbers a claim may name (benchmark/evaluate.py): fractions, higher is better. Not the
oracle_* numbers (chosen on test, they never rank anything) nor training costs (a cost claim is a ratio)."""
EXIT_METRICS = ("first_exit_accuracy", "early_exit_accuracy", "final_exit_accuracy")
"""Per-run numbers computed from exits.csv test accuracies (exit_metrics)."""
ROBUSTNESS_METRICS = ("corrupted_auc", "corrupted_early_macro_f1", "corrupted_final_macro_f1")
"""Per-run numbers from robustness.csv (analysis/robustness.py), means over every corruption and severity >= 1:
the validation-selected area, the macro-F1 of the internal exits 0..K-2 (the CET paper's "detection rate" at the
early exits) and of the final exit. A results folder without robustness.csv leaves them missing (0 pairs)."""
METRICS = RUN_METRICS + EXIT_METRICS + ROBUSTNESS_METRICS
REQUIRED_KEYS = ("id", "statement", "source", "a", "b", "metric", "direction")
KEYS = REQUIRED_KEYS + ("margin", "cells", "task")
TASKS = ("classification", "segmentation")
PAIR_KEY = ["dataset", "arch", "seed"]
COLUMNS = ["id", "statement", "source", "a", "b", "metric", "direction", "margin", "cells", "n_pairs",
           "mean_difference", "ci_low", "ci_high", "effect_size", "p_value", "p_opposite", "p_holm", "p_opposite_holm",
           "family_size", "verdict", "detectable_effect", "n_needed", "note"]
VERDICT_RULE = ("reproduced: Holm-adjusted one-sided p < {alpha:g} over the family of {m} and the whole 95 % CI "
                "of the mean difference on the claim's side of its margin (above 0 for >, above -margin for ≥); "
                "contradicted: the same for the opposite direction (CI wholly below 0, or below -margin); otherwise "
                "inconclusive")
CLAIM_COLUMNS = COLUMNS[:8]
"""The columns copied from the claim (its `cells` globs are replaced by the cells that gave pairs)."""
EXACT_POWER_LIMIT = 100_000
"""Above this many pairs n_needed is the normal approximation: the noncentral t search would gain nothing."""


@dataclass(frozen=True)
class Claim:
    id: str
    statement: str
    source: str
    a: str
    b: str
    metric: str
    direction: str
    margin: float = 0.0                 # not_less only; 0 for greater
    cells: tuple[str, ...] = ("*/*",)   # "dataset/arch" globs
    task: str | None = "classification"   # the task kind of the cells it is about; None: any (ad-hoc claims)


def _hint(name: str, valid) -> str:
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"


def load_claims(path: str | Path | None = None) -> list[Claim]:
    """Read and validate a claims file (default: the shipped benchmark/claims.toml). Every mistake is a UserError
    naming the file, the claim's id (or its position when the id itself is wrong) and the key."""
    from regimes.registry import regime_names   # imports every regime module (torch): only when claims load

    path = CLAIMS_FILE if path is None else Path(path)
    if not path.is_file():
        raise UserError(f"claims file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"claims file {path} is not valid TOML: {e}") from None
    for key in raw:
        if key != "claim":
            raise UserError(f"claims file {path}: unknown top-level key '{key}': declare each claim as a [[claim]] table")
    tables = raw.get("claim")
    if not isinstance(tables, list) or not tables:
        raise UserError(f"claims file {path} declares no claim: add a [[claim]] table")
    regimes, claims = regime_names(), []
    for position, table in enumerate(tables, start=1):
        claim = _claim(path, position, table, regimes)
        if any(c.id == claim.id for c in claims):
            raise UserError(f"claims file {path}: claim '{claim.id}': key 'id': repeats an earlier claim's id")
        claims.append(claim)
    return claims


def _claim(path: Path, position: int, table: dict, regimes: list[str]) -> Claim:
    name = table.get("id")
    label = name if isinstance(name, str) and name.strip() else f"#{position}"

    def bad(key: str, problem: str) -> UserError:
        return UserError(f"claims file {path}: claim '{label}': key '{key}': {problem}")

    for key in table:
        if key not in KEYS:
            raise bad(key, "unknown key" + _hint(key, KEYS))
    for key in REQUIRED_KEYS:
        if not isinstance(table.get(key), str) or not table[key].strip():
            raise bad(key, "required: a non-empty string")
    for key in ("a", "b"):
        if table[key] not in regimes:
            raise bad(key, f"unknown regime '{table[key]}'" + _hint(table[key], regimes))
    if table["a"] == table["b"]:
        raise bad("b", f"compares '{table['a']}' with itself")
    if table["metric"] not in METRICS:
        raise bad("metric", f"unknown metric '{table['metric']}'" + _hint(table["metric"], METRICS))
    if table["direction"] not in DIRECTIONS:
        raise bad("direction", f"unknown direction '{table['direction']}'" + _hint(table["direction"], DIRECTIONS))
    margin = table.get("margin")
    if table["direction"] == "not_less":
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 < margin < 1:
            raise bad("margin", f"direction 'not_less' needs a margin in (0, 1), in metric units "
                                f"(e.g. margin = 0.005), got {margin!r}")
    elif margin is not None:
        raise bad("margin", "only direction 'not_less' takes a margin")
    cells = table.get("cells", ["*/*"])
    if (not isinstance(cells, list) or not cells
            or not all(isinstance(c, str) and c.count("/") == 1 and all(c.split("/")) for c in cells)):
        raise bad("cells", f'must be a non-empty list of "dataset/arch" globs, e.g. ["digits/*"], got {cells!r}')
    task = table.get("task", "classification")
    if task not in TASKS:
        raise bad("task", f"unknown task {task!r}" + _hint(task, TASKS))
    return Claim(id=table["id"], statement=table["statement"].strip(), source=table["source"].strip(),
                 a=table["a"], b=table["b"], metric=table["metric"], direction=table["direction"],
                 margin=float(margin or 0.0), cells=tuple(cells), task=task)


def exit_metrics(exits: pd.DataFrame) -> pd.DataFrame:
    """Per run_id (the index): first_exit_accuracy (exit 0), early_exit_accuracy (mean over the internal exits
    0..K-2; NaN when K = 1) and final_exit_accuracy (exit K-1, the same number as runs.csv final_accuracy), all
    test accuracies. A run whose exits are not numbered 0..K-1 is an error: exit 0 would not be the first."""
    exits = exits.sort_values(["run_id", "exit"], kind="stable")
    numbered = exits["exit"].to_numpy() == exits.groupby("run_id").cumcount().to_numpy()
    if not numbered.all():
        raise ValueError(f"exits table: run {exits.loc[~numbered, 'run_id'].iloc[0]!r} has exits not numbered 0..K-1")

    def per_run(accuracy: pd.Series) -> pd.Series:
        values = accuracy.to_numpy(dtype=np.float64)
        return pd.Series({"first_exit_accuracy": values[0],
                          "early_exit_accuracy": values[:-1].mean() if len(values) > 1 else np.nan,
                          "final_exit_accuracy": values[-1]})

    if exits.empty:
        return pd.DataFrame(columns=list(EXIT_METRICS), index=pd.Index([], name="run_id"), dtype=np.float64)
    return exits.groupby("run_id")["test_accuracy"].apply(per_run).unstack()[list(EXIT_METRICS)]


def pairs_needed(effect: float, alpha: float = ALPHA, power: float = POWER) -> int:
    """Smallest n >= 2 at which a one-sided paired t-test at `alpha` rejects with probability `power` when the true
    standardised effect is `effect` > 0: power(n) = P(T > t_{1-alpha, n-1}), T noncentral t with n-1 degrees of
    freedom and noncentrality effect * sqrt(n) (scipy.stats.nct). The search starts at the normal approximation
    ((z_{1-alpha} + z_power) / effect)^2, which is returned above EXACT_POWER_LIMIT pairs."""
    from scipy import stats

    def achieved(n: int) -> float:
        return float(stats.nct.sf(stats.t.ppf(1 - alpha, n - 1), n - 1, effect * math.sqrt(n)))

    approximate = ((stats.norm.ppf(1 - alpha) + stats.norm.ppf(power)) / effect) ** 2
    if approximate > EXACT_POWER_LIMIT:
        return math.ceil(approximate)
    n = max(2, math.floor(approximate))
    while achieved(n) < power:
        n += 1
    while n > 2 and achieved(n - 1) >= power:
        n -= 1
    return n


def detectable_effect(n: int, sd: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference (beyond the tested boundary, in the units of `sd`) that a one-sided paired
    t-test with `n` pairs at level `alpha` detects with probability `power` when the differences spread with
    standard deviation `sd`: effect_z * sd, effect_z solving power(n, effect_z) = `power` (noncentral t)."""
    from scipy import optimize, stats

    if n < 2 or not np.isfinite(sd) or sd <= 0:
        return np.nan
    critical = stats.t.ppf(1 - alpha, n - 1)

    def shortfall(effect: float) -> float:
        return float(stats.nct.sf(critical, n - 1, effect * math.sqrt(n))) - power

    high = 1.0
    while shortfall(high) < 0:
        high *= 2
    return float(optimize.brentq(shortfall, 0.0, high, xtol=1e-10)) * sd


def paired_statistics(differences, margin: float = 0.0, scale: float = 1.0) -> dict:
    """The statistics of one claim from its paired differences d = a - b (module docstring), before its family
    decides the verdict (`decide`): n_pairs, mean_difference, ci_low, ci_high, effect_size, p_value (the claim's
    one-sided p), p_opposite, sd (of d), note. `margin` is 0 for "greater"; `scale` (the largest |value| compared)
    sets the rounding tolerance that tells zero variance."""
    from scipy import stats

    from analysis.statistics import EQUAL_RTOL, confidence_interval

    d = np.asarray(differences, dtype=np.float64)
    n = len(d)
    out = {"n_pairs": n, "mean_difference": float(d.mean()) if n else np.nan, "ci_low": np.nan, "ci_high": np.nan,
           "effect_size": np.nan, "p_value": np.nan, "p_opposite": np.nan, "sd": np.nan, "note": ""}
    if n < 2:
        out["note"] = f"{n} pair{'' if n == 1 else 's'}: a paired test needs at least 2"
        return out
    out["ci_low"], out["ci_high"] = confidence_interval(d)
    mean, shifted, tolerance = d.mean(), d.mean() + margin, EQUAL_RTOL * max(scale, 1e-300)
    if np.ptp(d) <= tolerance:                                   # zero variance: no t statistic
        out["effect_size"] = math.copysign(math.inf, mean) if abs(mean) > tolerance else np.nan
        out["sd"] = 0.0
        if shifted > tolerance:
            out.update(p_value=0.0, p_opposite=1.0)
        elif shifted < -tolerance:
            out.update(p_value=1.0, p_opposite=0.0)
        out["note"] = "every difference is the same (zero variance): decided by its sign, no t-test"
        return out
    out["sd"] = sd = float(d.std(ddof=1))
    out["effect_size"] = float(mean / sd)
    out["p_value"] = float(stats.ttest_1samp(d, -margin, alternative="greater").pvalue)
    out["p_opposite"] = float(stats.ttest_1samp(d, -margin, alternative="less").pvalue)
    return out


def holm(p_values) -> np.ndarray:
    """Holm's step-down adjusted p values (Holm 1979) of a family; NaN entries are not members and stay NaN.
    Every claim with at least 2 pairs is a member (`decide`), one without a p value as p = 1."""
    p = np.asarray(p_values, dtype=np.float64)
    adjusted = np.full(p.shape, np.nan)
    members = np.flatnonzero(np.isfinite(p))
    order = members[np.argsort(p[members], kind="stable")]
    m, running = len(order), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def decide(rows: pd.DataFrame) -> pd.DataFrame:
    """The verdicts of a family of claims (VERDICT_RULE): Holm over the rows with at least 2 pairs, the interval
    against each row's margin, and each row's detectable effect and pairs needed at the strictest Holm level."""
    rows = rows.copy()
    family = rows["n_pairs"] >= 2
    m = int(family.sum())
    rows["family_size"] = m
    for column in ("p_value", "p_opposite"):       # a member without a p (zero variance, mean 0) counts as p = 1
        member_p = rows[column].where(family).mask(family & rows[column].isna(), 1.0)
        rows[column.replace("p_value", "p") + "_holm"] = holm(member_p)
    level = ALPHA / max(m, 1)
    verdicts, detectable, needed, notes = [], [], [], []
    for row in rows.itertuples(index=False):
        boundary = -row.margin
        verdict, need, note = "inconclusive", np.nan, row.note
        if row.p_holm < ALPHA and row.ci_low > boundary:
            verdict = "reproduced"
        elif row.p_opposite_holm < ALPHA and row.ci_high < boundary:
            verdict = "contradicted"
        elif row.n_pairs >= 2 and row.sd > 0:
            distance = (row.mean_difference + row.margin) / row.sd
            if distance > 0:
                need = float(pairs_needed(distance, level))
            else:
                note = "; ".join(filter(None, [note, "no effect to power"]))
        verdicts.append(verdict)
        needed.append(need)
        notes.append(note)
        detectable.append(detectable_effect(row.n_pairs, row.sd, level) if row.n_pairs >= 2 else np.nan)
    rows["verdict"], rows["detectable_effect"], rows["n_needed"], rows["note"] = verdicts, detectable, needed, notes
    return rows


def robustness_metrics(robustness: pd.DataFrame) -> pd.DataFrame:
    """Per run_id (the index): ROBUSTNESS_METRICS from robustness.csv rows (severity >= 1 only)."""
    shifted = robustness[robustness["severity"] > 0]
    if shifted.empty:
        return pd.DataFrame(columns=list(ROBUSTNESS_METRICS), index=pd.Index([], name="run_id"), dtype=np.float64)
    exit_rows = shifted[shifted["point"].str.startswith("exit_")]
    last = exit_rows.groupby("run_id")["exit"].transform("max")
    return pd.DataFrame({
        "corrupted_auc": shifted[shifted["point"] == "area"].groupby("run_id")["accuracy"].mean(),
        "corrupted_early_macro_f1": exit_rows[exit_rows["exit"] < last].groupby("run_id")["macro_f1"].mean(),
        "corrupted_final_macro_f1": exit_rows[exit_rows["exit"] == last].groupby("run_id")["macro_f1"].mean(),
    })[list(ROBUSTNESS_METRICS)]


def evaluate_claims(runs: pd.DataFrame, exits: pd.DataFrame, claims: list[Claim] | None = None,
                    robustness: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per claim (COLUMNS; default claims: the shipped file), from the tidy runs.csv and exits.csv (and
    robustness.csv for ROBUSTNESS_METRICS; without it those claims have no pairs).

    Only runs with status "done" count. Pairs are (dataset, arch, seed) with a done run of both a and b and a value
    of the metric for both, in the cells the claim's globs match; `cells` lists the cells that gave pairs and
    `note` counts the done runs left unpaired (failed partner, missing seed or missing value)."""
    claims = load_claims() if claims is None else claims
    done = runs[runs["status"] == "done"]
    repeated = done.duplicated([*PAIR_KEY, "regime"])
    if repeated.any():
        raise ValueError(f"{repeated.sum()} done runs repeat a (dataset, arch, regime, seed); pairing needs one each")
    if any(claim.metric in EXIT_METRICS for claim in claims):
        done = done.join(exit_metrics(exits), on="run_id")
    if any(claim.metric in ROBUSTNESS_METRICS for claim in claims):
        empty = pd.DataFrame(columns=["run_id", "severity", "point", "exit", "accuracy", "macro_f1"])
        done = done.join(robustness_metrics(empty if robustness is None else robustness), on="run_id")
    rows = []
    for claim in claims:
        if claim.metric not in done.columns:
            raise UserError(f"claim '{claim.id}': the runs table has no column '{claim.metric}' (an older table? "
                            f"rerun `bench report` to rebuild it)")
        declared = {column: getattr(claim, column) for column in CLAIM_COLUMNS}
        rows.append({**declared, **_evaluate(claim, done)})      # `cells` becomes the matched cells
    if not rows:
        return pd.DataFrame(columns=COLUMNS)
    return decide(pd.DataFrame(rows))[COLUMNS]


def test_claim(runs: pd.DataFrame, exits: pd.DataFrame, a: str, b: str, metric: str, direction: str = "greater",
               margin: float | None = None, cells: tuple[str, ...] = ("*/*",),
               robustness: pd.DataFrame | None = None, entries: tuple[str, ...] = ()) -> pd.Series:
    """Any claim "a beats b on metric" (or "a is not worse than b by more than margin"), tested by the rules of the
    shipped claims (a family of one: list several in a claims file to correct them together). The same validation
    as a claims file: an unknown regime, metric or direction is a UserError naming it. Its cells are those `cells`
    matches, of either task (narrow them to keep accuracy and mIoU apart). `entries`: names of external entries
    (`benchmark.external.entry_runs`, rows of `runs` and `exits` with the entry's name as regime) a or b may be."""
    table = {"id": "ad-hoc", "statement": f"{a} vs {b} on {metric}", "source": "ad hoc", "a": a, "b": b,
             "metric": metric, "direction": direction, "cells": list(cells)}
    if margin is not None:
        table["margin"] = margin
    from regimes.registry import regime_names
    claim = replace(_claim(Path("<command line>"), 1, table, [*regime_names(), *entries]), task=None)   # cells by globs
    return evaluate_claims(runs, exits, [claim], robustness).iloc[0]


test_claim.__test__ = False       # a public API named like a test: pytest must not collect it


def _evaluate(claim: Claim, done: pd.DataFrame) -> dict:
    names = done["dataset"] + "/" + done["arch"]
    from benchmark.data import table_task
    tasks = {dataset: table_task(dataset) for dataset in set(done["dataset"])}
    matched = done.loc[np.array([any(fnmatchcase(c, glob) for glob in claim.cells) and claim.task in (None, tasks[d])
                                 for c, d in zip(names, done["dataset"])], dtype=bool)]
    sides = {side: matched[matched["regime"] == regime].set_index(PAIR_KEY)[claim.metric]
             for side, regime in (("a", claim.a), ("b", claim.b))}
    pairs = pd.concat(sides, axis=1, join="inner").dropna().sort_index()
    result = paired_statistics(pairs["a"] - pairs["b"], claim.margin,
                            float(np.abs(pairs.to_numpy(dtype=np.float64)).max()) if len(pairs) else 1.0)
    notes = [result["note"]] if result["note"] else []
    for side, regime in (("a", claim.a), ("b", claim.b)):
        if sides[side].empty:
            notes.append(f"no done run of {regime} in {', '.join(claim.cells)}"
                         + (f" ({claim.task} cells)" if claim.task == "segmentation" else ""))
    left_out = len(sides["a"]) + len(sides["b"]) - 2 * len(pairs)
    if left_out:
        notes.append(f"{left_out} done run{'' if left_out == 1 else 's'} left unpaired")
    cells = sorted({f"{dataset}/{arch}" for dataset, arch, _ in pairs.index})
    return {**result, "cells": ", ".join(cells), "note": "; ".join(notes)}


def claims_phrase(count: int) -> str:
    """"1 claim", "4 claims": the size of a family, in words."""
    return f"{count} claim{'' if count == 1 else 's'}"


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _p(p: float) -> str:
    if np.isnan(p):
        return "p undefined"
    return "p < 0.001" if 0 < p < 0.001 else f"p = {p:.2g}"


def claim_findings(table: pd.DataFrame) -> list[str]:
    """One sentence per row of evaluate_claims' table, every number taken from it (metrics are fractions, shown
    as points = x 100)."""
    sentences = []
    for row in table.itertuples(index=False):
        relation = ">" if row.direction == "greater" else "≥"
        margin = f", margin {100 * row.margin:g} points" if row.direction == "not_less" else ""
        head = f"{row.statement.rstrip('.')} ({row.a} {relation} {row.b} on {row.metric}{margin}): {row.verdict}"
        if row.n_pairs < 2:
            sentences.append(f"{head} — {row.note}.")
            continue
        sentence = (f"{head} — mean {_points(row.mean_difference)} points [95 % CI {_points(row.ci_low)}, "
                    f"{_points(row.ci_high)}] over {row.n_pairs} (cell, seed) pairs, one-sided {_p(row.p_value)}, "
                    f"Holm-adjusted over {claims_phrase(row.family_size)} {_p(row.p_holm)}; the pairs could detect "
                    f"{abs(100 * row.detectable_effect):.1f} points")
        if not np.isnan(row.n_needed):
            sentence += f"; about {int(row.n_needed)} pairs would give {100 * POWER:.0f} % power at this effect"
        sentences.append(sentence + (f" ({row.note})." if row.note else "."))
    return sentences
