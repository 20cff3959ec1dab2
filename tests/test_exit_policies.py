"""The entropy, patience and ensemble exit policies against per-sample loops, scipy and their defining cases:
patience with p = 1 is "leave at the first exit", the ensemble of one exit is that exit, and each new policy joins
validation selection like the old ones."""

import math

import numpy as np
import pytest
from scipy.special import softmax
from scipy.stats import entropy

from benchmark.evaluate import (POLICY_RULE, THRESHOLD_GRID, ExitOutputs, evaluate, exit_decisions, exit_scores,
                                max_softmax, policy_thresholds)

SEEDS = [0, 1, 2]


def random_logits(seed, n_exits=4, n_samples=60, n_classes=5, scale=2.0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=scale, size=(n_exits, n_samples, n_classes)).astype(np.float32)
    labels = rng.integers(0, n_classes, size=n_samples)
    return logits, labels


def pabee_exit(predictions, patience):
    """PABEE's inference loop for one sample (JetRunner/PABEE, the `patience > 0` branch of its forward): a counter
    starts at 0, grows by 1 when a layer's argmax equals the previous layer's and falls back to 0 otherwise; the
    loop breaks when it equals `patience`, else the last layer answers. patience 0 runs every layer (no early exit)."""
    if patience == 0:
        return len(predictions) - 1
    counter, previous = 0, None
    for k, predicted in enumerate(predictions):
        counter = counter + 1 if previous is not None and predicted == previous else 0
        previous = predicted
        if counter == patience:
            return k
    return len(predictions) - 1


def loop_geometric_ensemble(logits_of_exits):
    """ZTW's ensemble with equal weights, written as its definition: prod_k p_k ** (1/n), renormalised."""
    probabilities = [softmax(np.asarray(z, np.float64)) for z in logits_of_exits]
    product = np.prod([p ** (1.0 / len(probabilities)) for p in probabilities], axis=0)
    return product / product.sum()


def test_entropy_score_is_one_minus_normalised_scipy_entropy():
    logits, _ = random_logits(0)
    score, prediction = exit_scores("entropy", logits)
    expected = 1.0 - entropy(softmax(logits.astype(np.float64), axis=-1), axis=-1) / math.log(logits.shape[-1])
    np.testing.assert_allclose(score, expected, rtol=1e-12, atol=1e-12)
    assert np.array_equal(prediction, logits.argmax(-1))
    uniform_and_certain = np.array([[[0.0, 0.0, 0.0], [0.0, 0.0, 800.0]]])
    np.testing.assert_allclose(exit_scores("entropy", uniform_and_certain)[0][0], [0.0, 1.0], atol=1e-12)


def test_patience_streak_counts_consecutive_agreeing_exits():
    predicted_class = np.array([[0, 1, 2], [0, 1, 1], [1, 1, 1], [1, 1, 1], [0, 1, 2]])   # (K=5, N=3)
    logits = np.eye(3)[predicted_class] * 5.0
    streak, prediction = exit_scores("patience", logits)
    assert np.array_equal(prediction, predicted_class)
    assert streak[:, 0].tolist() == [1, 2, 1, 2, 1]
    assert streak[:, 1].tolist() == [1, 2, 3, 4, 5]
    assert streak[:, 2].tolist() == [1, 1, 2, 3, 1]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("pabee_patience", [1, 2, 3])
def test_patience_point_p_is_pabees_patience_p_minus_one(seed, pabee_patience):
    logits, _ = random_logits(seed, n_exits=5, n_classes=2)          # 2 classes: agreement is common
    streak, prediction = exit_scores("patience", logits)
    thresholds = policy_thresholds("patience", [pabee_patience + 1], streak)[0]
    decided = exit_decisions(streak, thresholds)
    expected = [pabee_exit(prediction[:, i], pabee_patience) for i in range(logits.shape[1])]
    assert decided.tolist() == expected
    assert len(set(expected)) > 1
    off_by_one = exit_decisions(streak, policy_thresholds("patience", [pabee_patience], streak)[0])
    assert off_by_one.tolist() != expected                           # p = t would leave a layer early


def test_patience_one_is_leaving_at_the_first_exit():
    logits, labels = random_logits(3)
    costs = np.array([1.0, 2.0, 3.0, 4.0])
    curves = evaluate(logits, labels, logits, labels, costs, 4.0).curves
    first_exit = curves[(curves.policy == "exit") & (curves.point == 0)].iloc[0]
    patience_one = curves[(curves.policy == "patience") & (curves.param == 1)].iloc[0]
    for column in ("val_accuracy", "val_flops", "test_accuracy", "test_flops"):
        assert patience_one[column] == first_exit[column]


@pytest.mark.parametrize("seed", SEEDS)
def test_ensemble_is_the_geometric_mean_of_the_exits_seen_so_far(seed):
    logits, _ = random_logits(seed)
    score, prediction = exit_scores("ensemble", logits)
    for k in range(logits.shape[0]):
        for i in range(0, logits.shape[1], 7):
            ensemble = loop_geometric_ensemble(logits[:k + 1, i])
            assert score[k, i] == pytest.approx(ensemble.max(), rel=1e-12)
            assert prediction[k, i] == ensemble.argmax()


def test_ensemble_of_one_exit_is_that_exit():
    logits, labels = random_logits(4)
    score, prediction = exit_scores("ensemble", logits)
    alone_score, alone_prediction = max_softmax(logits)
    np.testing.assert_allclose(score[0], alone_score[0], rtol=1e-12)
    assert np.array_equal(prediction[0], alone_prediction[0])
    one_exit = logits[:1]                                    # a network with one exit: every point is that exit
    curves = evaluate(one_exit, labels, one_exit, labels, np.array([1.0]), 1.0).curves
    by_policy = curves.groupby("policy")["test_accuracy"].agg(["min", "max"])
    assert (by_policy["min"] == by_policy["max"]).all() and by_policy["min"].nunique() == 1


def test_scores_are_causal():
    """Exit k's score and prediction do not change when later exits change: what an early-exit forward needs."""
    logits, _ = random_logits(5)
    changed = logits.copy()
    changed[2:] = np.random.default_rng(9).normal(size=changed[2:].shape)
    for rule in ("max_softmax", "entropy", "patience", "ensemble"):
        for before, after in zip(exit_scores(rule, logits), exit_scores(rule, changed)):
            assert np.array_equal(before[:2], after[:2]), rule


def test_a_new_policy_is_selected_on_validation_when_it_is_best():
    """Both exits are wrong on every sample, each towards another wrong class, and their geometric ensemble is
    right on every sample: only the ensemble policy reaches full accuracy, and validation selection takes it."""
    labels = np.arange(30) % 3
    logits = np.zeros((2, len(labels), 3), dtype=np.float32)
    for i, c in enumerate(labels):
        logits[0, i, [c, (c + 1) % 3, (c + 2) % 3]] = [2.0, 0.0, 2.1]      # exit 0 says c + 2
        logits[1, i, [c, (c + 1) % 3, (c + 2) % 3]] = [2.0, 2.1, 0.0]      # exit 1 says c + 1
    result = evaluate(logits, labels, logits, labels, np.array([1.0, 2.0]), 2.0)
    at_full = result.selected.set_index("selection").loc["at_100pct"]
    assert at_full["policy"] == "ensemble" and at_full["test_accuracy"] == 1.0
    assert result.curves[result.curves.policy != "ensemble"]["val_accuracy"].max() == 0.0
    assert set(result.curves.policy) == set(POLICY_RULE)       # classification's policies, all of them


def test_policy_outputs_are_consistent_with_the_rule():
    """ExitOutputs under each rule: correct is prediction == label, and the thresholds a policy sweeps are the grid."""
    logits, labels = random_logits(6)
    for rule in ("entropy", "ensemble", "patience"):
        outputs = ExitOutputs.from_logits(logits, labels, rule)
        assert np.array_equal(outputs.correct, outputs.prediction == labels[None])
    thresholds = policy_thresholds("entropy", THRESHOLD_GRID, np.zeros((4, 1)))
    assert thresholds.shape == (100, 3) and np.array_equal(thresholds[:, 1], THRESHOLD_GRID)
