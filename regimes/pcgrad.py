"""`pcgrad`: Gradient Surgery for Multi-Task Learning (Yu et al., NeurIPS 2020), with each exit's cross-entropy as
a task, as the multi-exit gradient-conflict literature applies it.

Follows Nash-MTL's PCGrad (AvivNavon/nash-mtl, methods/weight_methods.py, a modification of the PyTorch port
WeiChengTseng/Pytorch-PCGrad): each exit's gradient g_i on the shared blocks is projected, against every exit's
*original* gradient g_j in random order — its own g_i included, as in the official TF code (tianheyu927/PCGrad),
the port and Nash-MTL: that matters once earlier projections have turned g_i against its own original — onto the
normal plane of g_j wherever they conflict (g_i·g_j < 0: g_i <- g_i - (g_i·g_j / |g_j|²) g_j); the projected
gradients are summed (Nash-MTL's default reduction "sum", as the TF code sums); heads and the classifier get the
gradient of the summed cross-entropies, i.e. their own exit's gradient (Nash-MTL's task-specific part). Each exit
draws its own order (as the port and Nash-MTL shuffle per task), from the step's objective generator, so runs are
reproducible. Without conflicts the update is the gradient of the summed cross-entropies.
Differences from the other two references, stated: the TF code and the port project the whole parameter vector,
heads included (the heads' entries change the inner products), and the port averages the shared part
(reduction "mean" by default); the TF code projects in one fixed order for every task.
"""
from __future__ import annotations

import torch
from torch import Tensor

from regimes.exit_gradients import GradientCombination
from regimes.registry import register_objective


def project_conflicting(grads: Tensor, orders: Tensor) -> Tensor:
    """PCGrad's projected gradients (K, P) from the per-task gradients `grads` (K, P); `orders` (K, K) holds, per
    row i, a permutation of the tasks: the order in which task i is projected against every task's original
    gradient, its own included. Vectorised over i: step t projects every g_i against g_{orders[i, t]}."""
    projected = grads.clone()
    squared_norms = (grads * grads).sum(1)
    for t in range(orders.shape[1]):
        other = orders[:, t]
        inner = (projected * grads[other]).sum(1)
        conflict = (inner < 0) & (squared_norms[other] > 0)
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
