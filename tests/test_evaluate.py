"""Early-exit evaluation checked against brute force, hand computations and sklearn."""

import json
import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.special import softmax
from sklearn.metrics import f1_score

from benchmark.data import load_dataset
from benchmark.evaluate import (
    BUDGET_Q, ExitOutputs, accuracy_at_budget, budget_shares, evaluate, exit_decisions,
    fit_budgeted_thresholds, macro_f1, max_softmax, operating_point, pareto_mask, preference_order,
    select_at_budget, selection_staircase, staircase_auc,
)
from benchmark.pipeline import execute_run, initial_model
from benchmark.spec import RunSpec
from benchmark.store import ResultsStore, read_torch

SEEDS = [0, 1, 2, 3, 4]


def random_run(seed, n_exits, n_samples=50, n_classes=5, scale=3.0):
    """Random logits, labels and increasing cumulative exit costs."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=(n_exits, n_samples, n_classes)).astype(np.float32)
    labels = rng.integers(0, n_classes, size=n_samples)
    exit_costs = np.cumsum(rng.uniform(1.0, 3.0, size=n_exits))
    return logits, labels, exit_costs


def loop_softmax_confidence(logits_row):
    """Max softmax probability of one sample at one exit, in float64 Python arithmetic."""
    exps = [math.exp(z - max(logits_row)) for z in logits_row]
    return max(exps) / sum(exps)


def loop_exit_policy(logits, labels, exit_costs, thresholds):
    """The exit rule sample by sample: leave at the first exit whose confidence >= its threshold."""
    n_exits, n_samples, _ = logits.shape
    taken, correct, cost = [], 0, 0.0
    for i in range(n_samples):
        k = n_exits - 1
        for j in range(n_exits - 1):
            if loop_softmax_confidence(list(map(float, logits[j, i]))) >= thresholds[j]:
                k = j
                break
        taken.append(k)
        correct += int(np.argmax(logits[k, i]) == labels[i])
        cost += exit_costs[k]
    return np.array(taken), correct / n_samples, cost / n_samples


def loop_msdnet_thresholds(confidence, shares):
    """MSDNet's dynamic_eval_find_threshold, transcribed as its per-sample loop."""
    n_exits, n_samples = confidence.shape
    taken = np.zeros(n_samples, dtype=bool)
    thresholds = [math.inf] * (n_exits - 1)
    for k in range(n_exits - 1):
        quota = math.floor(n_samples * shares[k])
        count = 0
        for i in sorted(range(n_samples), key=lambda s: -confidence[k, s]):
            if not taken[i]:
                count += 1
                if count == quota:
                    thresholds[k] = confidence[k, i]
                    break
        taken |= confidence[k] >= thresholds[k]
    return np.array(thresholds)


def test_max_softmax_matches_scipy_and_argmax():
    logits, _, _ = random_run(0, n_exits=3)
    confidence, prediction = max_softmax(logits)
    assert confidence.dtype == np.float64
    np.testing.assert_allclose(confidence, softmax(logits.astype(np.float64), axis=-1).max(-1), rtol=1e-13)
    np.testing.assert_array_equal(prediction, logits.argmax(-1))


def test_confident_samples_keep_distinct_confidences():
    """Top-2 gaps 20 and 25: 1 - confidence = e^-20 + e^-25 and e^-25 + e^-30. In float32 both round to exactly 1.0
    (a tie no threshold can split); in float64 they stay apart and ordered."""
    logits = np.array([[20.0, 0.0, -5.0], [25.0, 0.0, -5.0]], dtype=np.float32)
    confidence, _ = max_softmax(logits)
    np.testing.assert_allclose(1.0 - confidence, [np.exp(-20.0) + np.exp(-25.0), np.exp(-25.0) + np.exp(-30.0)],
                               rtol=1e-4)
    assert confidence[0] < confidence[1] < 1.0
    in_float32 = np.float32(1.0) / np.exp(logits - logits.max(axis=-1, keepdims=True)).sum(axis=-1)
    assert (in_float32 == 1.0).all()                  # what the float32 computation gave: a tie at 1.0


def model_logits(model, x):
    """The float32 forward, written out: eval mode, no autocast."""
    model.eval()
    with torch.no_grad():
        return torch.stack(model(x)).numpy()


def test_a_run_stores_float32_logits_of_a_float32_forward(tmp_path):
    train = {"epochs": 1, "p1_epochs": None, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
             "nesterov": True, "weight_decay": 5e-4, "eval_every": 1}
    spec = RunSpec(dataset="digits", arch="small_cnn", regime="joint", seed=0, train=train,
                   model={"head": "pool", "exits": "flops:0.25,0.5,0.75"})
    store = ResultsStore(tmp_path)
    execute_run(spec, store, data_root=Path("/nonexistent"), device=torch.device("cpu"), threads=1, keep_model=True)
    stored = np.load(store.run_dir(spec.run_id) / "logits.npz")
    assert stored["val"].dtype == stored["test"].dtype == np.float32
    data = load_dataset("digits", "/nonexistent")
    model = initial_model(spec, data, torch.device("cpu"))
    model.load_state_dict(read_torch(store.run_dir(spec.run_id) / "model.pt"))
    np.testing.assert_array_equal(stored["test"], model_logits(model, data.x_test))


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_exits", [3, 4])
def test_exit_rule_matches_per_sample_loop(seed, n_exits):
    logits, labels, exit_costs = random_run(seed, n_exits)
    thresholds = np.random.default_rng(100 + seed).uniform(0.3, 1.0, size=n_exits - 1)
    outputs = ExitOutputs.from_logits(logits, labels)

    exits = exit_decisions(outputs.score, thresholds)
    accuracy, mean_flops = operating_point(exits, outputs, exit_costs)

    loop_exits, loop_accuracy, loop_flops = loop_exit_policy(logits, labels, exit_costs, thresholds)
    assert len(set(loop_exits)) > 1, "thresholds should spread samples over several exits"
    np.testing.assert_array_equal(exits, loop_exits)
    assert accuracy == pytest.approx(loop_accuracy, abs=1e-12)
    assert mean_flops == pytest.approx(loop_flops, rel=1e-12)


def test_exit_decisions_batch_of_points_equals_one_at_a_time():
    logits, labels, _ = random_run(7, n_exits=4)
    confidence = ExitOutputs.from_logits(logits, labels).score
    points = np.random.default_rng(7).uniform(0.2, 1.0, size=(6, 3))
    batched = exit_decisions(confidence, points)
    for row, thresholds in zip(batched, points):
        np.testing.assert_array_equal(row, exit_decisions(confidence, thresholds))


@pytest.mark.parametrize("seed", SEEDS)
def test_tau_zero_sends_all_to_first_exit_and_tau_above_one_to_last(seed):
    logits, labels, exit_costs = random_run(seed, n_exits=4)
    outputs = ExitOutputs.from_logits(logits, labels)

    everyone_first = exit_decisions(outputs.score, np.zeros(3))
    assert (everyone_first == 0).all()

    everyone_last = exit_decisions(outputs.score, np.full(3, 1.01))
    accuracy, mean_flops = operating_point(everyone_last, outputs, exit_costs)
    assert (everyone_last == 3).all()
    assert accuracy == outputs.correct[-1].mean()
    assert mean_flops == pytest.approx(exit_costs[-1], rel=1e-12)


def test_budget_shares_are_normalised_powers_of_q():
    shares = budget_shares(np.array([0.5, 1.0, 1.5]), 3)
    np.testing.assert_allclose(shares[0], [4 / 7, 2 / 7, 1 / 7])
    np.testing.assert_allclose(shares[1], [1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(shares[2], np.array([1.5, 2.25, 3.375]) / 7.125)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("n_exits", [3, 4])
def test_budgeted_thresholds_realise_the_shares_and_match_msdnet_loop(seed, n_exits):
    logits, labels, _ = random_run(seed, n_exits, n_samples=200)
    confidence = ExitOutputs.from_logits(logits, labels).score
    assert all(len(np.unique(row)) == len(row) for row in confidence), "this test needs tie-free confidences"
    all_shares = budget_shares(BUDGET_Q, n_exits)

    thresholds = fit_budgeted_thresholds(confidence, all_shares)
    exits = exit_decisions(confidence, thresholds)

    assert exits.shape == (len(BUDGET_Q), 200) and ((exits >= 0) & (exits < n_exits)).all()  # one exit each
    for shares, point_thresholds, point_exits in zip(all_shares, thresholds, exits):
        counts = np.bincount(point_exits, minlength=n_exits)
        expected = np.floor(200 * shares[:-1]).astype(int)
        np.testing.assert_array_equal(counts[:-1], expected)
        assert counts[-1] == 200 - expected.sum()
        np.testing.assert_array_equal(point_thresholds, loop_msdnet_thresholds(confidence, shares))
    np.testing.assert_array_equal(fit_budgeted_thresholds(confidence, all_shares[5]), thresholds[5])


def test_budgeted_ties_leave_together_and_a_short_exit_takes_all_that_remain():
    # 10 samples, 3 exits; exit 0 quota 3 but 6 samples tie at the top, so all 6 leave there.
    confidence = np.array([[0.9] * 6 + [0.1, 0.2, 0.3, 0.4],
                           [0.5] * 10,
                           [0.5] * 10], dtype=np.float32)
    shares = np.array([0.3, 0.5, 0.2])  # exit 1 quota 5 > the 4 remaining: it takes those 4
    thresholds = fit_budgeted_thresholds(confidence, shares)
    assert thresholds[0] == np.float32(0.9) and thresholds[1] == np.float32(0.5)
    np.testing.assert_array_equal(np.bincount(exit_decisions(confidence, thresholds), minlength=3), [6, 4, 0])
    closed = fit_budgeted_thresholds(confidence, np.array([0.05, 0.05, 0.9]))  # floor(10 * 0.05) = 0
    assert np.isinf(closed).all()


def pareto_mask_brute_force(costs, accuracies):
    n = len(costs)
    return np.array([not any(costs[j] <= costs[i] and accuracies[j] >= accuracies[i]
                             and (costs[j] < costs[i] or accuracies[j] > accuracies[i]) for j in range(n))
                     for i in range(n)])


@pytest.mark.parametrize("seed", range(20))
def test_pareto_mask_matches_brute_force_with_ties_and_duplicates(seed):
    rng = np.random.default_rng(seed)
    costs = rng.integers(0, 8, size=40).astype(float)  # few distinct values: many ties and duplicates
    accuracies = rng.integers(0, 8, size=40) / 8
    mask = pareto_mask(costs, accuracies)
    np.testing.assert_array_equal(mask, pareto_mask_brute_force(costs, accuracies))
    assert mask.any()


def test_pareto_mask_hand_case():
    costs = np.array([1.0, 2.0, 2.0, 3.0, 3.0, 0.5])
    accuracies = np.array([0.5, 0.6, 0.7, 0.7, 0.9, 0.5])
    np.testing.assert_array_equal(pareto_mask(costs, accuracies), [False, False, True, False, True, True])


def test_staircase_auc_hand_computed():
    # front: (0.2, 0.5), (0.5, 0.7), (0.8, 0.9); (0.6, 0.6) is dominated; (1.2, 0.95) is past the budget axis.
    fractions = np.array([0.5, 0.2, 0.6, 0.8, 1.2])
    accuracies = np.array([0.7, 0.5, 0.6, 0.9, 0.95])
    assert staircase_auc(fractions, accuracies) == pytest.approx(0.5 * 0.3 + 0.7 * 0.3 + 0.9 * 0.2)
    assert staircase_auc(np.array([0.0]), np.array([1.0])) == pytest.approx(1.0)  # free and perfect
    # averaged over the budgets the exits cover, [0.2, 1], it reads as an accuracy: a mean of 0.5, 0.7 and 0.9
    assert staircase_auc(fractions, accuracies, covered_from=0.2) == pytest.approx(
        (0.5 * 0.3 + 0.7 * 0.3 + 0.9 * 0.2) / 0.8)
    assert staircase_auc(np.array([0.2, 0.6]), np.array([0.9, 0.9]), covered_from=0.2) == pytest.approx(0.9)


def test_the_area_of_exits_all_at_one_accuracy_is_that_accuracy():
    """The primary area is a mean over the covered budgets: every exit at accuracy a gives area a, wherever the
    first exit sits (the old integral over [0, 1] gave a x (1 - first exit's cost))."""
    labels = np.zeros(40, dtype=int)
    right_on_30 = np.stack([confident_logits(0, 40)] * 3)
    right_on_30[:, :10, 0] = -20.0                                   # 10 of 40 wrong at every exit: accuracy 0.75
    for first_exit_cost in (10.0, 35.0):
        costs = np.array([first_exit_cost, 60.0, 100.0])
        result = evaluate(right_on_30, labels, right_on_30, labels, costs, backbone_cost=100.0)
        assert result.summary["auc_normalised"] == pytest.approx(0.75)
        assert result.summary["val_auc_normalised"] == pytest.approx(0.75)
        assert result.summary["oracle_auc_normalised"] == pytest.approx(0.75)


@pytest.mark.parametrize("seed", SEEDS)
def test_macro_f1_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, 7, size=300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, 9, size=300))  # classes 7, 8 only predicted
    y_true[y_true == 3] = 4  # class 3 only predicted, never true
    assert macro_f1(y_true, y_pred) == pytest.approx(f1_score(y_true, y_pred, average="macro"), abs=1e-12)


def test_accuracy_at_budget_selects_on_validation():
    curves = pd.DataFrame({"policy": "threshold", "point": [0, 1, 2], "val_accuracy": [0.9, 0.6, 0.99],
                           "val_flops": [10.0, 10.0, 20.0], "test_accuracy": [0.5, 0.95, 0.99]})
    assert accuracy_at_budget(curves, 10.0) == 0.5  # val prefers point 0; test would prefer point 1
    assert accuracy_at_budget(curves, 25.0) == 0.99
    assert math.isnan(accuracy_at_budget(curves, 5.0))


def test_validation_ties_are_broken_by_cost_then_listing_order_never_by_test():
    # Four points tie on validation accuracy; the two cheapest also tie on cost. The rule picks the cheaper,
    # then the policy listed first (exit < threshold < budgeted), then the lower point — whatever test says.
    curves = pd.DataFrame({"policy": ["budgeted", "threshold", "threshold", "exit"], "point": [0, 7, 3, 1],
                           "val_accuracy": [0.8, 0.8, 0.8, 0.8], "val_flops": [5.0, 5.0, 5.0, 9.0],
                           "test_accuracy": [0.9, 0.7, 0.1, 1.0]})
    assert list(preference_order(curves)) == [2, 1, 0, 3]
    assert select_at_budget(curves, 100.0) == 2
    assert accuracy_at_budget(curves, 100.0) == 0.1


def brute_force_selected_area(curves, backbone_cost, resolution=20_000):
    """The validation-selected staircase integrated on a fine grid of budgets, by select_at_budget alone.

    What validation picks at a budget depends only on which points fit it (validation FLOPs <= budget): consecutive
    budgets that the same points fit get the height of one accuracy_at_budget call, the same height one call per
    budget gives, in a few dozen calls instead of 20,000 (7 s of CPU per case). A budget within 1e-6 of a point's
    cost, where the selector's float tolerance could decide, gets its own call."""
    budgets = (np.arange(resolution) + 0.5) / resolution * backbone_cost
    val_flops = curves["val_flops"].to_numpy(dtype=np.float64)
    fitting = (val_flops[None, :] <= budgets[:, None]).sum(axis=1)        # nested sets: the count names the set
    on_edge = np.isclose(budgets[:, None], val_flops[None, :], rtol=1e-6, atol=0).any(axis=1)
    heights, memo = [], {}
    for budget, count, edge in zip(budgets, fitting, on_edge):
        if edge:
            heights.append(accuracy_at_budget(curves, budget))
        else:
            if count not in memo:
                memo[count] = accuracy_at_budget(curves, budget)
            heights.append(memo[count])
    covered_from = float(curves["val_flops"].min()) / backbone_cost            # the first exit's cost
    return float(np.nansum(heights) / resolution / (1.0 - covered_from))


@pytest.mark.parametrize("seed", SEEDS)
def test_primary_area_is_the_validation_selected_staircase(seed):
    val_logits, val_y, exit_costs = random_run(seed, n_exits=3, n_samples=60)
    test_logits, test_y, _ = random_run(seed + 100, n_exits=3, n_samples=60)
    backbone = float(exit_costs[-1]) * 0.9
    result = evaluate(val_logits, val_y, test_logits, test_y, exit_costs, backbone)
    assert result.summary["auc_normalised"] == pytest.approx(
        brute_force_selected_area(result.curves, backbone), abs=2e-4)
    steps = selection_staircase(result.curves, backbone)
    assert (np.diff(steps["budget_from"]) > 0).all() and steps["budget_to"].iloc[-1] == 1.0
    # the oracle picks the best test point at every budget, so it can only be higher
    assert result.summary["oracle_auc_normalised"] >= result.summary["auc_normalised"] - 1e-12


@pytest.mark.parametrize("seed", SEEDS)
def test_permuting_test_labels_changes_no_selected_operating_point(seed):
    """What validation selects (points, thresholds, budgets) cannot depend on the test labels."""
    val_logits, val_y, exit_costs = random_run(seed, n_exits=4, n_samples=80)
    test_logits, test_y, _ = random_run(seed + 7, n_exits=4, n_samples=80)
    permuted = np.random.default_rng(seed).permutation(test_y)
    original = evaluate(val_logits, val_y, test_logits, test_y, exit_costs, exit_costs[-1])
    shuffled = evaluate(val_logits, val_y, test_logits, permuted, exit_costs, exit_costs[-1])

    choice = ["selection", "budget_from", "budget_to", "policy", "point", "param", "val_accuracy", "val_flops",
              "test_flops"]
    pd.testing.assert_frame_equal(original.selected[choice], shuffled.selected[choice])
    assert original.summary["val_auc_normalised"] == shuffled.summary["val_auc_normalised"]
    assert not original.selected["test_accuracy"].equals(shuffled.selected["test_accuracy"])  # only these move


def confident_logits(predicted_class, n_samples, n_classes=3):
    """Logits of one exit that predict `predicted_class` with confidence ~1 on every sample."""
    logits = np.zeros((n_samples, n_classes), dtype=np.float32)
    logits[:, predicted_class] = 20.0
    return logits


def test_evaluate_reports_test_accuracy_of_the_point_validation_picks():
    # Validation: exit 0 always right, exit 1 always wrong. Test: the reverse. Both splits route alike.
    labels = np.zeros(40, dtype=int)
    val_logits = np.stack([confident_logits(0, 40), confident_logits(1, 40)])
    test_logits = np.stack([confident_logits(1, 40), confident_logits(0, 40)])
    result = evaluate(val_logits, labels, test_logits, labels, np.array([20.0, 100.0]), backbone_cost=100.0)

    assert result.summary["accuracy_at_100pct"] == 0.0  # validation's choice (exit 0), not test's best
    assert result.summary["accuracy_at_25pct"] == 0.0
    assert result.summary["auc_normalised"] == 0.0 and result.summary["val_auc_normalised"] == pytest.approx(1.0)


def test_evaluate_nan_when_no_point_fits_the_budget():
    logits, labels, _ = random_run(3, n_exits=3)
    result = evaluate(logits, labels, logits, labels, np.array([40.0, 70.0, 110.0]), backbone_cost=100.0)
    assert math.isnan(result.summary["accuracy_at_25pct"])
    assert result.summary["accuracy_at_50pct"] == accuracy_at_budget(result.curves, 50.0)
    assert not math.isnan(result.summary["accuracy_at_50pct"])  # exit 0 alone (40 FLOPs) fits


@pytest.mark.parametrize("seed", SEEDS)
def test_evaluate_tables_agree_with_building_blocks(seed):
    rng = np.random.default_rng(seed)
    val_logits, val_y, exit_costs = random_run(seed, n_exits=4, n_samples=120)
    test_logits, test_y, _ = random_run(seed + 50, n_exits=4, n_samples=80)
    backbone = float(exit_costs[-1]) * rng.uniform(0.9, 1.1)
    result = evaluate(val_logits, val_y, test_logits, test_y, exit_costs, backbone)
    exits, curves, summary = result.exits, result.curves, result.summary

    assert list(exits.columns) == ["exit", "flops", "flops_fraction", "val_accuracy", "test_accuracy", "test_macro_f1"]
    assert list(curves.columns) == ["policy", "point", "param", "val_accuracy", "val_flops", "test_accuracy",
                                    "test_flops", "test_flops_fraction"]
    assert list(curves.policy.unique()) == ["exit", "threshold", "budgeted", "entropy", "patience", "ensemble"]
    assert curves.groupby("policy").size().to_dict() == {"exit": 4, "threshold": 100, "budgeted": 39, "entropy": 100,
                                                         "patience": 3, "ensemble": 100}
    assert curves[["val_accuracy", "test_accuracy"]].stack().between(0, 1).all()

    test_pred = test_logits.argmax(-1)
    np.testing.assert_allclose(exits["test_macro_f1"], [f1_score(test_y, p, average="macro") for p in test_pred])
    np.testing.assert_allclose(exits["test_accuracy"], (test_pred == test_y).mean(1))

    # a threshold point recomputed by the per-sample loop, on test
    row = curves[curves.policy == "threshold"].iloc[60]
    _, loop_accuracy, loop_flops = loop_exit_policy(test_logits, test_y, exit_costs, [row.param] * 3)
    assert row.test_accuracy == pytest.approx(loop_accuracy) and row.test_flops == pytest.approx(loop_flops)

    front = pareto_mask_brute_force(curves["test_flops_fraction"].to_numpy(), curves["test_accuracy"].to_numpy())
    assert summary["oracle_auc_normalised"] == pytest.approx(staircase_auc(
        curves["test_flops_fraction"].to_numpy()[front], curves["test_accuracy"].to_numpy()[front],
        covered_from=exit_costs[0] / backbone))
    assert summary["final_accuracy"] == exits["test_accuracy"].iloc[-1]
    assert 0.0 <= summary["auc_normalised"] <= 1.0
    assert set(summary) == {"final_accuracy", "final_macro_f1", "accuracy_at_25pct", "accuracy_at_50pct",
                            "accuracy_at_75pct", "accuracy_at_100pct", "auc_normalised", "val_auc_normalised",
                            "oracle_auc_normalised"}
    json.dumps(summary)


def test_single_exit_network_evaluates():
    logits, labels, _ = random_run(0, n_exits=1)
    result = evaluate(logits, labels, logits, labels, np.array([100.0]), backbone_cost=100.0)
    assert (result.curves["test_accuracy"] == result.summary["final_accuracy"]).all()
    assert result.summary["accuracy_at_100pct"] == result.summary["final_accuracy"]
    # the exits cover no budget range (the only point sits at x = 1): the area is the accuracy there
    assert result.summary["auc_normalised"] == result.summary["final_accuracy"]


def test_float16_logits_decide_like_their_float32_upcast():
    val_logits, val_y, exit_costs = random_run(11, n_exits=4, n_samples=500, n_classes=10, scale=6.0)
    test_logits, test_y, _ = random_run(12, n_exits=4, n_samples=500, n_classes=10, scale=6.0)
    half_val, half_test = val_logits.astype(np.float16), test_logits.astype(np.float16)

    from_half = evaluate(half_val, val_y, half_test, test_y, exit_costs, exit_costs[-1])
    from_upcast = evaluate(half_val.astype(np.float32), val_y, half_test.astype(np.float32), test_y,
                           exit_costs, exit_costs[-1])
    pd.testing.assert_frame_equal(from_half.curves, from_upcast.curves)
    pd.testing.assert_frame_equal(from_half.exits, from_upcast.exits)


def test_evaluate_is_fast_on_a_realistic_run():
    """A CIFAR-100-sized run (6 exits, 10k samples per split) evaluates in seconds, next to minutes of training.
    Six policies over four exit rules measured 1.85-2.1 s on the 2-core CI machine (three policies: ~0.9 s)."""
    rng = np.random.default_rng(0)
    n_exits, n_samples, n_classes = 6, 10_000, 100
    val_logits = rng.normal(scale=4, size=(n_exits, n_samples, n_classes)).astype(np.float16)
    test_logits = rng.normal(scale=4, size=(n_exits, n_samples, n_classes)).astype(np.float16)
    labels = rng.integers(0, n_classes, size=n_samples)
    exit_costs = np.cumsum(np.full(n_exits, 1e8))

    evaluate(val_logits, labels, test_logits, labels, exit_costs, exit_costs[-1])  # warm-up (imports, caches)
    start = time.perf_counter()
    evaluate(val_logits, labels, test_logits, labels, exit_costs, exit_costs[-1])
    elapsed_ms = (time.perf_counter() - start) * 1e3
    print(f"evaluate(K={n_exits}, N={n_samples}, C={n_classes}): {elapsed_ms:.0f} ms")
    assert elapsed_ms < 3000
