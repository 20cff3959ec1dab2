"""The model analyses on segmentation runs (issue 23): each either carries over to dense outputs with a known answer
here, or says it does not apply (NaN) — none crashes."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from analysis import information, landscape, robustness
from analysis.information import exit_information_lower_bound, stratified_indices
from benchmark.data import IGNORE_INDEX, load_dataset
from benchmark.dense import evaluate_dense, mean_iou
from benchmark.models import build_model
from benchmark.pipeline import collect_dense
from benchmark.snapshots import analysis_subset
from regimes.losses import cross_entropy

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def scenes():
    """mnist_scenes cut to 40 training, 30 validation and 30 test scenes, and an untrained seg_cnn on it."""
    data = load_dataset("mnist_scenes", ".")
    cut = {f"x_{s}": data.stored(s)[:n] for s, n in (("train", 40), ("val", 30), ("test", 30))}
    data = replace(data, **cut, **{f"y_{s}": getattr(data, f"y_{s}")[:len(cut[f"x_{s}"])]
                                   for s in ("train", "val", "test")})
    torch.manual_seed(0)
    model = build_model("seg_cnn", data.num_classes, data.input_shape, head="seg_linear", exits="flops:0.25,0.5,0.75")
    return data, model.eval()


def test_label_maps_get_a_seeded_uniform_subset_as_they_have_no_class_to_stratify_by():
    maps = np.zeros((50, 4, 4), dtype=np.uint8)
    index = stratified_indices(maps, 12, seed=3)
    assert len(index) == len(set(index)) == 12 and list(index) == sorted(index) and index.max() < 50
    assert np.array_equal(index, stratified_indices(maps, 12, seed=3))
    assert not np.array_equal(index, stratified_indices(maps, 12, seed=4))
    assert np.array_equal(stratified_indices(maps, None), np.arange(50))


def test_information_measures_i_xt_on_label_maps_and_leaves_i_ty_undefined(scenes):
    data, model = scenes
    x, y = data.x_train, data.y_train
    for estimator in ("renyi", "binning"):
        dense = information.information_table(model, x, y, estimator=estimator, n_samples=None)
        # I(X;T) does not read Y: the same numbers as with any per-sample labels
        labels = information.information_table(model, x, torch.arange(len(y)) % 3, estimator=estimator,
                                               n_samples=None)
        assert dense.I_XT_bits.tolist() == labels.I_XT_bits.tolist() and len(dense) == len(model.blocks)
        assert dense.I_TY_bits.isna().all() and dense.H_Y_bits.isna().all() and labels.I_TY_bits.notna().all()


def test_the_exit_bound_on_label_maps_is_the_classification_bound_over_labelled_pixels():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 5, 6, generator=generator)
    labels = torch.randint(0, 4, (3, 5, 6), generator=generator).to(torch.uint8)
    labels[0, :2] = IGNORE_INDEX
    keep = labels != IGNORE_INDEX
    by_pixel = exit_information_lower_bound(logits.permute(0, 2, 3, 1)[keep], labels[keep].long())
    assert exit_information_lower_bound(logits, labels) == pytest.approx(by_pixel)
    assert by_pixel["CE_bits"] == pytest.approx(float(cross_entropy(logits, labels)) / np.log(2))


def test_the_landscape_of_a_segmentation_model_is_its_pixel_averaged_loss_and_pixel_accuracy(scenes):
    data, model = scenes
    x, y = analysis_subset(data, 25)
    with torch.no_grad():
        outputs = model(x)
    keep = y != IGNORE_INDEX
    expected = [(float(cross_entropy(z, y)), float((z.argmax(1) == y)[keep].float().mean())) for z in outputs]
    own = dict(model.named_parameters())
    for batch_size in (25, 7):               # batches hold different numbers of labelled pixels: still one mean
        got = landscape.exit_metrics(model, x, y, batch_size=batch_size)(own)
        assert np.allclose(got, expected, rtol=1e-5)
    table = landscape.slice_1d(model, x, y, landscape.random_direction(model, torch.Generator().manual_seed(0)),
                               np.array([-0.5, 0.0, 0.5]))
    at_zero = table[table.alpha == 0].sort_values("exit")
    assert np.allclose(at_zero[["loss", "accuracy"]].to_numpy(), expected, rtol=1e-5)
    assert table.loss.notna().all() and table[table.alpha != 0].loss.ne(at_zero.loss.iloc[0]).any()


def test_dense_robustness_reads_clean_rows_as_the_runs_evaluation_and_a_shift_moves_them(scenes):
    data, model = scenes
    costs, backbone = np.array([2e5, 4e5, 6e5, 1e6]), 1e6
    assert model.num_exits == len(costs)
    val = collect_dense(model, data.x_val, data.y_val, data.num_classes)
    test = collect_dense(model, data.x_test, data.y_test, data.num_classes)
    dark = collect_dense(model, data.x_test - 1.0, data.y_test, data.num_classes)
    rows = robustness.run_dense_robustness(val, test, {("copy", 1): test, ("dark", 1): dark}, costs, backbone)
    clean = rows[rows.corruption == robustness.CLEAN]
    evaluation = evaluate_dense(val, test, costs, backbone)
    exits = clean[clean.point.str.startswith("exit_")]
    assert exits.accuracy.tolist() == mean_iou(test["confusion"].sum(axis=1)).tolist()
    assert clean[clean.point == "area"].accuracy.item() == evaluation.summary["auc_normalised"]
    assert exits.macro_f1.isna().all() and exits.ks.isna().all() and exits.ece.notna().all()
    copy = rows[rows.corruption == "copy"].drop(columns=["corruption", "severity"]).reset_index(drop=True)
    assert copy.equals(clean.drop(columns=["corruption", "severity"]).reset_index(drop=True))
    shifted = rows[(rows.corruption == "dark") & rows.point.str.startswith("exit_")]
    assert not np.allclose(shifted.accuracy.to_numpy(), exits.accuracy.to_numpy())


def test_the_cost_model_times_a_segmentation_step_on_label_maps():
    """`bench calibrate` times a joint step per cell: a segmentation cell's labels are maps, not one class per sample."""
    from benchmark.cost_model import calibration_cells, measure_step
    from benchmark.grid import load_grid
    cell, = calibration_cells(load_grid("seg").specs)
    assert (cell.arch, cell.input_shape, cell.batch_size) == ("seg_cnn", (1, 32, 42), 32)
    assert 0 < measure_step(cell, CPU, warmup=0, steps=1) < 10
