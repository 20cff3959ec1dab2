"""The GPU fast path, exercised on the CPU where it can be: uint8-held images normalised per batch (bitwise equal to
normalising upfront), augmentation on uint8 pixels, `--fast` in the run id and spec.json, torch.compile and its
fallback to eager, the per-device evaluation batch size."""

import logging
import warnings
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from benchmark.data import build as data_build
from benchmark.data import registry as data_registry
from benchmark import train as train_module
from benchmark.cli import main
from benchmark.data import channel_statistics, load_dataset, pixel_lookup
from benchmark.store import read_csv
from benchmark.determinism import EVAL_BATCH_SIZES, configure
from benchmark.grid import load_grid
from benchmark.models import build_model
from benchmark.pipeline import collect_logits, execute_run
from benchmark.spec import RunSpec
from benchmark.store import ResultsStore
from benchmark.train import exit_accuracies, run_phase
from regimes.base import Phase
from regimes.registry import build_regime

CPU = torch.device("cpu")
SMOKE_TABLE = Path(__file__).resolve().parents[1] / "results" / "smoke" / "tables" / "runs.csv"
SMOKE_P1_ID = "6964c83b8808"   # the smoke grid's shared P1 backbone (digits/small_cnn/seed 0), protocol 7, no --fast
# (--fast left protocol 2's ids unchanged: 7d7b8caab627 and the run ids 53916929f545, 2ec973a5cf2c, 51267683d40b)
TINY_TRAIN = {"epochs": 1, "p1_epochs": None, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
              "nesterov": True, "weight_decay": 5e-4, "eval_every": 1}
MODEL = {"head": "pool", "exits": "flops:0.25,0.5,0.75"}


def old_normalisation(pixels: np.ndarray, train_pixels: np.ndarray) -> torch.Tensor:
    """What `_build` did to every image before uint8 storage: scale to [0, 1] in float32, then (x - mean) / std
    with the training split's statistics."""
    mean, std = channel_statistics(data_build._unit_scale(train_pixels, 255))
    return torch.from_numpy(np.ascontiguousarray((data_build._unit_scale(pixels, 255) - mean) / std,
                                                 dtype=np.float32))


def synthetic_entry(pixels: np.ndarray, labels: np.ndarray, augmentation="crop+flip", padding=4):
    """A registry entry whose reader returns the given 8-bit pixels scaled as every torchvision reader does."""
    def read(root, download):
        return data_build._unit_scale(pixels, 255), labels, None, None

    return data_registry._Entry("image", "synthetic", 10, augmentation, padding, "synthetic", read, embedded=True)


@pytest.fixture(scope="module")
def synthetic():
    """400 random 3x8x8 uint8 images with every level 0..255 present, built through `_build` like a real dataset."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(400, 3, 8, 8), dtype=np.uint8)
    pixels[1:3].reshape(-1)[:256] = np.arange(256)
    labels = np.arange(400) % 10
    dataset = data_build._build("synthetic", synthetic_entry(pixels, labels), Path("/nonexistent"), False)
    return pixels, labels, dataset


# --- uint8 storage and the normalisation rule ------------------------------------------------------------------


def test_8bit_images_are_held_as_uint8_and_read_bitwise_as_upfront_normalisation(synthetic):
    pixels, labels, dataset = synthetic
    assert dataset.storage == "uint8"
    train_index, test_index = data_build.stratified_split(labels, data_build.TEST_FRACTION)
    kept, val_index = data_build.stratified_split(labels[train_index], data_build.VALIDATION_FRACTION)
    expected = {"train": train_index[kept], "val": train_index[val_index], "test": test_index}
    for split, rows in expected.items():
        assert dataset.stored(split).dtype == torch.uint8
        assert torch.equal(dataset.stored(split), torch.from_numpy(pixels[rows]))
        upfront = old_normalisation(pixels[rows], pixels[expected["train"]])
        assert torch.equal(getattr(dataset, f"x_{split}"), upfront), split       # the compatible view
        assert torch.equal(dataset.inputs(split), upfront), split
        index = torch.tensor([5, 0, 3])
        assert torch.equal(dataset.inputs(split, index), upfront[index])


def test_pixel_lookup_is_the_float_arithmetic_for_every_level():
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.2435, 0.2616)
    lookup = pixel_lookup(mean, std)
    levels = np.arange(256, dtype=np.float32)
    levels /= 255
    arithmetic = (levels[None, :] - np.float32(mean)[:, None]) / np.float32(std)[:, None]
    assert lookup.dtype == torch.float32 and torch.equal(lookup, torch.from_numpy(arithmetic))
    black = -torch.tensor(mean) / torch.tensor(std)          # the float path's crop fill
    assert torch.equal(lookup[:, 0], black)


def test_images_that_are_not_8bit_and_series_stay_float():
    assert load_dataset("digits", "/nonexistent").storage == "float32"      # 0..16 scaled: not k / 255
    assert data_build.eight_bit_pixels(np.full((2, 1, 2, 2), 1 / 16, dtype=np.float32)) is None
    assert data_build.eight_bit_pixels(np.full((2, 1, 2, 2), 1.5, dtype=np.float32)) is None
    assert load_dataset("mnist5k", "/nonexistent").storage == "uint8"


def test_moving_keeps_uint8_and_a_quarter_of_the_memory(synthetic):
    _, _, dataset = synthetic
    moved = dataset.to("meta")
    assert moved.stored("train").dtype == torch.uint8 and moved.stored("train").device.type == "meta"
    as_floats = dataset.inputs("train")
    assert as_floats.nbytes == 4 * dataset.stored("train").nbytes


# --- augmentation on the device, from uint8 -------------------------------------------------------------------


def test_augmenting_uint8_then_normalising_is_bitwise_the_float_path(synthetic):
    _, _, dataset = synthetic
    index = torch.arange(64)
    for seed in range(3):
        from_pixels = dataset.training_batch(index, torch.Generator().manual_seed(seed))
        from_floats = dataset.augment(dataset.inputs("train", index), torch.Generator().manual_seed(seed))
        assert from_pixels.dtype == torch.float32 and torch.equal(from_pixels, from_floats)
    black = -torch.tensor(dataset.mean) / torch.tensor(dataset.std)
    shifted = dataset.training_batch(index, torch.Generator().manual_seed(0))
    padded_rows = (shifted[:, :, 0, :] == black.view(1, 3, 1)).all(dim=(1, 2))
    assert padded_rows.any()                              # some crops bring in a row of true black


def test_training_and_evaluation_on_uint8_match_normalised_floats_bitwise(synthetic):
    """One P2 epoch (crop+flip batches) of small_cnn on images held as uint8, and on the same images normalised
    upfront: weights, history, stored logits and validation accuracies all bitwise equal."""
    _, _, subset = synthetic
    assert subset.storage == "uint8"
    floats = replace(subset)            # replace() reads x_* as normalised floats: the upfront copy
    assert floats.storage == "float32"
    results = []
    for data in (subset, floats):
        torch.manual_seed(0)
        model = build_model("small_cnn", 10, data.input_shape, head="pool", exits="flops:0.5")
        history = run_phase(model, Phase("P2", "all", 1), build_regime("joint").objective, data, TINY_TRAIN,
                            pairing_seed=3, epoch_offset=0, device=CPU).history
        x, prepare = train_module.held(data, "val")
        logits = collect_logits(model, x, 64, prepare)
        accuracies = exit_accuracies(model, x, data.y_val, 64, nullcontext, prepare)
        results.append((model.state_dict(), pd.DataFrame(history).drop(columns="epoch_seconds"), logits, accuracies))
    (state_a, history_a, logits_a, acc_a), (state_b, history_b, logits_b, acc_b) = results
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert history_a.equals(history_b)
    assert np.array_equal(logits_a, logits_b) and acc_a == acc_b


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_uint8_batches_on_the_gpu_equal_the_cpu_float_path(synthetic):
    _, _, dataset = synthetic
    on_gpu = dataset.to("cuda")
    index = torch.arange(64)
    gpu = on_gpu.training_batch(index.cuda(), torch.Generator().manual_seed(1))
    cpu = dataset.augment(dataset.inputs("train", index), torch.Generator().manual_seed(1))
    assert torch.equal(gpu.cpu(), cpu)


# --- --fast in the spec, the run id and the P1 key ------------------------------------------------------------


def test_run_ids_without_fast_are_the_committed_ones():
    committed = set(read_csv(SMOKE_TABLE)["run_id"])
    specs = load_grid("smoke").specs
    assert {s.run_id for s in specs} == committed >= {"c9ed1ef4ae10", "85473a6a2311", "e2559563e254"}
    assert all("fast" not in s.to_json() for s in specs)
    assert specs[0].p1_id(5, "cpu") == SMOKE_P1_ID


def test_fast_changes_the_run_id_and_p1_key_and_is_recorded_in_spec_json():
    spec = load_grid("smoke").specs[0]
    fast = replace(spec, fast=True)
    assert fast.run_id != spec.run_id and fast.p1_id(5, "cpu") != spec.p1_id(5, "cpu")
    assert fast.to_json()["fast"] is True and fast.to_json()["run_id"] == fast.run_id
    assert RunSpec.from_json(fast.to_json()) == fast and RunSpec.from_json(spec.to_json()) == spec
    assert replace(fast, fast=False).run_id == spec.run_id


def test_bench_run_fast_plans_fast_run_ids(tmp_path):
    result = CliRunner().invoke(main, ["run", "--grid", "smoke", "--fast", "--dry-run", "--device", "cpu",
                                       "--results", str(tmp_path / "fast")])
    assert result.exit_code == 0, result.output
    for spec in load_grid("smoke").specs:
        assert replace(spec, fast=True).run_id in result.output and spec.run_id not in result.output


def test_configure_records_fast_and_the_evaluation_batch_size():
    slow, fast = configure(CPU, 1), configure(CPU, 1, fast=True)
    assert (slow["fast"], fast["fast"]) == (False, True)
    assert slow["deterministic_algorithms"] and fast["deterministic_algorithms"]      # cuDNN flags: CUDA only
    assert not fast["cudnn_benchmark"] and torch.are_deterministic_algorithms_enabled()
    assert slow["eval_batch_size"] == EVAL_BATCH_SIZES["cpu"] == 512 and EVAL_BATCH_SIZES["cuda"] == 2048


# --- torch.compile and its fallback ---------------------------------------------------------------------------


def tiny_spec(fast: bool, regime: str = "joint", exits: str = MODEL["exits"]) -> RunSpec:
    return RunSpec(dataset="digits", arch="small_cnn", regime=regime, seed=0, train=dict(TINY_TRAIN),
                   model={**MODEL, "exits": exits}, fast=fast)


def run_tiny(tmp_path, fast: bool, regime: str = "joint", exits: str = MODEL["exits"]) -> tuple[dict, dict]:
    spec = tiny_spec(fast, regime, exits)
    store = ResultsStore(tmp_path)
    metrics = execute_run(spec, store, data_root=Path("/nonexistent"), device=CPU, threads=1)
    logits = np.load(store.run_dir(spec.run_id) / "logits.npz")
    return metrics, {k: logits[k] for k in logits.files}


def broken_backend(graph, example_inputs):
    raise RuntimeError("this backend cannot compile anything")


@pytest.fixture
def restore_dynamo():
    yield
    import torch._dynamo
    torch._dynamo.reset()
    torch._dynamo.config.suppress_errors = False


def test_a_failing_compile_falls_back_to_eager_and_says_why(tmp_path, monkeypatch, restore_dynamo):
    monkeypatch.setattr(train_module, "COMPILE_BACKEND", broken_backend)
    monkeypatch.setattr(train_module, "_COMPILE_WARNED", set())
    with pytest.warns(UserWarning, match="torch.compile failed, training eagerly"):
        metrics, logits = run_tiny(tmp_path, fast=True)
    environment = metrics["environment"]
    assert environment["fast"] is True and environment["compiled"] is False
    assert "this backend cannot compile anything" in environment["compile_error"]
    reference, reference_logits = run_tiny(tmp_path, fast=False)
    assert reference["environment"]["compiled"] is False and reference["environment"]["compile_error"] is None
    # eager fallback on the CPU: the same numbers as a run without --fast (the probe left no trace)
    assert all(np.array_equal(logits[k], reference_logits[k]) for k in logits)


def test_compiling_with_the_eager_backend_leaves_the_numbers_alone(tmp_path, monkeypatch, restore_dynamo):
    """Dynamo's "eager" backend traces and runs the same kernels: a bitwise check that compiling, the probe, FLOP
    counting and evaluation outside the compiled graphs change nothing but the path."""
    monkeypatch.setattr(train_module, "COMPILE_BACKEND", "eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics, logits = run_tiny(tmp_path, fast=True)
    assert not [w for w in caught if "torch.compile failed" in str(w.message)]
    assert metrics["environment"]["compiled"] is True and metrics["environment"]["compile_error"] is None
    reference, reference_logits = run_tiny(tmp_path, fast=False)
    assert all(np.array_equal(logits[k], reference_logits[k]) for k in logits)
    assert metrics["cost"]["train_flops"] == reference["cost"]["train_flops"]


class RecompileLimitHits(logging.Handler):
    """Collects dynamo's warning that a function passed its recompile limit (it then runs that function eagerly);
    older torch names the limit cache_size_limit."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        message = record.getMessage()
        if "recompile_limit" in message or "cache_size_limit" in message:
            self.messages.append(message)


@pytest.mark.parametrize("regime", ["joint+l2w", "disjoint+ztw"])
def test_every_module_stays_compiled_through_every_phase(tmp_path, monkeypatch, restore_dynamo, regime):
    """Compiled modules share one wrapper function, and dynamo counts all their graphs against its recompile limit:
    torch's default (8) was passed by l2w's look-ahead steps and by disjoint's P3 (backbone frozen), after which
    modules silently trained eagerly under a run that said `compiled: true`. Traced with the eager backend."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    monkeypatch.setattr(train_module, "COMPILE_BACKEND", "eager")
    counters.clear()
    hits, dynamo_log = RecompileLimitHits(), logging.getLogger("torch._dynamo")
    dynamo_log.addHandler(hits)
    try:
        with torch._dynamo.config.patch(cache_size_limit=8):        # torch's default, whatever ran before
            metrics, _ = run_tiny(tmp_path, fast=True, regime=regime)
    finally:
        dynamo_log.removeHandler(hits)
    assert metrics["environment"]["compiled"] is True
    assert counters["stats"]["unique_graphs"] > 8, "the run must need more graphs than torch's default limit"
    assert not hits.messages, hits.messages[0]


def test_a_run_compiles_its_graphs_whatever_ran_before_it_in_the_process(tmp_path, monkeypatch, restore_dynamo):
    """A worker trains run after run: each --fast run starts from empty dynamo caches, so earlier runs' graphs
    neither count against its recompile limits nor stand in for its own (the second, identical run traces again)."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(train_module, "COMPILE_BACKEND", "eager")
    traced = []
    for attempt in ("first", "second"):
        before = counters["stats"]["unique_graphs"]
        run_tiny(tmp_path / attempt, fast=True)
        traced.append(counters["stats"]["unique_graphs"] - before)
    assert traced[0] > 0 and traced[1] == traced[0]


@pytest.mark.slow
def test_inductor_compiles_and_trains_on_the_cpu(tmp_path, restore_dynamo, monkeypatch):
    """The real --fast path on this CPU (inductor generates C++; ~20 s on 2 cores, most of it compiling). With one
    exit, so every kind of module still compiles (blocks, a head, the classifier) but two heads fewer, and with
    inductor trusting the CPU's flags for its vector instructions instead of compiling a probe program for each
    instruction set (~6 s of a core; inductor's own check, which its tests cover)."""
    import torch._inductor.config as inductor
    monkeypatch.setattr(inductor.cpp, "vec_isa_ok", True)
    metrics, logits = run_tiny(tmp_path, fast=True, exits="flops:0.5")
    assert metrics["environment"]["compiled"] is True, metrics["environment"]["compile_error"]
    assert all(np.isfinite(v).all() for v in logits.values())
    assert metrics["summary"]["final_accuracy"] > 0.15          # one epoch of 10 classes: better than chance


def test_a_reader_returning_uint8_pixels_builds_the_same_dataset_as_one_returning_scaled_floats():
    """Readers may hand `_build` raw uint8 pixels (torchvision's, TinyImageNet's) instead of k / 255 floats: same
    splits, same statistics, same stored pixels — and no full-size float copy."""
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, size=(300, 3, 8, 8), dtype=np.uint8)
    labels = np.arange(300) % 10
    as_floats = data_build._build("f", synthetic_entry(pixels, labels), Path("."), False)
    raw = data_registry._Entry("image", "synthetic", 10, "crop+flip", 4, "synthetic",
                             lambda root, download: (pixels, labels, None, None), embedded=True)
    as_pixels = data_build._build("p", raw, Path("."), False)
    assert as_pixels.storage == as_floats.storage == "uint8"
    assert as_pixels.mean == as_floats.mean and as_pixels.std == as_floats.std
    for split in ("train", "val", "test"):
        assert torch.equal(as_pixels.stored(split), as_floats.stored(split))


def test_channel_statistics_in_chunks_equal_the_whole_array_ones():
    """Known answer: numpy's whole-array mean and std; bitwise within one chunk, to float32 rounding across many."""
    rng = np.random.default_rng(2)
    x = rng.normal(3.0, 2.0, size=(1000, 3, 5, 5)).astype(np.float32)
    axes = (0, 2, 3)
    mean = x.mean(axis=axes, dtype=np.float64, keepdims=True).astype(np.float32)
    std = x.std(axis=axes, dtype=np.float64, keepdims=True).astype(np.float32)
    whole = channel_statistics(x)
    assert np.array_equal(whole[0], mean) and np.array_equal(whole[1], std)
    chunked = channel_statistics(x, chunk=64)
    np.testing.assert_allclose(chunked[0], mean, rtol=1e-6)
    np.testing.assert_allclose(chunked[1], std, rtol=1e-6)
    pixels = rng.integers(0, 256, size=(200, 3, 4, 4), dtype=np.uint8)
    assert all(np.array_equal(a, b) for a, b in zip(channel_statistics(pixels),
                                                    channel_statistics(data_build._unit_scale(pixels, 255))))
