"""The machinery of the gradient-combination objectives (pcgrad, cagrad, nash): each exit's cross-entropy is a task,
and the update of the shared backbone is a combination of the exits' gradients on it.

What is shared is the backbone's blocks: every exit's loss reaches the blocks before it. The heads and the
backbone's classifier belong to one exit each, and get that exit's gradient scaled by the method's weight for it.
The per-exit gradients cost one backward pass per exit (`torch.autograd.grad` on one forward graph, kept with
`retain_graph`), never a pass per sample; the trainer's FLOP counter sees every one of them, so the run's measured
training FLOPs and wall time carry the extra cost. Methods that solve a small K x K problem (CAGrad, Nash-MTL) do so
on the CPU in float64 from the Gram matrix of the gradients: one host sync per step, as in the official code.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from regimes.base import Objective, StepContext


@dataclass
class ExitGradients:
    """The per-exit gradients of one forward: `shared` (K, P) on the blocks' trainable parameters, flattened in
    float32 (zeros where an exit does not reach a parameter); `own[k]` exit k's gradients on every other trainable
    parameter (None where exit k does not reach it)."""

    shared_parameters: list[torch.nn.Parameter]
    own_parameters: list[torch.nn.Parameter]
    shared: Tensor
    own: list[tuple[Tensor | None, ...]]

    def apply(self, direction: Tensor, weights: Tensor) -> None:
        """Write the update into `.grad`: `direction` (P,) on the shared parameters, and on every other parameter
        the sum over exits of weights[k] times exit k's gradient."""
        offset = 0
        for p in self.shared_parameters:
            p.grad = direction[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        for i, p in enumerate(self.own_parameters):
            parts = [w * grads[i] for w, grads in zip(weights, self.own) if grads[i] is not None]
            p.grad = torch.stack(parts).sum(0).to(p.dtype) if parts else None


def exit_gradients(model, losses: Tensor) -> ExitGradients:
    """One backward pass per exit loss in `losses` (K,), on the graph of one forward."""
    shared = [p for p in model.blocks.parameters() if p.requires_grad]
    shared_ids = {id(p) for p in shared}
    own = [p for p in model.parameters() if p.requires_grad and id(p) not in shared_ids]
    rows, own_rows = [], []
    for k, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, shared + own, retain_graph=k < len(losses) - 1, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                               for g, p in zip(grads[:len(shared)], shared)]) if shared
                    else losses.new_zeros(0, dtype=torch.float32))
        own_rows.append(grads[len(shared):])
    return ExitGradients(shared, own, torch.stack(rows), own_rows)


def gram_matrix(grads: Tensor):
    """GGᵀ (K, K) of the per-exit gradients (K, P), in float64 on the CPU: what CAGrad's dual and Nash-MTL's
    bargaining equations are solved from."""
    g = grads.double()
    return (g @ g.T).cpu().numpy()


class GradientCombination(Objective):
    """An objective whose step combines the exits' gradients on the shared blocks (`combine`) instead of
    backpropagating one scalar loss. It acts only where the blocks train together with the heads (P2): under a
    schedule that never does (disjoint), it would be `uniform` under another name, so the registry refuses it."""

    requires_shared_training = True

    def combine(self, shared: Tensor, ctx: StepContext) -> tuple[Tensor, Tensor]:
        """(direction on the shared parameters (P,), weights (K,) of each exit's gradient on its own parameters)
        from the per-exit gradients `shared` (K, P)."""
        raise NotImplementedError

    def loss(self, logits: list[Tensor], y: Tensor, ctx: StepContext) -> Tensor:
        """The sum of the exits' cross-entropies: what every method here descends when the exits do not conflict."""
        return torch.stack([F.cross_entropy(z, y) for z in logits]).sum()

    def step(self, model, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        logits = self.forward(model, x)
        losses = torch.stack([F.cross_entropy(z.float(), y) for z in logits])
        grads = exit_gradients(model, losses)
        direction, weights = self.combine(grads.shared, ctx)
        weights = weights.to(losses.device)
        optimizer.zero_grad(set_to_none=True)
        grads.apply(direction, weights)
        optimizer.step()
        return {"loss": (weights * losses).sum().detach(), "exit_ce": losses.detach()}
