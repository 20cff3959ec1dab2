"""`cagrad`: Conflict-Averse Gradient descent (Liu et al., NeurIPS 2021), with each exit's cross-entropy as a task.

The update d maximises the worst exit's improvement min_i g_i·d within a ball ‖d − g₀‖ ≤ c‖g₀‖ around the mean
gradient g₀. Follows the official code (Cranial-XIX/CAGrad, `cagrad`, as Nash-MTL's repository reuses it): the
dual over simplex weights w, min_w wᵀ(GGᵀ)1/K + c‖g₀‖·sqrt(wᵀ(GGᵀ)w), solved with SLSQP from uniform weights;
g_w = wᵀG; d = (g₀ + c‖g₀‖ g_w/‖g_w‖) / (1 + c²) (the official `rescale=1`), times K "to match the sum loss";
heads and the classifier get the gradient of the summed cross-entropies. c = 0.4 is the default of Nash-MTL's
benchmark of CAGrad; c = 0 is the mean gradient (times K: the summed loss's gradient).

One change for conditioning, not for the answer: the dual is solved on GGᵀ divided by its mean diagonal, which
scales the dual objective and leaves its minimiser unchanged; the official code hands SLSQP the raw Gram matrix,
whose entries (squared gradient norms, often ~1e-6) fall below SLSQP's absolute tolerance.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from regimes.base import HParam
from regimes.exit_gradients import GradientCombination, gram_matrix, one_blas_thread
from regimes.registry import register_objective


def simplex_weights(gram: np.ndarray, c: float) -> np.ndarray:
    """The dual's minimiser w on the simplex, for the Gram matrix `gram` (K, K) of the task gradients."""
    from scipy.optimize import minimize          # here, not at import: `bench list` loads every regime, no SciPy
    k = len(gram)
    uniform = np.full(k, 1.0 / k)
    scale = np.trace(gram) / k
    if c == 0 or scale <= 0:
        return uniform
    a = gram / scale
    c_scaled = c * np.sqrt(a.mean() + 1e-8)
    objective = lambda w: float(w @ a @ uniform + c_scaled * np.sqrt(w @ a @ w + 1e-8))  # noqa: E731
    with one_blas_thread():
        result = minimize(objective, uniform, bounds=[(0.0, 1.0)] * k,
                          constraints={"type": "eq", "fun": lambda w: 1.0 - w.sum()}, method="SLSQP")
    return result.x


def cagrad_direction(grads: Tensor, c: float) -> Tensor:
    """CAGrad's update (P,) in the official code's mean scale (before the factor K) from task gradients (K, P)."""
    mean = grads.mean(0)
    if c == 0:
        return mean
    gram = gram_matrix(grads)
    w = torch.as_tensor(simplex_weights(gram, c), dtype=grads.dtype, device=grads.device)
    g_w = w @ grads
    lam = c * float(np.sqrt(gram.mean() + 1e-8)) / (float(g_w.norm()) + 1e-8)
    return (mean + lam * g_w) / (1 + c ** 2)


@register_objective
class CAGrad(GradientCombination):
    name = "cagrad"
    description = ("shared-block update maximising the worst exit's improvement in a ball of radius c|g0| around "
                   "the mean gradient; heads get the summed loss's gradient")
    source = "Liu et al., Conflict-Averse Gradient Descent for Multi-task Learning, NeurIPS 2021 (Cranial-XIX/CAGrad)"
    hparams = {"c": HParam(0.4, "radius of the ball around the mean gradient, in units of its norm (0: the mean)",
                           low=0.0, high=10.0)}

    def combine(self, shared, ctx):
        k = len(shared)
        return k * cagrad_direction(shared, self.hp["c"]), torch.ones(k)
