"""Every run records the code it trained on (issue 21): the commit, and whether the code differed from it."""
import os
import subprocess

import pytest

from benchmark.provenance import CODE_PATHS, checkout_version, code_version, new_timing_batch


def git(root, *args):
    subprocess.run(["git", "-C", str(root), *args], check=True, capture_output=True)


@pytest.fixture
def checkout(tmp_path):
    git(tmp_path, "init", "-q")
    git(tmp_path, "config", "user.email", "t@example.org")
    git(tmp_path, "config", "user.name", "t")
    (tmp_path / "benchmark").mkdir()
    (tmp_path / "benchmark" / "train.py").write_text("LR = 0.1\n")
    (tmp_path / "README.md").write_text("readme\n")
    git(tmp_path, "add", "-A")
    git(tmp_path, "commit", "-qm", "first")
    return tmp_path


def test_a_clean_checkout_records_its_commit(checkout):
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    assert checkout_version(checkout) == {"git_commit": head.strip(), "git_dirty": False}


def test_changed_code_is_dirty_but_a_changed_readme_or_a_new_results_file_is_not(checkout):
    (checkout / "README.md").write_text("edited\n")
    (checkout / "results.csv").write_text("untracked\n")
    assert checkout_version(checkout)["git_dirty"] is False
    (checkout / "benchmark" / "train.py").write_text("LR = 0.2\n")
    assert checkout_version(checkout)["git_dirty"] is True
    assert "benchmark" in CODE_PATHS


def test_outside_a_git_checkout_nothing_is_claimed(tmp_path):
    assert checkout_version(tmp_path) == {"git_commit": None, "git_dirty": None}


def test_this_package_reports_the_checkout_it_was_imported_from():
    version = code_version()
    assert version["git_commit"] is None or len(version["git_commit"]) == 40


def test_a_timing_batch_names_the_sitting_and_how_runs_shared_the_machine():
    batch = new_timing_batch("process", 2, 1)
    assert batch.endswith("/process-2x1") and batch[:8].isdigit()
    assert new_timing_batch("local", 1, 3).endswith("/local-1x3")
    assert new_timing_batch("process", 2, None, "cpu").endswith(f"/process-2x{max(1, (os.cpu_count() or 1) // 2)}")
