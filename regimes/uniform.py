"""`uniform`: the mean of every exit's cross-entropy (SDN/MSDNet convention).

Exits with no trainable parameters in a phase (the frozen classifier in P3) still count, as zero-grad terms,
so the loss value is comparable across schedules.
"""
import torch

from regimes.base import Objective
from regimes.losses import cross_entropy
from regimes.registry import register_objective


@register_objective
class Uniform(Objective):
    name = "uniform"
    description = "L = mean_k CE_k over all K exits"
    source = "SDN / MSDNet convention"

    def loss(self, logits, y, ctx):
        return torch.stack([cross_entropy(z, y) for z in logits]).mean()
