"""Claims as paired tests: each verdict on constructed differences with a known answer, p-values and power checked
against scipy, pairing and cell selection by hand, per-exit metrics, the loader's errors, and the shipped file on
the committed cpu tables."""
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from benchmark.claims import (ALPHA, COLUMNS, POWER, RUN_METRICS, Claim, claim_findings, detectable_effect,
                              evaluate_claims, exit_metrics, holm, load_claims, pairs_needed, test_claim)
from benchmark.errors import UserError
from conftest import bench_in_process

REPO = Path(__file__).resolve().parents[1]
CPU_TABLES = REPO / "results" / "cpu" / "tables"
BASE = [0.80, 0.82, 0.85, 0.78, 0.81, 0.84]                    # the baseline's metric per seed
GAIN = [0.020, 0.031, 0.024, 0.036, 0.018, 0.029]              # clearly > 0
NOISE = [0.010, -0.006, 0.004, 0.012, -0.008, 0.002]           # mean +0.0023, t ~ 0.7
NO_EXITS = pd.DataFrame(columns=["run_id", "exit", "test_accuracy"])


def runs_table(values: dict, dataset="d", arch="x", metric="final_accuracy") -> pd.DataFrame:
    """One done run per (regime, seed) in one cell; values[regime][seed] is the metric."""
    return pd.DataFrame([{"run_id": f"{dataset}/{arch}/{regime}/{seed}", "dataset": dataset, "arch": arch,
                          "regime": regime, "seed": seed, "status": "done", metric: value}
                         for regime, per_seed in values.items() for seed, value in enumerate(per_seed)])


def claim(direction="greater", margin=0.0, metric="final_accuracy", cells=("*/*",), a="mixed", b="joint"):
    return Claim(id="c", statement="Mixed beats joint.", source="test", a=a, b=b, metric=metric,
                 direction=direction, margin=margin, cells=tuple(cells))


def evaluate(differences, runs=None, **claim_keys) -> pd.Series:
    """The table row of one claim on mixed = BASE + differences vs joint = BASE (or on the given runs)."""
    if runs is None:
        runs = runs_table({"joint": BASE[:len(differences)], "mixed": np.add(BASE[:len(differences)], differences)})
    return evaluate_claims(runs, NO_EXITS, [claim(**claim_keys)]).iloc[0]


def power(n: int, effect: float) -> float:
    """Power of the one-sided paired t-test at ALPHA with n pairs and true standardised effect `effect`."""
    return stats.nct.sf(stats.t.ppf(1 - ALPHA, n - 1), n - 1, effect * math.sqrt(n))


# --- verdicts -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("differences, verdict", [
    (GAIN, "reproduced"), (np.negative(GAIN), "contradicted"), (NOISE, "inconclusive")])
def test_greater_verdicts(differences, verdict):
    row = evaluate(differences)
    assert row["verdict"] == verdict and row["n_pairs"] == 6
    assert row["mean_difference"] == pytest.approx(np.mean(differences))
    assert row["effect_size"] == pytest.approx(np.mean(differences) / np.std(differences, ddof=1))
    low, high = stats.t.interval(0.95, 5, loc=np.mean(differences), scale=stats.sem(differences))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((low, high))
    if verdict == "inconclusive":
        assert np.isfinite(row["n_needed"]) and row["n_needed"] > row["n_pairs"]
    else:
        assert np.isnan(row["n_needed"])


NEAR_MINUS_3 = [-0.002, -0.004, -0.003, -0.001, -0.005, -0.003]    # slightly worse, well inside a 0.01 margin
NEAR_MINUS_30 = [-0.028, -0.033, -0.025, -0.035, -0.030, -0.029]   # far outside it
NEAR_MINUS_6 = [-0.020, 0.004, -0.012, 0.006, -0.015, 0.001]       # mean -0.006, noisy


@pytest.mark.parametrize("differences, verdict", [
    (NEAR_MINUS_3, "reproduced"), (NEAR_MINUS_30, "contradicted"), (NEAR_MINUS_6, "inconclusive")])
def test_not_less_verdicts_with_a_margin(differences, verdict):
    row = evaluate(differences, direction="not_less", margin=0.01)
    assert row["verdict"] == verdict and row["margin"] == 0.01
    if verdict == "inconclusive":
        assert np.isfinite(row["n_needed"]) and row["n_needed"] > row["n_pairs"]


def test_non_inferiority_is_not_superiority():
    """Slightly worse but within the margin: non-inferior, yet 'greater' is contradicted on the same runs."""
    assert evaluate(NEAR_MINUS_3, direction="not_less", margin=0.01)["verdict"] == "reproduced"
    assert evaluate(NEAR_MINUS_3)["verdict"] == "contradicted"


@pytest.mark.parametrize("differences, direction, margin", [
    (GAIN, "greater", 0.0), (NOISE, "greater", 0.0), (np.negative(GAIN), "greater", 0.0),
    (NEAR_MINUS_3, "not_less", 0.01), (NEAR_MINUS_6, "not_less", 0.01), (NEAR_MINUS_30, "not_less", 0.01)])
def test_p_values_match_scipy_one_sided_ttest_rel(differences, direction, margin):
    a, b = np.add(BASE, differences), np.array(BASE)
    row = evaluate(differences, direction=direction, margin=margin)
    expected = stats.ttest_rel(a + margin, b, alternative="greater").pvalue
    assert row["p_value"] == pytest.approx(expected, rel=1e-9)
    opposite = stats.ttest_rel(a + margin, b, alternative="less").pvalue
    assert row["verdict"] == ("reproduced" if expected < ALPHA else "contradicted" if opposite < ALPHA
                              else "inconclusive")


def test_n_needed_is_the_smallest_n_with_80_percent_power():
    row = evaluate(NOISE)
    effect = np.mean(NOISE) / np.std(NOISE, ddof=1)
    n = int(row["n_needed"])
    assert power(n, effect) >= POWER > power(n - 1, effect)
    assert pairs_needed(0.5) == 27                   # G*Power: one-tailed paired t, d_z = 0.5, alpha 0.05, power 0.8
    shifted = (np.mean(NEAR_MINUS_6) + 0.01) / np.std(NEAR_MINUS_6, ddof=1)   # non-inferiority: distance to -margin
    assert evaluate(NEAR_MINUS_6, direction="not_less", margin=0.01)["n_needed"] == pairs_needed(shifted)


def test_an_effect_of_the_wrong_sign_has_nothing_to_power():
    row = evaluate(np.negative(NOISE))
    assert row["verdict"] == "inconclusive" and np.isnan(row["n_needed"]) and row["note"] == "no effect to power"


@pytest.mark.parametrize("differences, direction, verdict, p_value", [
    ([0.01] * 4, "greater", "reproduced", 0.0), ([-0.01] * 4, "greater", "contradicted", 1.0),
    ([0.0] * 4, "greater", "inconclusive", np.nan), ([-0.005] * 4, "not_less", "reproduced", 0.0),
    ([-0.02] * 4, "not_less", "contradicted", 1.0)])
def test_zero_variance_differences_are_decided_by_their_sign(differences, direction, verdict, p_value):
    row = evaluate(differences, direction=direction, margin=0.01 if direction == "not_less" else 0.0)
    assert row["verdict"] == verdict and row["p_value"] == pytest.approx(p_value, nan_ok=True)
    assert "zero variance" in row["note"]


def test_fewer_than_two_pairs_is_inconclusive_and_says_why():
    row = evaluate([0.05])
    assert row["verdict"] == "inconclusive" and row["n_pairs"] == 1 and np.isnan(row["p_value"])
    assert "at least 2" in row["note"]


# --- pairing, cells, per-exit metrics -------------------------------------------------------------------------------

def test_pairing_ignores_failed_runs_and_unmatched_seeds():
    runs = runs_table({"joint": [0.80, 0.81, 0.82, 0.83, 0.84], "mixed": [0.83, 0.00, 0.86, 0.85]})
    runs.loc[(runs["regime"] == "mixed") & (runs["seed"] == 1), "status"] = "failed"   # its 0.00 must not count
    row = evaluate(None, runs=runs)
    assert row["n_pairs"] == 3                                  # seeds 0, 2, 3: mixed seed 1 failed, seed 4 absent
    assert row["mean_difference"] == pytest.approx(np.mean([0.03, 0.04, 0.02]))
    assert "2 done runs left unpaired" in row["note"]           # joint seeds 1 and 4
    row = evaluate(None, runs=runs.assign(status="failed"))
    assert row["n_pairs"] == 0 and row["verdict"] == "inconclusive" and "no done run of joint" in row["note"]


def test_cell_globs_select_the_cells():
    runs = pd.concat([runs_table({"joint": BASE[:3], "mixed": np.add(BASE[:3], gain)}, dataset, arch)
                      for dataset, arch, gain in (("d1", "x", 0.02), ("d1", "y", 0.04), ("d2", "x", -0.05))])
    row = evaluate(None, runs=runs, cells=["d1/*"])
    assert row["cells"] == "d1/x, d1/y" and row["n_pairs"] == 6 and row["mean_difference"] == pytest.approx(0.03)
    row = evaluate(None, runs=runs, cells=["*/x"])
    assert row["cells"] == "d1/x, d2/x" and row["mean_difference"] == pytest.approx(-0.015)
    row = evaluate(None, runs=runs, cells=["d3/*"])
    assert row["n_pairs"] == 0 and row["cells"] == "" and row["verdict"] == "inconclusive"
    assert "no done run of mixed" in row["note"]


def test_per_exit_metrics():
    exits = pd.DataFrame({"run_id": ["r1"] * 4 + ["r2"] * 2 + ["r3"],
                          "exit": [0, 1, 2, 3, 0, 1, 0],
                          "test_accuracy": [0.5, 0.6, 0.7, 0.9, 0.4, 0.8, 0.3]}).sample(frac=1, random_state=0)
    got = exit_metrics(exits)
    assert got.loc["r1"].tolist() == pytest.approx([0.5, 0.6, 0.9])
    assert got.loc["r2"].tolist() == pytest.approx([0.4, 0.4, 0.8])
    assert got.loc["r3", "first_exit_accuracy"] == 0.3 and np.isnan(got.loc["r3", "early_exit_accuracy"])
    with pytest.raises(ValueError, match="numbered"):
        exit_metrics(exits[exits["exit"] != 1])


def test_per_exit_metrics_feed_the_claims():
    runs = runs_table({"joint": [0, 0, 0], "mixed": [0, 0, 0]}).drop(columns="final_accuracy")
    accuracy = {"joint": [[0.50, 0.70, 0.90], [0.52, 0.72, 0.91], [0.49, 0.69, 0.92]],
                "mixed": [[0.55, 0.71, 0.90], [0.58, 0.74, 0.90], [0.53, 0.70, 0.93]]}
    exits = pd.DataFrame([{"run_id": f"d/x/{regime}/{seed}", "exit": k, "test_accuracy": value}
                          for regime, per_seed in accuracy.items() for seed, values in enumerate(per_seed)
                          for k, value in enumerate(values)])
    table = evaluate_claims(runs, exits, [claim(metric=m) for m in
                                          ("first_exit_accuracy", "early_exit_accuracy", "final_exit_accuracy")])
    joint, mixed = np.array(accuracy["joint"]), np.array(accuracy["mixed"])
    expected = [(mixed[:, 0] - joint[:, 0]).mean(), (mixed[:, :2].mean(1) - joint[:, :2].mean(1)).mean(),
                (mixed[:, 2] - joint[:, 2]).mean()]
    assert table["mean_difference"].tolist() == pytest.approx(expected)


# --- the claims file ------------------------------------------------------------------------------------------------

VALID = {"id": "my-claim", "statement": "Mixed beats joint.", "source": "a paper", "a": "mixed", "b": "joint",
         "metric": "final_accuracy", "direction": "greater"}


def write_claims(path: Path, **changes) -> Path:
    table = {**VALID, **changes}
    lines = ["[[claim]]"] + [f"{key} = {value!r}".replace("'", '"') for key, value in table.items() if value is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_valid_claims_file_loads(tmp_path):
    (got,) = load_claims(write_claims(tmp_path / "c.toml", direction="not_less", margin=0.005, cells=["digits/*"]))
    assert got == Claim(id="my-claim", statement="Mixed beats joint.", source="a paper", a="mixed", b="joint",
                        metric="final_accuracy", direction="not_less", margin=0.005, cells=("digits/*",))


@pytest.mark.parametrize("changes, key, problem", [
    ({"a": "mixed+uniform"}, "a", "unknown regime"),
    ({"b": "jiont"}, "b", "did you mean 'joint'"),
    ({"metric": "exit_1_accuracy"}, "metric", "unknown metric"),
    ({"metric": "oracle_auc_normalised"}, "metric", "unknown metric"),
    ({"direction": "greater_equal"}, "direction", "unknown direction"),
    ({"alpha": 0.01}, "alpha", "unknown key"),
    ({"direction": "not_less"}, "margin", "needs a margin"),
    ({"margin": 0.01}, "margin", "only direction 'not_less'"),
    ({"cells": ["digits"]}, "cells", "dataset/arch"),
    ({"task": "detection"}, "task", "unknown task"),
    ({"source": None}, "source", "required"),
    ({"b": "mixed"}, "b", "with itself"),
])
def test_loader_names_the_file_claim_and_key(tmp_path, changes, key, problem):
    path = write_claims(tmp_path / "c.toml", **changes)
    with pytest.raises(UserError, match=re.escape(f"claims file {path}: claim 'my-claim': key '{key}'")) as error:
        load_claims(path)
    assert problem in str(error.value)


def test_a_claim_is_tested_on_the_cells_of_its_task_only_and_an_ad_hoc_claim_on_every_matched_cell():
    digits = runs_table({"joint": BASE[:3], "mixed": np.add(BASE[:3], GAIN[:3])}, "digits", "small_cnn")
    scenes = runs_table({"joint": BASE[3:6], "mixed": np.subtract(BASE[3:6], GAIN[3:6])}, "mnist_scenes", "seg_cnn")
    runs = pd.concat([digits, scenes], ignore_index=True)
    classification, segmentation = (replace(claim(), task=task) for task in ("classification", "segmentation"))
    table = evaluate_claims(runs, NO_EXITS, [classification, replace(segmentation, id="s")]).set_index("id")
    assert table.loc["c", "cells"] == "digits/small_cnn" and table.loc["c", "verdict"] == "reproduced"
    assert table.loc["s", "cells"] == "mnist_scenes/seg_cnn" and table.loc["s", "verdict"] == "contradicted"
    ad_hoc = test_claim(runs, NO_EXITS, "mixed", "joint", "final_accuracy")
    assert ad_hoc["n_pairs"] == 6 and ad_hoc["cells"] == "digits/small_cnn, mnist_scenes/seg_cnn"
    only = test_claim(runs, NO_EXITS, "mixed", "joint", "final_accuracy", cells=("mnist_scenes/*",))
    assert only["n_pairs"] == 3 and only["mean_difference"] < 0


def test_loader_rejects_repeated_ids_and_stray_top_level_keys(tmp_path):
    path = write_claims(tmp_path / "c.toml")
    path.write_text(path.read_text() * 2)
    with pytest.raises(UserError, match="claim 'my-claim': key 'id': repeats"):
        load_claims(path)
    path.write_text('alpha = 0.1\n' + write_claims(tmp_path / "d.toml").read_text())
    with pytest.raises(UserError, match="unknown top-level key 'alpha'"):
        load_claims(path)


def test_the_shipped_claims_evaluate_on_the_cpu_tables():
    claims = load_claims()
    assert len(claims) >= 8 and len({c.id for c in claims}) == len(claims)
    runs, exits = pd.read_csv(CPU_TABLES / "runs.csv"), pd.read_csv(CPU_TABLES / "exits.csv")
    assert set(RUN_METRICS) <= set(runs.columns)                # the declared metrics still exist
    final = runs.join(exit_metrics(exits), on="run_id")
    assert final["final_exit_accuracy"].to_numpy() == pytest.approx(final["final_accuracy"].to_numpy())
    table = evaluate_claims(runs, exits, claims)
    with pd.option_context("display.width", 250, "display.max_columns", None):
        print(table.drop(columns=["statement", "source"]).to_string())
    print("\n".join(claim_findings(table)))
    assert table.columns.tolist() == COLUMNS and table["id"].tolist() == [c.id for c in claims]
    in_cpu = pd.Series([not any(glob.startswith(("uci_har", "basicmotions")) for glob in c.cells)   # no sensor data
                        and c.task == "classification"                                       # nor segmentation
                        and {c.a, c.b} <= set(runs["regime"]) for c in claims], index=table.index)  # nor newer methods
    segmentation = table["id"].isin([c.id for c in claims if c.task == "segmentation"])
    assert segmentation.sum() == 2 and (table.loc[segmentation, "n_pairs"] == 0).all()   # cpu's digits cells
    assert in_cpu.sum() >= 8
    assert (table.loc[in_cpu, "n_pairs"] == 9).all() and table.loc[in_cpu, "p_value"].notna().all()
    assert (table.loc[~in_cpu, "n_pairs"] == 0).all() and (table.loc[~in_cpu, "verdict"] == "inconclusive").all()
    assert set(table["verdict"]) <= {"reproduced", "contradicted", "inconclusive"}


def test_findings_are_written_from_the_numbers():
    runs = runs_table({"joint": BASE, "mixed": np.add(BASE, GAIN), "disjoint": np.add(BASE, NOISE)})
    table = evaluate_claims(runs, NO_EXITS, [claim(), claim(a="disjoint")])
    reproduced, inconclusive = claim_findings(table)
    row = table.iloc[0]
    assert reproduced.startswith("Mixed beats joint (mixed > joint on final_accuracy): reproduced — ")
    for number in (row["mean_difference"], row["ci_low"], row["ci_high"]):
        assert f"{100 * number:+.1f}" in reproduced
    assert "over 6 (cell, seed) pairs" in reproduced and "one-sided p < 0.001" in reproduced    # p ~ 1e-4
    assert f"one-sided p = {table.iloc[1]['p_value']:.2g}, Holm-adjusted over 2 claims p = " in inconclusive
    assert f"could detect {100 * table.iloc[1]['detectable_effect']:.1f} points" in inconclusive
    assert f"about {int(table.iloc[1]['n_needed'])} pairs would give 80 % power" in inconclusive


# --- a family of claims: Holm, the interval against the margin, the detectable effect --------------------------------

def test_holm_adjusts_a_family_step_down_and_leaves_non_members_out():
    assert holm([0.01, 0.04, 0.03, np.nan]) == pytest.approx([0.03, 0.06, 0.06, np.nan], nan_ok=True)
    assert holm([0.2, 0.01]) == pytest.approx([0.2, 0.02])      # monotone: never below an earlier step


def test_a_claim_that_is_significant_alone_is_inconclusive_in_a_large_enough_family():
    """`weak` gives p ~ 0.02 alone: reproduced as a family of one, not after Holm over four claims."""
    weak = [0.013, -0.001, 0.010, 0.007, 0.000, 0.009]
    runs = runs_table({"joint": BASE, "mixed": np.add(BASE, weak), "disjoint": BASE, "joint+sdn": BASE,
                       "joint+ge": BASE})
    alone = evaluate_claims(runs, NO_EXITS, [claim()]).iloc[0]
    assert 0.01 < alone["p_value"] < ALPHA and alone["p_holm"] == alone["p_value"] and alone["verdict"] == "reproduced"
    family = evaluate_claims(runs, NO_EXITS, [claim(), claim(a="disjoint"), claim(a="joint+sdn"), claim(a="joint+ge")])
    first = family.iloc[0]
    assert first["family_size"] == 4 and first["p_value"] == alone["p_value"]
    assert first["p_holm"] == pytest.approx(min(1.0, 4 * alone["p_value"])) and first["verdict"] == "inconclusive"


def test_reproduced_also_needs_the_interval_on_the_claims_side_of_its_margin():
    """One-sided p < 0.05 with a 95 % interval that reaches past -margin: not reproduced (the issue's joint >= mixed
    row, whose CI low end lay beyond its own margin)."""
    differences = [0.002, -0.014, 0.004, -0.011, 0.001, -0.003]        # mean -0.0035 against margin 0.01
    row = evaluate(differences, direction="not_less", margin=0.01)
    assert row["p_holm"] < ALPHA and row["ci_low"] < -0.01 < row["ci_high"]
    assert row["verdict"] == "inconclusive"
    assert evaluate(differences, direction="not_less", margin=0.02)["verdict"] == "reproduced"


def test_contradicted_needs_the_interval_wholly_on_the_other_side():
    row = evaluate(np.negative(GAIN))
    assert row["p_opposite_holm"] < ALPHA and row["ci_high"] < 0 and row["verdict"] == "contradicted"
    crossing = [-0.011, 0.003, -0.013, -0.007, 0.001, -0.010]           # opposite p < 0.05, CI crosses 0
    row = evaluate(crossing)
    assert row["p_opposite"] < ALPHA and row["ci_high"] > 0 and row["verdict"] == "inconclusive"


def test_the_detectable_effect_is_detected_with_80_percent_power_at_the_strictest_holm_level():
    runs = runs_table({"joint": BASE, "mixed": np.add(BASE, NOISE), "disjoint": np.add(BASE, GAIN)})
    table = evaluate_claims(runs, NO_EXITS, [claim(), claim(a="disjoint")])
    row, level, n = table.iloc[0], ALPHA / 2, 6
    sd = np.std(NOISE, ddof=1)
    effect = row["detectable_effect"] / sd
    achieved = stats.nct.sf(stats.t.ppf(1 - level, n - 1), n - 1, effect * math.sqrt(n))
    assert achieved == pytest.approx(POWER, abs=1e-6)
    assert detectable_effect(30, sd, level) < detectable_effect(6, sd, level)          # more pairs, finer


def test_any_claim_can_be_tested_by_the_same_rules_from_python_and_the_command_line(tmp_path):
    runs = runs_table({"joint": BASE, "mixed": np.add(BASE, GAIN)})
    row = test_claim(runs, NO_EXITS, "mixed", "joint", "final_accuracy")
    assert row["verdict"] == "reproduced" and row["family_size"] == 1
    assert row["p_value"] == pytest.approx(evaluate(GAIN)["p_value"])
    with pytest.raises(UserError, match="unknown regime 'mixd'"):
        test_claim(runs, NO_EXITS, "mixd", "joint", "final_accuracy")
    with pytest.raises(UserError, match="needs a margin"):
        test_claim(runs, NO_EXITS, "mixed", "joint", "final_accuracy", direction="not_less")
    tables = tmp_path / "out" / "tables"
    tables.mkdir(parents=True)
    runs.to_csv(tables / "runs.csv", index=False)
    NO_EXITS.to_csv(tables / "exits.csv", index=False)
    command = ["claim", "mixed", "joint", "--metric", "final_accuracy", "--results", tmp_path / "out"]
    done = bench_in_process(*command)
    assert done.exit_code == 0, done.output
    assert "(mixed > joint on final_accuracy): reproduced" in done.stdout and "Verdict rule: reproduced:" in done.stdout
    wrong = bench_in_process(*command[:-2], "--metric", "final_acc", "--results", tmp_path / "out")
    assert wrong.exit_code == 2 and wrong.stderr.startswith("error: ") and "unknown metric 'final_acc'" in wrong.stderr
