"""What a segmentation run stores per (exit, image) instead of logits, and the metrics computed from it (issue 23).

Per-pixel logits of every exit (K x N x C x H x W: 5 x 1 449 x 21 x 256 x 256 floats is 40 GB for VOC's test split)
do not scale. Everything the metrics and the per-image exit policies need is kept per (exit, image), exactly:
- ``confusion`` (C, C) int64: pixel counts by (true class, predicted class) over the pixels whose label is not
  IGNORE_INDEX. Summing the matrices of any per-image exit assignment gives that assignment's confusion over the
  split, so its mIoU and pixel accuracy are exact — mIoU is not a mean over images and cannot be stored as one;
- ``summaries``: label-free confidences of the image's prediction over all its pixels, what a deployed policy
  can compute before deciding (MESS networks decide per image from such a summary): the mean and the 10 %
  quantile of the per-pixel max softmax, and one minus the mean normalised entropy;
- ``reliability`` (B, 3) and ``likelihood`` (2,): calibration over the image's labelled pixels — per equal-width
  bin of the max softmax (`analysis.calibration`'s bins) the pixel count, the sum of confidence and the number
  predicted right, and the sums of the pixels' negative log-likelihood and Brier score. Summed over images they
  give the split's ECE, NLL and Brier over pixels exactly; the binning-free KS error needs every pixel's confidence
  and is not stored.

mIoU (Long et al., FCN 2015; the Pascal VOC and Cityscapes benchmarks): per class, IoU = TP / (TP + FP + FN) from
the split's confusion matrix, averaged over the classes that occur in the labels or the predictions of the split
(a class absent from both has no IoU, as in torchmetrics' and mmseg's ``nan``-skipping mean).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from benchmark.data import IGNORE_INDEX
from benchmark.evaluate import DENSE_POLICY_RULE, Evaluation, evaluation_of, validation_area_of

LOW_QUANTILE = 0.1
"""The quantile of the per-pixel max softmax in ``summaries``: how sure the image's least sure tenth of pixels is."""
SUMMARY_RULES = ("mean_max_softmax", "low_quantile_max_softmax", "entropy")


def confusion_per_image(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, C, C) int64 pixel counts [image, true class, predicted class] of logits (N, C, H, W) against label maps
    (N, H, W); pixels labelled IGNORE_INDEX are not counted."""
    n = len(labels)
    labels = labels.long()
    counted = labels != IGNORE_INDEX
    predicted = logits.argmax(dim=1)
    image = torch.arange(n, device=labels.device).view(n, 1, 1).expand_as(labels)
    index = (image * num_classes + labels) * num_classes + predicted
    flat = torch.bincount(index[counted], minlength=n * num_classes * num_classes)
    return flat.view(n, num_classes, num_classes)


def summaries(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per image, float64 (N,): the mean and LOW_QUANTILE quantile of the per-pixel max softmax, and one minus the
    mean per-pixel entropy normalised by log C (1 = every pixel one-hot, 0 = uniform), over all pixels."""
    log_p = torch.log_softmax(logits.double(), dim=1)
    top = log_p.max(dim=1).values.exp().flatten(1)
    entropy = -(log_p.exp() * log_p).sum(dim=1).flatten(1) / np.log(logits.shape[1])
    return {"mean_max_softmax": top.mean(dim=1), "low_quantile_max_softmax": torch.quantile(top, LOW_QUANTILE, dim=1),
            "entropy": 1.0 - entropy.mean(dim=1)}


def calibration_sums(logits: torch.Tensor, labels: torch.Tensor, n_bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, over its labelled pixels: ``reliability`` (N, n_bins, 3) float64 — per equal-width bin (lo, hi] of
    the max softmax (a confidence of 0 in the first): pixel count, confidence sum, pixels predicted right — and
    ``likelihood`` (N, 2) float64: the sums of -log p(true class) and of the Brier score sum_c (p_c - [c = y])^2."""
    n = len(labels)
    labels = labels.long()
    counted = labels != IGNORE_INDEX
    log_p = torch.log_softmax(logits.double(), dim=1)
    top, predicted = log_p.max(dim=1)
    confidence = top.exp()
    true = labels.where(counted, 0)[:, None]
    log_p_true = log_p.gather(1, true)[:, 0]
    brier = log_p.exp().pow(2).sum(dim=1) - 2 * log_p_true.exp() + 1
    bins = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    index = (torch.arange(n, device=labels.device).view(n, 1, 1) * n_bins + bins)[counted]
    sums = [torch.bincount(index, weights=weights, minlength=n * n_bins) for weights in
            (torch.ones_like(confidence[counted]), confidence[counted], (predicted == labels)[counted].double())]
    reliability = torch.stack(sums, dim=-1).view(n, n_bins, 3)
    weight = counted.double()
    likelihood = torch.stack([(-log_p_true * weight).flatten(1).sum(1), (brier * weight).flatten(1).sum(1)], dim=-1)
    return reliability, likelihood


def mean_iou(confusion: np.ndarray) -> np.ndarray:
    """mIoU of confusion matrices (..., C, C) [true, predicted]: the mean IoU over the classes present in the labels
    or the predictions; NaN where no pixel was counted."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diagonal(confusion, axis1=-2, axis2=-1)
    union = confusion.sum(axis=-1) + confusion.sum(axis=-2) - true_positive
    present = union > 0
    iou = np.divide(true_positive, union, out=np.zeros_like(true_positive), where=present)
    count = present.sum(axis=-1)
    return np.divide(iou.sum(axis=-1), count, out=np.full(count.shape, np.nan), where=count > 0)


def class_iou(confusion: np.ndarray) -> np.ndarray:
    """Per-class IoU (..., C) of confusion matrices (..., C, C); NaN for a class absent from labels and predictions."""
    confusion = np.asarray(confusion, dtype=np.float64)
    true_positive = np.diagonal(confusion, axis1=-2, axis2=-1)
    union = confusion.sum(axis=-1) + confusion.sum(axis=-2) - true_positive
    return np.divide(true_positive, union, out=np.full_like(true_positive, np.nan), where=union > 0)


def pixel_accuracy(confusion: np.ndarray) -> np.ndarray:
    """Share of counted pixels predicted right, of confusion matrices (..., C, C)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    total = confusion.sum(axis=(-2, -1))
    correct = np.trace(confusion, axis1=-2, axis2=-1)
    return np.divide(correct, total, out=np.full(np.shape(total), np.nan), where=total > 0)


def assignment_miou(exits: np.ndarray, confusion: np.ndarray) -> np.ndarray:
    """mIoU over a split of per-image exit assignments ``exits`` (..., N), from per-(exit, image) confusion matrices
    (K, N, C, C): each image's pixels counted at the exit it leaves at — the dense counterpart of a classification
    operating point's accuracy."""
    exits = np.asarray(exits)
    images = np.arange(exits.shape[-1])
    flat = exits.reshape(-1, exits.shape[-1])
    totals = np.stack([confusion[row, images].sum(axis=0) for row in flat])
    return mean_iou(totals).reshape(exits.shape[:-1])


@dataclass(frozen=True)
class DenseExitOutputs:
    """One split's per-(exit, image) scores under one summary rule, and its confusion matrices: all a per-image
    policy needs — the dense counterpart of `evaluate.ExitOutputs`, whose accuracy becomes mIoU."""

    score: np.ndarray       # (K, N) float64: a `summaries` rule per exit and image
    confusion: np.ndarray   # (K, N, C, C) int64

    @property
    def n_exits(self) -> int:
        return self.score.shape[0]

    def quality(self, exits: np.ndarray) -> np.ndarray:
        """mIoU of exit assignments `exits` (..., N) over the split."""
        return assignment_miou(exits, self.confusion)

    def exit_quality(self) -> np.ndarray:
        """mIoU of every exit alone (K,)."""
        return mean_iou(self.confusion.sum(axis=1))


def evaluate_dense(val: dict[str, np.ndarray], test: dict[str, np.ndarray], exit_costs: np.ndarray,
                   backbone_cost: float) -> Evaluation:
    """`evaluate` for a segmentation run: every exit, per-image policy curve (DENSE_POLICY_RULE) and summary number
    from each split's outputs as `pipeline.collect_dense` gives them and dense.npz stores them — the confusion
    matrices "confusion" (K, N, C, C) and each summary rule's scores (K, N). The tables' accuracy columns hold mIoU
    (the primary area is the validation-selected staircase of mIoU over FLOPs); exits gain the test pixel accuracy
    and the summary the final exit's."""
    outputs = {rule: (DenseExitOutputs(val[rule], val["confusion"]), DenseExitOutputs(test[rule], test["confusion"]))
               for rule in SUMMARY_RULES}
    pixels = pixel_accuracy(np.asarray(test["confusion"]).sum(axis=1))
    return evaluation_of(outputs, DENSE_POLICY_RULE, exit_costs, float(backbone_cost),
                         {"test_pixel_accuracy": pixels}, {"final_pixel_accuracy": float(pixels[-1])})


def dense_validation_area(val: dict[str, np.ndarray], exit_costs: np.ndarray, backbone_cost: float) -> float:
    """`evaluate_dense`'s val_auc_normalised from the validation split's outputs alone: a tuning rung's score."""
    outputs = {rule: DenseExitOutputs(val[rule], val["confusion"]) for rule in dict.fromkeys(DENSE_POLICY_RULE.values())}
    return validation_area_of(outputs, DENSE_POLICY_RULE, exit_costs, backbone_cost)
