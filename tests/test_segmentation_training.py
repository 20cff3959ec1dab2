"""Training multi-exit segmentation networks (issue 23): every loss is pixel-averaged over labelled pixels (the ignore
label counts nowhere), each objective's definition carries over per pixel, and a trained run stores and evaluates
dense.npz — the classification calls stay the ones they were."""
from contextlib import nullcontext
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from analysis.calibration import N_BINS, calibration_table, exit_calibration, pixel_calibration
from benchmark.analyze import stored_test_calibration
from benchmark.data import IGNORE_INDEX, load_dataset
from benchmark.dense import SUMMARY_RULES, calibration_sums, confusion_per_image, mean_iou, summaries
from benchmark.evaluate import DENSE_POLICY_RULE
from benchmark.models import build_model
from benchmark.pipeline import stored_evaluation, validation_scores
from benchmark.spec import RunSpec
from benchmark.store import ResultsStore, read_dense, write_json
from benchmark.train import exit_accuracies, run_phase
from regimes.base import Budget
from regimes.losses import cross_entropy, kl_divergence, sample_confidence, sample_cross_entropy
from regimes.perturbations import draw_shift, perturb, perturb_with_shift
from regimes.registry import build_regime, regime_names
from regimes.ztw import ZeroTimeWaste

CPU = torch.device("cpu")
TRAIN = {"epochs": 2, "p1_epochs": None, "batch_size": 16, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
         "nesterov": True, "weight_decay": 5e-4, "eval_every": 1}


def dense_batch(n=3, classes=4, h=5, w=6, seed=0):
    """Random logits (N, C, H, W) and labels with an ignored tenth of pixels and one wholly ignored image."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, h, w, generator=generator, requires_grad=True)
    labels = torch.randint(0, classes, (n, h, w), generator=generator).to(torch.uint8)
    labels[torch.rand(labels.shape, generator=generator) < 0.1] = IGNORE_INDEX
    labels[-1] = IGNORE_INDEX
    return logits, labels


# --- the losses -----------------------------------------------------------------------------------------------------


def test_cross_entropy_is_the_mean_over_labelled_pixels_and_ignored_pixels_get_no_gradient():
    logits, labels = dense_batch()
    keep = labels != IGNORE_INDEX
    log_p = logits.log_softmax(1)
    by_hand = -log_p.gather(1, labels.long().clamp(max=3)[:, None])[:, 0][keep].mean()
    loss = cross_entropy(logits, labels)
    torch.testing.assert_close(loss, by_hand)
    grad, = torch.autograd.grad(loss, logits)
    assert grad.permute(0, 2, 3, 1)[~keep].abs().max() == 0 and grad.permute(0, 2, 3, 1)[keep].abs().max() > 0


def test_per_image_cross_entropy_averages_each_images_labelled_pixels():
    logits, labels = dense_batch()
    per_pixel = F.cross_entropy(logits, labels.long().clamp(max=3), reduction="none")
    got = sample_cross_entropy(logits, labels)
    for i in range(2):
        keep = labels[i] != IGNORE_INDEX
        torch.testing.assert_close(got[i], per_pixel[i][keep].mean())
    assert got[-1] == 0                                    # an image with no labelled pixel adds nothing, no NaN


def test_kl_divergence_is_summed_over_classes_and_averaged_over_labelled_pixels():
    logits, labels = dense_batch()
    teacher = torch.randn(logits.shape, generator=torch.Generator().manual_seed(5)).softmax(1)
    student = logits.log_softmax(1)
    per_pixel = (teacher * (teacher.log() - student)).sum(1)
    torch.testing.assert_close(kl_divergence(student, teacher, labels), per_pixel[labels != IGNORE_INDEX].mean())


def test_classification_losses_are_exactly_the_calls_the_objectives_made_before():
    generator = torch.Generator().manual_seed(1)
    z, y = torch.randn(8, 5, generator=generator), torch.randint(0, 5, (8,), generator=generator)
    teacher = torch.randn(8, 5, generator=generator).softmax(1)
    assert torch.equal(cross_entropy(z, y), F.cross_entropy(z, y))
    assert torch.equal(sample_cross_entropy(z, y), F.cross_entropy(z, y, reduction="none"))
    student = z.log_softmax(1)
    assert torch.equal(kl_divergence(student, teacher, y), F.kl_div(student, teacher, reduction="batchmean"))
    assert torch.equal(sample_confidence(z), z.softmax(1).amax(1))


def test_an_images_confidence_is_the_summary_the_per_image_budgeted_policy_allocates_by():
    logits, _ = dense_batch()
    assert DENSE_POLICY_RULE["budgeted"] == "mean_max_softmax"
    torch.testing.assert_close(sample_confidence(logits).double(), summaries(logits.detach())["mean_max_softmax"])


# --- calibration over pixels ---------------------------------------------------------------------------------------


def test_pixel_calibration_from_stored_sums_is_the_calibration_of_the_labelled_pixels_themselves():
    generator = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(2, 3, 4, 5, 6, generator=generator)          # 2 exits, 3 images, 4 classes
    labels = torch.randint(0, 4, (3, 5, 6), generator=generator).to(torch.uint8)
    labels[torch.rand(labels.shape, generator=generator) < 0.2] = IGNORE_INDEX
    sums = [calibration_sums(z, labels, N_BINS) for z in logits]
    table, bins = pixel_calibration(torch.stack([r for r, _ in sums]).numpy(), torch.stack([s for _, s in sums]).numpy())
    keep = labels != IGNORE_INDEX
    pixel_logits = logits.permute(0, 1, 3, 4, 2)[:, keep].numpy()         # (exits, labelled pixels, classes)
    reference, reference_bins = exit_calibration(pixel_logits, labels[keep].long().numpy())
    for column in ("accuracy", "mean_confidence", "ece", "nll", "brier", "samples"):
        assert table[column].to_numpy() == pytest.approx(reference[column].to_numpy(), rel=1e-12), column
    assert table["ks"].isna().all()                                        # needs every pixel: not stored
    pd.testing.assert_frame_equal(bins[["exit", "bin", "count"]], reference_bins[["exit", "bin", "count"]])


# --- cet's geometric perturbation moves the labels too ----------------------------------------------------------------


def test_a_shift_moves_labels_as_it_moves_pixels_and_ignores_what_came_from_outside():
    x = torch.arange(4 * 8 * 8, dtype=torch.float32).view(4, 1, 8, 8)
    labels = (torch.arange(8 * 8) % 11).view(1, 8, 8).expand(4, 8, 8).to(torch.uint8)
    shift = draw_shift(x, torch.Generator().manual_seed(2), crop=0.25, flip=0.5)
    assert torch.equal(shift.move(x), perturb(x, "image", torch.Generator().manual_seed(2), crop=0.25, flip=0.5,
                                              cutout=0, noise=0))
    moved = shift.move_labels(labels)
    source = shift.move(x).long() % 64                 # the pixel each output pixel was read from
    inside = shift.inside.view(4, 8, 8)
    assert torch.equal(moved[inside], (source % 11).to(torch.uint8)[:, 0][inside])
    assert (moved[~inside] == IGNORE_INDEX).all() and (~inside).any()


def test_cet_on_segmentation_without_perturbation_adds_nothing_and_its_shift_matches_x_tilde():
    model, x, y = scene_model_and_batch("joint+cet")
    objective = build_regime("joint+cet", {"crop": 0.0, "flip": 0.0, "cutout": 0.0, "noise": 0.0}).objective
    logits = model(x)
    assert torch.equal(objective.perturbed_terms(logits, model(x), y), torch.zeros(model.num_exits))
    x_tilde, shift = perturb_with_shift(x, "image", torch.Generator().manual_seed(4), crop=0.25, flip=0.0,
                                        cutout=0.0, noise=0.0)
    assert torch.equal(x_tilde, shift.move(x))
    label_term = build_regime("joint+cet", {"target": "label"}).objective.perturbed_terms(
        logits, model(x_tilde), y, shift)
    by_hand = torch.stack([cross_entropy(z, shift.move_labels(y)) for z in model(x_tilde)])
    torch.testing.assert_close(label_term, by_hand)


# --- ztw per pixel ----------------------------------------------------------------------------------------------------


def test_ztw_cascades_and_ensembles_each_pixel_as_a_classification_exit():
    torch.manual_seed(0)
    combiner = ZeroTimeWaste(3, 4, [8, 8])
    combiner.begin_last_phase()
    heads = [torch.randn(2, 4, 3, 5) for _ in range(3)]
    as_rows = [z.permute(0, 2, 3, 1).reshape(-1, 4) for z in heads]
    state_dense = state_rows = None
    for k in range(3):
        out_dense, state_dense = combiner.step(k, heads[k], state_dense)
        out_rows, state_rows = combiner.step(k, as_rows[k], state_rows)
        assert torch.equal(out_dense.permute(0, 2, 3, 1).reshape(-1, 4), out_rows)


# --- every regime trains a segmentation network -------------------------------------------------------------------


@pytest.fixture(scope="module")
def scenes():
    """mnist_scenes cut to a few batches: 32 training (two batches), 16 validation and 16 test scenes."""
    data = load_dataset("mnist_scenes", ".")
    cut = {f"x_{s}": data.stored(s)[:n] for s, n in (("train", 32), ("val", 16), ("test", 16))}
    return replace(data, **cut, **{f"y_{s}": getattr(data, f"y_{s}")[:len(cut[f"x_{s}"])] for s in
                                   ("train", "val", "test")})


def scene_model_and_batch(regime, data=None):
    data = data or load_dataset("mnist_scenes", ".")
    torch.manual_seed(0)
    model = build_model("seg_cnn", data.num_classes, data.input_shape, head="seg_linear", exits="flops:0.25,0.5,0.75")
    model.combiner = build_regime(regime).objective.exit_combiner(model, data.num_classes)
    return model, data.normalise(data.stored("train")[:6]), data.y_train[:6]


@pytest.mark.parametrize("regime", regime_names())
def test_every_regime_trains_a_segmentation_network_and_its_run_evaluates_from_dense_npz(regime, scenes, tmp_path):
    model, _, _ = scene_model_and_batch(regime, scenes)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    built, offset, history = build_regime(regime), 0, []
    for phase in built.phases(Budget(2)):
        if phase.epochs:
            result = run_phase(model, phase, built.objective, scenes, TRAIN, pairing_seed=1, epoch_offset=offset,
                               device=CPU)
            history += result.history
            offset += phase.epochs
    assert all(np.isfinite(row["train_loss"]) for row in history)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(0 <= row["val_accuracy"] <= 1 for row in history)

    costs = {"backbone": 1e6, "exits": [2.5e5 * (k + 1) for k in range(model.num_exits)]}
    evaluation = stored_evaluation(model, scenes, tmp_path, CPU, costs)
    stored = read_dense(tmp_path / "dense.npz", model.num_exits, len(scenes.y_val), len(scenes.y_test),
                        scenes.num_classes, SUMMARY_RULES, N_BINS)
    assert not (tmp_path / "logits.npz").exists()
    assert evaluation.exits["test_accuracy"].tolist() == mean_iou(stored["test"]["confusion"].sum(axis=1)).tolist()
    calibration, _ = pixel_calibration(stored["test"]["reliability"], stored["test"]["likelihood"])
    assert calibration["accuracy"].to_numpy() == pytest.approx(evaluation.exits["test_pixel_accuracy"].to_numpy())
    area, val_miou = validation_scores(model, scenes, CPU, costs)
    assert area == evaluation.summary["val_auc_normalised"]
    assert val_miou == evaluation.exits["val_accuracy"].tolist()
    assert val_miou == pytest.approx([row["val_accuracy"] for row in history[-model.num_exits:]])   # as history


def test_validation_miou_in_history_is_the_split_confusions_miou(scenes):
    model, _, _ = scene_model_and_batch("joint", scenes)
    got = exit_accuracies(model, scenes.stored("val"), scenes.y_val, 10, nullcontext, scenes.normalise)
    with torch.no_grad():
        logits = model.eval()(scenes.x_val)
    expected = [float(mean_iou(confusion_per_image(z, scenes.y_val, scenes.num_classes).sum(0).numpy())) for z in logits]
    assert got == pytest.approx(expected) and len(set(got)) > 1


def test_the_grids_calibration_table_reads_a_segmentation_runs_pixel_calibration_from_dense_npz(scenes, tmp_path):
    store = ResultsStore(tmp_path)
    spec = RunSpec(dataset="mnist_scenes", arch="seg_cnn", regime="joint", seed=0, train={}, model={})
    folder = store.run_dir(spec.run_id)
    folder.mkdir(parents=True)
    model, _, _ = scene_model_and_batch("joint", scenes)
    costs = {"backbone": 1e6, "exits": [2e5 * (k + 1) for k in range(model.num_exits)]}
    stored_evaluation(model, scenes, folder, CPU, costs)
    write_json(folder / "metrics.json", {"num_exits": model.num_exits})
    table, bins = calibration_table([], dense_runs=stored_test_calibration([spec], store))
    labelled = int((scenes.y_test != IGNORE_INDEX).sum())
    assert table.exit.tolist() == list(range(model.num_exits)) and (table.samples == labelled).all()
    assert set(bins.run_id) == {spec.run_id} and set(table.dataset) == {"mnist_scenes"} and (bins.groupby("exit")["count"].sum() == labelled).all()
