"""`pcgrad`: Gradient Surgery for Multi-Task Learning (Yu et al., NeurIPS 2020), with each exit's cross-entropy as
a task, as the multi-exit gradient-conflict literature applies it.

Follows the official code (tianheyu927/PCGrad, PCGrad_tf.py; and the PyTorch port WeiChengTseng/Pytorch-PCGrad
that Nash-MTL's repository reuses): each exit's gradient g_i on the shared blocks is projected, against every
other exit's *original* gradient g_j in random order, onto the normal plane of g_j wherever they conflict
(g_i·g_j < 0: g_i <- g_i - (g_i·g_j / |g_j|²) g_j); the projected gradients are summed (reduction "sum", the
official default). Heads and the classifier get their own exit's gradient. Each exit draws its own order (as
the PyTorch port shuffles per task), from the step's objective generator, so runs are reproducible. Without
conflicts the update is the gradient of the summed cross-entropies.
"""
from __future__ import annotations

import torch
from torch import Tensor

from regimes.exit_gradients import GradientCombination
from regimes.registry import register_objective


def project_conflicting(grads: Tensor, orders: Tensor) -> Tensor:
    """PCGrad's projected gradients (K, P) from the per-task gradients `grads` (K, P); `orders` (K, K) holds, per
    row i, a permutation of the tasks: the order in which task i is projected against the others (i itself is
    skipped). Vectorised over i: step t projects every g_i against g_{orders[i, t]}."""
    projected = grads.clone()
    squared_norms = (grads * grads).sum(1)
    rows = torch.arange(len(grads), device=grads.device)
    for t in range(orders.shape[1]):
        other = orders[:, t]
        inner = (projected * grads[other]).sum(1)
        conflict = (inner < 0) & (other != rows) & (squared_norms[other] > 0)
        scale = torch.where(conflict, inner / squared_norms[other].clamp_min(torch.finfo(grads.dtype).tiny), 0.0)
        projected -= scale[:, None] * grads[other]
    return projected


@register_objective
class PCGrad(GradientCombination):
    name = "pcgrad"
    description = ("exits' gradients on the shared blocks projected off each other where they conflict, then "
                   "summed; heads get their own exit's gradient")
    source = "Yu et al., Gradient Surgery for Multi-Task Learning, NeurIPS 2020 (tianheyu927/PCGrad)"

    def combine(self, shared, ctx):
        k = len(shared)
        orders = torch.rand(k, k, generator=ctx.generator).argsort(1).to(shared.device)
        return project_conflicting(shared, orders).sum(0), torch.ones(k)
