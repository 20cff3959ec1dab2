"""`bench report` against a committed fixture (the tables of a real 12-run grid, three of whose runs failed on
purpose) compared with a golden markdown file, as DomainBed's collect_results test does; and the critical-difference
statistics against Demšar's table.

To accept an intended change of the report: EXITBENCH_UPDATE_GOLDEN=1 python -m pytest tests/test_report.py, then
read the diff of tests/fixtures/report/REPORT.md before committing it.
"""
import os
import re
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from analysis.critical_difference import nemenyi_q, rank_test
from benchmark.cli import main
from benchmark.errors import UserError
from benchmark.grid import load_grid
from benchmark.report import LEADERBOARD_MARKERS, build_report, resolved_text, update_benchmark
from benchmark.store import ResultsStore
from conftest import REPO

FIXTURE = REPO / "tests" / "fixtures" / "report"
STAMP = {"protocol version": "2", "runs trained at": "fixture", "exitbench": "0.1.0", "torch": "fixed",
         "torchvision": "fixed", "timm": "fixed", "devices of the runs": "cpu", "generated": "2026-12-01"}


@pytest.fixture
def fixture_store(tmp_path):
    shutil.copytree(FIXTURE / "tables", tmp_path / "out" / "tables")
    return load_grid(str(FIXTURE / "report_grid.toml"), check_models=False), ResultsStore(tmp_path / "out")


def test_the_report_matches_the_golden_markdown(fixture_store):
    grid, store = fixture_store
    text, _ = build_report(grid, store, store.root / "figures", STAMP)
    golden = FIXTURE / "REPORT.md"
    if os.environ.get("EXITBENCH_UPDATE_GOLDEN"):
        golden.write_text(text)
    assert text == golden.read_text()


def test_completeness_lists_each_failed_run_with_its_reason(fixture_store):
    grid, store = fixture_store
    text, _ = build_report(grid, store, store.root / "figures", STAMP)
    runs = pd.read_csv(store.tables_dir / "runs.csv")
    failed = runs[runs.status == "failed"]
    assert len(failed) == 3
    for _, run in failed.iterrows():
        assert f"- Failed: `{run.run_id}` disjoint on digits/small_cnn, seed {run.seed}: {run.error}" in text
    assert "**9 done**, 3 failed, 0 missing of the 12" in text


def test_every_embedded_figure_exists_under_a_relative_path(fixture_store):
    grid, store = fixture_store
    text, _ = build_report(grid, store, store.root / "figures", STAMP)
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "figures/critical_difference.png" in images and "figures/exit_accuracy.png" in images
    for image in images:
        assert not image.startswith("/") and (store.root / image).is_file()
    assert str(store.root) not in text, "no machine paths in the report"


def test_bench_report_works_from_the_tables_alone_and_names_missing_figures(fixture_store, tmp_path):
    grid, store = fixture_store
    result = CliRunner().invoke(main, ["report", "--grid", str(FIXTURE / "report_grid.toml"), "--results",
                                       str(store.root)])
    assert result.exit_code == 0, result.output
    text = (store.root / "REPORT.md").read_text()
    assert "Not drawn yet:" in text and "`bench analyze --grid report_grid`" in text


def test_analyses_a_grid_leaves_out_are_named_as_left_out_not_as_pending(fixture_store):
    grid, store = fixture_store
    grid = replace(grid, analyses={**grid.analyses, "model": ["rank"]})
    text, _ = build_report(grid, store, store.root / "figures", STAMP)
    assert "Not part of grid `report_grid`: its [analyses] model list leaves robustness out." in text
    left_out = next(line for line in text.splitlines() if line.startswith("Not part of grid `report_grid`: `"))
    assert "`landscape_1d_*.png`" in left_out and "`robustness_*.png`" in left_out
    assert "leaves out information, landscape, robustness." in left_out and "rank_profiles" not in left_out
    pending = next(line for line in text.splitlines() if line.startswith("Not drawn yet:"))
    assert "`rank_profiles.png`" in pending and "landscape" not in pending


def test_bench_report_without_runs_is_one_line_exit_2(tmp_path):
    result = CliRunner().invoke(main, ["report", "--grid", str(FIXTURE / "report_grid.toml"), "--results",
                                       str(tmp_path / "none")])
    assert result.exit_code == 2 and "bench run --grid" in result.stderr and "Traceback" not in result.output


def test_update_benchmark_rewrites_only_between_the_markers(tmp_path):
    start, end = LEADERBOARD_MARKERS
    path = tmp_path / "BENCHMARK.md"
    path.write_text(f"# head\n{start}\nold\n{end}\ntail\n")
    update_benchmark(path, "new block")
    assert path.read_text() == f"# head\n{start}\nnew block\n{end}\ntail\n"
    path.write_text("no markers\n")
    with pytest.raises(UserError, match="markers"):
        update_benchmark(path, "x")


def test_nemenyi_quantiles_match_demsar_table_5():
    # Demšar 2006, table 5(a), alpha = 0.05, k = 2..10
    expected = [1.960, 2.343, 2.569, 2.728, 2.850, 2.949, 3.031, 3.102, 3.164]
    assert [round(nemenyi_q(k), 3) for k in range(2, 11)] == pytest.approx(expected, abs=0.0015)


def test_rank_test_on_a_known_ordering():
    from scipy import stats
    rng = np.random.default_rng(0)
    rows = []
    for cell in range(6):
        base = rng.uniform(0.5, 0.8)
        for r, regime in enumerate(["a", "b", "c", "d"]):
            for seed in range(3):
                rows.append({"dataset": f"d{cell}", "arch": "x", "regime": regime, "seed": seed,
                             "auc": base - 0.05 * r + 0.001 * seed})
    runs = pd.DataFrame(rows)
    test = rank_test(runs, "auc")
    assert list(test.ranks.index) == ["a", "b", "c", "d"] and list(test.ranks) == [1.0, 2.0, 3.0, 4.0]
    means = runs.groupby(["dataset", "arch", "regime"])["auc"].mean().unstack("regime")
    assert test.friedman_p == pytest.approx(stats.friedmanchisquare(*(means[c] for c in means.columns)).pvalue)
    assert test.critical_difference == pytest.approx(2.569 * np.sqrt(4 * 5 / (6 * 6)), abs=1e-3)
    assert test.groups() == [("a", "b"), ("b", "c"), ("c", "d")], "CD 1.92: neighbours only are unresolved"
    assert test.resolved_pairs() == [("a", "c"), ("a", "d"), ("b", "d")]          # rank gaps 2, 3, 2 > 1.92
    assert resolved_text(test) == "Resolved pairs (3): `a` above `c`, `a` above `d`, `b` above `d`."
    two_cells = rank_test(runs[runs.dataset.isin(["d0", "d1"])], "auc")          # CD 3.32 > the rank range 3
    assert two_cells.resolved_pairs() == [] and "**No pair of regimes is resolved**" in resolved_text(two_cells)


def test_a_user_adds_a_claim_by_adding_a_row(fixture_store, tmp_path):
    from benchmark.claims import CLAIMS_FILE
    grid, store = fixture_store
    mine = tmp_path / "my_claims.toml"
    mine.write_text(CLAIMS_FILE.read_text() + '\n[[claim]]\nid = "mixed-beats-joint-at-half"\n'
                    'statement = "Mixed is more accurate than joint at half the FLOPs."\nsource = "a reader"\n'
                    'a = "mixed"\nb = "joint"\nmetric = "accuracy_at_50pct"\ndirection = "greater"\n')
    text, _ = build_report(grid, store, store.root / "figures", STAMP, claims_file=mine)
    row = next(line for line in text.splitlines() if line.startswith("| Mixed is more accurate than joint at half"))
    assert "`mixed` > `joint`" in row and "| 3 |" in row
    # fixture: mixed 55.8 vs joint 73.2 at 50 %, over 3 seeds; the opposite one-sided p (0.01) is below 0.05 alone
    # but not after Holm over the family, which the added row joins (5 claims with pairs): inconclusive
    assert "**inconclusive**" in row and "family of 5 claims" in text


def test_a_tuned_objective_knob_is_shown_beside_the_lr(fixture_store):
    grid, store = fixture_store
    runs = pd.read_csv(store.tables_dir / "runs.csv")
    runs.loc[runs.regime == "joint+bdl", "bdl.groups"] = 3          # as tuning.py's provenance names a knob
    runs.to_csv(store.tables_dir / "runs.csv", index=False)
    text, _ = build_report(grid, store, store.root / "figures", STAMP)
    row = next(line for line in text.splitlines() if "| `joint+bdl` |" in line)
    assert "0.05; bdl.groups=3" in row
    assert "bdl.groups" not in next(line for line in text.splitlines() if "| `joint` |" in line)


def test_policies_section_counts_selections_and_merges_front_segments(tmp_path):
    """Known answer: 3 of 4 budget selections and 3/4 of the staircase's width are ensemble's; the front's
    consecutive points with the same owners merge, a shared point lists both owners."""
    from benchmark.report import policies_section
    runs = pd.DataFrame({"run_id": ["r1"]})
    pd.DataFrame({"run_id": "r1", "selection": ["at_25pct", "at_50pct", "at_75pct", "at_100pct", "staircase",
                                                "staircase"],
                  "budget_from": [0.25, 0.5, 0.75, 1.0, 0.0, 0.25], "budget_to": [0.25, 0.5, 0.75, 1.0, 0.25, 1.0],
                  "policy": ["exit", "ensemble", "ensemble", "ensemble", "exit", "ensemble"]}
                 ).to_csv(tmp_path / "selected.csv", index=False)
    pd.DataFrame({"dataset": "d", "arch": "a",
                  "regime": ["joint", "joint", "joint", "mixed", "joint"],
                  "policy": ["exit", "threshold", "threshold", "ensemble", "ensemble"],
                  "test_flops_fraction": [0.2, 0.3, 0.4, 0.6, 0.6], "test_accuracy": [0.5, 0.6, 0.7, 0.8, 0.8]}
                 ).to_csv(tmp_path / "pareto.csv", index=False)
    text = "\n".join(policies_section(tmp_path, runs, "g"))
    assert "| `exit` | 25.0 | 25.0 |" in text and "| `ensemble` | 75.0 | 75.0 |" in text
    assert "| `patience` | 0.0 | 0.0 |" in text
    assert "| 20.0 | 50.0 | `joint` exit |" in text
    assert "| 30.0–40.0 | 60.0–70.0 | `joint` threshold |" in text
    assert "| 60.0 | 80.0 | `joint` ensemble, `mixed` ensemble |" in text


def test_each_cell_states_the_budgets_its_area_averages_over(fixture_store):
    """The area is a mean over the budgets the exits cover: each cell's leaderboard names that range, read from
    exit 0's FLOPs fraction in exits.csv."""
    grid, store = fixture_store
    text, _ = build_report(grid, store, store.root / "figures", STAMP)
    exits = pd.read_csv(store.root / "tables" / "exits.csv")
    for (dataset, arch), cell in exits[exits["exit"] == 0].groupby(["dataset", "arch"]):
        low = 100 * cell["flops_fraction"].min()
        section = text.split(f"### {dataset} / {arch}\n", 1)[1]
        assert section.lstrip().startswith(f"Area = mean accuracy over budgets from the first exit's cost, {low:.1f}")


def test_a_segmentation_grids_report_says_miou_and_tests_the_segmentation_claims_only(tmp_path):
    """From the committed `seg` tables alone: its words are mIoU, its claims are the two segmentation claims (the
    classification claims have no cell there and stay out of the Holm family), its policies are the per-image ones."""
    shutil.copytree(REPO / "results" / "seg" / "tables", tmp_path / "tables")
    text, _ = build_report(load_grid("seg"), ResultsStore(tmp_path), tmp_path / "figures", STAMP)
    assert "the test mIoU of the point validation selects" in text and "Area = mean mIoU over budgets" in text
    assert "every accuracy of the tables, figures and claims is mIoU" in text
    claims = [line for line in text.splitlines() if line.startswith("| ") and "Han et al." in line]
    assert len(claims) == 2 and all("segmentation network" in line for line in claims)
    assert "over the family of 2 claims" in text and "Kubaty" not in text
    policies = re.findall(r"^\| `(\w+)` \| [\d.–-]+ \| [\d.–-]+ \|$", text, flags=re.M)
    assert set(policies) == {"exit", "threshold", "budgeted", "quantile", "entropy"}
