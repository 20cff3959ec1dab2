"""A grid's `[model] weights`: runs that start from a pretrained backbone (benchmark/weights.py). The weights are a
state dict saved by the test itself."""
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from benchmark.api import train_model
from benchmark.cli import main
from benchmark.data import load_dataset
from benchmark.grid import load_grid
from benchmark.models import build_model
from benchmark.pipeline import collect_logits, initial_model
from benchmark.spec import RunSpec
from benchmark.store import ResultsStore, read_csv, read_json, read_torch
from benchmark.weights import load_backbone, read_weights
from conftest import SERIAL_RUN, write_grid

CPU = torch.device("cpu")


def save_backbone(path, input_shape=(1, 8, 8), num_classes=10, seed=7, drop=()):
    """torch.save of a small_cnn's state dict (random weights of `seed`), without the keys starting with `drop`."""
    torch.manual_seed(seed)
    model = build_model("small_cnn", num_classes, input_shape, head="pool", exits="flops:0.25,0.5,0.75")
    torch.save({k: v for k, v in model.state_dict().items() if not k.startswith(tuple(drop) or ("\0",))}, path)
    return path


def weights_grid(folder, weights, regimes=("joint", "disjoint", "mixed")):
    return write_grid(folder / "grid.toml", regimes=regimes, epochs=2,
                      extra="" if weights is None else f'weights = "{weights}"\n')


def bench(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_the_files_content_enters_the_run_id_not_its_path(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    save_backbone(tmp_path / "a" / "w.pt")
    shutil.copy(tmp_path / "a" / "w.pt", tmp_path / "b" / "moved.pt")
    save_backbone(tmp_path / "b" / "other.pt", seed=8)
    ids = {name: [s.run_id for s in load_grid(str(weights_grid(tmp_path / folder, file)), "/nonexistent").specs]
           for name, folder, file in (("plain", "a", None), ("a", "a", "w.pt"), ("moved", "b", "moved.pt"),
                                      ("other", "b", "other.pt"))}
    assert ids["a"] == ids["moved"]
    assert not set(ids["a"]) & set(ids["plain"]) and not set(ids["a"]) & set(ids["other"])
    spec = load_grid(str(weights_grid(tmp_path / "a", "w.pt")), "/nonexistent").specs[0]
    assert spec.model["weights"].startswith("sha256:") and len(spec.model["weights"]) == 7 + 64


def test_runs_start_from_the_weights_and_skip_p1(tmp_path):
    weights = save_backbone(tmp_path / "backbone.pt")
    grid = weights_grid(tmp_path, "backbone.pt")
    dry = bench("run", "--grid", grid, "--results", tmp_path / "out", "--dry-run")
    assert dry.exit_code == 0 and dry.output.count("pretrained") == 3, dry.output
    result = bench("run", "--grid", grid, "--results", tmp_path / "out", "--save-models", *SERIAL_RUN)
    assert result.exit_code == 0, result.output
    store = ResultsStore(tmp_path / "out")
    digest = load_grid(str(grid), "/nonexistent").specs[0].model["weights"]
    assert (tmp_path / "out" / "weights" / f"{digest[7:]}.pt").is_file()    # the exact weights, kept with the runs
    assert not (tmp_path / "out" / "backbones").exists()                     # no P1 was trained
    runs = read_csv(tmp_path / "out" / "tables" / "runs.csv").set_index("regime")
    assert (runs.weights == digest).all()
    saved = read_weights(weights)
    for regime in ("disjoint", "mixed", "joint"):
        folder = store.run_dir(runs.loc[regime, "run_id"])
        metrics = read_json(folder / "metrics.json")
        assert metrics["pretrained"] == {"weights": digest, "classifier_loaded": True}
        phases = [p["phase"] for p in metrics["cost"]["phases"]]
        history = read_csv(folder / "history.csv")
        assert "P1" not in set(history.phase)
        if regime != "joint":
            assert metrics["cost"]["phases"][0] == {**metrics["cost"]["phases"][0], "phase": "P1", "epochs": 0,
                                                    "optimizer_steps": 0, "skipped": f"pretrained weights {digest}"}
            assert phases[1] == ("P3" if regime == "disjoint" else "P2")
    model = read_torch(store.run_dir(runs.loc["disjoint", "run_id"]) / "model.pt")
    backbone = [k for k in saved if k.startswith(("blocks.", "classifier."))]
    assert all(torch.equal(model[k], saved[k]) for k in backbone)           # disjoint: frozen pretrained backbone
    assert not all(torch.equal(model[k], saved[k]) for k in saved if k.startswith("heads."))   # heads trained

    # joint fine-tunes from the weights: the suite's trainer from the loaded backbone gives its logits bitwise
    spec = RunSpec.from_json(read_json(store.run_dir(runs.loc["joint", "run_id"]) / "spec.json"))
    data = load_dataset("digits", "/nonexistent")
    model = initial_model(spec, data, CPU)
    assert load_backbone(model, saved)
    train_model(model, "joint", data, epochs=2, lr=spec.train["lr"], batch_size=spec.train["batch_size"],
                seed=spec.pairing_seed)
    stored = np.load(store.run_dir(runs.loc["joint", "run_id"]) / "logits.npz")
    assert np.array_equal(collect_logits(model, data.x_val), stored["val"])

    report = bench("report", "--grid", grid, "--results", tmp_path / "out")
    assert report.exit_code == 0, report.output
    assert f"start from pretrained weights `{digest[:19]}…`" in (tmp_path / "out" / "REPORT.md").read_text()


@pytest.mark.parametrize("case, message", [
    ("missing", "no file"),
    ("other shapes", "'blocks.0.0.weight' has shape (16, 3, 3, 3), the network's is (16, 1, 3, 3)"),
    ("not a state dict", "is not a state dict saved by torch.save"),
    ("no blocks", "has no 'blocks.0.0.weight'"),
    ("no classifier for disjoint", "has no classifier for digits's 10 classes, which disjoint would never train"),
    ("imagenet of small_cnn", "small_cnn is defined by exitbench and has no ImageNet weights"),
])
def test_a_missing_or_mismatched_file_is_one_line_exit_2(tmp_path, case, message):
    file = {"missing": lambda p: "nowhere.pt",
            "other shapes": lambda p: save_backbone(p / "w.pt", input_shape=(3, 8, 8)).name,
            "not a state dict": lambda p: (p / "w.pt").write_text("weights") and "w.pt",
            "no blocks": lambda p: save_backbone(p / "w.pt", drop=("blocks.0",)).name,
            "no classifier for disjoint": lambda p: save_backbone(p / "w.pt", drop=("classifier.",)).name,
            "imagenet of small_cnn": lambda p: "imagenet"}[case](tmp_path)
    result = bench("run", "--grid", weights_grid(tmp_path, file), "--results", tmp_path / "out", "--dry-run")
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


def test_imagenet_weights_of_a_torchvision_arch_are_planned_without_downloading(tmp_path):
    grid = write_grid(tmp_path / "grid.toml", archs=("resnet18",), regimes=("joint",),
                      extra='weights = "imagenet"\n')
    (spec,) = load_grid(str(grid), "/nonexistent").specs
    assert spec.model["weights"] == "imagenet"
    assert spec.run_id not in {s.run_id for s in load_grid(str(write_grid(tmp_path / "plain.toml", archs=("resnet18",),
                                                                            regimes=("joint",))), "/nonexistent").specs}


def test_without_a_classifier_joint_and_mixed_fine_tune_with_a_fresh_one(tmp_path):
    save_backbone(tmp_path / "w.pt", drop=("classifier.",))
    result = bench("run", "--grid", weights_grid(tmp_path, "w.pt", regimes=("joint", "mixed")), "--results",
                   tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output


def test_the_cost_estimate_charges_a_pretrained_run_no_p1(tmp_path):
    from benchmark import cost_model
    save_backbone(tmp_path / "w.pt")
    plain = load_grid(str(weights_grid(tmp_path, None, regimes=("disjoint",))), "/nonexistent").specs
    pretrained = load_grid(str(weights_grid(tmp_path, "w.pt", regimes=("disjoint",))), "/nonexistent").specs
    (with_p1,), (without,) = (cost_model.estimate([("report", s) for s in specs], None, device_type="cpu").cells
                              for specs in (plain, pretrained))
    assert (with_p1.shared_p1, without.shared_p1) == (1, 0)
    assert without.train_flops < with_p1.train_flops


def test_a_trained_imagenet_run_loads_for_analysis_without_downloading_its_weights_again(tmp_path):
    from benchmark.analyze import load_trained
    from benchmark.store import write_torch
    (spec,) = load_grid(str(write_grid(tmp_path / "grid.toml", archs=("resnet18",), regimes=("joint",),
                                       extra='weights = "imagenet"\n')), "/nonexistent").specs
    data = load_dataset("digits", "/nonexistent")
    trained = build_model("resnet18", 10, data.input_shape, head=spec.model["head"], exits=spec.model["exits"])
    store = ResultsStore(tmp_path / "out")
    store.run_dir(spec.run_id).mkdir(parents=True)
    write_torch(store.run_dir(spec.run_id) / "model.pt", trained.state_dict())
    model = load_trained(spec, store, data, CPU)              # offline here: a download would fail
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
