"""Runs one phase of a regime: the right parameters, a fresh optimizer and per-step cosine schedule,
paired batch order, and a per-epoch history. Knows schedules only through `Phase.trains`.

- `backbone` (P1): plain cross-entropy on the backbone's own classifier; heads are not computed.
- `all` (P2): the objective's step over every exit.
- `heads` (P3): backbone frozen — `requires_grad_(False)` and its modules in eval() so BatchNorm statistics
  stay put too; the objective's step over every exit (the frozen classifier contributes a zero-grad term).
- `combiner` (an objective's last phase, ztw's ensembles): only the exit combiner's last-phase parameters train,
  the whole network frozen and in eval(); the objective's step over every exit.
The combiner's other parameters (ztw's cascades) train wherever the heads do.
"""
from __future__ import annotations

import math
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from benchmark.dense import confusion_per_image, mean_iou
from benchmark.determinism import derive_seed, eval_batch_size
from benchmark.flops import counting_flops
from benchmark.errors import NonFiniteLoss
from benchmark.models.eval_mode import evaluating
from regimes.base import Objective, Phase, StepContext
from regimes.losses import cross_entropy


@dataclass
class PhaseCost:
    """What a phase cost. FLOPs are measured, not estimated: the first step of each kind (`step_kind`) runs under
    `flops.counting_flops` (matmul/conv forward and backward, 1 multiply-add = 2 FLOPs; it leaves the numbers
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
    optimizer: torch.optim.Optimizer | None = None
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    def state(self) -> dict:
        """What `run_phase(..., resume=...)` needs to go on after a `stop_epoch`: tensors and plain values only, so
        it loads with `weights_only=True`."""
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "cost": asdict(self.cost)}


def make_optimizer(params: list[torch.nn.Parameter], train: dict) -> torch.optim.Optimizer:
    """foreach: one C++ loop over the parameters (PyTorch's default on CUDA only); on the CPU it gives the per-tensor
    loop's numbers bit for bit and saves its Python overhead (fused kernels would not: they round differently)."""
    if train["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=train["lr"], weight_decay=train["weight_decay"], foreach=True)
    return torch.optim.SGD(params, lr=train["lr"], momentum=train["momentum"], nesterov=train["nesterov"],
                           weight_decay=train["weight_decay"], foreach=True)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from the base lr to 0 over the phase, stepped per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps)))


def set_trainable(model, trains: str) -> list[torch.nn.Parameter]:
    """Turn requires_grad on exactly for the parameters this phase trains; return them."""
    backbone = {id(p) for p in model.backbone_parameters()}
    last = {id(p) for p in model.last_phase_parameters()}
    trained = []
    for p in model.parameters():
        on = {"backbone": id(p) in backbone, "all": id(p) not in last,
              "heads": id(p) not in backbone and id(p) not in last, "combiner": id(p) in last}[trains]
        p.requires_grad_(on)
        if on:
            trained.append(p)
    return trained


def set_train_mode(model, trains: str) -> None:
    if trains == "combiner":
        model.eval()
        return
    model.train()
    if trains == "heads":
        for module in model.backbone_modules():
            module.eval()


def held(data, split: str) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """A split as the dataset holds it and the rule that makes model inputs of a batch of it: a `Dataset` may hold
    uint8 pixels (normalised per batch); anything else passed as data (tests' subsets) holds model inputs."""
    if hasattr(data, "stored"):
        return data.stored(split), data.normalise
    return getattr(data, f"x_{split}"), lambda x: x


def eager(on: bool = True):
    """Run compiled (--fast) modules eagerly inside: FLOP counting, evaluation. Nothing when `on` is False or when
    torch.compile was never imported (then nothing is compiled, and importing it would cost every run ~1 s)."""
    return torch.compiler.set_stance("force_eager") if on and "torch._dynamo" in sys.modules else nullcontext()


COMPILE_BACKEND = "inductor"
"""The torch.compile backend of --fast (tests swap in a failing one to exercise the fallback)."""
_COMPILE_WARNED: set[str] = set()
COMPILES_PER_MODULE = 4
"""Compiled graphs a module may need: `Module.compile` runs every compiled module through one wrapper function, so
dynamo counts all their graphs against that one function's recompile limit, 8 by default — which small_cnn passed
under l2w, metagf and disjoint, and vgg16_bn (11 distinct modules) under any regime; the modules after the 8th graph
then ran eagerly. One graph per module as it trains, one with its parameters frozen (disjoint's P3), and room for
the look-ahead steps' substituted parameters (l2w: 21 graphs for small_cnn's 13 modules)."""


def compile_for_training(model, data, batch_size: int, device: torch.device) -> dict:
    """--fast: compile every block, exit head and the classifier in place (`Module.compile`, so state_dict keys,
    hooks, `forward_final` and `functional_call` keep working) and probe the compiled model at once with one
    forward and backward on a training-sized batch, so that a compilation failure shows here rather than mid-run.
    The probe leaves no trace: weights, BatchNorm statistics, gradients and RNG states are restored.

    Shapes are static (`dynamic=False`): a module sees one batch shape in training (the ragged last batch is
    dropped; evaluation runs eagerly), so the kernels are specialised to it instead of being made shape-generic
    when the next module's different shapes reach the shared wrapper (that took 20 % longer to compile small_cnn
    on the CPU). The recompile limit grows to `COMPILES_PER_MODULE` graphs per module (process-wide, never lowered),
    and dynamo's caches are emptied first, so a run compiles the same graphs whatever a worker trained before it
    (graphs of earlier runs would count against the same limits; the on-disk inductor cache still spares the C++).

    If compiling or the probe raises, the modules are returned to eager, a warning with the reason is given (once
    per reason and process) and training goes on eagerly. Returns {"compiled": bool, "compile_error": str|None}
    for metrics.json. Compiles that fail later (another phase's graph) fall back to eager per graph
    (torch._dynamo's suppress_errors) without failing the run."""
    modules = [*model.blocks, *model.heads, model.classifier]
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if device.type == "cuda" else None)
    grad_enabled, training = torch.is_grad_enabled(), model.training
    import torch._dynamo as dynamo          # here, not at the top: importing it costs ~1 s
    try:
        dynamo.reset()                    # this run's graphs only: a worker's earlier runs fill no limit here
        dynamo.config.suppress_errors = False
        # cache_size_limit: the recompile limit's name in every torch this supports (newer ones alias it)
        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, COMPILES_PER_MODULE * len(modules))
        for module in modules:
            module.compile(backend=COMPILE_BACKEND, dynamic=False)
        x_train, prepare = held(data, "train")
        x = prepare(x_train[:batch_size])
        if device.type == "cuda" and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()
        model.train()
        with torch.enable_grad(), autocast:
            logits = model(x)
        torch.stack([z.float().sum() for z in logits]).sum().backward()
        error = None
    except Exception as failure:  # noqa: BLE001 — any failure to compile means: train eagerly
        cause = getattr(failure, "inner_exception", None) or failure.__cause__ or failure   # the backend's own error
        message = (str(cause).strip().splitlines() or [""])[0][:300]
        error = type(failure).__name__ + (f" ({type(cause).__name__}: {message})" if cause is not failure
                                          else f": {message}")
        for module in modules:
            module._compiled_call_impl = None
        dynamo.reset()
        if error not in _COMPILE_WARNED:
            _COMPILE_WARNED.add(error)
            warnings.warn(f"--fast: torch.compile failed, training eagerly instead ({error})", stacklevel=2)
    finally:
        for p in model.parameters():
            p.grad = None
        with torch.no_grad():
            model.load_state_dict(saved)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
        torch.set_grad_enabled(grad_enabled)
        model.train(training)
    dynamo.config.suppress_errors = error is None
    return {"compiled": error is None, "compile_error": error}


def backbone_step(model, x, y, optimizer, ctx) -> dict:
    """P1: the backbone alone, cross-entropy on its own classifier (its decoder, pixel-averaged, for segmentation)
    whatever the objective."""
    loss = cross_entropy(model.forward_final(x), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss.detach(), "exit_ce": loss.detach().reshape(1)}


def exit_accuracies(model, x: torch.Tensor, y: torch.Tensor, batch_size: int, autocast,
                    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[float]:
    """Per-exit accuracy on (x, y) in batches — for label maps (N, H, W), mIoU over the split's labelled pixels (the
    accuracy columns' segmentation metric, `benchmark.dense`); `prepare` turns a batch of stored values into model
    inputs (`Dataset.normalise` for uint8 pixels), so a whole split is never normalised at once."""
    dense = y.dim() == 3
    counts = None
    with evaluating(model), eager():                       # evaluation never runs a compiled (--fast) graph
        for start in range(0, len(x), batch_size):
            batch, labels = x[start:start + batch_size], y[start:start + batch_size]
            with autocast():
                logits = model(batch if prepare is None else prepare(batch))
            if dense:
                found = torch.stack([confusion_per_image(z, labels, z.shape[1]).sum(0) for z in logits])
            else:
                found = torch.stack([(z.argmax(1) == labels).sum() for z in logits])
            counts = found if counts is None else counts + found
    if dense:
        return mean_iou(counts.cpu().numpy()).tolist()
    return (counts.double() / len(x)).tolist()


def run_phase(model, phase: Phase, objective: Objective, data, train: dict, *, pairing_seed: int,
              epoch_offset: int, device: torch.device,
              on_epoch: Callable[[str, int, float], None] | None = None,
              after_epoch: Callable[[int], None] | None = None, start_epoch: int = 0,
              stop_epoch: int | None = None, resume: dict | None = None) -> PhaseResult:
    """Train `model` in place for one phase. `epoch_offset` is the number of epochs the run trained before this
    phase: batch order and augmentation of global epoch e are seeded by (pairing seed, e), so a mixed run's P2
    epoch 0 sees the same batches as a joint run's epoch E1. Objectives get a generator of their own
    (`ctx.generator`) so their randomness never shifts the batches. `after_epoch(global_epoch)` runs after each
    epoch's bookkeeping, outside the timed part (information-plane snapshots use it). The phase's own settings
    (`Phase.train`) replace those of `train` that they name.

    Successive-halving rungs (`benchmark.tuning`) cut a phase in two: `stop_epoch` ends it after that many of its
    epochs (the schedule still spans all `phase.epochs`), and the returned `PhaseResult.state()` is what a later
    call needs to go on; that call passes it as `resume` with `start_epoch` = the epochs done. Everything else an
    epoch depends on is seeded by the global epoch, so the two halves train bitwise what one call trains."""
    train = {**train, **(phase.train or {})}
    trained = set_trainable(model, phase.trains)
    if phase.trains == "combiner":
        model.combiner.begin_last_phase()
    optimizer = make_optimizer(trained, train)
    (x_train, prepare), (x_val, _) = held(data, "train"), held(data, "val")
    n, batch_size = len(x_train), train["batch_size"]
    steps_per_epoch = max(1, n // batch_size)          # drop the ragged last batch (BatchNorm needs >1 sample)
    scheduler = cosine_schedule(optimizer, steps_per_epoch * phase.epochs)
    result = PhaseResult(optimizer=optimizer, scheduler=scheduler)
    if resume is not None:
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        result.cost = PhaseCost(**resume["cost"])
    step_fn = backbone_step if phase.trains == "backbone" else objective.step
    step_kind = (lambda ctx: "step") if phase.trains == "backbone" else objective.step_kind
    autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else nullcontext)
    step = start_epoch * steps_per_epoch
    for epoch in range(start_epoch, phase.epochs if stop_epoch is None else stop_epoch):
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
            if data.task == "segmentation":                         # label maps move with their images
                x, y = data.training_pair(idx, generator)
            else:
                x, y = prepare(data.augment(x_train[idx], generator)), data.y_train[idx]  # normalised after the crop
            if device.type == "cuda" and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            ctx.step = step
            kind = step_kind(ctx)
            counter = None if kind in result.cost.step_flops else counting_flops()
            with nullcontext() if counter is None else counter, eager(counter is not None), autocast():
                out = step_fn(model, x, y, optimizer, ctx)
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
        val_acc = (exit_accuracies(model, x_val, data.y_val, eval_batch_size(device), autocast, prepare)
                   if evaluate_now else None)
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
