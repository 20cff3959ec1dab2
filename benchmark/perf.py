"""Training throughput of exitbench's trainer against the plain PyTorch loop a researcher would write, on the same
model, data and batch size.

    bench perf [--arch small_cnn] [--dataset mnist5k] [--epochs 3] [--repeats 3] [--device cpu]
    bench perf --arch resnet18 --dataset synthetic-cifar --device cuda    # the GPU figure
    bench perf --objectives        # cost per step of every objective relative to `uniform`
    bench perf --objectives ztw metagf    # of these (and `uniform`, the reference) only

`--objectives` prints beside each objective's measured P2 step time relative to `uniform` its arithmetic minimum
relative to `uniform` (`minimum_step_costs`: the FLOPs its procedure cannot do without, from the model's counted
forward and backward FLOPs), and the quotient measured / minimum. Above 1: the implementation spends more than the
FLOPs it needs (extra passes, or work the minimum leaves out). Below 1 is common on a CPU: part of uniform's step
is not FLOPs (data and augmentation, the optimizer, elementwise ops, Python), and the extra passes do not repeat it.

Three loops, each step: a batch, crop (+flip) augmentation, forward every exit, mean cross-entropy, backward, SGD
step, cosine lr step.
- **plain DataLoader loop**: a torchvision `DataLoader` (`--workers` worker processes, pinned memory on cuda,
  persistent workers) over the training split, per-sample `torchvision.transforms.v2` (RandomCrop with padding,
  RandomHorizontalFlip, ToDtype + Normalize for 8-bit pixels), float32 training in the default memory format.
- **in-memory loop**: the minimal loop over the data as exitbench holds it (on the device, batched augmentation),
  with exitbench's precision and layout (bf16 autocast and channels-last on cuda): what is left is the trainer's
  own overhead.
- **exitbench trainer** (`run_phase`): adds per-exit loss logging, the non-finite check, the step-FLOP
  measurement and one validation pass per epoch (reported separately).
Goals: trainer <= 2 % slower than the in-memory loop per step; on a GPU at least 2x the plain DataLoader loop for
the CIFAR ResNet-18 cell. `synthetic-cifar` is random 8-bit 3x32x32 images (50 000, 10 classes, crop+flip), held
as exitbench holds CIFAR: it measures throughput on machines without CIFAR files; its accuracies mean nothing.
"""
from __future__ import annotations

import copy
import math
import statistics
import time

import torch
import torch.nn.functional as F

from benchmark.data import Dataset
from benchmark.determinism import derive_seed, seed_everything
from benchmark.flops import counting_flops
from benchmark.models import build_model
from benchmark.train import cosine_schedule, make_optimizer, run_phase
from regimes.base import Objective, Phase
from regimes.cet import ConsistentExitTraining
from regimes.exit_gradients import GradientCombination
from regimes.l2w import L2W
from regimes.metagf import MetaGF
from regimes.registry import build_regime, objective_names

TRAIN = {"batch_size": 128, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
         "weight_decay": 5e-4, "eval_every": 10 ** 9}


def synthetic_cifar(n: int = 50_000) -> Dataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
    y = torch.randint(0, 10, (n,), generator=generator)
    return Dataset(name="synthetic-cifar", kind="image", num_classes=10, input_shape=(3, 32, 32),
                   x_train=x, y_train=y, x_val=x[:5000], y_val=y[:5000], x_test=x[:5000], y_test=y[:5000],
                   augmentation="crop+flip", crop_padding=4, mean=(0.5,) * 3, std=(0.25,) * 3)


class _TransformedSplit(torch.utils.data.Dataset):
    """The training split as a map-style dataset with per-sample torchvision transforms, as a plain loop has it."""

    def __init__(self, data: Dataset):
        from torchvision.transforms import v2
        pixels = data.stored("train")
        self.x, self.y = pixels.cpu(), data.y_train.cpu()
        steps = []
        if data.augmentation != "none" and self.x.dim() == 4:
            steps.append(v2.RandomCrop(data.input_shape[1:], padding=data.crop_padding))
            if data.augmentation == "crop+flip":
                steps.append(v2.RandomHorizontalFlip())
        if self.x.dtype == torch.uint8:
            steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(data.mean), list(data.std))]
        self.transform = v2.Compose(steps)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.transform(self.x[i]), self.y[i]


def dataloader_loop(model, loader, epochs: int, device) -> float:
    """The plain loop: batches from a torchvision DataLoader, float32, default memory format; returns seconds."""
    optimizer = make_optimizer(list(model.parameters()), TRAIN)
    scheduler = cosine_schedule(optimizer, len(loader) * epochs)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            _plain_step(model, x, y, optimizer, scheduler, bf16=False)
    return _seconds_since(start, device)


def _plain_step(model, x, y, optimizer, scheduler, bf16: bool) -> None:
    """The baselines' training step, one for both so they do the same work: mean cross-entropy over the exits,
    an optimizer and a schedule step; the forward under bf16 autocast when `bf16`."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = torch.stack([F.cross_entropy(z, y) for z in model(x)]).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    scheduler.step()


def _seconds_since(start: float, device) -> float:
    """Wall seconds since `start`, after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def fresh_model(arch, data, device, channels_last: bool | None = None):
    seed_everything(0)
    model = build_model(arch, data.num_classes, data.input_shape).to(device)
    if channels_last is None:
        channels_last = device.type == "cuda"
    return model.to(memory_format=torch.channels_last) if channels_last else model


def hand_loop(model, data, epochs: int, device) -> float:
    """The minimal in-memory loop over the data as exitbench holds it, with its precision and layout; returns
    seconds."""
    optimizer = make_optimizer(list(model.parameters()), TRAIN)
    n, bs = len(data.y_train), TRAIN["batch_size"]
    steps = n // bs
    scheduler = cosine_schedule(optimizer, steps * epochs)
    model.train()
    start = time.perf_counter()
    for epoch in range(epochs):
        generator = torch.Generator().manual_seed(derive_seed(0, "epoch", epoch))
        order = torch.randperm(n, generator=generator).to(device)
        for b in range(steps):
            idx = order[b * bs:(b + 1) * bs]
            x, y = data.training_batch(idx, generator), data.y_train[idx]
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            _plain_step(model, x, y, optimizer, scheduler, bf16=device.type == "cuda")
    return _seconds_since(start, device)


def trainer(model, data, epochs: int, device) -> tuple[float, float]:
    """run_phase on the same work; returns (seconds of training steps, seconds of validation passes)."""
    start = time.perf_counter()
    result = run_phase(model, Phase("P2", "all", epochs), build_regime("joint").objective, data, TRAIN,
                       pairing_seed=0, epoch_offset=0, device=device)
    total = time.perf_counter() - start
    return result.cost.wall_seconds, total - result.cost.wall_seconds


def pass_flops(model, input_shape: tuple[int, ...], objective: Objective) -> dict[str, float]:
    """Per-sample FLOPs (`counting_flops`: 2 per multiply-add, conv/linear/attention only) of the passes an
    objective's step is made of, on a meta-device copy of `model` (carrying the objective's exit combiner, if any)
    with the objective's hooks; the model itself is not touched: `forward` (all exits), `backward` (of the summed
    exits, to every parameter), `exit_backward` (K numbers: of exit k alone, to every parameter: its head and the
    blocks up to its own) and `blocks_backward` (of the summed exits, to the blocks' parameters only: the heads'
    weight gradients are skipped). The input does not require gradient, so the first layer's backward computes its
    weight gradient only, as in training."""
    shadow = copy.deepcopy(model).to("meta").eval()       # eval: BatchNorm takes a batch of 1; FLOPs are the same
    parameters = [p for p in shadow.parameters() if p.requires_grad]
    blocks = [p for p in shadow.blocks.parameters() if p.requires_grad]
    x = torch.zeros((1, *input_shape), device="meta")

    def counted(function) -> float:
        with counting_flops() as counter:
            function()
        return float(counter.get_total_flops())

    def backward(output, inputs) -> float:
        return counted(lambda: torch.autograd.grad(output, inputs, retain_graph=True, allow_unused=True))

    logits = []
    forward = counted(lambda: logits.extend(objective.forward(shadow, x)))
    total = torch.stack([z.sum() for z in logits]).sum()
    return {"forward": forward, "backward": backward(total, parameters),
            "exit_backward": [backward(z.sum(), parameters) for z in logits],
            "blocks_backward": backward(total, blocks)}


def minimum_flops(model, input_shape: tuple[int, ...], objective: Objective) -> float:
    """The arithmetic minimum per-sample FLOPs of one training step of `objective` (phase P2: everything trains):
    - one forward and one backward (its own graph, hooks included: bdl's detached group boundaries skip an input
      gradient; ztw's cascades add theirs): every objective not named below; `uniform` is this without hooks;
    - `cet`: two forwards (clean and perturbed) and a backward through both graphs, twice the above;
    - gradient combination (pcgrad, cagrad, nash): one forward and one backward per exit, exit k's through its head
      and the blocks up to its own; `metagf` adds its look-ahead forward and the meta loss's backward to the blocks'
      parameters (the look-ahead heads do not depend on the meta-weights). The K x K combination (Gram matrix,
      projections: O(K²P) for P shared parameters, independent of the batch) is not counted;
    - `l2w`, its official procedure per meta step, two halves of the batch: a pseudo forward and backward (with
      graph), the meta forward, the meta backward to the pseudo-stepped parameters and on through the pseudo
      backward to the weight net (the latter counted as one backward: per conv or linear layer, the two
      forward-sized products that carry the cotangent; PyTorch's convolution double backward computes twice that),
      then the real update's forward and backward: 3 forwards + 4 backwards of the whole batch; a step that is not
      a meta step (every `meta_interval`-th is) is one forward and one backward; the weight net's own FLOPs (an MLP
      on K losses per sample) are not counted."""
    flops = pass_flops(model, input_shape, objective)
    one_step = flops["forward"] + flops["backward"]
    if isinstance(objective, ConsistentExitTraining):
        return 2 * one_step
    if isinstance(objective, L2W):
        meta = 3 * flops["forward"] + 4 * flops["backward"]
        interval = objective.hp["meta_interval"]
        return (meta + (interval - 1) * one_step) / interval
    if isinstance(objective, GradientCombination):
        gradients = flops["forward"] + sum(flops["exit_backward"])
        if isinstance(objective, MetaGF):
            return gradients + flops["forward"] + flops["blocks_backward"]
        return gradients
    return one_step


def minimum_step_costs(model, input_shape: tuple[int, ...], num_classes: int, names: list[str]) -> dict[str, float]:
    """Each named objective's `minimum_flops` relative to `uniform`'s (1 forward + 1 backward of the plain model),
    on copies of `model` (built without an exit combiner) that carry each objective's own."""
    def flops(name: str) -> float:
        objective = build_regime("joint" if name == "uniform" else f"joint+{name}").objective
        shadow = copy.deepcopy(model)
        shadow.combiner = objective.exit_combiner(shadow, num_classes)
        return minimum_flops(shadow, input_shape, objective)

    reference = flops("uniform")
    return {name: flops(name) / reference for name in names}


def objective_costs(arch: str, data, epochs: int, repeats: int, device, names: list[str],
                    echo=print) -> None:
    """Median seconds per step of a P2 phase (all parameters) and a P3 phase (heads only) for the named objectives
    (every registered one if none) and `uniform`, relative to `uniform` on the same model, data and batches, with
    each objective's arithmetic minimum in P2 relative to `uniform` (`minimum_step_costs`) and measured / minimum.
    Objectives that act only on the shared blocks' gradients have no P3 (the registry refuses them under disjoint)."""
    from regimes.registry import OBJECTIVES
    names = ["uniform"] + [name for name in (names or objective_names()) if name != "uniform"]
    steps = len(data.y_train) // TRAIN["batch_size"] * epochs
    cases = [(name, trains) for name in names
             for trains in (("all",) if OBJECTIVES[name].requires_shared_training else ("all", "heads"))]
    minimum = minimum_step_costs(fresh_model(arch, data, torch.device("cpu")), data.input_shape, data.num_classes,
                                 names)
    samples = {case: [] for case in cases}
    for _ in range(repeats):                     # interleaved, so the machine's drift hits every objective alike
        for name, trains in cases:
            model = fresh_model(arch, data, device)
            objective = build_regime("joint" if name == "uniform" else f"joint+{name}").objective
            model.combiner = objective.exit_combiner(model, data.num_classes)
            result = run_phase(model, Phase("P2" if trains == "all" else "P3", trains, epochs), objective, data,
                               TRAIN, pairing_seed=0, epoch_offset=0, device=device)
            samples[name, trains].append(result.cost.wall_seconds / steps)
    times = {case: statistics.median(values) for case, values in samples.items()}
    echo(f"objective cost per step, {arch} on {data.name}, {device}, batch {TRAIN['batch_size']}, "
         f"{steps} steps x {repeats} repeats (median); relative to uniform; minimum: the P2 step's FLOPs the "
         f"objective needs relative to uniform's")
    for name in names:
        p2, p3 = times[name, "all"], times.get((name, "heads"))
        measured = p2 / times["uniform", "all"]
        echo(f"  {name:8}  P2 {1000 * p2:7.1f} ms  x{measured:4.2f}  minimum x{minimum[name]:4.2f}  "
             f"measured/minimum {measured / minimum[name]:4.2f}    "
             + (f"P3 {1000 * p3:7.1f} ms  x{p3 / times['uniform', 'heads']:4.2f}" if p3 else "P3  (no P3)"))


def compare_loops(arch: str, data, epochs: int, repeats: int, device, threads: int, workers: int,
                  echo=print) -> bool:
    """Time the plain DataLoader loop (`workers` worker processes), the in-memory loop and the trainer on the same
    model, data and batch size — one warm-up epoch each, then `repeats` interleaved repeats of `epochs` epochs — and
    print each one's median throughput; False when the trainer's time is not finite."""
    steps = len(data.y_train) // TRAIN["batch_size"] * epochs
    loader = torch.utils.data.DataLoader(_TransformedSplit(data), batch_size=TRAIN["batch_size"], shuffle=True,
                                         drop_last=True, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0)
    plain_model = fresh_model(arch, data, device, channels_last=False)
    hand_model, trainer_model = fresh_model(arch, data, device), fresh_model(arch, data, device)
    dataloader_loop(plain_model, loader, 1, device)               # warm-up every path (workers start here)
    hand_loop(hand_model, data, 1, device)
    trainer(trainer_model, data, 1, device)
    plain, hand, ours, evals = [], [], [], []
    for _ in range(repeats):                                     # interleaved, so drift hits all alike
        plain.append(dataloader_loop(plain_model, loader, epochs, device))
        hand.append(hand_loop(hand_model, data, epochs, device))
        train_s, eval_s = trainer(trainer_model, data, epochs, device)
        ours.append(train_s)
        evals.append(eval_s)
    p, h, t = statistics.median(plain), statistics.median(hand), statistics.median(ours)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    echo(f"{arch} on {data.name}, {device} ({name}), {threads} threads, {workers} DataLoader "
         f"workers, batch {TRAIN['batch_size']}, {steps} steps x {repeats} repeats (median), torch "
         f"{torch.__version__}")
    images = steps * TRAIN["batch_size"]
    echo(f"  plain DataLoader loop : {1000 * p / steps:8.2f} ms/step  {images / p:10.0f} images/s")
    echo(f"  in-memory loop        : {1000 * h / steps:8.2f} ms/step  {images / h:10.0f} images/s")
    echo(f"  exitbench trainer     : {1000 * t / steps:8.2f} ms/step  {images / t:10.0f} images/s   "
         f"{p / t:.2f}x the plain loop, overhead {100 * (t / h - 1):+.1f} % over the in-memory loop")
    echo(f"  + validation pass     : {1000 * statistics.median(evals) / epochs:8.1f} ms/epoch "
         f"({100 * statistics.median(evals) / t:.1f} % of training time)")
    return math.isfinite(t)


def _cpu_name() -> str:
    from benchmark.determinism import cpu_environment
    return cpu_environment().get("cpu_model") or "cpu"

