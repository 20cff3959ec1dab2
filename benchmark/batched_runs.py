"""Do small runs gain from sharing the arithmetic? (issue 19, part 3). Answer: no, ~1.3x at best (results below).

    python -m benchmark.batched_runs [--arch small_cnn|cifar_resnet32] [--runs 2 5] [--steps N] [--threads 1 2]

The question. The grid trains the runs of a cell one after another (or one per worker process): the tuning
candidates of a cell differ only in their learning rate, its seeds only in initial weights and batch order. A
small_cnn step on digits (8x8 images, batch 128) is ~10 ms on 2 CPU cores at ~25 GFLOP/s, mostly per-operator
overhead, so K runs trained as ONE batched model (one operator call doing the arithmetic of K models) might be
up to K times faster per model.

The method. K real MultiExitNets, each built by `pipeline.initial_model` for its own seed (own initial weights),
each with its own batches in the trainer's order (`run_phase`'s per-epoch permutation and crop augmentation for
its pairing seed) and its own base lr (the quick grid's tuning set 0.2, 0.1, 0.05, 0.02, 0.01, cycled), trained
with the uniform objective (mean of the exits' cross-entropies), SGD (momentum 0.9, Nesterov, weight decay 5e-4)
and a per-step cosine lr, four ways:

- `sequential`: the baseline, what the grid does: each model in turn, `Objective.step` with `torch.optim.SGD`
  (`train.make_optimizer`) and `train.cosine_schedule`.
- `vmap`: the K models' parameters and buffers stacked (`torch.func.stack_module_state`), one forward of
  `torch.func.functional_call` under `torch.func.vmap` (each model its own batch: in_dims 0 on x and y), backward
  by ordinary autograd through the sum of the K losses (model k's loss depends on its own parameters only, so
  each stacked slice receives exactly its model's gradient), then `VectorSGD`: the SGD-Nesterov-weight-decay
  formula of `torch.optim.SGD` written with torch ops over the stacked tensors, with one lr per model.
  BatchNorm in train mode works as it should: the running statistics are stacked buffers, vmap's BatchNorm
  rule normalises each model's batch by its own statistics and updates each model's running mean and variance
  in place (no workaround, no change of semantics).
- `vmap_grad`: the same with the gradient taken by `torch.func.grad` inside the vmap instead of autograd.
- `grouped` (small_cnn only): a "wide" model. Every conv becomes one conv with groups=K (the K models'
  filters side by side: input channels of model k see only model k's batch, which sits in channel group k),
  every BatchNorm one BatchNorm over K x C channels (per-channel statistics = per-model statistics, exact), the
  SDN pool heads and the classifier's linear layers one batched matmul (`torch.baddbmm`) over K. Built from, and
  mapped back to, the K models' state dicts (`WideSmallCNN.from_models`, `.states`).

Throughput: steps/s per model = K x steps / wall seconds of a timed block; each block is `--steps` steps after a
warm-up, the methods' blocks interleaved (rotated order) over `--repeats` rounds, the median reported. Batches
are drawn before timing (the draw is the same per model in every method), the stacking of the K batches is timed.
Correctness (`check`): from the same initial weights and the same batches, `--check-steps` steps batched and
sequential; the max |difference| over every parameter and buffer of every model, and two batched repeats compared
bitwise (determinism, `torch.use_deterministic_algorithms(True)` as the trainer sets it on CPU).

RESULTS (2-core AMD EPYC, torch 2.14.1, `python -m benchmark.batched_runs --steps 10 --repeats 5` and `--arch
cifar_resnet32 --steps 2 --repeats 3 --check-steps 5`). The machine was loaded by other processes while measuring
(load average 1-8 on 2 cores), so absolute rates are indicative; the ratios from interleaved repeats are what
matter, and with 1 thread the process CPU time per model-step is close to load-independent.

small_cnn, digits, batch 128 (load average 1-4). wall: steps/s per model; cpu: CPU ms per model-step; (x vs
sequential):

    threads K        sequential      vmap            vmap_grad       grouped
    1       2  wall  64.3            66.2 (x1.03)    53.5 (x0.83)    82.5 (x1.28)
                cpu  15.5            15.1 (x1.03)    18.5 (x0.84)    11.8 (x1.32)
    1       5  wall  68.2            81.9 (x1.20)    66.6 (x0.98)    97.3 (x1.43)
                cpu  14.3            11.8 (x1.21)    14.8 (x0.97)    10.0 (x1.43)
    2       2  wall   8.0             5.4 (x0.68)     5.7 (x0.71)    10.2 (x1.27)
    2       5  wall   6.9             9.6 (x1.40)     9.2 (x1.34)    12.3 (x1.78)

An earlier run under heavier load (6-8) gave, with 1 thread, CPU-time ratios vmap x0.82 / x1.05 and grouped
x1.16 / x1.36 for K = 2 / 5; with 2 threads wall ratios vmap x1.07 / x0.93, grouped x1.17 / x2.02 (sequential
2.8 / 3.8 steps/s per model).

cifar_resnet32, digits, batch 128 (vmap only; the grouped model is small_cnn's): 1 thread, K = 2 / 5: sequential
7.3 / 7.9 steps/s per model (68.6 / 68.8 CPU ms), vmap x0.84 / x0.99 wall, x0.85 / x0.91 CPU; vmap_grad x0.64 /
x0.64. A run at load ~1 (3 blocks of 3 steps): vmap x0.88 / x0.85. With 2 threads (sequential 2.2 / 1.3 steps/s)
vmap x0.32 / x0.68.

Two threads are not a usable measurement on this machine: every method runs 5-10x SLOWER with 2 threads than with
1 (the sequential trainer alone: 43-52 steps/s with 1 thread, 6-17 with 2, also with OMP_WAIT_POLICY=passive),
because other workers hold the second core and each of the step's many small parallel regions waits for it.
Batched steps have fewer, larger regions and lose less to that wait, hence their larger 2-thread ratios; they
measure contention, not arithmetic.

Correctness, small_cnn, K=5 (seeds 0-4, lrs 0.2, 0.1, 0.05, 0.02, 0.01), 20 steps, against the sequential runs
at 2 threads (largest |value| 1.58): max |batched - sequential| in float32: vmap 2.6e-5 (per model 3e-7, 2e-7,
2e-7, 3e-5, 1e-7), vmap_grad 7.9e-4, grouped 9.8e-6 (2e-7 ... 1e-5); the trainer's own difference between 1 and 2
threads is 9.8e-3 (4e-7, 1e-7, 1e-7, 3e-5, 1e-2). In float64 the batched runs equal the sequential ones to 4e-16
(vmap), 6e-16 (vmap_grad, grouped): the same arithmetic. The float32 jumps have one cause, found by comparing the
two runs' activations: a pre-ReLU value within 3e-7 of 0 takes the other side of the kink under a rounding-level
difference, and the first conv's gradient jumps by 1.5e-3 (a single sign flip, measured); the thread count moves
runs the same way. cifar_resnet32, K=5, 5 steps (largest |value| 5.87): float32 vmap 0.013, vmap_grad 0.013,
trainer 1 vs 2 threads 0.078; float64 6e-14 / 4e-14. Every batched method is bitwise reproducible across two
repeats at the same thread count (deterministic algorithms on), for both architectures.

Why so little. The premise that a small step is mostly per-operator overhead does not hold on this CPU. The
sequential step's CPU time with 1 thread grows linearly with the batch: small_cnn 4.5, 7.0, 8.4, 12.7, 21.1, 37.7
ms at batch 8, 32, 64, 128, 256, 512, i.e. ~4.3 ms fixed (Python, dispatch, ~1,700 ATen calls with the per-tensor
SGD loop) + 0.065 ms per example; cifar_resnet32 ~17 ms + 0.41 ms per example. At batch 128 the fixed part is a
third of small_cnn's step and a quarter of cifar_resnet32's; the rest is kernel time (conv forward/backward,
BatchNorm, adaptive pooling) proportional to the arithmetic, which batching K models does not shrink: a conv with
groups=K costs K convs (profiled: the same kernel milliseconds per model-step sequential, vmapped or grouped).
Sharing the fixed part at best gives (a + bB) / (a/K + bB): x1.20 (K=2) and x1.37 (K=5) for small_cnn, x1.13 and
x1.23 for cifar_resnet32. The grouped model reaches that ceiling; vmap's batching rules add their own calls
(moves, fills, BatchNorm's decomposition: at K=2 as many ATen calls per model-step as sequential on
cifar_resnet32), so it gains less or loses, and `torch.func.grad` inside vmap is slower than autograd through the
summed losses.

The answer: it does not pay, so nothing is adopted. Per core (1 thread, the measurement the load does not distort)
batching K runs gives at most x1.2 (K=2) to x1.4 (K=5) for small_cnn with a hand-written grouped model, x1.0-1.2
with the generic vmap, and nothing (x0.85-0.99) for cifar_resnet32. A 2-core machine already uses its second core
fully with two 1-thread worker processes (`bench run --executor process --jobs 2`), and against that the batched
gain is this per-core ratio. It is a ~1.3x at best, not a multiplication, and would cost what follows. (A GPU, where
small models are launch-bound and the fixed share is much larger, may well gain more; not measured: no device.)

What adopting it in the trainer would take, and what it cannot cover:
- A group = runs of one cell that share dataset, arch, heads/exits, schedule, phase lengths, batch size, optimizer
  and objective with its hyperparameters, differing only in lr (tuning candidates) and/or seed; a stacked state,
  a per-model lr vector through the cosine schedule, `VectorSGD` instead of `torch.optim.SGD` (AdamW needs its own).
- Covered: objectives that only override `loss` (uniform, sdn, distill, bdl, ge) and exit combiners that are part
  of the model (boosted; ztw's cascades), whose hooks are tensor functions; the same `StepContext` for all members.
- Not covered without per-objective work: objectives with their own `step` — l2w (meta step: a functional pseudo
  update and a second optimizer, grad-of-grad inside vmap), cet (two forwards, per-run perturbation randomness from
  `ctx.generator`), metagf (meta weights and optimizer), pcgrad/cagrad/nash (per-exit gradients and a per-model
  projection or small solve each step); ztw's `combiner` phase (another trainable set).
- Per-run cost accounting: under the trainer's counter (`flops.counting_flops`, whose grouped-conv backward is
  corrected) a batched step of K=5 small_cnns counts exactly the FLOPs of the 5 sequential steps (measured, vmap and
  grouped alike; PyTorch's own counter says 2.3x, all of it in convolution_backward), so FLOPs split evenly; but
  wall time becomes a share of the group's, no longer a measurement of the run, and `cost.wall_seconds` would not
  be comparable with unbatched runs.
- The shared P1 backbone: tuning candidates of disjoint/mixed share one P1 (same seed), so only their own phases
  can be batched; seeds could batch P1, but each P1 is stored, locked and reused under its own p1_id; P3 freezes
  the backbone (BatchNorm in eval) and every member of a group must be in the same phase.
- Early stopping / successive halving: candidates that stop at different times must leave the group mid-phase
  (unstack and go on alone, or keep computing with lr 0, wasting the arithmetic and, unless masked, still moving
  BatchNorm statistics); different budgets also mean different cosine lengths.
- Failure isolation: one member's non-finite loss must fail that run only, not the group.
- Reproducibility: the batched float32 numbers differ from the per-run trainer's at rounding level, which can
  flip a ReLU and grow (as between thread counts), so batched runs could not keep the unbatched run ids; and a
  run's numbers could depend on which runs shared its group (K may change the kernels oneDNN picks), which must
  not depend on scheduling. In float64 the arithmetic is the same (above), so the method itself is sound.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, stack_module_state, vmap

from benchmark.data import load_dataset
from benchmark.determinism import configure, derive_seed
from benchmark.models.heads import PoolHead
from benchmark.pipeline import initial_model
from benchmark.spec import RunSpec
from benchmark.train import cosine_schedule, held, make_optimizer
from regimes.base import StepContext
from regimes.registry import build_regime

TRAIN = {"epochs": 1, "p1_epochs": None, "batch_size": 128, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
         "nesterov": True, "weight_decay": 5e-4, "eval_every": 10 ** 9}
MODEL = {"head": "pool", "exits": "flops:0.25,0.5,0.75"}
TUNING_LRS = (0.2, 0.1, 0.05, 0.02, 0.01)      # the quick grid's tuning set
METHODS = ("sequential", "vmap", "vmap_grad", "grouped")


def run_spec(arch: str, seed: int, lr: float, train: dict | None = None) -> RunSpec:
    return RunSpec(dataset="digits", arch=arch, regime="joint", seed=seed, train={**(train or TRAIN), "lr": lr},
                   model=dict(MODEL))


def trainer_batches(data, pairing_seed: int, steps: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first `steps` training batches (inputs, labels) `run_phase` draws for `pairing_seed` from epoch 0 on:
    the same per-epoch permutation, crop augmentation and normalisation, in the same order."""
    x_train, prepare = held(data, "train")
    n = len(x_train)
    per_epoch = max(1, n // batch_size)
    batches = []
    for epoch in range(math.ceil(steps / per_epoch)):
        generator = torch.Generator().manual_seed(derive_seed(pairing_seed, "epoch", epoch))
        order = torch.randperm(n, generator=generator)
        for b in range(per_epoch):
            idx = order[b * batch_size:(b + 1) * batch_size]
            batches.append((prepare(data.augment(x_train[idx], generator)), data.y_train[idx]))
    return batches[:steps]


def cosine_factor(step: int, total_steps: int) -> float:
    """`train.cosine_schedule`'s lr multiplier after `step` scheduler steps."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


def uniform_loss(logits: list[torch.Tensor], y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The uniform objective (`regimes/uniform.py`): mean of the exits' cross-entropies; and each exit's, detached."""
    ces = torch.stack([F.cross_entropy(z, y) for z in logits])
    return ces.mean(), ces.detach()


class VectorSGD:
    """`torch.optim.SGD`'s update (dampening 0) for tensors that hold several models, one lr per element group:

        d = g + wd * p;  buf = d (first step) else momentum * buf + d;  d = d + momentum * buf (Nesterov);
        p = p - lr * d

    `lr_maps[i]` maps the per-model lr vector (K,) onto parameter i (a broadcastable view, or the expansion a
    wide model's parameter needs). `step(lrs)` takes this step's per-model lrs (base lr x cosine factor)."""

    def __init__(self, params: list[torch.Tensor], lr_maps, momentum: float, nesterov: bool, weight_decay: float):
        self.params, self.lr_maps = params, lr_maps
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay
        self.buffers: list[torch.Tensor] | None = None

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor], lrs: torch.Tensor) -> None:
        d = torch._foreach_add(grads, self.params, alpha=self.weight_decay) if self.weight_decay else list(grads)
        if self.momentum:
            if self.buffers is None:
                self.buffers = [t.clone() for t in d]
            else:
                torch._foreach_mul_(self.buffers, self.momentum)
                torch._foreach_add_(self.buffers, d)
            if self.nesterov:
                d = torch._foreach_add(d, self.buffers, alpha=self.momentum)
            else:
                d = self.buffers
        for p, t, lr_map in zip(self.params, d, self.lr_maps):
            p.sub_(t * lr_map(lrs))


# --- the baseline: K runs one after another, as the grid trains them ------------------------------------------------

class SequentialRuns:
    """K models, each with its own `torch.optim.SGD` and cosine schedule, stepped by the uniform objective's own
    `Objective.step` one model after the other."""

    def __init__(self, models: list[nn.Module], lrs: list[float], train: dict, total_steps: int):
        self.models = models
        self.objective = build_regime("joint", {}).objective
        self.optimizers = [make_optimizer(list(m.parameters()), {**train, "lr": lr}) for m, lr in zip(models, lrs)]
        self.schedulers = [cosine_schedule(o, total_steps) for o in self.optimizers]
        self.contexts = [StepContext(phase="P2", epoch=0, epochs=1, step=0, num_exits=m.num_exits) for m in models]
        for m in models:
            m.train()

    def train(self, batches: list[list[tuple[torch.Tensor, torch.Tensor]]], steps: int) -> None:
        """`steps` steps of every model, model after model; `batches[k][s % len]` is model k's batch at step s."""
        for k, model in enumerate(self.models):
            for s in range(steps):
                x, y = batches[k][s % len(batches[k])]
                self.contexts[k].step = s
                self.objective.step(model, x, y, self.optimizers[k], self.contexts[k])
                self.schedulers[k].step()

    def states(self) -> list[dict[str, torch.Tensor]]:
        return [m.state_dict() for m in self.models]


# --- (a) vmap over the stacked models ----------------------------------------------------------------------------------

class VmapRuns:
    """K models of one architecture as one: stacked parameters and buffers, the forward vmapped over
    `functional_call`, each model its own batch and lr. `gradient`: "autograd" (backward through the sum of the K
    losses) or "func" (`torch.func.grad` inside the vmap)."""

    def __init__(self, models: list[nn.Module], lrs: list[float], train: dict, total_steps: int,
                 gradient: str = "autograd"):
        for m in models:
            m.train()
        self.keys = list(models[0].state_dict())
        params, self.buffers = stack_module_state(models)
        self.names = list(params)
        self.params = [params[n].detach().requires_grad_(gradient == "autograd") for n in self.names]
        self.base = copy.deepcopy(models[0]).to("meta")
        self.base_lrs, self.total_steps, self.step_count = list(lrs), total_steps, 0
        self.gradient = gradient
        self.optimizer = VectorSGD(self.params, [self._lr_view(p) for p in self.params], train["momentum"],
                                   train["nesterov"], train["weight_decay"])

        def loss(params, buffers, x, y):
            logits = functional_call(self.base, (dict(zip(self.names, params)), buffers), (x,))
            return uniform_loss(logits, y)

        self.loss = vmap(loss, in_dims=(0, 0, 0, 0))
        self.grad = vmap(grad_and_value(loss, has_aux=True), in_dims=(0, 0, 0, 0))

    @staticmethod
    def _lr_view(p: torch.Tensor):
        shape = (-1,) + (1,) * (p.dim() - 1)
        return lambda lrs: lrs.view(shape)

    def lrs(self) -> torch.Tensor:
        factor = cosine_factor(self.step_count, self.total_steps)
        return torch.tensor([lr * factor for lr in self.base_lrs], dtype=self.params[0].dtype)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """One step of every model: x (K, B, ...), y (K, B)."""
        if self.gradient == "autograd":
            losses, ces = self.loss(self.params, self.buffers, x, y)
            grads = torch.autograd.grad(losses.sum(), self.params)
        else:
            grads, (losses, ces) = self.grad(self.params, self.buffers, x, y)
        self.optimizer.step(list(grads), self.lrs())
        self.step_count += 1
        return {"loss": losses.detach(), "exit_ce": ces}

    def train(self, batches, steps: int) -> None:
        for s in range(steps):
            pairs = [b[s % len(b)] for b in batches]
            self.step(torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs]))

    def states(self) -> list[dict[str, torch.Tensor]]:
        stacked = {**dict(zip(self.names, self.params)), **self.buffers}
        return [{key: stacked[key][k].detach() for key in self.keys} for k in range(len(self.base_lrs))]


# --- (b) a wide small_cnn: grouped convolutions -------------------------------------------------------------------------

class WideLinear(nn.Module):
    """K linear layers as one batched matmul: (K, B, in) -> (K, B, out)."""

    def __init__(self, k: int, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(k, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(k, out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class WidePoolHead(nn.Module):
    """K SDN pool heads (`heads.PoolHead`) on a (B, K x C, H, W) map: per-model alpha, batched linear."""

    def __init__(self, k: int, head: PoolHead):
        super().__init__()
        self.k, self.pooled = k, head.pooled
        self.alpha = nn.Parameter(torch.empty(k))
        self.linear = WideLinear(k, head.linear.in_features, head.linear.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        maxed = F.adaptive_max_pool2d(x, self.pooled).view(b, self.k, -1)
        averaged = F.adaptive_avg_pool2d(x, self.pooled).view(b, self.k, -1)
        alpha = self.alpha.view(1, self.k, 1)
        return self.linear((alpha * maxed + (1 - alpha) * averaged).transpose(0, 1))


class WideClassifier(nn.Sequential):
    """small_cnn's classifier (avg-pool to a grid, flatten, linear) for K models: pool, (K, B, C x grid), linear.
    Its linear layer keeps the index 2 so that state dict keys match the model's."""

    def __init__(self, k: int, classifier: nn.Sequential):
        pool, _, linear = classifier
        super().__init__(copy.deepcopy(pool), nn.Identity(), WideLinear(k, linear.in_features, linear.out_features))
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self[0](x)
        return self[2](pooled.view(pooled.shape[0], self.k, -1).transpose(0, 1))


def _wide_layer(k: int, module: nn.Module) -> nn.Module:
    if isinstance(module, nn.Conv2d) and module.bias is None and module.groups == 1:
        return nn.Conv2d(k * module.in_channels, k * module.out_channels, module.kernel_size, stride=module.stride,
                         padding=module.padding, groups=k, bias=False)
    if isinstance(module, nn.BatchNorm2d):
        return nn.BatchNorm2d(k * module.num_features, eps=module.eps, momentum=module.momentum)
    if isinstance(module, nn.ReLU):
        return nn.ReLU(inplace=module.inplace)
    raise NotImplementedError(f"no wide version of {type(module).__name__}: the grouped model is small_cnn's only")


class WideSmallCNN(nn.Module):
    """K small_cnn MultiExitNets (2-D, pool heads) as one network whose every layer holds the K models side by
    side: input (B, K, H, W) (model k's batch in channel k), outputs per exit (K, B, classes). State dict keys are
    the MultiExitNet's; each tensor is the K models' tensors stacked (`from_models`, `states`)."""

    def __init__(self, models: list[nn.Module]):
        super().__init__()
        first, self.k = models[0], len(models)
        if first.combiner is not None or any(not isinstance(h, PoolHead) for h in first.heads):
            raise NotImplementedError("the grouped model covers small_cnn with pool heads and no exit combiner")
        self.blocks = nn.ModuleList(nn.Sequential(*(_wide_layer(self.k, m) for m in block)) for block in first.blocks)
        self.heads = nn.ModuleList(WidePoolHead(self.k, h) for h in first.heads)
        self.classifier = WideClassifier(self.k, first.classifier)
        self.exit_blocks = list(first.exit_blocks)
        self.shapes = {key: value.shape for key, value in first.state_dict().items()}

    @classmethod
    def from_models(cls, models: list[nn.Module]) -> "WideSmallCNN":
        wide = cls(models).to(next(models[0].parameters()).dtype)
        states = [m.state_dict() for m in models]
        own = wide.state_dict()
        wide.load_state_dict({key: (states[0][key] if own[key].dim() == 0 else
                                    torch.stack([s[key] for s in states]).reshape(own[key].shape))
                              for key in own})
        return wide.train()

    def states(self) -> list[dict[str, torch.Tensor]]:
        own = self.state_dict()
        return [{key: (value if value.dim() == 0 else value.reshape(self.k, *self.shapes[key])[k]).detach()
                 for key, value in own.items()} for k in range(self.k)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        logits, heads = [], dict(zip(self.exit_blocks, self.heads))
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in heads:
                logits.append(heads[i](x))
        logits.append(self.classifier(x))
        return logits


class GroupedRuns:
    """K small_cnn runs trained as one `WideSmallCNN`: the sum of the K models' uniform losses, one backward,
    `VectorSGD` with each parameter's lr mapped to its model's slots."""

    def __init__(self, models: list[nn.Module], lrs: list[float], train: dict, total_steps: int):
        self.model = WideSmallCNN.from_models(models)
        self.k, self.base_lrs, self.total_steps, self.step_count = len(models), list(lrs), total_steps, 0
        params = list(self.model.parameters())
        self.optimizer = VectorSGD(params, [self._lr_map(p) for p in params], train["momentum"], train["nesterov"],
                                   train["weight_decay"])

    def _lr_map(self, p: torch.Tensor):
        """(K,) lrs -> a tensor broadcastable to p: p's first dimension is K blocks of equal size."""
        per_model = p.shape[0] // self.k
        shape = (-1,) + (1,) * (p.dim() - 1)
        return lambda lrs: lrs.repeat_interleave(per_model).view(shape)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """x (B, K, H, W): model k's batch in channel k; y (K, B)."""
        logits = self.model(x)
        k, b = y.shape
        ces = torch.stack([F.cross_entropy(z.reshape(k * b, -1), y.reshape(-1), reduction="none").view(k, b).mean(1)
                           for z in logits], dim=1)                                                   # (K, exits)
        losses = ces.mean(1)
        params = self.optimizer.params
        grads = torch.autograd.grad(losses.sum(), params)
        factor = cosine_factor(self.step_count, self.total_steps)
        self.optimizer.step(list(grads), torch.tensor([lr * factor for lr in self.base_lrs], dtype=params[0].dtype))
        self.step_count += 1
        return {"loss": losses.detach(), "exit_ce": ces.detach()}

    def train(self, batches, steps: int) -> None:
        for s in range(steps):
            pairs = [b[s % len(b)] for b in batches]
            self.step(torch.cat([x for x, _ in pairs], dim=1), torch.stack([y for _, y in pairs]))

    def states(self) -> list[dict[str, torch.Tensor]]:
        return self.model.states()


# --- the measurement ---------------------------------------------------------------------------------------------------

@dataclass
class Cell:
    """K runs of one cell: seeds, lrs, their initial models (fresh copies per method) and batches."""

    arch: str
    seeds: list[int]
    lrs: list[float]
    models: list[nn.Module]
    batches: list[list[tuple[torch.Tensor, torch.Tensor]]]

    def fresh(self) -> list[nn.Module]:
        return [copy.deepcopy(m) for m in self.models]


def make_cell(data, arch: str, k: int, steps: int, lrs: list[float] | None = None) -> Cell:
    seeds, lrs = list(range(k)), list(lrs or [TUNING_LRS[i % len(TUNING_LRS)] for i in range(k)])
    specs = [run_spec(arch, s, lr) for s, lr in zip(seeds, lrs)]
    models = [initial_model(spec, data, torch.device("cpu")) for spec in specs]
    batches = [trainer_batches(data, spec.pairing_seed, steps, TRAIN["batch_size"]) for spec in specs]
    return Cell(arch, seeds, lrs, models, batches)


def trainer_for(method: str, cell: Cell, total_steps: int):
    models = cell.fresh()
    if method == "sequential":
        return SequentialRuns(models, cell.lrs, TRAIN, total_steps)
    if method == "vmap":
        return VmapRuns(models, cell.lrs, TRAIN, total_steps, gradient="autograd")
    if method == "vmap_grad":
        return VmapRuns(models, cell.lrs, TRAIN, total_steps, gradient="func")
    if method == "grouped":
        return GroupedRuns(models, cell.lrs, TRAIN, total_steps)
    raise ValueError(method)


def methods_for(arch: str) -> list[str]:
    return [m for m in METHODS if m != "grouped" or arch == "small_cnn"]


def max_difference(a: list[dict], b: list[dict]) -> tuple[float, float]:
    """Max |a - b| over every floating-point parameter and buffer of every model, and the largest |value|."""
    diff = scale = 0.0
    for sa, sb in zip(a, b):
        for key, value in sa.items():
            if value.is_floating_point():
                diff = max(diff, (value - sb[key]).abs().max().item())
                scale = max(scale, value.abs().max().item())
            elif not torch.equal(value, sb[key]):
                return math.inf, scale
    return diff, scale


def bitwise_equal(a: list[dict], b: list[dict]) -> bool:
    return all(torch.equal(sa[key], sb[key]) for sa, sb in zip(a, b) for key in sa)


def in_float64(cell: Cell) -> Cell:
    return Cell(cell.arch, cell.seeds, cell.lrs, [copy.deepcopy(m).double() for m in cell.models],
                [[(x.double(), y) for x, y in b] for b in cell.batches])


def trained_states(method: str, cell: Cell, steps: int) -> list[dict[str, torch.Tensor]]:
    runs = trainer_for(method, cell, steps)
    runs.train(cell.batches, steps)
    return runs.states()


def check(data, arch: str, k: int, steps: int, other_threads: int | None = None) -> dict[str, dict]:
    """Per batched method, after `steps` steps from the same initial weights and batches: the max |batched -
    sequential| over every weight and buffer of every model (and per model) in float32, the same in float64, and
    whether two float32 batched repeats are bitwise equal. With `other_threads`, also the float32 sequential runs
    at that thread count against the reference: the rounding difference the trainer itself accepts between thread
    counts, the yardstick for the float32 differences (in float32 a rounding-level difference can flip a pre-ReLU
    activation that sits within 1e-7 of 0 and make the gradients jump; float64 shows the arithmetic is the same)."""
    cell, cell64 = make_cell(data, arch, k, steps), None
    threads = torch.get_num_threads()
    reference = trained_states("sequential", cell, steps)
    reference64 = None
    out = {}
    for method in methods_for(arch)[1:] + (["sequential"] if other_threads else []):
        if method == "sequential":
            torch.set_num_threads(other_threads)
        first, second = trained_states(method, cell, steps), trained_states(method, cell, steps)
        torch.set_num_threads(threads)
        label, diff64 = f"sequential, {other_threads} threads", math.nan
        if method != "sequential":
            label = method
            if reference64 is None:
                cell64 = in_float64(cell)
                reference64 = trained_states("sequential", cell64, steps)
            diff64 = max_difference(trained_states(method, cell64, steps), reference64)[0]
        diff, scale = max_difference(first, reference)
        out[label] = {"max_abs_diff": diff, "max_abs_value": scale, "max_abs_diff_float64": diff64,
                      "per_model": [max_difference([a], [b])[0] for a, b in zip(first, reference)],
                      "bitwise_reproducible": bitwise_equal(first, second)}
    return out


def measure(data, arch: str, k: int, threads: int, steps: int, repeats: int,
            warmup: int = 3) -> dict[str, dict[str, float]]:
    """Per method, over `repeats` interleaved blocks of `steps` steps (the methods' order rotated each round): the
    median wall-clock steps/s per model (`rate`) and the median process CPU milliseconds per model-step (`cpu_ms`;
    with one thread it is the time the step really ran, whatever else the machine was doing)."""
    torch.set_num_threads(threads)
    cell = make_cell(data, arch, k, steps)
    trainers = {m: trainer_for(m, cell, 10 ** 6) for m in methods_for(arch)}
    for trainer in trainers.values():
        trainer.train(cell.batches, warmup)
    wall, cpu = {m: [] for m in trainers}, {m: [] for m in trainers}
    names = list(trainers)
    for r in range(repeats):
        for m in names[r % len(names):] + names[:r % len(names)]:
            started, started_cpu = time.perf_counter(), time.process_time()
            trainers[m].train(cell.batches, steps)
            wall[m].append(time.perf_counter() - started)
            cpu[m].append(time.process_time() - started_cpu)
    return {m: {"rate": k * steps / statistics.median(wall[m]),
                "cpu_ms": 1000 * statistics.median(cpu[m]) / (k * steps)} for m in names}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmark.batched_runs", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="small_cnn", choices=("small_cnn", "cifar_resnet32"))
    parser.add_argument("--runs", type=int, nargs="+", default=[2, 5], help="K, the runs batched together")
    parser.add_argument("--steps", type=int, default=20, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timed blocks per method")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--check-steps", type=int, default=20, help="steps of the correctness check (0: none)")
    args = parser.parse_args(argv)

    configure(torch.device("cpu"), max(args.threads))
    data = load_dataset("digits", "/nonexistent")
    print(f"{args.arch} on digits, batch {TRAIN['batch_size']}, uniform objective, SGD-Nesterov; "
          f"steps/s per model, median of {args.repeats} interleaved blocks of {args.steps} steps")
    methods = methods_for(args.arch)
    print("wall: steps/s per model (x vs sequential); cpu: process CPU ms per model-step (x vs sequential)")
    print(f"{'threads':>7} {'K':>2}  {'':4} " + " ".join(f"{m:>16}" for m in methods))
    for threads in args.threads:
        for k in args.runs:
            result = measure(data, args.arch, k, threads, args.steps, args.repeats)
            for key, label, fmt in (("rate", "wall", "8.1f"), ("cpu_ms", "cpu", "8.2f")):
                base = result["sequential"][key]
                ratio = (lambda v: v / base) if key == "rate" else (lambda v: base / v)
                cells = [f"{result[m][key]:{fmt}} (x{ratio(result[m][key]):4.2f})" for m in methods]
                print(f"{threads:>7} {k:>2}  {label:4} " + " ".join(f"{c:>16}" for c in cells), flush=True)
    if args.check_steps:
        threads = max(args.threads)
        torch.set_num_threads(threads)
        k = max(args.runs)
        other = min(args.threads) if min(args.threads) != threads else None
        print(f"\ncorrectness: {args.check_steps} steps, K={k}, lrs "
              f"{[TUNING_LRS[i % len(TUNING_LRS)] for i in range(k)]}, against the sequential runs at {threads} "
              "threads")
        for method, result in check(data, args.arch, k, args.check_steps, other).items():
            per_model = ", ".join(f"{d:.1g}" for d in result["per_model"])
            float64 = result["max_abs_diff_float64"]
            print(f"  {method:>22}: max |difference| {result['max_abs_diff']:.2g} (largest |value| "
                  f"{result['max_abs_value']:.3g}; per model {per_model})"
                  + ("" if math.isnan(float64) else f", in float64 {float64:.1g}")
                  + f"; bitwise reproducible: {result['bitwise_reproducible']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
