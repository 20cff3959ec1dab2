"""Runs one phase of a regime: the right parameters, a fresh optimizer and per-step cosine schedule,
paired batch order, and a per-epoch history. Knows schedules only through `Phase.trains`.

- `backbone` (P1): plain cross-entropy on the backbone's own classifier; heads are not computed.
- `all` (P2): the objective's step over every exit.
- `heads` (P3): backbone frozen — `requires_grad_(False)` and its modules in eval() so BatchNorm statistics
  stay put too; the objective's step over every exit (the frozen classifier contributes a zero-grad term).
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from benchmark.determinism import derive_seed
from benchmark.errors import NonFiniteLoss
from benchmark.models.eval_mode import evaluating
from regimes.base import Objective, Phase, StepContext


@dataclass
class PhaseCost:
    """What a phase cost. FLOPs are measured, not estimated: the first step of each kind (`step_kind`) runs under
    `FlopCounterMode` (matmul/conv forward and backward, 1 multiply-add = 2 FLOPs; it leaves the numbers
    bitwise unchanged) and every step of that kind is charged its count. `wall_seconds` includes that counted
    step, which runs ~2x slower on CPU. On CPU the fused attention kernels escape the counter (flops.py)."""

    wall_seconds: float = 0.0
    optimizer_steps: int = 0
    examples_seen: int = 0                     # examples drawn from the training split, summed over steps
    train_flops: float = 0.0
    flops_per_step: float = 0.0                # train_flops / step calls (a mean where step kinds mix)
    step_flops: dict[str, float] = field(default_factory=dict)   # the measured FLOPs of one step of each kind


@dataclass
class PhaseResult:
    history: list[dict] = field(default_factory=list)
    cost: PhaseCost = field(default_factory=PhaseCost)


def make_optimizer(params: list[torch.nn.Parameter], train: dict) -> torch.optim.Optimizer:
    if train["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=train["lr"], weight_decay=train["weight_decay"])
    return torch.optim.SGD(params, lr=train["lr"], momentum=train["momentum"], nesterov=train["nesterov"],
                           weight_decay=train["weight_decay"])


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from the base lr to 0 over the phase, stepped per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)))


def set_trainable(model, trains: str) -> list[torch.nn.Parameter]:
    """Turn requires_grad on exactly for the parameters this phase trains; return them."""
    backbone = {id(p) for p in model.backbone_parameters()}
    trained = []
    for p in model.parameters():
        on = {"backbone": id(p) in backbone, "all": True, "heads": id(p) not in backbone}[trains]
        p.requires_grad_(on)
        if on:
            trained.append(p)
    return trained


def set_train_mode(model, trains: str) -> None:
    model.train()
    if trains == "heads":
        for module in model.backbone_modules():
            module.eval()


def backbone_step(model, x, y, optimizer, ctx) -> dict:
    """P1: the backbone alone, cross-entropy on its own classifier whatever the objective."""
    loss = F.cross_entropy(model.forward_final(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), "exit_ce": loss.detach().reshape(1)}


def exit_accuracies(model, x: torch.Tensor, y: torch.Tensor, batch_size: int, autocast) -> list[float]:
    correct = None
    with evaluating(model):
        for start in range(0, len(x), batch_size):
            with autocast():
                logits = model(x[start:start + batch_size])
            hits = torch.stack([(z.argmax(1) == y[start:start + batch_size]).sum() for z in logits])
            correct = hits if correct is None else correct + hits
    return (correct.double() / len(x)).tolist()


def run_phase(model, phase: Phase, objective: Objective, data, train: dict, *, pairing_seed: int,
              epoch_offset: int, device: torch.device,
              on_epoch: Callable[[str, int, float], None] | None = None,
              after_epoch: Callable[[int], None] | None = None) -> PhaseResult:
    """Train `model` in place for one phase. `epoch_offset` is the number of epochs the run trained before this
    phase: batch order and augmentation of global epoch e are seeded by (pairing seed, e), so a mixed run's P2
    epoch 0 sees the same batches as a joint run's epoch E1. Objectives get a generator of their own
    (`ctx.generator`) so their randomness never shifts the batches. `after_epoch(global_epoch)` runs after each
    epoch's bookkeeping, outside the timed part (information-plane snapshots use it)."""
    trained = set_trainable(model, phase.trains)
    optimizer = make_optimizer(trained, train)
    n, batch_size = len(data.x_train), train["batch_size"]
    steps_per_epoch = max(1, n // batch_size)          # drop the ragged last batch (BatchNorm needs >1 sample)
    scheduler = cosine_schedule(optimizer, steps_per_epoch * phase.epochs)
    step_fn = backbone_step if phase.trains == "backbone" else objective.step
    step_kind = (lambda ctx: "step") if phase.trains == "backbone" else objective.step_kind
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext)
    result = PhaseResult()
    step = 0
    for epoch in range(phase.epochs):
        global_epoch = epoch_offset + epoch
        started = time.perf_counter()
        set_train_mode(model, phase.trains)
        generator = torch.Generator().manual_seed(derive_seed(pairing_seed, "epoch", global_epoch))
        order = torch.randperm(n, generator=generator).to(device)
        loss_sum = torch.zeros((), device=device)
        ce_sum = None
        ctx = StepContext(phase=phase.name, epoch=epoch, epochs=phase.epochs, step=step, num_exits=model.num_exits,
                          generator=torch.Generator().manual_seed(derive_seed(pairing_seed, "objective", global_epoch)),
                          data_kind=data.kind)
        optimizer_steps = drawn = 0
        for b in range(steps_per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            x = data.augment(data.x_train[idx], generator)
            if device.type == "cuda" and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            ctx.step = step
            kind = step_kind(ctx)
            counter = None if kind in result.cost.step_flops else FlopCounterMode(display=False)
            with nullcontext() if counter is None else counter, autocast():
                out = step_fn(model, x, data.y_train[idx], optimizer, ctx)
            if counter is not None:
                result.cost.step_flops[kind] = float(counter.get_total_flops())
            result.cost.train_flops += result.cost.step_flops[kind]
            scheduler.step()
            step += 1
            optimizer_steps += out.get("optimizer_steps", 1)
            drawn += len(idx)
            loss_sum += out["loss"].float()
            ce_sum = out["exit_ce"].float() if ce_sum is None else ce_sum + out["exit_ce"].float()
        mean_loss = (loss_sum / steps_per_epoch).item()        # one host sync per epoch, not per step
        if not math.isfinite(mean_loss):
            raise NonFiniteLoss(global_epoch + 1, phase.name)
        seconds = time.perf_counter() - started
        result.cost.wall_seconds += seconds
        result.cost.optimizer_steps += optimizer_steps
        result.cost.examples_seen += drawn
        evaluate_now = (epoch + 1) % train["eval_every"] == 0 or epoch + 1 == phase.epochs
        val_acc = exit_accuracies(model, data.x_val, data.y_val, 512, autocast) if evaluate_now else None
        exit_ce = (ce_sum / steps_per_epoch).tolist()
        for k in range(model.num_exits):
            trained_exit = phase.trains != "backbone" or k == model.num_exits - 1
            result.history.append({
                "phase": phase.name, "epoch": epoch + 1, "global_epoch": global_epoch + 1, "exit": k,
                "train_loss": mean_loss,
                "train_exit_ce": (exit_ce[k] if phase.trains != "backbone" else exit_ce[0]) if trained_exit else math.nan,
                "val_accuracy": val_acc[k] if val_acc is not None else math.nan,
                "lr_end": scheduler.get_last_lr()[0], "epoch_seconds": seconds,
            })
        if on_epoch:
            on_epoch(phase.name, epoch + 1, mean_loss)
        if after_epoch:
            after_epoch(global_epoch + 1)
    result.cost.flops_per_step = result.cost.train_flops / step
    return result
