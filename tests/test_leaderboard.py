"""The leaderboard ranks by the validation-selected area and charges each regime's cost beside it."""
import pandas as pd
import pytest

from benchmark.analyze import leaderboard


def test_cost_is_charged_relative_to_joint_in_each_cell():
    runs = pd.DataFrame({
        "dataset": "digits", "arch": ["a"] * 4 + ["b"] * 4, "regime": ["joint", "joint", "mixed+l2w", "mixed+l2w"] * 2,
        "seed": [0, 1] * 4, "auc_normalised": [0.5, 0.6, 0.7, 0.8, 0.9, 0.9, 0.1, 0.2],
        "oracle_auc_normalised": [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0],     # must not matter
        "train_flops": [10, 10, 30, 30, 5, 5, 5, 5], "train_optimizer_steps": [4, 4, 8, 8, 2, 2, 4, 4],
        "train_wall_seconds": [1, 3, 4, 4, 2, 2, 1, 1]})
    board = leaderboard(runs).set_index("regime")
    assert board.loc["joint", "average_rank"] == board.loc["mixed+l2w", "average_rank"] == 1.5
    assert board.loc["mixed+l2w", "train_flops_vs_joint"] == pytest.approx((3 + 1) / 2)
    assert board.loc["mixed+l2w", "train_optimizer_steps_vs_joint"] == pytest.approx(2.0)
    assert board.loc["mixed+l2w", "train_wall_seconds_vs_joint"] == pytest.approx((2 + 0.5) / 2)
    assert (board.loc["joint", ["train_flops_vs_joint", "train_wall_seconds_vs_joint"]] == 1).all()


def test_wall_time_is_flagged_unless_the_regime_and_joint_were_timed_in_one_sitting():
    """Cell a: both regimes in batch s1 (comparable); cell b: mixed+l2w in another sitting; cell c: nothing
    recorded. One of three cells is comparable for mixed+l2w; joint against itself always is (1.00x)."""
    runs = pd.DataFrame({
        "dataset": "digits", "arch": ["a"] * 2 + ["b"] * 2 + ["c"] * 2, "regime": ["joint", "mixed+l2w"] * 3,
        "seed": 0, "auc_normalised": [0.5, 0.6, 0.5, 0.6, 0.5, 0.6], "train_flops": 1.0,
        "train_optimizer_steps": 1.0, "train_wall_seconds": [1.0, 2.0, 1.0, 3.0, 1.0, 4.0],
        "timing_batch": ["s1", "s1", "s1", "s2", None, None]})
    board = leaderboard(runs).set_index("regime")
    assert board.loc["mixed+l2w", "wall_time_one_sitting"] == pytest.approx(1 / 3)
    assert board.loc["joint", "wall_time_one_sitting"] == 1
    assert board.loc["mixed+l2w", "train_wall_seconds_vs_joint"] == pytest.approx(3.0)     # the ratio stays, flagged
    unrecorded = leaderboard(runs.drop(columns="timing_batch")).set_index("regime")
    assert unrecorded.loc["mixed+l2w", "wall_time_one_sitting"] == 0
