"""`nash`: Nash-MTL, multi-task learning as a bargaining game (Navon et al., ICML 2022), with each exit's
cross-entropy as a task.

The update is Σ α_i g_i with the weights α > 0 that solve the bargaining equations (GGᵀ) α = 1/α element-wise
(G: the exits' gradients on the shared blocks, one per row). Follows the official code (AvivNavon/nash-mtl,
methods/weight_methods.py, `NashMTL` with its defaults: weights recomputed every step, shared-parameter gradient
clipped to norm `max_norm` = 1); the loss Σ α_i CE_i is what the heads and the classifier descend.

Solved differently, same answer: the official code approaches the solution with up to 20 convex sub-problems
(cvxpy/ECOS) and stops when ‖GGᵀα − 1/α‖ < 1e-3; here the equations are the stationarity condition of the
strictly convex f(α) = ½αᵀ(GGᵀ)α − Σ log α_i, minimised by damped Newton steps that keep α > 0, to a residual
of 1e-10 (on GGᵀ normalised by its Frobenius norm, as the official code normalises it; α is scaled back).
"""
from __future__ import annotations

import numpy as np
import torch

from regimes.base import HParam
from regimes.exit_gradients import GradientCombination, gram_matrix, one_blas_thread
from regimes.registry import register_objective

NEWTON_STEPS = 100
TOLERANCE = 1e-10


def bargaining_weights(gram: np.ndarray) -> np.ndarray:
    """α > 0 with (gram α)_i = 1/α_i, for the Gram matrix `gram` (K, K) of the task gradients (solved with one BLAS
    thread: `one_blas_thread`)."""
    with one_blas_thread():
        return _newton(gram)


def _newton(gram: np.ndarray) -> np.ndarray:
    scale = float(np.linalg.norm(gram))
    if scale == 0:
        return np.ones(len(gram))
    a = gram / scale

    def f(beta: np.ndarray) -> float:
        return 0.5 * beta @ a @ beta - np.log(beta).sum()

    beta = np.ones(len(gram))
    for _ in range(NEWTON_STEPS):
        residual = a @ beta - 1.0 / beta
        if np.linalg.norm(residual) < TOLERANCE:
            break
        delta = np.linalg.solve(a + np.diag(1.0 / beta ** 2), residual)
        t = 1.0
        while np.any(beta - t * delta <= 0):
            t /= 2
        while f(beta - t * delta) > f(beta) - 0.25 * t * residual @ delta and t > 1e-12:
            t /= 2
        beta = beta - t * delta
    return beta / np.sqrt(scale)


@register_objective
class NashMTL(GradientCombination):
    name = "nash"
    description = ("shared-block update Σ α_i g_i with the Nash bargaining weights (GGᵀ)α = 1/α, clipped to "
                   "max_norm; heads descend Σ α_i CE_i")
    source = "Navon et al., Multi-Task Learning as a Bargaining Game, ICML 2022 (AvivNavon/nash-mtl)"
    hparams = {"max_norm": HParam(1.0, "the shared blocks' update is clipped to this norm (0: no clipping)",
                                  low=0.0)}

    def combine(self, shared, ctx):
        alpha = torch.as_tensor(bargaining_weights(gram_matrix(shared)), dtype=shared.dtype)
        direction = alpha.to(shared.device) @ shared
        max_norm = self.hp["max_norm"]
        if max_norm > 0:                     # torch.nn.utils.clip_grad_norm_'s rule, as the official code clips
            direction = direction * min(1.0, max_norm / (float(direction.norm()) + 1e-6))
        return direction, alpha
