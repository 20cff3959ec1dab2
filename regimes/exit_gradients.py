"""The machinery of the gradient-combination objectives (pcgrad, cagrad, nash, metagf): each exit's cross-entropy is
a task, and the update of the shared backbone is a combination of the exits' gradients on it.

What is shared is the backbone's blocks: every exit's loss reaches the blocks before it. The heads and the
backbone's classifier belong to one exit each, and get that exit's gradient scaled by the method's weight for it.

The per-exit gradients: one forward, then one backward pass per exit, `torch.autograd.grad` from that exit's own
scalar loss on the forward's graph (kept with `retain_graph`), never a pass per sample. Exit k's pass runs through
its head and the blocks up to its own only, so the K passes cost the sum of those prefixes' backwards: the
arithmetic minimum for K separate gradients (`benchmark.perf.minimum_step_costs`). Until issue 19 the passes
started from the rows of the stacked loss vector; a row's backward runs through the stack into every exit's graph,
the whole network each pass, with zero gradients where exit k does not reach (zeros, not None, on the other heads).
Per step (median of 7 interleaved repeats, 2-core CPU, 1 thread, digits, batch 128, 4 exits), rows -> own losses:
small_cnn pcgrad 65.9 -> 42.0 ms, cagrad 67.6 -> 44.3, nash 63.4 -> 41.3, metagf 92.8 -> 66.5 (uniform 25.3);
cifar_resnet32 pcgrad 280 -> 208, cagrad 218 -> 146, nash 285 -> 173, metagf 391 -> 357 (uniform 87).

Not one batched backward (the K one-hot cotangents through one vmapped backward), because on CPU (torch 2.14) it
is slower, in the same runs: `torch.autograd.grad(losses, ..., grad_outputs=eye(K), is_grads_batched=True)` took
63.0 / 60.3 / 61.8 / 86.2 ms on small_cnn and 315 / 329 / 287 / 387 ms on cifar_resnet32 (pcgrad / cagrad / nash /
metagf), `torch.func.vmap` over `torch.autograd.grad` 68.5 / 65.4 / 66.6 / 95.3 and 275 / 361 / 262 / 441. The
first runs PyTorch's legacy vmap, which has no batching rule for the backward of convolution, batch-norm, pooling or
cross-entropy and loops over the K rows op by op; the second has the rules but sends every row through the whole
network (K full backwards, not the K prefixes) and decomposes batch-norm's backward into many elementwise ops; a
backward batched segment by segment between the exits (rows only where exits reach) was slower than the K passes
too (gradients alone: 42.5 vs 21.2 ms on small_cnn, 460 vs 248 on cifar_resnet32). All give the same gradients, bit
for bit on CPU (tests/test_gradient_combination.py). Not measured on a GPU, where fewer, larger kernels might favour
the batched backward.

The trainer's FLOP counter sees every pass, so the run's measured training FLOPs and wall time carry the extra cost.
Methods that solve a small K x K problem (CAGrad, Nash-MTL) do so on the CPU in float64 from the Gram matrix of the
gradients: one host sync per step, as in the official code.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from regimes.base import Objective, StepContext
from regimes.losses import cross_entropy


@dataclass
class ExitGradients:
    """The per-exit gradients of one forward: `shared` (K, P) on the blocks' trainable parameters, flattened in
    float32 (zeros where an exit does not reach a parameter); `reach` (K, T) bool, whether exit k's loss reaches
    shared parameter t at all (autograd gave it a gradient; MSDNet's exit k does not reach the finer scales of its
    own block, which only later blocks read); `own[k]` exit k's gradients on every other trainable parameter (None
    where exit k does not reach it: every head but its own)."""

    shared_parameters: list[torch.nn.Parameter]
    own_parameters: list[torch.nn.Parameter]
    shared: Tensor
    reach: Tensor
    own: list[tuple[Tensor | None, ...]]

    def own_update(self, weights: Tensor) -> list[Tensor | None]:
        """Per parameter that is not shared: the sum over exits of weights[k] times exit k's gradient (None where no
        exit reaches it)."""
        updates = []
        for i in range(len(self.own_parameters)):
            parts = [w * grads[i] for w, grads in zip(weights, self.own) if grads[i] is not None]
            updates.append(torch.stack(parts).sum(0) if parts else None)
        return updates

    def apply(self, direction: Tensor, weights: Tensor) -> None:
        """Write the update into `.grad`: `direction` (P,) on the shared parameters, `own_update(weights)` on the
        others."""
        offset = 0
        for p in self.shared_parameters:
            p.grad = direction[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
        for p, update in zip(self.own_parameters, self.own_update(weights)):
            p.grad = update.to(p.dtype) if update is not None else None


def exit_gradients(model, losses: Sequence[Tensor]) -> ExitGradients:
    """One backward pass per exit, from each of the exits' scalar losses `losses` (K separate tensors, not the rows of
    one stacked vector: see the module docstring), on the graph of one forward."""
    if isinstance(losses, Tensor):
        raise TypeError("exit_gradients needs the exits' losses as separate scalars, not stacked: a row of a stacked "
                        "vector backpropagates through every exit's graph")
    shared = [p for p in model.blocks.parameters() if p.requires_grad]
    shared_ids = {id(p) for p in shared}
    own = [p for p in model.parameters() if p.requires_grad and id(p) not in shared_ids]
    rows, reach, own_rows = [], [], []
    for k, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, shared + own, retain_graph=k < len(losses) - 1, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                               for g, p in zip(grads[:len(shared)], shared)]) if shared
                    else loss.new_zeros(0, dtype=torch.float32))
        reach.append([g is not None for g in grads[:len(shared)]])
        own_rows.append(grads[len(shared):])
    reached = torch.tensor(reach, dtype=torch.bool).reshape(len(losses), len(shared))
    return ExitGradients(shared, own, torch.stack(rows), reached, own_rows)


def one_blas_thread():
    """A context in which NumPy's and SciPy's BLAS/LAPACK run on one thread. CAGrad's and Nash-MTL's small solves go
    through them, and OpenBLAS sums in an order that depends on its thread count: with 2 BLAS threads joint+cagrad's
    logits differed from a Ray worker's (which has 1) although torch ran 1 thread in both. One thread everywhere makes
    the solve — and the run — the same on every machine and executor."""
    from threadpoolctl import threadpool_limits
    return threadpool_limits(limits=1, user_api="blas")


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
        return torch.stack([cross_entropy(z, y) for z in logits]).sum()

    def step(self, model, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer, ctx: StepContext) -> dict:
        logits = self.forward(model, x)
        exit_losses = [cross_entropy(z.float(), y) for z in logits]
        grads = exit_gradients(model, exit_losses)
        losses = torch.stack(exit_losses).detach()
        direction, weights = self.combine(grads.shared, ctx)
        weights = weights.to(losses.device)
        optimizer.zero_grad(set_to_none=True)
        grads.apply(direction, weights)
        optimizer.step()
        return {"loss": (weights * losses).sum(), "exit_ce": losses}
