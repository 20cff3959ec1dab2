"""The per-exit losses every objective builds from, for both task kinds, so an objective is written once.

An exit's output is (N, C) logits for classification and (N, C, H, W) per-pixel logits for segmentation (issue 23),
with labels (N,) or (N, H, W). On segmentation every loss is the pixel-averaged one of semantic segmentation (FCN,
DeepLab): the mean over the batch's *labelled* pixels — a pixel labelled IGNORE_INDEX (object borders, void, padding)
counts in no loss — so each definition carries over with "sample" read as "labelled pixel". Where an objective needs
one number per sample (l2w's weights, its budgeted allocation) a segmentation image gets the mean over its labelled
pixels and its policy confidence (`sample_confidence`).

On classification these are exactly the calls the objectives made before (same arguments, same reductions), so no
classification number moves.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from benchmark.data.dataset import IGNORE_INDEX


def is_dense(z: Tensor) -> bool:
    """Whether an exit output is per pixel (N, C, H, W) rather than per sample (N, C)."""
    return z.dim() == 4


def labelled(y: Tensor) -> Tensor:
    """The pixels of label maps (N, H, W) that a loss counts."""
    return y != IGNORE_INDEX


def cross_entropy(z: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy over the batch's samples, or over its labelled pixels."""
    if is_dense(z):
        return F.cross_entropy(z, y.long(), ignore_index=IGNORE_INDEX)
    return F.cross_entropy(z, y)


def sample_cross_entropy(z: Tensor, y: Tensor) -> Tensor:
    """Cross-entropy per sample (N,); per image, the mean over its labelled pixels (0 for an image with none)."""
    if not is_dense(z):
        return F.cross_entropy(z, y, reduction="none")
    y = y.long()
    per_pixel = F.cross_entropy(z, y, ignore_index=IGNORE_INDEX, reduction="none")     # 0 at ignored pixels
    return per_pixel.flatten(1).sum(1) / labelled(y).flatten(1).sum(1).clamp_min(1)


def kl_divergence(student_log_probs: Tensor, target: Tensor, y: Tensor, *, log_target: bool = False) -> Tensor:
    """KL(target ‖ student), the class distribution on dim 1: summed over classes, averaged over the samples
    ("batchmean") or over the pixels that `y` labels (pass a warped label map to count only the pixels that a
    geometric perturbation kept)."""
    if not is_dense(student_log_probs):
        return F.kl_div(student_log_probs, target, reduction="batchmean", log_target=log_target)
    per_pixel = F.kl_div(student_log_probs, target, reduction="none", log_target=log_target).sum(1)
    return masked_mean(per_pixel, labelled(y))


def masked_mean(values: Tensor, counted: Tensor) -> Tensor:
    """Mean of `values` where `counted` is True (0 where nothing is counted: no NaN enters a loss)."""
    counted = counted.to(values.dtype)
    return (values * counted).sum() / counted.sum().clamp_min(1)


def sample_confidence(z: Tensor) -> Tensor:
    """What a confidence-based policy ranks a sample by (N,): the max softmax, or for an image the mean over its
    pixels of the max softmax — `benchmark.dense.summaries`' "mean_max_softmax", the rule the evaluation's per-image
    budgeted policy allocates by (DENSE_POLICY_RULE), computed here in the loss's precision."""
    top = z.float().softmax(dim=1).amax(dim=1)
    return top.flatten(1).mean(1) if is_dense(z) else top
