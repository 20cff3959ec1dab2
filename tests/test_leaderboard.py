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
