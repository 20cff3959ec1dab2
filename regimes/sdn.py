"""`sdn`: Shallow-Deep Networks' ramped exit weights (Kaya et al., ICML 2019).

L = sum_{k<K} tau_k(t) * CE_k + CE_K with tau_k(t) = min(C_k, 0.01 + t * C_k / E): internal exits start almost
unweighted and reach their cap C_k (spread linearly from c_min to c_max over the internal exits) by the end of
the phase, so early training shapes the backbone for the final exit first. t is the 1-based epoch of the phase
and E its length, as in the official code's training loop.
"""
import numpy as np

from regimes.base import HParam, Objective
from regimes.losses import cross_entropy
from regimes.registry import register_objective


def sdn_weights(epoch: int, epochs: int, internal_exits: int, c_min: float, c_max: float) -> np.ndarray:
    """tau_k at 1-based `epoch` of `epochs` for each internal exit (closed form of the SDN schedule)."""
    caps = np.linspace(c_min, c_max, internal_exits)
    return np.minimum(caps, 0.01 + epoch * caps / epochs)


@register_objective
class SDN(Objective):
    name = "sdn"
    description = "L = sum_k<K tau_k(t) CE_k + CE_K, tau_k(t) = min(C_k, 0.01 + t C_k / E), C_k linear c_min..c_max"
    source = "Kaya, Hong & Dumitras, Shallow-Deep Networks, ICML 2019"
    hparams = {
        "c_min": HParam(0.15, "weight cap C_k of the first internal exit (the final exit weighs 1)", low=0, high=1),
        "c_max": HParam(0.90, "weight cap C_k of the last internal exit (the final exit weighs 1)", low=0, high=1),
    }

    def loss(self, logits, y, ctx):
        taus = sdn_weights(ctx.epoch + 1, ctx.epochs, len(logits) - 1, self.hp["c_min"], self.hp["c_max"])
        total = cross_entropy(logits[-1], y)
        for tau, z in zip(taus, logits[:-1]):
            total = total + float(tau) * cross_entropy(z, y)
        return total
