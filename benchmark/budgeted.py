"""The budgeted-batch allocation of MSDNet (Huang et al. 2018) and L2W (Han, Pu et al. 2022), written once:
evaluation fits its exit thresholds from it (benchmark/evaluate.py) and `l2w` trains against it
(regimes/l2w.py), so the policy a model is trained for is the policy it is evaluated with.

A pure module (numpy and torch, no runner): `regimes` may import it.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def budget_shares(q: np.ndarray | float, n_exits: int) -> np.ndarray:
    """MSDNet/L2W exit shares p_k ∝ q**k for k = 1..K, normalised to sum to 1; shape q.shape + (K,).

    q < 1 front-loads the early exits (cheap), q > 1 the late ones (accurate), q = 1 is uniform.
    """
    q = np.asarray(q, dtype=np.float64)
    shares = q[..., None] ** np.arange(1, n_exits + 1)
    return shares / shares.sum(axis=-1, keepdims=True)


def budgeted_exits(confidence: Tensor, shares: Sequence[float]) -> Tensor:
    """The exit each sample leaves at under the budgeted-batch policy, from `confidence` (K, n) and `shares` (K,).

    Walk the internal exits in order: exit k takes the floor(n * shares[k]) samples most confident at exit k among
    those no earlier exit took (equal confidences: the lower index first, so the result is deterministic); the
    last exit takes the rest. Counts are Python ints and the ranking a stable sort: no host sync on CUDA.
    """
    num_exits, n = confidence.shape
    exit_of = torch.full((n,), num_exits - 1, dtype=torch.long, device=confidence.device)
    taken = torch.zeros(n, dtype=torch.bool, device=confidence.device)
    for k, share in enumerate(list(shares)[:-1]):
        ranked = confidence[k].masked_fill(taken, -math.inf).argsort(descending=True, stable=True)
        chosen = ranked[:math.floor(n * share)]
        exit_of.index_fill_(0, chosen, k)              # a scalar fill: `exit_of[chosen] = k` syncs on CUDA
        taken.index_fill_(0, chosen, True)
    return exit_of
