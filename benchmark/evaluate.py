"""Early-exit evaluation from stored per-exit logits: exit policies, accuracy–FLOPs curves, summary numbers.

The protocol is REGIMES.md, "Early-exit evaluation". Everything here works on stored logits — numpy, plus the
budgeted-batch allocation shared with l2w's training (benchmark/budgeted.py, torch on the CPU); no model, no
re-forward — so re-evaluating a run takes milliseconds and later analyses can reuse the pieces.

Conventions used throughout:
- K exits, N samples, C classes. Logits are (K, N, C); confidences and correctness are (K, N).
- An exit *rule* turns the (K, N, C) logits into a score and a prediction per exit (`exit_scores`): the max
  softmax probability (SDN/MSDNet), one minus the normalised entropy, the length of the current streak of exits
  agreeing on the argmax (PBEE's patience), or the max probability of the geometric-mean ensemble of exits 0..k
  (ZTW). Scores are float64 from the stored float32 logits, and causal: exit k's depends on exits 0..k only.
- A sample leaves at the first exit whose score >= that exit's threshold; the last exit takes the rest, with its
  rule's prediction there. Thresholds are therefore K-1 numbers, one per internal exit. A *policy* is a rule plus
  a sweep of threshold vectors (POLICIES).
- exit_costs[k] is the cumulative FLOPs of leaving at exit k (backbone up to k plus every head up to k).
  A policy point reports mean FLOPs per sample and accuracy as a fraction in [0, 1].
- Thresholds and operating points are chosen on validation only (`preference_order` is the one selection
  rule, over the points of every policy) and then *applied* to test; no number but `oracle_auc_normalised`
  looks at test to choose anything.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from benchmark.budgeted import budget_shares, budgeted_exits

THRESHOLD_GRID = np.linspace(0.0, 1.0, 100)
"""Global thresholds tau of the threshold (SDN/ZTW), entropy and ensemble sweeps (same tau at every internal exit)."""

BUDGET_Q = np.arange(1, 40) / 20
"""Share ratios q of the MSDNet/L2W budgeted-batch curve: exit k gets a share proportional to q**k."""

POLICY_RULE = {"exit": "max_softmax", "threshold": "max_softmax", "budgeted": "max_softmax",
               "entropy": "entropy", "patience": "patience", "ensemble": "ensemble"}
"""Each policy's exit rule (`exit_scores`). `exit`: everyone leaves at exit k (param k); `threshold`: one global tau
on the max softmax (param tau); `budgeted`: MSDNet/L2W budgeted batch, per-exit thresholds fit on validation
(param q); `entropy`: one global tau on 1 - H/log C; `patience`: leave once p consecutive exits agree (param p,
1..K-1; PBEE: PABEE's `patience` t is p = t + 1, its t = 0 is no early exit); `ensemble`: one global tau on the
geometric-mean ensemble's max probability (ZTW, unweighted)."""

DENSE_POLICY_RULE = {"exit": "mean_max_softmax", "threshold": "mean_max_softmax", "budgeted": "mean_max_softmax",
                     "quantile": "low_quantile_max_softmax", "entropy": "entropy"}
"""The policies of segmentation runs, which decide per image from a confidence summary of the exit's prediction
(`benchmark.dense.summaries`, as MESS networks do): `threshold`, `budgeted` and `exit` on the mean per-pixel max
softmax, `quantile` on its 10 % quantile, `entropy` on one minus the mean normalised entropy. patience and ensemble
do not carry over: they compare or combine exits pixel by pixel, which the stored per-image summaries cannot."""

POLICY_ORDER = (*POLICY_RULE, "quantile")
"""The order of the policies in curves.csv; with the point index it breaks the last ties of validation selection.
The protocol-2 policies come first, so a tie between an old and a new policy keeps the old choice."""

HISTORY_RULES = frozenset({"patience", "ensemble"})
"""Rules whose score at exit k reads the heads of every earlier exit: an early-exit forward must run all of them."""

BUDGET_FRACTIONS = {"25pct": 0.25, "50pct": 0.50, "75pct": 0.75, "100pct": 1.00}
"""Budgets of the accuracy_at_X summary numbers, as fractions of the backbone's FLOPs."""

_BUDGET_RTOL = 1e-9
"""A point 'fits' a budget up to this relative slack, so a mean of identical costs that rounds a hair
above the exact budget is not excluded by floating-point noise."""


@dataclass(frozen=True)
class ExitOutputs:
    """One split's per-exit scores, predictions and correctness under one exit rule, (K, N) each: all a policy
    needs."""

    score: np.ndarray  # float64, what the thresholds compare against (`exit_scores`)
    prediction: np.ndarray  # int64, the class a sample leaving at this exit is given
    correct: np.ndarray  # bool, prediction == label

    @classmethod
    def from_logits(cls, logits: np.ndarray, y: np.ndarray, rule: str = "max_softmax") -> ExitOutputs:
        score, prediction = exit_scores(rule, logits)
        y = np.asarray(y)
        if y.shape != prediction.shape[1:]:
            raise ValueError(f"labels of shape {y.shape} do not match logits of shape {np.shape(logits)}")
        return cls(score, prediction, prediction == y[None, :])

    @property
    def n_exits(self) -> int:
        return self.score.shape[0]

    def quality(self, exits: np.ndarray) -> np.ndarray:
        """Accuracy (fraction) of exit assignments `exits` (..., N): what an operating point reports. Segmentation's
        outputs (`benchmark.dense.DenseExitOutputs`) report the assignment's mIoU through the same method."""
        return self.correct[exits, np.arange(np.shape(exits)[-1])].mean(axis=-1)

    def exit_quality(self) -> np.ndarray:
        """Accuracy of every exit alone (K,)."""
        return self.correct.mean(axis=1)


@dataclass
class Evaluation:
    """Everything evaluate() computes for one run; see evaluate() for the columns."""

    exits: pd.DataFrame
    curves: pd.DataFrame
    selected: pd.DataFrame
    summary: dict
    outputs: dict[str, tuple[ExitOutputs, ExitOutputs]]  # rule -> (validation, test): what the policies read


def max_softmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Confidence (max softmax probability, float64) and predicted class along the last axis.

    The max probability is 1 / sum(exp(z - max z)), which is the softmax at the argmax, computed stably. In
    float64 because it saturates: 1 / (1 + e^-g) rounds to exactly 1.0 once the top-2 logit gap g exceeds ~17 in
    float32 (~37 in float64), and confident samples would then tie, so thresholds could no longer order them.
    """
    logits = np.asarray(logits, dtype=np.float64)
    prediction = logits.argmax(axis=-1)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    np.exp(shifted, out=shifted)
    confidence = 1.0 / shifted.sum(axis=-1)
    return confidence, prediction


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities along the last axis in float64, computed stably (shift by the max)."""
    logits = np.asarray(logits, dtype=np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def exit_scores(rule: str, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Score and prediction per exit, (K, N) each, from per-exit logits (K, N, C) under an exit rule.

    - max_softmax: the max softmax probability and the exit's argmax (`max_softmax`).
    - entropy: 1 - H(p) / log C in [0, 1] (1 = one-hot, 0 = uniform) and the exit's argmax; the normalisation puts
      its thresholds on the same [0, 1] grid as the max softmax's, whatever the number of classes.
    - patience: how many consecutive exits up to and including k predict exit k's argmax (1 at exit 0, +1 while
      the argmax stays, back to 1 when it changes), and exit k's argmax; threshold p = PBEE's "p exits agree" (the official
      PABEE counter starts at 0 and leaves when it reaches `patience` t: p = t + 1).
    - ensemble: the max probability and argmax of the normalised geometric mean of the softmax of exits 0..k, i.e.
      the softmax of the mean log-probability (ZTW's geometric ensemble with equal weights); exit 0 alone is itself.
    Every rule is causal (exit k reads exits 0..k only), so the early-exit forward of bench latency computes the
    same numbers from the heads it has run so far.
    """
    if rule == "max_softmax":
        return max_softmax(logits)
    if rule == "entropy":
        shifted = np.asarray(logits, dtype=np.float64)
        prediction = shifted.argmax(axis=-1)
        shifted = shifted - shifted.max(axis=-1, keepdims=True)
        weights = np.exp(shifted)
        total = weights.sum(axis=-1)
        entropy = np.log(total) - (weights * shifted).sum(axis=-1) / total     # H = log S - sum(e^z z) / S
        return 1.0 - entropy / np.log(shifted.shape[-1]), prediction
    if rule == "patience":
        prediction = np.asarray(logits).argmax(axis=-1)
        streak = np.ones(prediction.shape)
        for k in range(1, len(prediction)):
            streak[k] = np.where(prediction[k] == prediction[k - 1], streak[k - 1] + 1, 1)
        return streak, prediction
    if rule == "ensemble":
        log_p = log_softmax(logits)
        seen = np.arange(1, len(log_p) + 1, dtype=np.float64)[:, None, None]
        return max_softmax(np.cumsum(log_p, axis=0) / seen)
    raise ValueError(f"unknown exit rule '{rule}'; known: {sorted(set(POLICY_RULE.values()))}")


def exit_decisions(score: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Index of the exit each sample leaves at: the first k < K-1 with score[k] >= thresholds[k], else K-1.

    score: (K, N). thresholds: (K-1,) or a batch of policy points (..., K-1).
    Returns int64 of shape (..., N). A threshold of +inf closes an exit; 0 sends everyone there.
    """
    score = np.asarray(score)
    thresholds = np.asarray(thresholds, dtype=np.float64)
    n_exits, n_samples = score.shape
    if thresholds.shape[-1:] != (n_exits - 1,):
        raise ValueError(f"need {n_exits - 1} thresholds (one per internal exit), got shape {thresholds.shape}")
    exits = np.full(thresholds.shape[:-1] + (n_samples,), n_exits - 1)
    for k in reversed(range(n_exits - 1)):  # walking backwards, the earliest exit a sample passes wins
        exits[score[k] >= thresholds[..., k, None]] = k
    return exits


def operating_point(exits: np.ndarray, outputs: ExitOutputs, exit_costs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy (fraction; mIoU for segmentation outputs) and mean FLOPs per sample of the exit assignment `exits`
    (..., N).

    outputs: the split's per-exit outputs (`quality` scores an assignment); exit_costs: (K,) FLOPs of leaving at each
    exit.
    """
    exits = np.asarray(exits)
    mean_flops = np.asarray(exit_costs, dtype=np.float64)[exits].mean(axis=-1)
    return outputs.quality(exits), mean_flops


def fit_budgeted_thresholds(confidence: np.ndarray, shares: np.ndarray) -> np.ndarray:
    """Per-exit thresholds that realise exit `shares` on this (validation) split, as MSDNet's dynamic_evaluate.

    The allocation is `budgeted_exits`, the one l2w trains against: walking the internal exits in order, exit k
    takes its floor(N * shares[k]) most confident samples among those not yet taken; the last exit takes the
    rest. Exit k's threshold is the lowest confidence among the samples it took, +inf if it took none (exit
    closed). Applied with exit_decisions, the thresholds send every sample to its allocated exit, except that a
    sample whose confidence ties an earlier exit's threshold leaves there (ties leave together).

    confidence: (K, N); shares: (K,) or (P, K). Returns thresholds (K-1,) or (P, K-1).
    """
    confidence = np.asarray(confidence)
    shares = np.asarray(shares, dtype=np.float64)
    n_exits = confidence.shape[0]
    if shares.shape[-1] != n_exits:
        raise ValueError(f"need {n_exits} shares, got shape {shares.shape}")
    points = shares.reshape(-1, n_exits)
    ranked = torch.from_numpy(np.ascontiguousarray(confidence))
    internal = np.arange(n_exits - 1)[:, None]
    thresholds = np.empty((len(points), n_exits - 1))
    for p, point in enumerate(points):
        exits = budgeted_exits(ranked, point.tolist()).numpy()
        thresholds[p] = np.where(exits == internal, confidence[:-1], np.inf).min(axis=1)
    return thresholds.reshape(shares.shape[:-1] + (n_exits - 1,))


def policy_params(policy: str, n_exits: int) -> np.ndarray:
    """A policy's sweep: the param of each of its points (curves.csv's `param`; `point` indexes this array)."""
    if policy == "exit":
        return np.arange(n_exits, dtype=np.float64)
    if policy == "budgeted":
        return BUDGET_Q
    if policy == "patience":
        return np.arange(1, n_exits, dtype=np.float64)
    if policy in POLICY_RULE or policy in DENSE_POLICY_RULE:
        return THRESHOLD_GRID
    raise ValueError(f"unknown policy '{policy}'; known: {', '.join(POLICY_ORDER)}")


def policy_thresholds(policy: str, params: np.ndarray, val_score: np.ndarray) -> np.ndarray:
    """The threshold vectors (P, K-1) of a policy's points `params`, built as every number of the suite uses them.

    val_score: (K, N) validation scores under the policy's rule; only `budgeted` reads it (its thresholds are fit
    on validation). `exit` k opens exit k alone (threshold 0: every max softmax is > 0, everyone leaves; earlier
    exits closed with +inf; k = K-1 closes them all); `budgeted` q realises shares proportional to q**k on
    validation (`fit_budgeted_thresholds`); the others put their param at every internal exit.
    """
    params = np.asarray(params, dtype=np.float64)
    n_exits = np.shape(val_score)[0]
    if policy == "exit":
        thresholds = np.full((len(params), n_exits - 1), np.inf)
        internal = params < n_exits - 1
        thresholds[np.flatnonzero(internal), params[internal].astype(int)] = 0.0
        return thresholds
    if policy == "budgeted":
        return fit_budgeted_thresholds(val_score, budget_shares(params, n_exits))
    return np.repeat(params[:, None], n_exits - 1, axis=1)


def policy_curve(policy: str, val: ExitOutputs, test: ExitOutputs, exit_costs: np.ndarray) -> pd.DataFrame:
    """curves.csv rows of one policy: its sweep's thresholds, fit on validation where they are fit at all, applied
    to validation and test alike. `val` and `test` are under the policy's rule (POLICY_RULE)."""
    params = policy_params(policy, val.n_exits)
    thresholds = policy_thresholds(policy, params, val.score)
    val_accuracy, val_flops = operating_point(exit_decisions(val.score, thresholds), val, exit_costs)
    test_accuracy, test_flops = operating_point(exit_decisions(test.score, thresholds), test, exit_costs)
    return pd.DataFrame({"policy": policy, "point": np.arange(len(params)), "param": params,
                         "val_accuracy": val_accuracy, "val_flops": val_flops,
                         "test_accuracy": test_accuracy, "test_flops": test_flops})


def point_outcome(policy: str, param: float, val: ExitOutputs, test: ExitOutputs) -> tuple[np.ndarray, np.ndarray]:
    """(exit, prediction) of every test sample at one point of a policy (thresholds built as in `policy_curve`);
    `val` and `test` under the policy's rule. What a per-sample metric of a chosen point (macro-F1) needs."""
    thresholds = policy_thresholds(policy, [param], val.score)[0]
    exits = exit_decisions(test.score, thresholds)
    return exits, test.prediction[exits, np.arange(exits.shape[-1])]


def pareto_mask(costs: np.ndarray, accuracies: np.ndarray) -> np.ndarray:
    """True for points no other point dominates (cost <= and accuracy >=, one of them strictly).

    Exact duplicates do not dominate each other, so both stay on the front. O(n log n): sort by cost
    (most accurate first within a cost), then a point is on the front iff it is the most accurate at its
    cost and strictly more accurate than every cheaper point.
    """
    costs = np.asarray(costs, dtype=np.float64)
    accuracies = np.asarray(accuracies, dtype=np.float64)
    if costs.shape != accuracies.shape or costs.ndim != 1:
        raise ValueError(f"costs {costs.shape} and accuracies {accuracies.shape} must be 1-D of equal length")
    if len(costs) == 0:
        return np.zeros(0, dtype=bool)
    order = np.lexsort((-accuracies, costs))
    cost, accuracy = costs[order], accuracies[order]
    starts_cost_group = np.r_[True, cost[1:] != cost[:-1]]
    group_start = np.maximum.accumulate(np.where(starts_cost_group, np.arange(len(cost)), 0))
    best_so_far = np.maximum.accumulate(accuracy)
    best_cheaper = np.r_[-np.inf, best_so_far][group_start]  # best accuracy strictly cheaper than this cost
    on_front_sorted = (accuracy == accuracy[group_start]) & (accuracy > best_cheaper)
    mask = np.empty(len(costs), dtype=bool)
    mask[order] = on_front_sorted
    return mask


def covered_budgets(exit_costs: np.ndarray, backbone_cost: float) -> float:
    """Where the budgets the exits cover begin, as a fraction of the backbone: the first exit's cost. Every policy
    point costs at least this much (each sample passes exit 0), so below it no budget can be met by any regime."""
    return float(np.min(exit_costs)) / float(backbone_cost)


def mean_over_covered_budgets(steps_at: np.ndarray, heights: np.ndarray, covered_from: float) -> float:
    """Mean of a staircase (height `heights[i]` from `steps_at[i]` to the next step, the last to 1) over the budgets
    x in [covered_from, 1] — THE area of the suite: it reads as an accuracy. The steps start at covered_from or
    later (no point is cheaper than the first exit); a budget below the first step counts as 0. If the exits cover
    no range (covered_from >= 1: one exit, at the full cost), the mean is the height at x = 1."""
    steps_at, heights = np.asarray(steps_at, dtype=np.float64), np.asarray(heights, dtype=np.float64)
    if len(steps_at) == 0:
        return 0.0
    if covered_from >= 1.0:
        return float(heights[-1])
    widths = np.diff(np.r_[steps_at, 1.0])
    return float(np.sum(heights * widths) / (1.0 - covered_from))


def staircase_auc(cost_fractions: np.ndarray, accuracies: np.ndarray, covered_from: float = 0.0) -> float:
    """Mean over budgets x in [covered_from, 1] of a(x) = best accuracy reachable at cost fraction <= x.

    a(x) is the staircase through the Pareto front of the given points; it is in [0, 1] for accuracies in
    [0, 1]. Points costing more than the whole backbone (x > 1) add nothing. On test points this is an oracle
    (it picks the best *test* point at every budget): it only ever appears as `oracle_auc_normalised`.
    """
    cost_fractions = np.asarray(cost_fractions, dtype=np.float64)
    accuracies = np.asarray(accuracies, dtype=np.float64)
    front = pareto_mask(cost_fractions, accuracies)
    order = np.argsort(cost_fractions[front], kind="stable")
    steps_at = np.clip(cost_fractions[front][order], 0.0, 1.0)
    inside = cost_fractions[front][order] <= 1.0 * (1 + _BUDGET_RTOL)
    return mean_over_covered_budgets(steps_at[inside], accuracies[front][order][inside], covered_from)


def preference_order(curves: pd.DataFrame) -> np.ndarray:
    """Row positions of `curves`, most preferred first, by validation alone — THE selection rule of the suite.

    Higher validation accuracy first; ties go to the lower validation mean FLOPs, then to the policy listed
    first in POLICY_ORDER, then to the lower point index (curves.csv is written in exactly this listing order,
    so "first listed wins" recomputes every selection from the table). Test columns are never read.
    """
    policy_rank = curves["policy"].map({p: i for i, p in enumerate(POLICY_ORDER)}).to_numpy()
    return np.lexsort((curves["point"].to_numpy(), policy_rank, curves["val_flops"].to_numpy(dtype=np.float64),
                       -curves["val_accuracy"].to_numpy(dtype=np.float64)))


def select_at_budget(curves: pd.DataFrame, budget_flops: float) -> int | None:
    """Row position of the point validation picks within a budget (validation mean FLOPs <= budget), or None."""
    fits = curves["val_flops"].to_numpy(dtype=np.float64) <= budget_flops * (1 + _BUDGET_RTOL)
    preferred = preference_order(curves)
    fitting = preferred[fits[preferred]]
    return int(fitting[0]) if len(fitting) else None


def accuracy_at_budget(curves: pd.DataFrame, budget_flops: float) -> float:
    """Test accuracy of the point validation picks within a budget (`select_at_budget`); NaN if no point fits."""
    chosen = select_at_budget(curves, budget_flops)
    return float("nan") if chosen is None else float(curves["test_accuracy"].iloc[chosen])


def selection_staircase(curves: pd.DataFrame, backbone_cost: float) -> pd.DataFrame:
    """The validation-selected staircase over budgets x in [0, 1] x backbone FLOPs: one row per step.

    At budget x the chosen point is `select_at_budget(curves, x * backbone_cost)`; it can only change where x
    passes a point's validation cost, so the staircase is exact. Columns: budget_from, budget_to (fractions of
    the backbone's FLOPs; the step holds on [from, to)), row (position in `curves`). Empty if no point costs
    <= 100 % on validation.
    """
    fractions = curves["val_flops"].to_numpy(dtype=np.float64) / backbone_cost
    preferred = preference_order(curves)
    preference_rank = np.empty(len(curves), dtype=np.int64)
    preference_rank[preferred] = np.arange(len(curves))
    by_cost = np.argsort(fractions, kind="stable")
    best_so_far = preferred[np.minimum.accumulate(preference_rank[by_cost])]  # chosen once by_cost[:i+1] fit
    starts = fractions[by_cost]
    last_of_cost = np.r_[starts[1:] != starts[:-1], True]            # equal costs enter together
    starts, chosen = starts[last_of_cost], best_so_far[last_of_cost]
    inside = starts <= 1.0 * (1 + _BUDGET_RTOL)
    starts, chosen = np.clip(starts[inside], 0.0, 1.0), chosen[inside]
    changes = np.r_[True, chosen[1:] != chosen[:-1]]
    starts, chosen = starts[changes], chosen[changes]
    return pd.DataFrame({"budget_from": starts, "budget_to": np.r_[starts[1:], 1.0], "row": chosen})


def selected_points(curves: pd.DataFrame, backbone_cost: float) -> pd.DataFrame:
    """Every operating point validation selects, with its validation and test numbers: the summary budgets
    (selection = at_25pct ...) and the steps of the validation-selected staircase (selection = staircase)."""
    rows = []
    for name, fraction in BUDGET_FRACTIONS.items():
        chosen = select_at_budget(curves, fraction * backbone_cost)
        rows.append({"selection": f"at_{name}", "budget_from": fraction, "budget_to": fraction, "row": chosen})
    for step in selection_staircase(curves, backbone_cost).itertuples(index=False):
        rows.append({"selection": "staircase", "budget_from": step.budget_from, "budget_to": step.budget_to,
                     "row": step.row})
    table = pd.DataFrame(rows)
    found = table["row"].notna()
    points = curves.iloc[table.loc[found, "row"].astype(int)][
        ["policy", "point", "param", "val_accuracy", "val_flops", "test_accuracy", "test_flops"]]
    return table.drop(columns="row").join(points.set_axis(table.index[found]))


def selected_auc(selected: pd.DataFrame, split: str, covered_from: float) -> float:
    """Mean over the covered budgets [covered_from, 1] of the validation-selected staircase, with the chosen
    points' `split` accuracy (test: the primary metric; val: the tuning metric). 0 where no point fits."""
    steps = selected[selected["selection"] == "staircase"]
    return mean_over_covered_budgets(steps["budget_from"].to_numpy(), steps[f"{split}_accuracy"].to_numpy(),
                                     covered_from)


def validation_area(val_logits: np.ndarray, val_y: np.ndarray, exit_costs: np.ndarray, backbone_cost: float) -> float:
    """`evaluate`'s val_auc_normalised from validation logits alone — the score of a successive-halving rung, where
    no test data may be read."""
    outputs = {rule: ExitOutputs.from_logits(val_logits, val_y, rule) for rule in dict.fromkeys(POLICY_RULE.values())}
    return validation_area_of(outputs, POLICY_RULE, exit_costs, backbone_cost)


def validation_area_of(val_outputs: dict, rules: dict[str, str], exit_costs: np.ndarray, backbone_cost: float) -> float:
    """val_auc_normalised from each rule's validation outputs (`ExitOutputs`, or `dense.DenseExitOutputs`) under the
    policies of `rules`: the same curves and selection as `evaluation_of`, validation standing in for the test
    columns, which `selected_auc(..., "val")` never reads."""
    curves = policy_curves({rule: (out, out) for rule, out in val_outputs.items()},
                           np.asarray(exit_costs, dtype=np.float64), rules)
    return selected_auc(selected_points(curves, float(backbone_cost)), "val", covered_budgets(exit_costs, backbone_cost))


def policy_curves(outputs: dict[str, tuple[ExitOutputs, ExitOutputs]], exit_costs: np.ndarray,
                  rules: dict[str, str] = POLICY_RULE) -> pd.DataFrame:
    """curves.csv's rows of every policy of `rules` (POLICY_RULE; DENSE_POLICY_RULE for segmentation), in
    POLICY_ORDER, from each rule's (validation, test) outputs."""
    return pd.concat([policy_curve(policy, *outputs[rules[policy]], exit_costs)
                      for policy in POLICY_ORDER if policy in rules], ignore_index=True)


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean over classes of F1 = 2TP / (2TP + FP + FN), as sklearn's f1_score(average="macro").

    Like sklearn, the classes are those present in y_true or y_pred (a class never seen nor predicted has no F1).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    n_classes = int(max(y_true.max(), y_pred.max())) + 1
    true_positives = np.bincount(y_true[y_true == y_pred], minlength=n_classes)
    support = np.bincount(y_true, minlength=n_classes)  # TP + FN
    predicted = np.bincount(y_pred, minlength=n_classes)  # TP + FP
    present = (support + predicted) > 0
    return float(np.mean(2 * true_positives[present] / (support + predicted)[present]))


def evaluate(val_logits: np.ndarray, val_y: np.ndarray, test_logits: np.ndarray, test_y: np.ndarray,
             exit_costs: np.ndarray, backbone_cost: float) -> Evaluation:
    """Every exit, policy curve and summary number of one run, from its stored validation and test logits.

    val_logits, test_logits: (K, N, C), any float dtype. val_y, test_y: (N,) int labels.
    exit_costs: (K,) cumulative FLOPs of leaving at each exit. backbone_cost: FLOPs of the plain backbone (100 %).

    exits:    one row per exit: exit, flops, flops_fraction, val_accuracy, test_accuracy, test_macro_f1.
    curves:   one row per (policy, point) for every policy of POLICY_RULE (each exit alone, the max-softmax tau
              sweep, MSDNet's budgeted batch, entropy, patience, the exits' ensemble), listed in POLICY_ORDER then
              point order: param,
              val_accuracy, val_flops, test_accuracy, test_flops, test_flops_fraction.
    selected: the operating points validation picks (`selected_points`).
    summary:  final_accuracy and final_macro_f1 (last exit, test); accuracy_at_{25,50,75,100}pct (chosen on
              validation); auc_normalised — the primary metric, "area" — the validation-selected staircase with
              test accuracies, averaged over the budgets the exits cover (from the first exit's cost to 100 % of
              the backbone: `mean_over_covered_budgets`), so it reads as an accuracy; val_auc_normalised, the same
              with validation accuracies (the tuning metric: it reads no test data); oracle_auc_normalised, the
              same mean of the *test* Pareto staircase (best test point at every budget: shows how much test
              selection would flatter; ranks nothing).
    """
    exit_costs = np.asarray(exit_costs, dtype=np.float64)
    backbone_cost = float(backbone_cost)
    if np.ndim(val_logits) != 3 or np.ndim(test_logits) != 3:
        raise ValueError("logits must be (exits, samples, classes)")
    if not (np.shape(val_logits)[0] == np.shape(test_logits)[0] == len(exit_costs)):
        raise ValueError(f"exit counts differ: val {np.shape(val_logits)[0]}, test {np.shape(test_logits)[0]}, "
                         f"exit_costs {len(exit_costs)}")
    if backbone_cost <= 0:
        raise ValueError(f"backbone_cost must be positive, got {backbone_cost}")
    outputs = {rule: (ExitOutputs.from_logits(val_logits, val_y, rule), ExitOutputs.from_logits(test_logits, test_y, rule))
               for rule in dict.fromkeys(POLICY_RULE.values())}
    test_y = np.asarray(test_y)
    macro = [macro_f1(test_y, prediction) for prediction in outputs["max_softmax"][1].prediction]
    return evaluation_of(outputs, POLICY_RULE, exit_costs, backbone_cost, {"test_macro_f1": macro},
                         {"final_macro_f1": float(macro[-1])})


def evaluation_of(outputs: dict, rules: dict[str, str], exit_costs: np.ndarray, backbone_cost: float,
                  exit_columns: dict[str, list], final: dict[str, float]) -> Evaluation:
    """`evaluate`'s tables from each rule's (validation, test) outputs — classification's `ExitOutputs` or
    segmentation's `DenseExitOutputs`, whose `quality` is accuracy or mIoU: the one evaluation of both tasks.
    `exit_columns` and `final` add the task's own per-exit and final-exit numbers (macro-F1; pixel accuracy)."""
    exit_costs = np.asarray(exit_costs, dtype=np.float64)
    val, test = outputs[rules["threshold"]]
    exits = pd.DataFrame({
        "exit": np.arange(len(exit_costs)), "flops": exit_costs, "flops_fraction": exit_costs / backbone_cost,
        "val_accuracy": val.exit_quality(), "test_accuracy": test.exit_quality(), **exit_columns,
    })

    curves = policy_curves(outputs, exit_costs, rules)
    curves["test_flops_fraction"] = curves["test_flops"] / backbone_cost
    selected = selected_points(curves, backbone_cost)
    at_budget = selected.set_index("selection")["test_accuracy"]      # the points chosen once, read here
    covered_from = covered_budgets(exit_costs, backbone_cost)

    summary = {
        "final_accuracy": float(exits["test_accuracy"].iloc[-1]),
        **final,
        **{f"accuracy_at_{name}": float(at_budget[f"at_{name}"]) for name in BUDGET_FRACTIONS},
        "auc_normalised": selected_auc(selected, "test", covered_from),
        "val_auc_normalised": selected_auc(selected, "val", covered_from),
        "oracle_auc_normalised": staircase_auc(curves["test_flops_fraction"].to_numpy(),
                                               curves["test_accuracy"].to_numpy(), covered_from),
    }
    return Evaluation(exits=exits, curves=curves, selected=selected, summary=summary, outputs=outputs)
