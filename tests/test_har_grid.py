"""The UCI HAR grid: the shipped file validates against a folder in the official layout, an absent folder gets a
message naming it, and a small version trains, measures robustness under the sensor corruptions and tests the
consistency-training claim on it, end to end on real files (a generated UCI HAR folder)."""
import re

import pandas as pd
import torch
from click.testing import CliRunner

from benchmark.cli import main
from conftest import REPO, SERIAL_RUN, write_uci_har

HAR_GRID = REPO / "benchmark" / "grids" / "har.toml"


def bench(*args):
    threads = torch.get_num_threads()
    result = CliRunner().invoke(main, [str(a) for a in args])
    torch.set_num_threads(threads)
    return result


def test_the_shipped_grid_plans_its_runs_on_the_official_layout(tmp_path):
    write_uci_har(tmp_path)
    result = bench("run", "--grid", "har", "--data-root", tmp_path, "--results", tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "uci_har" in result.output and "small_cnn1d" in result.output
    assert re.search(r"\b15 reported\b|\b15\b", result.output), result.output


def test_absent_files_name_the_folder_and_layout(tmp_path):
    planned = bench("run", "--grid", "har", "--data-root", tmp_path, "--results", tmp_path / "out", "--dry-run")
    assert planned.exit_code == 0 and f"uci_har: not present under {tmp_path}" in planned.output, planned.output
    result = bench("run", "--grid", "har", "--data-root", tmp_path, "--results", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "UCI HAR Dataset" in result.output and "Inertial Signals" in result.output, result.output
    assert "Traceback" not in result.output


def test_a_small_har_grid_measures_detection_under_corruption_and_tests_the_claim(tmp_path):
    write_uci_har(tmp_path, sizes=(("train", 120), ("test", 36)))
    text = HAR_GRID.read_text()
    text = re.sub(r'regimes = \[.*\]', 'regimes = ["joint", "joint+cet"]', text)
    text = re.sub(r"seeds = \[0, 1, 2\]", "seeds = [0, 1]", text)
    text = re.sub(r"epochs = 30 ", "epochs = 2 ", text)
    text = re.sub(r"\[tuning\]\n(?:[^\[\n][^\n]*\n)*", "", text)                   # the whole [tuning] table
    text = text.replace("severities = [1, 2, 3, 4, 5]", "severities = [1, 5]")
    grid = tmp_path / "har_small.toml"
    grid.write_text(text)
    out = tmp_path / "out"
    result = bench("run", "--grid", grid, "--data-root", tmp_path, "--results", out, *SERIAL_RUN)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "tables" / "robustness.csv")
    assert set(table.corruption) == {"none", "jitter", "scaling", "time_warp", "channel_dropout"}
    assert table[table.point.str.startswith("exit_")].macro_f1.notna().all()
    report = bench("report", "--grid", grid, "--results", out)
    assert report.exit_code == 0, report.output
    text = (out / "REPORT.md").read_text()
    claim_row = next(line for line in text.splitlines() if "| `joint+cet` > `joint` | corrupted_early_macro_f1" in line)
    assert "| corrupted_early_macro_f1 | 2 |" in claim_row, claim_row     # two (cell, seed) pairs: seeds 0 and 1
    assert "## Robustness" in text and "uci_har / small_cnn1d" in text
