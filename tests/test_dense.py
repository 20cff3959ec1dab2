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
