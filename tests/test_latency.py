"""`bench latency`: the early-exit forward really stops, decides as evaluate.py does from the stored logits, gives
the same answers batched and one by one, and the command writes its table or says in one line what is missing.

One real run (digits / small_cnn, joint, 2 epochs, model kept) is trained once in-process; tests work on copies."""
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from benchmark.analyze import load_trained
from benchmark.cli import main
from benchmark.data import load_dataset
from benchmark.evaluate import POLICY_RULE, THRESHOLD_GRID, ExitOutputs, exit_decisions
from benchmark.latency import (COLUMNS, Point, backbone_forward, curve_thresholds, early_exit_forward,
                               operating_points)
from benchmark.models.eval_mode import evaluating
from benchmark.pipeline import initial_model
from benchmark.spec import RunSpec
from benchmark.store import ResultsStore, folder_digests, read_json, read_logits, write_json
from benchmark.train import held
from conftest import SERIAL_RUN, write_grid

pytestmark = pytest.mark.xdist_group("latency")   # one xdist worker trains `trained` and loads `loaded` once
DATA_ROOT = Path("/nonexistent")      # digits is embedded: no data root is read


def bench(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(autouse=True)
def keep_thread_count():
    """`bench` commands set torch's thread count; give the rest of the session its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def trained(shared_folder):
    """(grid file, results folder, run id) of one joint run trained with --save-models, once per session."""
    def build(root):
        grid = write_grid(root / "grid.toml", regimes=("joint",), epochs=2)
        result = bench("run", "--grid", grid, "--results", root / "out", "--save-models", *SERIAL_RUN)
        assert result.exit_code == 0, result.output
    root = shared_folder("latency", build)
    (run_id,) = ResultsStore(root / "out").done_run_ids()
    return root / "grid.toml", root / "out", run_id


@pytest.fixture
def results(trained, tmp_path):
    """A private copy of the trained results folder: (grid, results folder, run id)."""
    grid, out, run_id = trained
    shutil.copytree(out, tmp_path / "out")
    return grid, tmp_path / "out", run_id


@pytest.fixture(scope="module")
def loaded(trained):
    """(model in eval mode, test inputs, stored logits, selected.csv) of the trained run."""
    _, out, run_id = trained
    store = ResultsStore(out)
    spec = RunSpec.from_json(read_json(store.run_dir(run_id) / "spec.json"))
    data = load_dataset(spec.dataset, DATA_ROOT)
    model = load_trained(spec, store, data, torch.device("cpu"))
    stored = read_logits(store.run_dir(run_id) / "logits.npz", model.num_exits, len(data.y_val), len(data.y_test))
    return model, data.x_test, stored, pd.read_csv(store.run_dir(run_id) / "selected.csv")


class CallCounter:
    """Counts the calls of every block, head and the classifier through forward hooks."""

    def __init__(self, model):
        self.counts = {}
        self.handles = []
        parts = [*(f"block{i}" for i in range(len(model.blocks))), *(f"head{k}" for k in range(len(model.heads))),
                 "classifier"]
        for name, module in zip(parts, [*model.blocks, *model.heads, model.classifier]):
            self.counts[name] = 0
            self.handles.append(module.register_forward_hook(lambda *_, name=name: self._count(name)))

    def _count(self, name):
        self.counts[name] += 1

    def remove(self):
        for handle in self.handles:
            handle.remove()


def counted(model, function):
    counter = CallCounter(model)
    try:
        with evaluating(model):
            out = function()
    finally:
        counter.remove()
    return out, counter.counts


def mixed_thresholds(model, x):
    """Thresholds that send about a third of the samples to each of exits 0 and 1, the rest on."""
    with evaluating(model):
        confidence = ExitOutputs.from_logits(torch.stack(model(x)).numpy(), np.zeros(len(x), int)).score
    thresholds = np.full(model.num_exits - 1, np.inf)
    thresholds[0] = np.quantile(confidence[0], 2 / 3)
    thresholds[1] = np.quantile(confidence[1][confidence[0] < thresholds[0]], 1 / 2)
    return thresholds


@pytest.mark.parametrize("batch", [1, 64])
def test_everyone_leaving_at_exit_0_runs_nothing_after_its_block(loaded, batch):
    model, x, _, _ = loaded
    x = x[:batch]
    thresholds = np.r_[0.0, np.full(model.num_exits - 2, np.inf)]
    (prediction, exits), counts = counted(model, lambda: early_exit_forward(model, x, thresholds))
    first = model.exit_blocks[0]
    assert all(counts[f"block{i}"] == 1 for i in range(first + 1))
    assert all(counts[f"block{i}"] == 0 for i in range(first + 1, len(model.blocks))), counts
    assert counts["head0"] == 1 and counts["classifier"] == 0
    assert all(counts[f"head{k}"] == 0 for k in range(1, len(model.heads))), counts
    with evaluating(model):
        expected = model(x)[0].argmax(dim=-1).numpy()
    assert (exits == 0).all() and np.array_equal(prediction, expected)


def test_closed_exits_run_the_backbone_alone(loaded):
    model, x, _, _ = loaded
    x = x[:32]
    (prediction, exits), counts = counted(model, lambda: early_exit_forward(model, x, np.full(3, np.inf)))
    assert all(counts[f"block{i}"] == 1 for i in range(len(model.blocks))) and counts["classifier"] == 1
    assert all(counts[f"head{k}"] == 0 for k in range(len(model.heads))), counts
    (baseline, _), base_counts = counted(model, lambda: backbone_forward(model, x))
    assert base_counts == counts, "the baseline (backbone alone) runs exactly what a forward with no open exit runs"
    assert (exits == model.num_exits - 1).all() and np.array_equal(prediction, baseline)


def test_a_sample_that_leaves_runs_no_later_block(loaded):
    model, x, _, _ = loaded
    thresholds = mixed_thresholds(model, x)
    for sample in x[:40].split(1):
        (_, (exit_,)), counts = counted(model, lambda sample=sample: early_exit_forward(model, sample, thresholds))
        last_block = model.exit_blocks[exit_] if exit_ < model.num_exits - 1 else len(model.blocks) - 1
        assert [counts[f"block{i}"] for i in range(len(model.blocks))] == \
            [1] * (last_block + 1) + [0] * (len(model.blocks) - last_block - 1)
        assert counts["classifier"] == (exit_ == model.num_exits - 1)


def test_batched_early_exit_drops_finished_samples_and_answers_as_batch_size_1(loaded):
    model, x, _, _ = loaded
    thresholds = mixed_thresholds(model, x)
    with evaluating(model):
        batched = [early_exit_forward(model, chunk, thresholds) for chunk in x.split(64)]
        single = [early_exit_forward(model, sample, thresholds) for sample in x.split(1)]
    prediction, exits = (np.concatenate(parts) for parts in zip(*batched))
    assert np.array_equal(prediction, np.concatenate([p for p, _ in single]))
    assert np.array_equal(exits, np.concatenate([e for _, e in single]))
    assert len(set(exits)) >= 3, "the thresholds should spread the samples over exits"
    (_, _), counts = counted(model, lambda: early_exit_forward(model, x[:64], thresholds))
    assert counts["block0"] == 1 and counts["classifier"] == (exits[:64] == model.num_exits - 1).any()


def test_exits_agree_with_evaluate_on_the_stored_logits(loaded):
    """For every operating point the command times (the selected ones included), the forward leaves where
    evaluate's exit_decisions sends the stored logits, but for samples on a threshold to float noise."""
    model, x, stored, selected = loaded
    val = ExitOutputs.from_logits(stored["val"], stored["val_y"])
    points = operating_points(selected, val.score)
    assert {s for p in points for s in p.selections} >= {"baseline", "exit_0", "at_25pct", "at_100pct"}
    points += [Point(policy, point, param, curve_thresholds(policy, point, param, val.score), ())
               for policy, point, param in (("entropy", 70, THRESHOLD_GRID[70]), ("patience", 1, 2.0),
                                            ("ensemble", 80, THRESHOLD_GRID[80]))]
    for point in points:
        rule = POLICY_RULE.get(point.policy, "max_softmax")
        test = ExitOutputs.from_logits(stored["test"], stored["test_y"], rule)
        decided = exit_decisions(test.score, point.thresholds)
        with evaluating(model):
            prediction, exits = early_exit_forward(model, x, point.thresholds, rule)
            single = np.concatenate([early_exit_forward(model, s, point.thresholds, rule)[1]
                                     for s in x[:50].split(1)])
        for got, want in ((exits, decided), (single, decided[:50])):
            differ = np.flatnonzero(got != want)
            first = np.minimum(got, want)[differ]
            gap = np.abs(test.score[first, differ] - point.thresholds[first])
            assert (gap < 1e-5).all(), (point, differ, gap)
        same = exits == decided
        assert np.array_equal(prediction[same], test.prediction[decided, np.arange(len(decided))][same])


def test_bench_latency_writes_the_run_table(results):
    _, out, run_id = results
    result = bench("latency", run_id, "--results", out, "--samples", 12, "--repeats", 1, "--batch-size", 100)
    assert result.exit_code == 0, result.output
    table = pd.read_csv(out / "runs" / run_id / "latency.csv")
    assert list(table.columns) == COLUMNS
    printed = result.stdout.splitlines()                # the table is printed, not only where it was written
    assert printed[0].split() == ["selection", "policy", "accuracy", "FLOPs", "speed-up", "measured", "bs1",
                                  "measured", "batched", "ms/sample", "bs1"]
    assert [line.split()[0] for line in printed[1:len(table) + 1]] == list(table.selection)
    assert list(table.selection[:4]) == ["baseline", "exit_0", "exit_1", "exit_2"]
    assert set(table.selection) == {"baseline", "exit_0", "exit_1", "exit_2", "at_25pct", "at_50pct", "at_75pct",
                                    "at_100pct"}
    baseline = table.set_index("selection").loc["baseline"]
    assert baseline.measured_speedup_bs1 == 1 and baseline.measured_speedup_batched == 1
    assert baseline.predicted_speedup == 1 and baseline.flops == baseline.backbone_flops
    assert (table.exit_disagreements + table.prediction_disagreements <= 1).all()
    assert np.allclose(table.accuracy, table.stored_accuracy, atol=1.5 / table.test_samples.iloc[0])
    assert (table.timed_samples == 12).all() and (table.threads == 1).all() and (table.device == "cpu").all()
    assert (table.latency_bs1_ms > 0).all() and (table.throughput > 0).all()
    exit_0 = table.set_index("selection").loc["exit_0"]
    assert exit_0.predicted_speedup > 2 and exit_0.exit_shares.split()[0] == "1"
    assert (table.evaluated_flops >= table.flops).all()   # closed exits' heads are not run
    selected = pd.read_csv(out / "runs" / run_id / "selected.csv").set_index("selection")
    for row in table[table.selection.str.startswith("at_")].itertuples():
        assert np.isclose(row.stored_accuracy, selected.loc[row.selection, "test_accuracy"])


def test_bench_latency_of_a_grid_writes_the_table_and_counts_runs_without_a_model(results, tmp_path):
    grid, out, run_id = results
    result = bench("latency", "--grid", grid, "--results", out, "--samples", 5, "--repeats", 1)
    assert result.exit_code == 0, result.output
    assert "1 runs measured, 0 skipped" in result.stdout
    table = pd.read_csv(out / "tables" / "latency.csv")
    assert list(table.columns) == COLUMNS and set(table.run_id) == {run_id}
    drop_model(out, run_id)
    (out / "tables" / "latency.csv").unlink()
    result = bench("latency", "--grid", grid, "--results", out, "--samples", 5, "--repeats", 1)
    assert_one_line_error(result, "none of the 1 reported runs", "1 have no model.pt", "--save-models")
    assert not (out / "tables" / "latency.csv").exists()


def drop_model(out, run_id):
    """The run as `bench run` without --save-models leaves it: no model.pt, metrics.json's checksums without it."""
    folder = out / "runs" / run_id
    (folder / "model.pt").unlink()
    (folder / "latency.csv").unlink(missing_ok=True)
    metrics = read_json(folder / "metrics.json")
    write_json(folder / "metrics.json", {**metrics, "files": {k: v for k, v in folder_digests(folder).items()
                                                              if k != "metrics.json"}})


def test_a_run_without_model_pt_is_one_line_naming_the_fix(results):
    _, out, run_id = results
    drop_model(out, run_id)
    assert ResultsStore(out).state(run_id) == "done"
    result = bench("latency", run_id, "--results", out)
    assert_one_line_error(result, run_id, "no model.pt", "--save-models")
    assert not (out / "runs" / run_id / "latency.csv").exists()


def test_a_corrupt_model_pt_and_an_unknown_run_are_one_line_each(results):
    _, out, run_id = results
    assert_one_line_error(bench("latency", "0123456789ab", "--results", out), "no run '0123456789ab'")
    assert_one_line_error(bench("latency", "--results", out), "RUN_ID", "--grid")
    model = out / "runs" / run_id / "model.pt"
    model.write_bytes(model.read_bytes()[:1000])
    result = bench("latency", run_id, "--results", out)
    assert_one_line_error(result, str(model), "--save-models")
    assert not (out / "runs" / run_id / "latency.csv").exists()


@pytest.mark.parametrize("regime", ["joint+boosted", "joint+ztw"])
def test_early_exit_runs_the_exit_combiner_and_leaves_where_evaluation_does(regime):
    """A model whose exits combine earlier heads (boosted's additive ensemble; ztw's cascades and fitted
    ensembles) leaves each row where evaluation's full forward would, a closed exit's head still feeding the next."""
    digits = load_dataset("digits", "/nonexistent")
    spec = RunSpec(dataset="digits", arch="small_cnn", regime=regime, seed=0,
                   train={"epochs": 1, "p1_epochs": None, "batch_size": 64, "optimizer": "sgd", "lr": 0.05,
                          "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "eval_every": 1},
                   model={"head": "pool", "exits": "flops:0.25,0.5,0.75"})
    model = initial_model(spec, digits, torch.device("cpu"))
    if regime == "joint+ztw":                                   # as after its ensemble phase
        model.combiner.begin_last_phase()
        with torch.no_grad():
            for parameter in model.combiner.last_phase_parameters():
                parameter.normal_(0, 0.5)
    x_test, prepare = held(digits, "test")
    x = prepare(x_test)
    with evaluating(model):
        outputs = ExitOutputs.from_logits(torch.stack(model(x)).numpy(), digits.y_test.numpy())
    thresholds = np.full(model.num_exits - 1, np.inf)
    thresholds[1] = np.quantile(outputs.score[1], 0.5)            # exit 0 closed: its head still feeds exit 1
    decided = exit_decisions(outputs.score, thresholds)
    with evaluating(model):
        prediction, exits = early_exit_forward(model, x, thresholds)
    differ = np.flatnonzero(exits != decided)
    first = np.minimum(exits, decided)[differ]
    assert (np.abs(outputs.score[first, differ] - thresholds[first]) < 1e-5).all()     # float noise at a threshold
    assert (decided == 1).any() and (decided == model.num_exits - 1).any()
    same = exits == decided
    assert np.array_equal(prediction[same], outputs.prediction[decided, np.arange(len(decided))][same])
