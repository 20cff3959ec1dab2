"""The Python API (benchmark/api.py), called as a notebook user calls it, against known answers: the suite's own
runs — their stored logits, tables and trained weights."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmark.api import (claim, draw_critical_difference, draw_pareto, evaluate_model, evaluate_outputs,  # noqa: E402
                           exit_flops_of, train_model)
from benchmark.analyze import load_trained  # noqa: E402
from benchmark.data import load_dataset  # noqa: E402
from benchmark.pipeline import initial_model  # noqa: E402
from benchmark.spec import RunSpec  # noqa: E402
from benchmark.store import ResultsStore, read_csv, read_json  # noqa: E402

CPU = torch.device("cpu")


def stored_run(results, regime: str):
    """(spec, folder, metrics) of the done run of `regime` in a results folder."""
    store = ResultsStore(results)
    for run_id in store.done_run_ids():
        spec = RunSpec.from_json(read_json(store.run_dir(run_id) / "spec.json"))
        if spec.regime == regime:
            return spec, store.run_dir(run_id), read_json(store.run_dir(run_id) / "metrics.json")
    raise LookupError(regime)


def test_evaluate_outputs_of_a_runs_logits_gives_the_runs_numbers(smoke_results):
    _, results, _ = smoke_results
    spec, folder, metrics = stored_run(results, "mixed")
    logits = np.load(folder / "logits.npz")
    result = evaluate_outputs(logits["val"], logits["val_y"], logits["test"], logits["test_y"], logits["exit_flops"],
                              backbone_flops=metrics["flops"]["backbone"], name="mixed", dataset="digits",
                              arch="small_cnn", seed=0)
    assert result.summary == metrics["summary"]
    own_exits = read_csv(folder / "exits.csv")
    assert np.array_equal(result.exits.test_accuracy, own_exits.test_accuracy)
    assert list(result.curves.columns[:5]) == ["run_id", "dataset", "arch", "regime", "seed"]
    pd.testing.assert_frame_equal(result.curves.drop(columns=["run_id", "dataset", "arch", "regime", "seed"]),
                                  read_csv(folder / "curves.csv").drop(columns="run_id"))
    assert result.robustness is None and len(result.calibration) == metrics["num_exits"]
    assert result.row().iloc[0][["regime", "seed", "auc_normalised"]].tolist() == [
        "mixed", 0, metrics["summary"]["auc_normalised"]]


def test_evaluate_outputs_names_a_problem_as_bench_evaluate_does():
    logits, labels = np.zeros((2, 40, 2)), np.arange(40) % 2
    with pytest.raises(ValueError, match="evaluate_outputs: exit_flops must be positive and strictly increasing"):
        evaluate_outputs(logits, labels, logits, labels, [2.0, 1.0])
    with pytest.raises(ValueError, match="are not probabilities"):
        evaluate_outputs(logits, labels, logits, labels, [1.0, 2.0], probabilities=True)


def test_evaluate_model_of_a_trained_run_gives_its_numbers_and_counts_its_flops(analysed):
    _, out = analysed
    spec, folder, metrics = stored_run(out, "joint")
    data = load_dataset(spec.dataset, "/nonexistent")
    model = load_trained(spec, ResultsStore(out), data, CPU)
    result = evaluate_model(model, (data.x_val, data.y_val), (data.x_test, data.y_test), batch_size=512)
    assert result.summary == metrics["summary"]                   # FLOPs counted here, logits collected here
    assert exit_flops_of(model, data.input_shape) == (metrics["flops"]["exits"], metrics["flops"]["backbone"])


class TwoExits(nn.Module):
    """A user's own multi-exit model: any module whose forward returns a list of per-exit logits."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(64, 10), nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        x = x.flatten(1)
        return [self.first(x), self.second(x)]


def test_any_module_returning_per_exit_logits_is_evaluated_given_its_flops():
    data = load_dataset("digits", "/nonexistent")
    model = TwoExits()
    val, test = (data.x_val, data.y_val), (data.x_test, data.y_test)
    with pytest.raises(ValueError, match="pass exit_flops, or build the model as .*MultiExitNet"):
        evaluate_model(model, val, test)
    result = evaluate_model(model, val, test, exit_flops=[1280.0, 5504.0])
    with torch.no_grad():
        expected = [(out.argmax(1) == data.y_test).float().mean().item() for out in model.eval()(data.x_test)]
    assert result.exits.test_accuracy.tolist() == pytest.approx(expected)
    assert result.exits.flops_fraction.iloc[-1] == 1.0


def test_train_model_is_the_suites_trainer(smoke_results):
    """Known answer: the smoke grid's mixed run, retrained through the API from the same initial weights and
    settings, gives bitwise its stored validation logits."""
    _, results, _ = smoke_results
    spec, folder, _ = stored_run(results, "mixed")
    data = load_dataset(spec.dataset, "/nonexistent")
    model = initial_model(spec, data, CPU)
    history = train_model(model, "mixed", data, epochs=spec.train["epochs"], lr=spec.train["lr"],
                          batch_size=spec.train["batch_size"], seed=spec.pairing_seed)
    assert list(history.phase.unique()) == ["P1", "P2"]
    stored = np.load(folder / "logits.npz")
    result = evaluate_model(model, (data.x_val, data.y_val), (data.x_test, data.y_test), batch_size=512)
    assert np.array_equal(result.exits.val_accuracy, read_csv(folder / "exits.csv").val_accuracy)
    from benchmark.pipeline import collect_logits
    assert np.array_equal(collect_logits(model, data.x_val), stored["val"])


def test_train_model_disjoint_leaves_the_backbone_as_p1_left_it():
    """disjoint's defining property: after P1, its P3 trains the heads on a frozen backbone."""
    data = load_dataset("digits", "/nonexistent")
    spec = RunSpec(dataset="digits", arch="small_cnn", regime="disjoint", seed=0,
                   train={"epochs": 2, "p1_epochs": None, "batch_size": 64, "optimizer": "sgd", "lr": 0.05,
                          "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "eval_every": 1},
                   model={"head": "pool", "exits": "flops:0.25,0.5,0.75"})
    p1_only, disjoint = initial_model(spec, data, CPU), initial_model(spec, data, CPU)
    initial_heads = [p.detach().clone() for p in disjoint.head_parameters()]
    assert list(train_model(p1_only, "disjoint", data, epochs=1, p1_epochs=1, lr=0.05).phase.unique()) == ["P1"]
    history = train_model(disjoint, "disjoint", data, epochs=2, p1_epochs=1, lr=0.05)
    assert list(history.phase.unique()) == ["P1", "P3"]
    for a, b in zip(p1_only.backbone_parameters(), disjoint.backbone_parameters()):
        assert torch.equal(a, b)                                   # P3 left the backbone as P1 did
    assert not any(torch.equal(a, b) for a, b in zip(initial_heads, disjoint.head_parameters()))   # heads trained
    with pytest.raises(ValueError, match="wrap your modules as"):
        train_model(TwoExits(), "joint", data, epochs=1, lr=0.05)


def test_claim_pairs_two_tables_by_cell_and_seed():
    a = pd.DataFrame({"dataset": "d", "arch": "m", "seed": [0, 1, 2, 3], "auc_normalised": [0.80, 0.82, 0.81, 0.83]})
    b = a.assign(auc_normalised=a.auc_normalised - [0.05, 0.04, 0.06, 0.05])
    row = claim(a, b, names=("ours", "theirs"))
    assert row.n_pairs == 4 and row.mean_difference == pytest.approx(0.05)
    assert row.verdict == "reproduced"
    reverse = claim(b, a, names=("theirs", "ours"))
    assert reverse.verdict == "contradicted"
    with pytest.raises(ValueError, match="no column seed"):
        claim(a.drop(columns="seed"), b)


def test_the_figures_draw_on_a_users_axis(smoke_results):
    _, results, _ = smoke_results
    tables = results / "tables"
    fig, (left, right) = plt.subplots(1, 2)
    draw_pareto(left, read_csv(tables / "curves.csv"))
    assert len(left.lines) >= 3 and left.get_xscale() == "log" and left.get_legend() is not None
    runs = read_csv(tables / "runs.csv")
    two_cells = pd.concat([runs, runs.assign(arch="copy")])
    draw_critical_difference(right, two_cells)
    labels = [text.get_text() for text in right.texts]
    assert any(label.startswith("joint (") for label in labels) and any("CD = " in label for label in labels)
    plt.close(fig)
    with pytest.raises(ValueError, match="one cell"):
        draw_pareto(plt.subplots()[1], read_csv(tables / "curves.csv").pipe(
            lambda c: pd.concat([c, c.assign(arch="copy")])))
