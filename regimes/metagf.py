"""`metagf`: Meta-GF, meta-learned gradient fusion (Sun et al., "Meta-GF: Training Dynamic-Depth Neural Networks
Harmoniously", ECCV 2022), at the granularity of one optimisation step.

The official code (SYVAE/MetaGF, M5main_GF.py, tools/DifUpdate.py; its CIFAR scripts' settings) per epoch: (1) for
each exit k, from the same starting weights, trains one epoch on s_k·(CE_k + a·Σ_{j≠k} w_j·CE_j) giving weights θ_k
(a = `auxiliarylr` 0.1; w = [1, 1, 0.6, 0.6, 0.75, 0.9, 1], fixed per exit j in `train_minibatch`; s_k the SDN ramp
τ_k of the current epoch for an internal exit and 1 for the last when `usingsdn` is 1 — its ResNet and VGG scripts
—, 1 when it is 0 — its MSDNet script); (2) fuses them tensor by tensor, θ_t = Σ_k σ(m_kt) θ_kt / Σ_k σ(m_kt), over
the exits whose loss reaches tensor t (`p.grad is not None` for exit k's output; the heads: their own exit only),
with one meta-weight m_kt per (exit, tensor), initialised to 1; (3) learns m by Adam (lr 0.1) on the SDN-weighted
loss of the fused network, differentiating through the fusion; (4) keeps an EMA of the meta-weights,
m <- 0.1·m_new + 0.9·m_old. Both ramps read the 0-based epoch: τ_k = min(C_k, 0.01 + e·C_k / E), e = 0, ..., E − 1.

Here one step plays one epoch's part: each exit's task update is the gradient d_k = s_k·(g_k + a·Σ_{j≠k} w_j·g_j)
of one batch (one backward per exit, from its own loss, on one forward: `exit_gradients`), the fused update
d_t = Σ_k σ(m_kt) d_kt / Σ_k σ(m_kt) over the exits whose loss reaches tensor t (where autograd gives exit k a
gradient, `ExitGradients.reach`: on MSDNet exit k does not reach the finer scales of its own block), and the
meta-weights take one Adam step on the SDN-weighted loss (`sdn_weights`, the ramp the official meta loss uses) of
the same batch at the look-ahead weights θ − lr·d(m), then the EMA. The fused update is applied as the gradient of
the run's optimizer (momentum, weight decay), as pcgrad, cagrad and nash apply theirs; it is the update fused with
the meta-weights from before their step, as the official epoch keeps the network fused before the last meta step.
Heads and the classifier get their own exit's task gradient s_k·g_k (the only θ_k the fusion reads for them), in
the update and in the look-ahead. `task_ramp = "auto"` follows the official scripts per architecture (the ramp on
single-scale backbones, none on MSDNet).
Deviations, stated: per step, not per epoch (an epoch per exit would multiply the run's compute by K + 1); the
look-ahead is plain SGD at the current lr; on a network with more than 7 exits, exits past the seventh weigh 1 in
the auxiliary terms (the official list ends there, with 1).
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.func import functional_call

from regimes.base import HParam, StepContext
from regimes.exit_gradients import GradientCombination, exit_gradients
from regimes.losses import cross_entropy
from regimes.registry import register_objective
from regimes.sdn import sdn_weights


AUXILIARY_EXIT_WEIGHTS = (1.0, 1.0, 0.6, 0.6, 0.75, 0.9, 1.0)
"""w_j: the official weights of exit j's loss in another exit's task (`train_minibatch`), times `auxiliary`."""


def auxiliary_exit_weights(num_exits: int) -> Tensor:
    """w_j for exits 0..K−1: the official list, 1 past its seventh entry."""
    return torch.tensor([AUXILIARY_EXIT_WEIGHTS[j] if j < len(AUXILIARY_EXIT_WEIGHTS) else 1.0
                         for j in range(num_exits)])


def task_directions(grads: Tensor, auxiliary: float, exit_weights: Tensor, task_scales: Tensor) -> Tensor:
    """d_k = s_k·(g_k + a·Σ_{j≠k} w_j·g_j) for every exit k (K, P): the gradient of the official inner task's loss
    s_k·(CE_k + a·Σ_{j≠k} w_j·CE_j)."""
    weighted = (auxiliary * exit_weights.to(grads))[:, None] * grads
    return task_scales.to(grads)[:, None] * (grads + weighted.sum(0, keepdim=True) - weighted)


def fuse(directions: Tensor, meta_weights: Tensor, reach: Tensor, sizes: list[int]) -> Tensor:
    """Σ_k σ(m_kt) d_kt / Σ_k σ(m_kt) over the exits reaching each tensor t; `directions` (K, P) flattened over
    tensors of `sizes`, `meta_weights` and `reach` (K, T); 0 on a tensor no exit reaches. Differentiable in
    `meta_weights`."""
    weights = torch.sigmoid(meta_weights) * reach
    weights = weights / weights.sum(0, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    per_entry = weights.repeat_interleave(torch.tensor(sizes, device=weights.device), dim=1)
    return (per_entry * directions).sum(0)


@register_objective
class MetaGF(GradientCombination):
    name = "metagf"
    description = ("shared-block update: per-tensor fusion Σ σ(m) d_k / Σ σ(m) of the exits' task updates "
                   "d_k = g_k + a Σ g_j, meta-weights m learned by Adam on the look-ahead loss, EMA-smoothed")
    source = "Sun et al., Meta-GF: Training Dynamic-Depth Neural Networks Harmoniously, ECCV 2022 (SYVAE/MetaGF)"
    hparams = {
        "auxiliary": HParam(0.1, "weight a of the other exits' losses in each exit's task update", low=0, high=1),
        "meta_lr": HParam(0.1, "Adam learning rate of the meta-weights", low=0.0, low_open=True),
        "ema": HParam(0.9, "weight of the previous meta-weights in their EMA", low=0, high=1),
        "c_min": HParam(0.15, "SDN weight cap of the first internal exit in the meta loss", low=0, high=1),
        "c_max": HParam(0.90, "SDN weight cap of the last internal exit in the meta loss", low=0, high=1),
        "task_ramp": HParam("auto", "SDN ramp s_k on exit k's task loss (official `usingsdn`): sdn, none, or auto "
                                    "(sdn on single-scale backbones, none on multi-scale ones, as the official "
                                    "scripts)", choices=("auto", "sdn", "none")),
    }

    def __init__(self, **overrides):
        super().__init__(**overrides)
        # Created on the first step, fixed for the run: the meta-weights (K, T) with their Adam, which exits reach
        # each shared tensor (K, T), the tensors' sizes and the parameters' names (for the look-ahead call).
        self.meta_weights: Tensor | None = None
        self.meta_optimizer: torch.optim.Optimizer | None = None
        self.reach: Tensor | None = None
        self.sizes: list[int] = []
        self.names: dict[int, str] = {}
        self._restore: dict = {}

    def state_dict(self) -> dict:
        if self.meta_weights is None:
            return {}
        return {"meta_weights": self.meta_weights.detach().clone(), "meta_optimizer": self.meta_optimizer.state_dict()}

    def load_state_dict(self, state: dict, model) -> None:
        """Kept until the first step builds the meta-weights (their shape needs that step's gradients' reach)."""
        self._restore = dict(state)

    def meta_loss_weights(self, ctx: StepContext) -> Tensor:
        """The SDN ramp at the 0-based epoch for the internal exits, 1 for the last (official `eval_validate`)."""
        taus = sdn_weights(ctx.epoch, ctx.epochs, ctx.num_exits - 1, self.hp["c_min"], self.hp["c_max"])
        return torch.tensor([*taus, 1.0], dtype=torch.float32)

    def task_scales(self, model, ctx: StepContext) -> Tensor:
        """s_k: the SDN ramp (the meta loss's weights) or 1 for every exit, per `task_ramp`."""
        ramp = self.hp["task_ramp"] == "sdn" or (self.hp["task_ramp"] == "auto" and not model.multi_scale)
        return self.meta_loss_weights(ctx) if ramp else torch.ones(ctx.num_exits)

    def step(self, model, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        logits = self.forward(model, x)
        exit_losses = [cross_entropy(z.float(), y) for z in logits]
        grads = exit_gradients(model, exit_losses)
        losses = torch.stack(exit_losses).detach()
        if self.meta_weights is None:
            self.reach = grads.reach.to(losses.device)
            self.sizes = [p.numel() for p in grads.shared_parameters]
            self.names = {id(p): n for n, p in model.named_parameters()}
            self.meta_weights = torch.ones(self.reach.shape, device=losses.device, requires_grad=True)
            self.meta_optimizer = torch.optim.Adam([self.meta_weights], lr=self.hp["meta_lr"])
            if self._restore:                          # resumed from a tuning rung (`load_state_dict`)
                with torch.no_grad():
                    self.meta_weights.copy_(self._restore["meta_weights"])
                self.meta_optimizer.load_state_dict(self._restore["meta_optimizer"])
                self._restore = {}
        scales = self.task_scales(model, ctx).to(losses.device)
        directions = task_directions(grads.shared, self.hp["auxiliary"], auxiliary_exit_weights(len(losses)), scales)
        fused = fuse(directions, self.meta_weights, self.reach, self.sizes)
        update = fused.detach()
        self.meta_step(model, x, y, grads, fused, scales, optimizer.param_groups[0]["lr"], ctx)
        optimizer.zero_grad(set_to_none=True)
        grads.apply(update, scales)
        optimizer.step()
        return {"loss": losses.sum(), "exit_ce": losses}

    def meta_step(self, model, x, y, grads, fused: Tensor, scales: Tensor, lr: float, ctx: StepContext) -> None:
        """One Adam step of the meta-weights on the SDN-weighted loss at θ − lr·fused (heads: their own exit's
        task gradient), then the EMA. The look-ahead forward uses copies of the buffers: BatchNorm's running
        statistics see each batch once."""
        ahead, offset = {}, 0
        for p, size in zip(grads.shared_parameters, self.sizes):
            ahead[self.names[id(p)]] = p.detach() - lr * fused[offset:offset + size].view_as(p)
            offset += size
        for p, own in zip(grads.own_parameters, grads.own_update(scales)):
            ahead[self.names[id(p)]] = p.detach() - lr * own if own is not None else p.detach()
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        logits = functional_call(model, {**ahead, **buffers}, (x,))
        weights = self.meta_loss_weights(ctx).to(fused.device)
        meta_loss = (weights * torch.stack([cross_entropy(z.float(), y) for z in logits])).sum()
        previous = self.meta_weights.detach().clone()
        self.meta_optimizer.zero_grad(set_to_none=True)
        self.meta_weights.grad, = torch.autograd.grad(meta_loss, self.meta_weights)
        self.meta_optimizer.step()
        with torch.no_grad():
            self.meta_weights.mul_(1 - self.hp["ema"]).add_(self.hp["ema"] * previous)
