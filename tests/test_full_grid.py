"""The `full` grid: its cells, the TinyImageNet reader (on a fake folder in the official layout) and the cost model
behind `bench run --grid full --dry-run`'s estimate."""
import csv
import dataclasses
import re
import tomllib

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from benchmark import cost_model, data
from benchmark.data import tinyimagenet
from benchmark.cli import main
from benchmark.data import clear_cache, load_dataset
from benchmark.errors import DataUnavailable
from benchmark.grid import GRIDS_DIR, load_grid
from benchmark.models import build_model
from conftest import write_grid

# One xdist worker runs this module: the dry runs' FLOP counts of the 21 full cells on meta-device models (~25 s of
# CPU, cost_model.step_flops_per_example) and the `full` fixture are cached per process, so they are counted once.
pytestmark = pytest.mark.xdist_group("full_grid")

FULL_ARCHS = ["resnet18", "resnet34", "resnet50", "vgg16_bn", "mobilenet_v2", "vit_tiny", "msdnet"]


@pytest.fixture(autouse=True)
def fresh_data_cache():
    """The reader tests load a fake TinyImageNet: no other test may find it in the cache (nor the reverse)."""
    clear_cache()
    yield
    clear_cache()


@pytest.fixture(scope="module")
def full():
    return load_grid("full", "/nonexistent")          # checks every cell's head and exits (meta backbones)


# --- the grid ----------------------------------------------------------------------------------------------------

def test_full_has_every_regime_of_the_leaderboard_on_the_stated_cells(full):
    leaderboard = tomllib.loads((GRIDS_DIR / "leaderboard.toml").read_text())
    assert sorted({s.regime for s in full.specs}) == sorted(leaderboard["regimes"])
    assert {s.dataset for s in full.specs} == {"cifar10", "cifar100", "tinyimagenet"}
    assert sorted({s.arch for s in full.specs}) == sorted(FULL_ARCHS)
    assert {s.seed for s in full.specs} == {0, 1, 2}
    assert len(full.specs) == 3 * len(FULL_ARCHS) * len(leaderboard["regimes"]) * 3       # no cell excluded
    assert {s.train["epochs"] for s in full.specs} == {200}
    assert not set(full.tuning["seeds"]) & {0, 1, 2} and full.resources["gpus_per_run"] == 1
    for optimizer in ("sgd", "adamw"):           # each optimizer's lr set holds its P1 lr
        assert {s.train["lr"] for s in full.specs if s.train["optimizer"] == optimizer} <= set(full.tuning["lr"][optimizer])
    assert {s.train["optimizer"] for s in full.specs if s.arch == "vit_tiny"} == {"adamw"}


def test_msdnet_has_seven_exits_with_its_own_head_also_at_64_px(full):
    msdnet = {(s.model["head"], s.model["exits"]) for s in full.specs if s.arch == "msdnet"}
    assert msdnet == {("auto", "all")}
    for shape, classes in [((3, 32, 32), 100), ((3, 64, 64), 200)]:
        with torch.device("meta"):
            model = build_model("msdnet", classes, shape, head="auto", exits="all")
        assert model.num_exits == 7 and type(model.heads[0]).__name__ == "MSDNetHead"


# --- TinyImageNet ------------------------------------------------------------------------------------------------

WNIDS = ["n0300", "n0100", "n0200"]          # deliberately not sorted: the class order is the file's


def write_tiny_imagenet(root, per_class=10, val=6):
    """A fake TinyImageNet in the official zip's layout: class k's images are a solid grey of level 40 (k + 1), so a
    decoded image tells its label; the validation images are greyscale JPEGs (TinyImageNet has some)."""
    folder = root / "tiny-imagenet-200"
    folder.mkdir(parents=True)
    (folder / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    for k, wnid in enumerate(WNIDS):
        images = folder / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (64, 64), (40 * (k + 1),) * 3).save(images / f"{wnid}_{i}.JPEG")
    (folder / "val" / "images").mkdir(parents=True)
    labels = [(2 * i + 1) % 3 for i in range(val)]
    lines = []
    for i, label in enumerate(labels):
        Image.new("L", (64, 64), 40 * (label + 1)).save(folder / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{WNIDS[label]}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return folder, labels


@pytest.fixture
def three_classes(monkeypatch):
    monkeypatch.setattr(tinyimagenet, "TINY_IMAGENET_CLASSES", 3)


def grey_levels(dataset, x):
    mean, std = torch.tensor(dataset.mean).view(1, 3, 1, 1), torch.tensor(dataset.std).view(1, 3, 1, 1)
    return ((x * std + mean) * 255).mean(dim=(1, 2, 3))


def test_tiny_imagenet_reads_the_official_layout(tmp_path, three_classes):
    _, labels = write_tiny_imagenet(tmp_path)
    assert data.dataset_available("tinyimagenet", tmp_path)
    dataset = load_dataset("tinyimagenet", tmp_path)
    assert (dataset.kind, dataset.input_shape, dataset.augmentation, dataset.crop_padding) == \
        ("image", (3, 64, 64), "crop+flip", 8)
    assert (len(dataset.y_train), len(dataset.y_val), len(dataset.y_test)) == (27, 3, 6)   # val carved from train
    assert dataset.y_test.tolist() == labels                      # the official val split, val_annotations' order
    assert sorted(dataset.y_val.tolist()) == [0, 1, 2]            # stratified
    for x, y in [(dataset.x_train, dataset.y_train), (dataset.x_test, dataset.y_test)]:
        levels = grey_levels(dataset, x)                          # class k is wnids.txt's k-th line
        assert torch.allclose(levels, 40.0 * (y + 1).float(), atol=2), (levels, y)


def test_tiny_imagenet_is_cached_atomically_and_rebuilt_when_the_folder_changes(tmp_path, three_classes,
                                                                                monkeypatch):
    folder, _ = write_tiny_imagenet(tmp_path)
    first = load_dataset("tinyimagenet", tmp_path)
    cache = tmp_path / "tiny-imagenet-200.exitbench.npz"
    assert cache.is_file() and [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    clear_cache()
    monkeypatch.setattr(tinyimagenet, "_decode_images", lambda root, files: pytest.fail("decoded despite the cache"))
    assert torch.equal(load_dataset("tinyimagenet", tmp_path).x_train, first.x_train)
    monkeypatch.undo()
    monkeypatch.setattr(tinyimagenet, "TINY_IMAGENET_CLASSES", 3)
    Image.new("L", (64, 64), 40).save(folder / "val" / "images" / "val_6.JPEG")
    with open(folder / "val" / "val_annotations.txt", "a") as f:
        f.write(f"val_6.JPEG\t{WNIDS[0]}\t0\t0\t63\t63\n")
    clear_cache()
    assert load_dataset("tinyimagenet", tmp_path).y_test.tolist()[-1] == 0     # a stale cache would have 6 images


def assert_names_the_layout(message, root):
    assert str(root) in message and "tiny-imagenet-200/wnids.txt" in message
    assert "train/<wnid>/images/*.JPEG" in message and "val/val_annotations.txt" in message
    assert "http://cs231n.stanford.edu/tiny-imagenet-200.zip" in message and "unzip" in message


def test_tiny_imagenet_missing_folder_names_the_path_layout_and_where_to_get_it(tmp_path):
    assert not data.dataset_available("tinyimagenet", tmp_path) and not data.dataset_available("tinyimagenet")
    with pytest.raises(DataUnavailable) as raised:
        load_dataset("tinyimagenet", tmp_path, download=True)
    assert f"folder {tmp_path / 'tiny-imagenet-200'} does not exist" in str(raised.value)
    assert_names_the_layout(str(raised.value), tmp_path)


@pytest.mark.parametrize("damage, problem", [
    ("no val_annotations", "val_annotations.txt is missing"),
    ("unknown wnid", "with a wnid of wnids.txt"),
    ("missing image", "val_3.JPEG, listed in"),
    ("empty class", "class n0100 of wnids.txt has no images"),
    ("wrong size", "is 32x32 pixels, not 64x64"),
    ("wrong class count", "must list 200 distinct WordNet ids"),
])
def test_tiny_imagenet_malformed_layouts_are_named(tmp_path, monkeypatch, damage, problem):
    folder, _ = write_tiny_imagenet(tmp_path)
    if damage != "wrong class count":
        monkeypatch.setattr(tinyimagenet, "TINY_IMAGENET_CLASSES", 3)
    annotations = folder / "val" / "val_annotations.txt"
    if damage == "no val_annotations":
        annotations.unlink()
    elif damage == "unknown wnid":
        annotations.write_text(annotations.read_text().replace(WNIDS[1], "n9999"))
    elif damage == "missing image":
        (folder / "val" / "images" / "val_3.JPEG").unlink()
    elif damage == "empty class":
        for path in (folder / "train" / WNIDS[1] / "images").iterdir():
            path.unlink()
    elif damage == "wrong size":
        Image.new("RGB", (32, 32)).save(folder / "train" / WNIDS[2] / "images" / f"{WNIDS[2]}_0.JPEG")
    with pytest.raises(DataUnavailable) as raised:
        load_dataset("tinyimagenet", tmp_path)
    assert problem in str(raised.value)
    assert_names_the_layout(str(raised.value), tmp_path)


def test_bench_run_without_tiny_imagenet_exits_2_naming_the_layout(tmp_path):
    grid = write_grid(tmp_path / "grid.toml", datasets=("tinyimagenet",))
    result = CliRunner().invoke(main, ["run", "--grid", str(grid), "--results", str(tmp_path / "out"),
                                       "--data-root", str(tmp_path)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: TinyImageNet folder")
    assert_names_the_layout(error, tmp_path)
    assert not (tmp_path / "out" / "runs").exists()


def test_tiny_imagenet_is_listed():
    result = CliRunner().invoke(main, ["list", "datasets"])
    assert re.search(r"tinyimagenet\s+image\s+200 classes", result.stdout)


# --- the cost model ----------------------------------------------------------------------------------------------

def one_second_per_step(arch="small_cnn", shape="1x8x8", batch=64, device=("cpu", "test cpu")):
    row = {"device_type": device[0], "device_name": device[1], "arch": arch, "input_shape": shape,
           "batch_size": batch, "optimizer": "sgd", "seconds_per_step": 1.0, "threads": 1, "torch": "x",
           "date": "2026-01-01"}
    return cost_model.Calibration(device[0], device[1], (row,))


def test_cost_of_a_tiny_grid_is_steps_times_seconds_per_step_with_the_shared_p1_counted_once(tmp_path, monkeypatch):
    monkeypatch.setitem(cost_model.STEP_MULTIPLIERS, "backbone", 0.5)
    monkeypatch.setitem(cost_model.STEP_MULTIPLIERS, "heads", 0.25)
    grid = load_grid(str(write_grid(tmp_path / "g.toml", regimes=("joint", "mixed", "disjoint"), seeds=(0, 1),
                                    epochs=4)))
    # digits: 1 797 images, 360 test, 144 validation, 1 293 training: 20 steps of 64 per epoch
    assert cost_model.dataset_geometry("digits") == cost_model.Geometry(1293, 144, 360, (1, 8, 8), 10)
    steps, eval_second = 20, 1 / 64 / 3                # a forward pass per example: a third of a step's
    overhead = cost_model.RUN_OVERHEAD_SECONDS          # building, evaluating from logits, writing: per run
    val_pass, final = 144 * eval_second, (144 + 360) * eval_second + overhead
    joint = 4 * steps * 1.0 + 4 * val_pass + final     # validation every epoch (eval_every 1)
    p1 = 2 * steps * 0.5 + 2 * val_pass
    mixed_own, disjoint_own = 2 * steps * 1.0 + 2 * val_pass + final, 2 * steps * 0.25 + 2 * val_pass + final
    per_seed = joint + p1 + mixed_own + disjoint_own   # one P1 for mixed and disjoint
    estimate = cost_model.estimate([("report", s) for s in grid.specs], one_second_per_step())
    (cell,) = estimate.cells
    assert (cell.runs, cell.tuning_runs, cell.shared_p1) == (6, 0, 2)
    assert cell.seconds == pytest.approx(2 * per_seed) and cell.seconds_left == pytest.approx(2 * per_seed)
    assert per_seed == pytest.approx(80 + 20 + 40 + 10 + 10 * 144 / 192 + 3 * 504 / 192 + 3 * overhead)  # 10 val passes

    done = {s.run_id for s in grid.specs if s.seed == 0}
    partly = cost_model.estimate([("report", s) for s in grid.specs], one_second_per_step(),
                                 done=lambda s: s.run_id in done, p1_done=lambda s: s.seed == 0)
    assert partly.cells[0].seconds == pytest.approx(2 * per_seed)
    assert partly.cells[0].seconds_left == pytest.approx(per_seed)

    with_analyses = cost_model.estimate([("report", s) for s in grid.specs], one_second_per_step(), analyses=True)
    assert with_analyses.cells[0].seconds == pytest.approx(2 * per_seed + 6 * cost_model.ANALYSIS_EXAMPLES * eval_second)

    flops = cost_model.step_flops_per_example("small_cnn", 10, (1, 8, 8), "pool", "flops:0.25,0.5,0.75")
    examples = 64 * steps * (4 + 2 * 0.5 + 2 * 1.0 + 2 * 0.25)
    assert cell.train_flops == pytest.approx(2 * examples * flops)


def test_the_wall_time_spreads_the_runs_over_the_runs_at_a_time(tmp_path):
    grid = load_grid(str(write_grid(tmp_path / "g.toml", regimes=("joint", "mixed"), seeds=(0, 1, 2), epochs=20)))
    calibration = dataclasses.replace(one_second_per_step(), run_threads=1)
    estimate = cost_model.estimate([("report", s) for s in grid.specs], calibration)
    seconds = estimate.total("seconds")
    assert seconds > 1800                                # half an hour: minutes tell one and two runs at a time apart

    def wall(jobs):
        return [line for line in cost_model.format_estimate(estimate, "g", "cpu", jobs) if "wall time" in line]

    (one,), (two,) = wall(1), wall(2)
    assert f"({cost_model._clock(seconds)} from empty)" in one and "one run at a time with 1 thread(s) each" in one
    assert f"({cost_model._clock(seconds / 2)} from empty)" in two and "2 runs at a time with 1 thread(s) each" in two
    assert wall(None) == []                              # Ray: how many runs at a time is the cluster's business


def test_an_uncalibrated_cell_has_no_hours_but_still_its_flops(tmp_path):
    grid = load_grid(str(write_grid(tmp_path / "g.toml", regimes=("joint",))))
    estimate = cost_model.estimate([("report", s) for s in grid.specs], one_second_per_step(arch="cifar_resnet32"))
    assert estimate.cells[0].seconds is None and estimate.cells[0].train_flops > 0
    lines = cost_model.format_estimate(estimate, "g", "cpu")
    assert any(line.startswith("n/c: 1 cells have no calibration row on test cpu (digits/small_cnn)") for line in lines)


def test_step_flops_match_what_the_trainer_measured_in_the_step_cost_runs():
    import pandas as pd
    runs = pd.read_csv(cost_model.STEP_COST_RUNS)
    joint = runs[(runs.regime == "joint") & (runs.arch == "cifar_resnet32")].iloc[0]
    counted = cost_model.step_flops_per_example("cifar_resnet32", 10, (1, 8, 8), "pool", "flops:0.25,0.5,0.75")
    assert counted == joint.train_flops / joint.train_examples_seen


def test_multipliers_are_the_ones_the_step_cost_runs_give():
    derived = cost_model.derive_multipliers()
    assert derived == cost_model.STEP_MULTIPLIERS
    assert derived["cet"] == 2.0 and derived["l2w"] > 4 and 0.3 < derived["heads"] < 0.4


def test_calibration_rows_are_merged_by_device_and_cell(tmp_path):
    path = tmp_path / "calibration.csv"
    row = {"device_type": "cpu", "device_name": "A", "arch": "small_cnn", "input_shape": "1x8x8", "num_classes": 10,
           "batch_size": 128, "optimizer": "sgd", "seconds_per_step": 2.0, "torch": "x", "date": "d"}
    cost_model.write_calibration([row, {**row, "device_name": "B"}], path)
    cost_model.write_calibration([{**row, "seconds_per_step": 3.0}], path)
    rows = cost_model.read_calibration(path)
    assert sorted((r["device_name"], r["seconds_per_step"]) for r in rows) == [("A", 3.0), ("B", 2.0)]
    assert list(csv.reader(open(path)))[0] == cost_model.CALIBRATION_COLUMNS
    assert cost_model.choose_calibration(rows, "cpu", "A").device_name == "A"
    assert cost_model.choose_calibration(rows, "cpu", "C") is None          # another CPU says nothing of this one
    gpu = {**row, "device_type": "cuda", "device_name": "H"}
    assert cost_model.choose_calibration(rows + [gpu], "cpu", "C").device_name == "H"


def test_calibrating_measures_a_step_and_writes_its_row(tmp_path, grid_file):
    output = tmp_path / "calibration.csv"
    result = CliRunner().invoke(main, ["calibrate", "--grid", str(grid_file(regimes=("joint",))), "--device", "cpu",
                                       "--threads", "1", "--warmup", "1", "--steps", "1", "--memory-fraction", "0.5",
                                       "--output", str(output)])
    assert result.exit_code == 0, result.output
    (row,) = cost_model.read_calibration(output)
    assert (row["arch"], row["input_shape"], row["batch_size"], row["threads"]) == ("small_cnn", "1x8x8", 64, "1")
    assert row["seconds_per_step"] > 0 and row["device_name"] == cost_model.this_device_name("cpu")
    assert re.search(r"^small_cnn at 1x8x8, batch 64: [\d.e-]+ s/step", result.stdout, re.M), result.stdout
    assert f"1 rows merged into {output}" in result.stdout

    estimate = CliRunner().invoke(main, ["calibrate", "--grid", str(grid_file(regimes=("joint",))), "--estimate",
                                         "--device", "cpu", "--output", str(output)])     # reads it, measures nothing
    assert estimate.exit_code == 0, estimate.output
    assert re.search(r"^total: 1 runs, [\d.]+ CPU-hours on ", estimate.stdout, re.M), estimate.stdout
    assert cost_model.read_calibration(output) == [row]


@pytest.mark.parametrize("args, fragments", [
    (["--grid", "quik"], ["unknown grid 'quik'", "full"]),
    (["--only", "arch=resnet1000"], ["--only arch=resnet1000 matches none"]),
])
def test_calibrate_says_a_users_mistake_in_one_line(tmp_path, args, fragments):
    result = CliRunner().invoke(main, ["calibrate", *args, "--device", "cpu", "--output", str(tmp_path / "c.csv")])
    assert result.exit_code == 2, result.output
    assert result.stderr.splitlines() == [result.stderr.strip()] and result.stderr.startswith("error: ")
    assert "Traceback" not in result.output and not (tmp_path / "c.csv").exists()
    assert all(fragment in result.stderr for fragment in fragments), result.stderr


# --- the dry run -------------------------------------------------------------------------------------------------

def write_calibration_fixture(path, device_type, device_name, seconds):
    rows = [{"device_type": device_type, "device_name": device_name, "arch": arch, "input_shape": shape,
             "num_classes": classes, "batch_size": 128, "optimizer": "adamw" if arch == "vit_tiny" else "sgd",
             "seconds_per_step": seconds, "threads": 1, "torch": "fixture", "date": "2026-01-01"}
            for arch in FULL_ARCHS for shape, classes in [("3x32x32", 100), ("3x64x64", 200)]]
    cost_model.write_calibration(rows, path)


def dry_run_full(tmp_path, monkeypatch, calibration):
    monkeypatch.setenv(cost_model.CALIBRATION_ENV, str(calibration))
    result = CliRunner().invoke(main, ["run", "--grid", "full", "--dry-run", "--device", "cpu", "--data-root",
                                       str(tmp_path / "no-data"), "--results", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    return result.stdout


def cell_hours(stdout):
    cells = re.findall(r"^  (cifar10|cifar100|tinyimagenet)\s+(\S+)\s+120\s+75\s+4\s+[\d,.]+\s+([\d.]+)\s+([\d.]+)$",
                       stdout, re.M)
    return {(d, a): float(h) for d, a, h, _ in cells}


def test_dry_run_of_full_prints_cpu_hours_per_cell_and_in_total_and_says_gpus_are_not_calibrated(tmp_path,
                                                                                                 monkeypatch):
    calibration = tmp_path / "calibration.csv"
    write_calibration_fixture(calibration, "cpu", cost_model.this_device_name("cpu"), 0.01)
    stdout = dry_run_full(tmp_path, monkeypatch, calibration)
    assert "945 runs (945 tuning)" in stdout and "945 reported runs await" in stdout       # the listing stays
    hours = cell_hours(stdout)
    assert len(hours) == 21 and all(h > 0 for h in hours.values())
    total = re.search(r"^total: 2520 runs, ([\d.]+) CPU-hours on (.+) \(([\d.]+) still to run\)$", stdout, re.M)
    assert total and total.group(2) == cost_model.this_device_name("cpu")
    assert float(total.group(1)) == pytest.approx(sum(hours.values()), rel=0.01)   # cells print rounded
    assert "GPU-hours: not calibrated yet for any CUDA device" in stdout
    assert "bench calibrate --grid full --device cuda" in stdout


def test_dry_run_of_full_uses_a_gpu_calibration_where_one_is_committed(tmp_path, monkeypatch):
    calibration = tmp_path / "calibration.csv"
    write_calibration_fixture(calibration, "cuda", "NVIDIA Fixture GPU", 0.05)
    stdout = dry_run_full(tmp_path, monkeypatch, calibration)
    hours = cell_hours(stdout)
    total = re.search(r"^total: 2520 runs, ([\d.]+) GPU-hours on NVIDIA Fixture GPU", stdout, re.M)
    assert total and float(total.group(1)) == pytest.approx(sum(hours.values()), rel=0.01)
    assert "not calibrated" not in stdout
    # every cell is steps x 0.05 s: tinyimagenet's 703 steps per epoch against CIFAR's 351
    assert hours["tinyimagenet", "resnet18"] / hours["cifar10", "resnet18"] == pytest.approx(703 / 351, rel=0.01)
