"""`boosted`: Boosted Dynamic Neural Networks (Yu et al., AAAI 2023), the exits as an additive gradient-boosting
ensemble.

Follows the official code (SHI-Labs/Boosted-Dynamic-Networks: models/dynamic_net.py, train_cifar100.py,
models/msdnet_ge.py):
- Exit k outputs the ensemble F_k = z_k + w·F_{k−1} (z_k: head k's logits, F_{−1} = 0, w the shrinkage, the
  official `ensemble_reweight`, 0.5 in its CIFAR-100 MSDNet scripts), in training and at inference alike — the
  model's combiner (`BoostedEnsemble`), so evaluation, analyses and `bench latency` all see the ensemble.
- In training F_{k−1} is detached (the official code builds it under `torch.no_grad`): exit k's loss reaches
  head k and the backbone below it, never an earlier head, so each head fits what the earlier exits left.
- Loss Σ_k CE(F_k, y), summed as in the official code.
- The backbone's gradients are rescaled as the official code's `msdnet_ge` (the architecture of all its CIFAR
  and ImageNet scripts) rescales them: gradient equilibrium (`ge`'s hooks), so each block receives the mean of
  its downstream exits' gradients; on MSDNet on the coarsest scale only, `x[-1]`, as `msdnet_ge` does.
Not followed: per-block weight decay (a linspace of the official `--weight-decay` list, one value in its
scripts) — the grid's single weight decay applies.
"""
from __future__ import annotations

from torch import Tensor, nn

from regimes.base import HParam
from regimes.ge import GradientEquilibrium
from regimes.registry import register_objective


class BoostedEnsemble(nn.Module):
    """Exit k's output F_k = z_k + shrinkage·F_{k−1}, the earlier ensemble detached: its state is F_k itself."""

    def __init__(self, shrinkage: float):
        super().__init__()
        self.shrinkage = shrinkage

    def step(self, k: int, head_logits: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor]:
        out = head_logits if state is None else head_logits + self.shrinkage * state.detach()
        return out, out


@register_objective
class Boosted(GradientEquilibrium):
    name = "boosted"
    description = ("exit k outputs z_k + w·F_{k-1} (the detached ensemble of earlier exits); L = sum_k CE(F_k); "
                   "gradient equilibrium on the backbone")
    source = ("Yu et al., Boosted Dynamic Neural Networks, AAAI 2023 (SHI-Labs/Boosted-Dynamic-Networks)")
    hparams = {"shrinkage": HParam(0.5, "weight w of the earlier ensemble in F_k = z_k + w F_{k-1}",
                                   low=0.0, high=1.0, low_open=True)}

    def exit_combiner(self, model, num_classes: int) -> nn.Module:
        return BoostedEnsemble(self.hp["shrinkage"])
