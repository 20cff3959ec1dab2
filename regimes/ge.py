"""`ge`: Gradient Equilibrium (Li et al., ICCV 2019, "Improved Techniques for Training Adaptive Deep Networks";
official code kalviny/IMTA, models/msdnet_ge.py).

Loss sum_k CE_k. With a plain sum, a block receives the *sum* of the gradients of all exits after it, so early
blocks get gradients that grow with the number of exits and conflict. GE rescales in the backward pass only:
after block i the hidden state (as read by the head there and by later blocks) gets its gradient scaled by 1/n_i,
and the path into later blocks by n_{i+1} = n_i - 1 (at a head), where n_i is the number of exits at or after
block i. By induction every block receives the *mean* of its downstream exits' gradients. IMTA's MSDNet has an
exit after every block (n_i = K - i); here blocks without a head get n_i = n_{i+1}, which makes them pass
gradients through unchanged.
"""
import torch

from benchmark.models.multi_exit import on_coarsest_scale
from regimes.base import Objective
from regimes.losses import cross_entropy
from regimes.registry import register_objective


class ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by `scale` in the backward pass."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def downstream_exits(exit_blocks: list[int], num_blocks: int) -> list[int]:
    """n_i: exits at or after block i (the classifier after the last block counts)."""
    return [1 + sum(b >= i for b in exit_blocks) for i in range(num_blocks)]


@register_objective
class GradientEquilibrium(Objective):
    name = "ge"
    description = "L = sum_k CE_k; backward rescaled between blocks so each block gets the mean of its exits' gradients"
    source = "Li et al., Improved Techniques for Training Adaptive Deep Networks, ICCV 2019 (kalviny/IMTA)"
    uses_between = True
    uses_after_block = True

    def forward(self, model, x):
        self._n = downstream_exits(model.exit_blocks, len(model.blocks))
        return super().forward(model, x)

    def after_block(self, i, hidden):
        return on_coarsest_scale(lambda h: ScaleGradient.apply(h, 1.0 / self._n[i]), hidden)

    def between(self, i, hidden):
        return on_coarsest_scale(lambda h: ScaleGradient.apply(h, float(self._n[i + 1])), hidden)

    def loss(self, logits, y, ctx):
        return torch.stack([cross_entropy(z, y) for z in logits]).sum()
