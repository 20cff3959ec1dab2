"""Seed statistics checked against scipy on fixed data, pairing by seed under shuffling, and hand-made ranks."""

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.statistics import average_ranks, cell_ranks, plot_confidence_intervals, summary_table

JOINT = [0.910, 0.930, 0.900, 0.950, 0.920, 0.940]
MIXED = [0.915, 0.941, 0.903, 0.962, 0.921, 0.955]     # joint + a seed-dependent gain: pairing matters


def runs_table(values: dict, dataset="d", arch="a", metric="final_accuracy"):
    """One row per (regime, seed); values[regime][seed] is the metric."""
    return pd.DataFrame([{"dataset": dataset, "arch": arch, "regime": regime, "seed": seed, metric: value}
                         for regime, per_seed in values.items() for seed, value in enumerate(per_seed)])


def row(summary, regime, metric="final_accuracy"):
    return summary[(summary["regime"] == regime) & (summary["metric"] == metric)].iloc[0]


def test_mean_std_and_confidence_interval_match_scipy():
    summary = summary_table(runs_table({"joint": JOINT, "mixed": MIXED}), ["final_accuracy"])
    got = row(summary, "mixed")
    low, high = stats.t.interval(0.95, len(MIXED) - 1, loc=np.mean(MIXED), scale=stats.sem(MIXED))
    assert got["n"] == 6 and got["mean"] == pytest.approx(np.mean(MIXED))
    assert got["std"] == pytest.approx(np.std(MIXED, ddof=1))
    assert (got["ci95_low"], got["ci95_high"]) == pytest.approx((low, high), rel=1e-12)


def test_paired_tests_match_scipy_and_baseline_rows_have_no_p_value():
    summary = summary_table(runs_table({"joint": JOINT, "mixed": MIXED}), ["final_accuracy"])
    got = row(summary, "mixed")
    assert got["test"] == "paired t" and got["n_pairs"] == 6
    assert got["p_value"] == pytest.approx(stats.ttest_rel(MIXED, JOINT).pvalue, rel=1e-12)
    assert got["wilcoxon_p"] == pytest.approx(stats.wilcoxon(MIXED, JOINT).pvalue, rel=1e-12)
    assert got["mean_difference"] == pytest.approx(np.mean(MIXED) - np.mean(JOINT))
    baseline = row(summary, "joint")
    assert np.isnan(baseline["p_value"]) and np.isnan(baseline["wilcoxon_p"]) and pd.isna(baseline["test"])


def test_pairing_is_by_seed_even_when_rows_are_shuffled():
    runs = runs_table({"joint": JOINT, "mixed": MIXED}).sample(frac=1.0, random_state=3)
    got = row(summary_table(runs, ["final_accuracy"]), "mixed")
    assert got["p_value"] == pytest.approx(stats.ttest_rel(MIXED, JOINT).pvalue, rel=1e-12)
    misordered = runs[runs["regime"] == "mixed"]["final_accuracy"], runs[runs["regime"] == "joint"]["final_accuracy"]
    assert stats.ttest_rel(*misordered).pvalue != pytest.approx(got["p_value"])   # the shuffle does mix the order


def test_missing_values_drop_their_pairs():
    mixed = [*MIXED[:5], np.nan]
    got = row(summary_table(runs_table({"joint": JOINT, "mixed": mixed}), ["final_accuracy"]), "mixed")
    assert got["n"] == 5 and got["n_pairs"] == 5
    assert got["p_value"] == pytest.approx(stats.ttest_rel(MIXED[:5], JOINT[:5]).pvalue, rel=1e-12)


def test_three_seeds_cannot_reach_significance_with_wilcoxon():
    got = row(summary_table(runs_table({"joint": JOINT[:3], "mixed": [1.0, 1.0, 1.0]}), ["final_accuracy"]), "mixed")
    assert got["wilcoxon_p"] == pytest.approx(0.25) and got["p_value"] < 0.05


def test_equal_non_zero_differences_have_no_t_test_p_value():
    """Every seed gains exactly 0.01 (up to float rounding: the differences spread by 1e-16, and scipy's t-test
    reads that as p ~ 1e-70). t = mean / 0 is undefined: p_value is NaN, the Wilcoxon p is 2 / 2^6."""
    mixed = [0.920, 0.940, 0.910, 0.960, 0.930, 0.950]
    differences = np.subtract(mixed, JOINT)
    assert 0 < np.ptp(differences) < 1e-15 and stats.ttest_rel(mixed, JOINT).pvalue < 1e-30   # the trap
    got = row(summary_table(runs_table({"joint": JOINT, "mixed": mixed}), ["final_accuracy"]), "mixed")
    assert got["n_pairs"] == 6 and got["mean_difference"] == pytest.approx(0.01)
    assert np.isnan(got["p_value"])
    assert got["wilcoxon_p"] == pytest.approx(2 / 2 ** 6)


def test_identical_values_give_p_one():
    got = row(summary_table(runs_table({"joint": JOINT, "mixed": list(JOINT)}), ["final_accuracy"]), "mixed")
    assert got["n_pairs"] == 6 and got["mean_difference"] == 0.0
    assert got["p_value"] == 1.0 and got["wilcoxon_p"] == 1.0


def test_missing_baseline_or_repeated_seed_is_an_error():
    with pytest.raises(ValueError, match="baseline"):
        summary_table(runs_table({"mixed": MIXED}), ["final_accuracy"])
    repeated = runs_table({"joint": JOINT, "mixed": MIXED})
    with pytest.raises(ValueError, match="repeat"):
        summary_table(pd.concat([repeated, repeated.iloc[:1]]), ["final_accuracy"])


def test_average_ranks_on_a_hand_made_table():
    """Cell means (higher is better; binary fractions, so ties are exact):
                          joint   disjoint  mixed
        c1                0.875   0.75      0.625   -> ranks 1, 2, 3
        c2                0.75    0.75      0.875   -> ranks 2.5, 2.5, 1 (tie averaged)
        c3 (mixed absent) 0.5     0.625     -       -> ranks 2, 1
    Averages: joint (1 + 2.5 + 2) / 3 = 5.5 / 3, disjoint (2 + 2.5 + 1) / 3 = 5.5 / 3, mixed (3 + 1) / 2 = 2."""
    runs = pd.concat([
        runs_table({"joint": [0.75, 1.0], "disjoint": [0.75, 0.75], "mixed": [0.625, 0.625]}, arch="c1"),
        runs_table({"joint": [0.75, 0.75], "disjoint": [0.5, 1.0], "mixed": [0.875, 0.875]}, arch="c2"),
        runs_table({"joint": [0.5, 0.5], "disjoint": [0.625, 0.625]}, arch="c3"),
    ])
    ranks = cell_ranks(runs, "final_accuracy").set_index(["arch", "regime"])["rank"]
    assert ranks[("c2", "joint")] == ranks[("c2", "disjoint")] == 2.5 and ranks[("c2", "mixed")] == 1.0
    board = average_ranks(runs, "final_accuracy")
    assert list(board["regime"]) == ["joint", "disjoint", "mixed"]          # joint/disjoint tie: regime order
    assert list(board["average_rank"]) == pytest.approx([5.5 / 3, 5.5 / 3, 2.0])
    assert list(board["n_cells"]) == [3, 3, 2]
    lower_better = average_ranks(runs, "final_accuracy", higher_is_better=False).set_index("regime")
    assert lower_better.loc["joint", "average_rank"] == pytest.approx((3 + 1.5 + 1) / 3)


def test_confidence_interval_figure_is_written(tmp_path):
    runs = pd.concat([runs_table({"joint": JOINT, "mixed": MIXED}, arch=arch) for arch in ("a", "b")])
    plot_confidence_intervals(summary_table(runs, ["final_accuracy"]), "final_accuracy", tmp_path / "ci.png")
    assert (tmp_path / "ci.png").stat().st_size > 10_000
