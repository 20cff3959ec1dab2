"""`bench evaluate`: per-exit outputs of models trained elsewhere, evaluated by the suite's own code.

Known answer: a run the suite trained, exported to the external format (`export_run`), evaluates to that run's own
tables — exits, curves, selected points, calibration and robustness — value for value."""
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from benchmark.cli import main
from benchmark.external import FORMAT, export_run, read_outputs, write_outputs
from benchmark.store import ResultsStore, read_csv, read_json

def bench(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture
def exported(analysed, tmp_path):
    """(the analysed joint run's folder, its grid's tables folder, the run exported as an outputs file)."""
    _, out = analysed
    store = ResultsStore(out)
    (run_id,) = store.done_run_ids()
    return store.run_dir(run_id), out / "tables", export_run(store, run_id, tmp_path / "joint.npz")


def test_an_exported_run_evaluates_to_its_own_tables(exported, tmp_path):
    folder, tables, path = exported
    result = bench("evaluate", path, "--results", tmp_path / "external")
    assert result.exit_code == 0, result.output
    run_id = folder.name
    entry = tmp_path / "external" / run_id
    own = read_csv(folder / "exits.csv")
    pd.testing.assert_frame_equal(read_csv(entry / "exits.csv"), own.drop(columns=["target_fraction",
                                                                                   "backbone_fraction"]))
    for name in ("curves", "selected", "robustness"):
        pd.testing.assert_frame_equal(read_csv(entry / f"{name}.csv"), read_csv(folder / f"{name}.csv"))
    calibration = read_csv(tables / "calibration.csv")
    pd.testing.assert_frame_equal(read_csv(entry / "calibration.csv"),
                                  calibration[calibration.run_id == run_id].reset_index(drop=True))
    metrics, own_metrics = read_json(entry / "metrics.json"), read_json(folder / "metrics.json")
    assert metrics["summary"] == own_metrics["summary"] and metrics["flops"] == own_metrics["flops"]
    assert {key: metrics[key] for key in ("dataset", "arch", "regime", "seed")} == \
        {key: own_metrics[key] for key in ("dataset", "arch", "regime", "seed")}
    report = (tmp_path / "external" / "REPORT.md").read_text()
    assert f"`{run_id}`" in report and "Under corrupted test inputs" in report and "gaussian_noise" in report
    assert f"{100 * own_metrics['summary']['auc_normalised']:.1f}" in report


def test_probabilities_evaluate_as_the_logits_they_came_from(exported, tmp_path):
    _, _, path = exported
    outputs = read_outputs(path)
    probs = {split: np.exp(z - z.max(-1, keepdims=True)) for split, z in
             (("val", outputs.val_logits.astype(np.float64)), ("test", outputs.test_logits.astype(np.float64)))}
    probs = {split: p / p.sum(-1, keepdims=True) for split, p in probs.items()}
    arrays = dict(np.load(path))
    for split in ("val", "test"):
        del arrays[f"{split}_logits"]
        arrays[f"{split}_probs"] = probs[split]
    arrays = {k: v for k, v in arrays.items() if "@" not in k}
    np.savez(tmp_path / "probs.npz", **arrays)
    as_probs = read_outputs(tmp_path / "probs.npz")
    from benchmark.external import evaluate_outputs
    logit_tables, logit_summary = evaluate_outputs(outputs)
    prob_tables, prob_summary = evaluate_outputs(as_probs)
    pd.testing.assert_frame_equal(prob_tables["exits"], logit_tables["exits"])     # same argmax at every exit
    tolerance = 1 / len(outputs.test_labels)                   # a threshold tie may move one sample, no more
    for key, value in logit_summary.items():
        assert prob_summary[key] == pytest.approx(value, abs=tolerance), key


def test_an_entry_joins_a_grids_report_and_pairs_only_through_bench_claim(smoke_results, tmp_path):
    grid, results, _ = smoke_results
    shutil.copytree(results, tmp_path / "out")
    store = ResultsStore(tmp_path / "out")
    runs = read_csv(tmp_path / "out" / "tables" / "runs.csv")
    mixed = runs[runs.regime == "mixed"].run_id.iloc[0]
    path = export_run(store, mixed, tmp_path / "mixed.npz")
    np.savez(tmp_path / "renamed.npz", **{**dict(np.load(path)), "run_id": np.str_("external-copy-of-mixed")})
    before = bench("report", "--grid", grid, "--results", tmp_path / "out")
    assert before.exit_code == 0, before.output
    claims_before = (tmp_path / "out" / "REPORT.md").read_text().split("## The papers' claims, tested")[1] \
        .split("\n## ")[0]

    added = bench("evaluate", tmp_path / "renamed.npz", "--grid", grid, "--as", "official_mixed", "--results",
                  tmp_path / "out")
    assert added.exit_code == 0, added.output
    assert "bench report --grid" in added.output
    assert (tmp_path / "out" / "external" / "external-copy-of-mixed" / "metrics.json").is_file()
    assert read_csv(tmp_path / "out" / "tables" / "runs.csv").equals(runs)           # the grid's tables untouched
    report = bench("report", "--grid", grid, "--results", tmp_path / "out")
    assert report.exit_code == 0, report.output
    text = (tmp_path / "out" / "REPORT.md").read_text()
    section = text.split("## Models trained elsewhere")[1].split("\n## ")[0]
    assert "**official_mixed**" in section and "joint (small_cnn)" in section and "external-copy-of-mixed" in section
    assert text.split("## The papers' claims, tested")[1].split("\n## ")[0] == claims_before   # not in the family
    mixed_area = runs.loc[runs.regime == "mixed", "auc_normalised"].iloc[0]
    assert f"| **official_mixed** | external | {100 * mixed_area:.1f} |" in section

    claim = bench("claim", "official_mixed", "mixed", "--grid", grid, "--results", tmp_path / "out",
                  "--direction", "not_less", "--margin", "0.01")
    assert claim.exit_code == 0, claim.output
    assert "1 pair" in claim.output                         # the same dataset, arch and seed as the mixed run


def write_tiny(path, **change):
    """A valid outputs file of 3 exits, 2 classes, 40 validation and 30 test samples, with `change` applied
    (None deletes a key)."""
    rng = np.random.default_rng(0)
    arrays = {"format": np.str_(FORMAT), "val_logits": rng.normal(size=(3, 40, 2)).astype(np.float32),
              "test_logits": rng.normal(size=(3, 30, 2)).astype(np.float32), "val_labels": np.arange(40) % 2,
              "test_labels": np.arange(30) % 2, "exit_flops": np.array([1e6, 2e6, 3e6]), "num_classes": np.int64(2)}
    for key, value in change.items():
        if value is None:
            arrays.pop(key)
        else:
            arrays[key] = value
    np.savez(path, **arrays)
    return path


def test_a_valid_tiny_file_evaluates(tmp_path):
    result = bench("evaluate", write_tiny(tmp_path / "tiny.npz"), "--results", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert read_json(tmp_path / "out" / "external-tiny" / "metrics.json")["regime"] == "tiny"


NAN = np.full((3, 30, 2), np.nan, dtype=np.float32)
BAD_FILES = {
    "shapes": ({"test_logits": np.zeros((2, 30, 2), np.float32)}, "exit counts disagree"),
    "classes": ({"num_classes": np.int64(3)}, "has 2 classes, num_classes is 3"),
    "label range": ({"val_labels": np.arange(40) % 2 + 1}, "labels outside [0, 2)"),
    "label count": ({"test_labels": np.arange(29) % 2}, "has shape (29,), the outputs have 30 samples"),
    "non-finite": ({"test_logits": NAN}, "is not finite at exit 0, sample 0"),
    "flops order": ({"exit_flops": np.array([1e6, 3e6, 2e6])}, "strictly increasing"),
    "small validation": ({"val_labels": np.r_[np.zeros(35), np.ones(5)].astype(int)},
                         "5 samples in its smallest class (minimum 10)"),
    "format": ({"format": np.str_("mine/2")}, "format is 'mine/2'"),
    "missing": ({"exit_flops": None}, "no 'exit_flops' array"),
    "both kinds": ({"val_probs": np.full((3, 40, 2), 0.5)}, "one kind for both splits"),
    "not probabilities": ({"val_logits": None, "test_logits": None, "val_probs": np.full((3, 40, 2), 0.7),
                           "test_probs": np.full((3, 30, 2), 0.5)}, "are not probabilities"),
    "pickled": ({"name": np.array([{"a": 1}], dtype=object)}, "holds pickled objects"),
    "corruption key": ({"test_logits@fog": np.zeros((3, 30, 2), np.float32)}, "test_logits@CORRUPTION@SEVERITY"),
}


@pytest.mark.parametrize("change, message", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_a_bad_file_is_one_line_exit_2_and_nothing_is_written(tmp_path, change, message):
    good = write_tiny(tmp_path / "good.npz")
    bad = write_tiny(tmp_path / "bad.npz", **change)
    result = CliRunner().invoke(main, ["evaluate", str(good), str(bad), "--results", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in result.output and str(bad) in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()                    # the good file first: still nothing written


def test_not_an_npz_and_a_missing_file_are_named(tmp_path):
    (tmp_path / "notes.npz").write_text("not a zip")
    for path, message in ((tmp_path / "notes.npz", "is not a readable .npz file"), (tmp_path / "gone.npz",
                                                                                   "no such file")):
        result = bench("evaluate", path, "--results", tmp_path / "out")
        assert result.exit_code == 2 and message in result.output, result.output


def test_two_files_of_one_entry_are_refused(tmp_path):
    one, two = write_tiny(tmp_path / "a.npz", name=np.str_("m")), write_tiny(tmp_path / "b.npz", name=np.str_("m"))
    result = bench("evaluate", one, two, "--results", tmp_path / "out")
    assert result.exit_code == 2 and "both entry 'external-m'" in result.output, result.output


def test_joining_a_grid_needs_its_dataset_its_test_split_and_a_name_of_its_own(smoke_results, tmp_path):
    grid, results, _ = smoke_results
    shutil.copytree(results, tmp_path / "out")
    runs = read_csv(tmp_path / "out" / "tables" / "runs.csv")
    path = export_run(ResultsStore(tmp_path / "out"), runs.run_id.iloc[0], tmp_path / "run.npz")
    arrays = dict(np.load(path))
    cases = {"no dataset": ({k: v for k, v in arrays.items() if k != "dataset"}, "official", "declares dataset None"),
             "a regime's name": (arrays, "joint", "is a regime of grid"),
             "another test split": ({**arrays, "test_labels": np.roll(arrays["test_labels"], 1)}, "official",
                                    "labels differ")}
    for name, (changed, as_name, message) in cases.items():
        np.savez(tmp_path / "changed.npz", **changed)
        result = bench("evaluate", tmp_path / "changed.npz", "--grid", grid, "--as", as_name, "--results",
                       tmp_path / "out")
        assert result.exit_code == 2 and message in result.output, (name, result.output)
    assert not (tmp_path / "out" / "external").exists()


def test_write_outputs_round_trips_and_rejects_unknown_keys(tmp_path):
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(2, 30, 3)).astype(np.float32)
    labels = np.arange(30) % 3
    path = write_outputs(tmp_path / "m.npz", val_logits=logits, val_labels=labels, test_logits=logits,
                         test_labels=labels, exit_flops=[1.0, 2.0], num_classes=3, name="m", seed=4,
                         provenance="made here", url="https://example.org/m")
    outputs = read_outputs(path)
    assert (outputs.name, outputs.seed, outputs.entry_id, outputs.url) == ("m", 4, "external-m-s4",
                                                                           "https://example.org/m")
    assert outputs.backbone_flops == 2.0 and np.array_equal(outputs.val_logits, logits)
    with pytest.raises(TypeError, match="unknown keys"):
        write_outputs(tmp_path / "x.npz", val_logits=logits, val_labels=labels, test_logits=logits,
                      test_labels=labels, exit_flops=[1.0, 2.0], num_classes=3, colour="red")
