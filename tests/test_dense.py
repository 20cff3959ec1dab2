"""Dense-prediction metrics from per-(exit, image) confusion matrices (issue 23), against hand-computed answers and
scikit-learn's Jaccard score on the pixels themselves."""
import numpy as np
import pytest
import torch
from sklearn.metrics import jaccard_score

from benchmark.data import IGNORE_INDEX
from benchmark.dense import (assignment_miou, class_iou, confusion_per_image, mean_iou, pixel_accuracy,
                             summaries)


def one_hot_logits(predicted: torch.Tensor, num_classes: int, margin: float = 5.0) -> torch.Tensor:
    """Logits (N, C, H, W) whose argmax is `predicted` (N, H, W)."""
    return margin * torch.nn.functional.one_hot(predicted, num_classes).permute(0, 3, 1, 2).float()


def test_confusion_counts_each_images_pixels_by_true_and_predicted_class_leaving_ignored_ones_out():
    labels = torch.tensor([[[0, 1], [1, IGNORE_INDEX]], [[2, 2], [2, 0]]], dtype=torch.uint8)
    predicted = torch.tensor([[[0, 0], [1, 2]], [[2, 1], [2, 0]]])
    confusion = confusion_per_image(one_hot_logits(predicted, 3), labels, 3)
    assert confusion.dtype == torch.int64 and confusion.shape == (2, 3, 3)
    assert confusion[0].tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 0]]        # the ignored pixel predicted 2: absent
    assert confusion[1].tolist() == [[1, 0, 0], [0, 0, 0], [0, 1, 2]]


def test_mean_iou_by_hand_and_absent_classes_skipped():
    confusion = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])                   # class 2 never labelled nor predicted
    assert class_iou(confusion)[:2].tolist() == [3 / 4, 2 / 3] and np.isnan(class_iou(confusion)[2])
    assert mean_iou(confusion) == pytest.approx((3 / 4 + 2 / 3) / 2)
    assert pixel_accuracy(confusion) == pytest.approx(5 / 6)
    assert np.isnan(mean_iou(np.zeros((3, 3))))
    assert mean_iou(np.stack([confusion, np.eye(3)])).tolist() == pytest.approx([(3 / 4 + 2 / 3) / 2, 1.0])


@pytest.mark.parametrize("seed", range(3))
def test_an_assignments_miou_is_scikit_learns_jaccard_over_the_pixels_each_image_gets_at_its_exit(seed):
    generator = torch.Generator().manual_seed(seed)
    exits, images, classes = 3, 6, 4
    labels = torch.randint(0, classes, (images, 5, 7), generator=generator).to(torch.uint8)
    labels[torch.rand(labels.shape, generator=generator) < 0.1] = IGNORE_INDEX
    predicted = torch.randint(0, classes, (exits, images, 5, 7), generator=generator)
    confusion = np.stack([confusion_per_image(one_hot_logits(p, classes), labels, classes).numpy() for p in predicted])
    assignment = np.array([[0, 1, 2, 2, 1, 0], [2, 2, 2, 2, 2, 2]])
    for row, got in zip(assignment, assignment_miou(assignment, confusion)):
        keep = labels != IGNORE_INDEX
        y_true = torch.cat([labels[i][keep[i]] for i in range(images)]).numpy()
        y_pred = torch.cat([predicted[k, i][keep[i]] for i, k in enumerate(row)]).numpy()
        assert got == pytest.approx(jaccard_score(y_true, y_pred, average="macro"))


def test_summaries_read_uniform_as_least_and_one_hot_as_most_confident():
    uniform = torch.zeros(1, 4, 3, 3)
    sure = one_hot_logits(torch.zeros(1, 3, 3, dtype=torch.long), 4, margin=60.0)
    low, high = summaries(uniform), summaries(sure)
    assert low["mean_max_softmax"].item() == pytest.approx(0.25) and low["entropy"].item() == pytest.approx(0.0)
    assert high["mean_max_softmax"].item() == pytest.approx(1.0) and high["entropy"].item() == pytest.approx(1.0)
    half = one_hot_logits(torch.zeros(1, 10, 3, dtype=torch.long), 4, margin=60.0)
    half[..., 2] = 0.0                                                   # a third of the pixels unsure
    assert summaries(half)["low_quantile_max_softmax"].item() == pytest.approx(0.25)
    assert summaries(half)["mean_max_softmax"].item() == pytest.approx((2 + 0.25) / 3)
    assert all(v.dtype == torch.float64 and v.shape == (1,) for v in summaries(half).values())


def toy_dense_run(seed=0, exits=3, images=40, classes=3):
    """Per-(exit, image) confusion matrices of random pixel predictions that get better with depth, and scores."""
    rng = np.random.default_rng(seed)
    confusion = np.zeros((exits, images, classes, classes), dtype=np.int64)
    for k in range(exits):
        for i in range(images):
            truth = rng.integers(0, classes, 50)
            right = rng.random(50) < 0.4 + 0.25 * k
            guess = np.where(right, truth, rng.integers(0, classes, 50))
            np.add.at(confusion[k, i], (truth, guess), 1)
    scores = {rule: rng.random((exits, images)) for rule in ("mean_max_softmax", "low_quantile_max_softmax",
                                                             "entropy")}
    return scores, confusion


def test_dense_evaluation_reads_miou_where_classification_reads_accuracy():
    from benchmark.dense import DenseExitOutputs, evaluate_dense
    from benchmark.evaluate import DENSE_POLICY_RULE, POLICY_ORDER, exit_decisions, policy_thresholds
    (val_scores, val_conf), (test_scores, test_conf) = toy_dense_run(0), toy_dense_run(1)
    costs = np.array([1.0, 2.0, 4.0])
    result = evaluate_dense({**val_scores, "confusion": val_conf}, {**test_scores, "confusion": test_conf}, costs, 4.0)
    assert list(dict.fromkeys(result.curves.policy)) == [p for p in POLICY_ORDER if p in DENSE_POLICY_RULE]
    assert result.exits.test_accuracy.tolist() == pytest.approx([float(mean_iou(test_conf[k].sum(0))) for k in range(3)])
    assert result.summary["final_accuracy"] == pytest.approx(mean_iou(test_conf[-1].sum(0)))
    assert result.summary["final_pixel_accuracy"] == pytest.approx(pixel_accuracy(test_conf[-1].sum(0)))
    quantile = result.curves[result.curves.policy == "quantile"].iloc[40]           # one point, recomputed by hand
    thresholds = policy_thresholds("quantile", [quantile.param], val_scores["low_quantile_max_softmax"])[0]
    leave = exit_decisions(test_scores["low_quantile_max_softmax"], thresholds)
    by_hand = mean_iou(sum(test_conf[k, i] for i, k in enumerate(leave)))
    assert quantile.test_accuracy == pytest.approx(by_hand) and quantile.test_flops == pytest.approx(costs[leave].mean())
    assert 0 <= result.summary["auc_normalised"] <= 1 and result.selected.policy.notna().all()
    assert DenseExitOutputs(val_scores["entropy"], val_conf).quality(np.full(40, 2)) == pytest.approx(
        mean_iou(val_conf[2].sum(0)))


def test_the_dense_eval_forward_stores_exactly_what_the_per_pixel_logits_give():
    """collect_dense on a real seg_cnn: per-(exit, image) confusion and summaries equal those of collect_logits'
    per-pixel logits (the same eval forward), batch size and all."""
    from benchmark.models import build_model
    from benchmark.pipeline import collect_dense, collect_logits
    torch.manual_seed(0)
    model = build_model("seg_cnn", 5, (1, 16, 20), head="seg_linear", exits=[1, 4])
    x = torch.randn(7, 1, 16, 20)
    y = torch.randint(0, 5, (7, 16, 20)).to(torch.uint8)
    y[:, :2] = IGNORE_INDEX
    stored = collect_dense(model, x, y, 5, batch_size=3)
    logits = torch.from_numpy(collect_logits(model, x, batch_size=3))           # (K, N, C, H, W)
    assert stored["confusion"].shape == (3, 7, 5, 5) and stored["confusion"].sum() == 3 * 7 * 14 * 20
    for k in range(3):
        assert np.array_equal(stored["confusion"][k], confusion_per_image(logits[k], y, 5).numpy())
        for rule, values in summaries(logits[k]).items():
            np.testing.assert_allclose(stored[rule][k], values.numpy(), rtol=1e-12)
