"""Every user mistake: a clear message on stderr, exit code 2, no traceback.

Most cases call the click command in-process (the same code path, without 3 s of interpreter start-up each);
the first tests go through the installed entry point in a real subprocess.
"""
import subprocess
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from benchmark.cli import main
from conftest import BENCH, REPO


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


def bench(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Result(result.exit_code, result.stdout, result.stderr)


def bench_subprocess(*args):
    result = subprocess.run([*BENCH, *map(str, args)], cwd=REPO, capture_output=True, text=True, timeout=120)
    return Result(result.returncode, result.stdout, result.stderr)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def test_entry_point_reports_user_errors_without_traceback(grid_file, tmp_path):
    path = grid_file(archs=("resnet1000",))
    assert_user_error(bench_subprocess("run", "--grid", path, "--results", tmp_path), "unknown name 'resnet1000'")


def test_entry_point_help():
    result = bench_subprocess("--help")
    assert result.returncode == 0 and "run" in result.stdout and "list" in result.stdout


@pytest.mark.parametrize("kind, name, valid", [
    ("datasets", "cifar11", "digits"), ("archs", "resnet1000", "small_cnn"), ("regimes", "mixd", "joint")])
def test_unknown_names_list_the_valid_ones(grid_file, tmp_path, kind, name, valid):
    path = grid_file(**{kind: (name,)})
    result = bench("run", "--grid", path, "--results", tmp_path / "out")
    assert_user_error(result, f"unknown name '{name}'", valid, str(path))


def test_unknown_grid_name(tmp_path):
    assert_user_error(bench("run", "--grid", "quik", "--results", tmp_path), "unknown grid 'quik'", "smoke")


def test_missing_grid_file(tmp_path):
    assert_user_error(bench("run", "--grid", tmp_path / "nope.toml"), "does not exist")


def test_malformed_grid_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("datasets = [\"digits\"]\narchs = [small_cnn]\n")
    assert_user_error(bench("run", "--grid", path, "--results", tmp_path / "out"), str(path), "line")


def test_missing_dataset_files_name_path_layout_and_download_flag(grid_file, tmp_path):
    path = grid_file(datasets=("cifar10",))
    root = tmp_path / "data"
    result = bench("run", "--grid", path, "--results", tmp_path / "out", "--data-root", root)
    assert_user_error(result, str(root), "--download")
    assert not list((tmp_path / "out").glob("runs/*/metrics.json"))


def test_only_that_matches_nothing(grid_file, tmp_path):
    result = bench("run", "--grid", grid_file(), "--only", "regime=nosuch*", "--results", tmp_path)
    assert_user_error(result, "matches none")


def test_bad_only_syntax(grid_file, tmp_path):
    assert_user_error(bench("run", "--grid", grid_file(), "--only", "colour", "--results", tmp_path), "KEY=GLOB")


def test_show_unknown_run(tmp_path):
    assert_user_error(bench("show", "deadbeef0000", "--results", tmp_path), "no run 'deadbeef0000'")


def test_show_a_run_of_a_committed_table_whose_folder_is_not_in_git(tmp_path):
    """A clone has the committed runs.csv but no run folders: `bench show ID` says so, prints the table's numbers
    and how to get the folder, instead of "no run"."""
    import shutil

    from benchmark.store import read_csv
    committed = REPO / "results" / "smoke" / "tables" / "runs.csv"
    (tmp_path / "smoke" / "tables").mkdir(parents=True)
    shutil.copy(committed, tmp_path / "smoke" / "tables" / "runs.csv")
    row = read_csv(committed).iloc[0]
    result = bench("show", row["run_id"], "--results", tmp_path / "smoke")
    assert result.returncode == 0, result.stderr
    assert "its folder is not in" in result.stdout and "run folders are not in git" in result.stdout
    assert f"final_accuracy         {row['final_accuracy']:.4f}" in result.stdout
    assert "`bench run --grid smoke --results" in result.stdout


def test_cuda_requested_without_a_gpu(grid_file, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert_user_error(bench("run", "--grid", grid_file(), "--device", "cuda", "--results", tmp_path), "--device cpu")


@pytest.mark.parametrize("what, expected", [("regimes", "mixed"), ("archs", "cifar_resnet8"),
                                            ("datasets", "mnist5k"), ("grids", "smoke")])
def test_list(what, expected):
    result = bench("list", what)
    assert result.returncode == 0 and expected in result.stdout, result.stderr


@pytest.mark.parametrize("command", [[], ["run"], ["list"], ["show"], ["analyze"]])
def test_help_on_every_command(command):
    result = bench(*command, "--help")
    assert result.returncode == 0 and "Usage" in result.stdout


def test_dry_run_lists_runs_and_states_without_training(grid_file, tmp_path):
    result = bench("run", "--grid", grid_file(), "--dry-run", "--results", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("pending") == 3 + 1 and "to train" in result.stdout
    assert not (tmp_path / "out" / "runs").exists()


def test_analyze_without_done_runs(grid_file, tmp_path):
    assert_user_error(bench("analyze", "--grid", grid_file(), "--results", tmp_path / "empty"), "no done runs",
                      "bench run")


def test_unknown_analysis_in_a_grid(grid_file, tmp_path):
    path = grid_file(extra='[analyses]\nmodel = ["rank", "horoscope"]\n')
    assert_user_error(bench("run", "--grid", path, "--results", tmp_path), "analyses.model", "horoscope")
