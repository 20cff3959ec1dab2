"""`l2w`: Learning to Weight Samples for Dynamic Early-exiting Networks (Han, Pu et al., ECCV 2022).

A small weight-prediction net g maps each training sample's per-exit losses to per-exit weights. g is
meta-learned: it is good if one SGD step of the network on the g-weighted loss lowers the loss that the
network will pay *at test time*, where each sample leaves at one exit (the budgeted-batch allocation).
Follows the official code (LeapLabTHU/L2W-DEN, tools/main_cifar_DDP.py and tools/meta.py): every batch is
split in halves A and B, and the procedure runs twice, A train / B meta, then B train / A meta, so the real
optimizer steps twice per batch. Choices where the official code and REGIMES.md are silent:

- The pseudo-step is one differentiable SGD step of the *trainable* parameters (in P3 only the heads) with the
  real optimizer's current lr, momentum, dampening, nesterov and weight decay, and its momentum buffer where one
  exists (the official code loads the real optimizer's state into its MetaSGD). An optimizer without momentum
  (AdamW) gets a plain SGD step with its lr and weight decay (for one plain step, L2 and decoupled decay are the
  same): the official code has SGD only, and g's Adam update hardly depends on the meta-gradient's scale.
- The pseudo and meta forwards run through `torch.func.functional_call` on *copies* of the buffers, in the mode
  the model is in: the official code does them on a throwaway copy of the network, so only the real forward
  moves BatchNorm's running statistics.
- g's Adam lr follows the real optimizer's schedule (meta_lr x lr / initial_lr), as the official code anneals
  both with the same cosine.
- g and the loss run in float32 outside autocast: the weights multiply losses, so bf16 rounding would bias them.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmark.budgeted import budget_shares, budgeted_exits
from regimes.base import HParam, Objective
from regimes.losses import sample_confidence, sample_cross_entropy
from regimes.registry import register_objective

CENTRINGS = ("col", "mat")


def allocate_to_exits(confidences: Tensor, q: float) -> Tensor:
    """The exit each sample leaves at under the budgeted-batch policy with shares ∝ q^k, from `confidences` (K, n):
    the allocation the evaluation fits its thresholds from (benchmark/budgeted.py), so g learns for the test-time
    policy itself."""
    return budgeted_exits(confidences, budget_shares(q, len(confidences)).tolist())


def centre_weights(raw: Tensor, mode: str) -> Tensor:
    """g's (n, K) output minus its mean, so the weights w = 1 + δ·centred average to 1: `col` per sample over
    the exits (reweights exits within a sample), `mat` over the whole batch (also reweights samples)."""
    if mode == "col":
        return raw - raw.mean(dim=1, keepdim=True)
    if mode == "mat":
        return raw - raw.mean()
    raise ValueError(f"l2w centring must be one of {CENTRINGS}, got {mode!r}")


def per_sample_exit_ce(logits: list[Tensor], y: Tensor) -> Tensor:
    """ℓ ∈ R^{n×K}: each sample's cross-entropy at each exit (an image's: over its labelled pixels), in float32."""
    return torch.stack([sample_cross_entropy(z.float(), y) for z in logits], dim=1)


def weighted_exit_loss(weights: Tensor, losses: Tensor) -> Tensor:
    """L = Σ_k mean_i(w_ik ℓ_ik)."""
    return (weights * losses).mean(dim=0).sum()


def budgeted_exit_loss(logits: list[Tensor], y: Tensor, q: float) -> Tensor:
    """The meta objective: Σ_k mean CE over the samples the budgeted-batch policy sends to exit k; an exit that
    gets no sample contributes nothing."""
    losses = per_sample_exit_ce(logits, y)
    with torch.no_grad():
        confidences = torch.stack([sample_confidence(z) for z in logits])
        exits = torch.arange(len(logits), device=losses.device)
        chosen = (allocate_to_exits(confidences, q)[:, None] == exits).to(losses.dtype)   # one_hot syncs on CUDA
    return ((losses * chosen).sum(dim=0) / chosen.sum(dim=0).clamp(min=1)).sum()


def sgd_lookahead(params: dict[str, Tensor], grads: tuple[Tensor, ...],
                  optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
    """θ' after one step of torch.optim.SGD's update rule with `optimizer`'s hyperparameters and momentum
    buffers, built from differentiable ops so that θ' carries the graph of `grads` (the official MetaSGD)."""
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    stepped = {}
    for (name, p), grad in zip(params.items(), grads):
        group = group_of[id(p)]
        momentum = group.get("momentum", 0.0)
        direction = grad + group["weight_decay"] * p
        if momentum:
            buffer = optimizer.state.get(p, {}).get("momentum_buffer")
            buffer = direction if buffer is None else momentum * buffer + (1 - group["dampening"]) * direction
            direction = direction + momentum * buffer if group["nesterov"] else buffer
        stepped[name] = p - group["lr"] * direction
    return stepped


class WeightNet(nn.Sequential):
    """g: K per-exit losses -> K raw weights in (-1, 1) (the official MLP_tanh with one hidden layer)."""

    def __init__(self, num_exits: int, hidden: int):
        super().__init__(nn.Linear(num_exits, hidden), nn.ReLU(), nn.Linear(hidden, num_exits), nn.Tanh())


@register_objective
class L2W(Objective):
    name = "l2w"
    description = "L = Σ_k mean_i(w_ik CE_ik), w meta-learned for the budgeted-batch test-time exit allocation"
    source = ("Han, Pu et al., ECCV 2022, 'Learning to Weight Samples for Dynamic Early-exiting Networks'; "
              "official code LeapLabTHU/L2W-DEN")
    hparams = {
        "delta": HParam(0.8, "weight spread: w = 1 + delta * centred g(loss) (official 'epsilon'; CIFAR 0.8, IN 0.3)",
                        low=0),
        "centring": HParam("col", "centre g's output per sample over exits ('col') or over the batch ('mat')",
                           choices=CENTRINGS),
        "meta_interval": HParam(1, "update g every this many steps (CIFAR 1, ImageNet 100)", kind=int, low=1),
        "meta_lr": HParam(1e-4, "Adam learning rate of g (annealed with the real optimizer's schedule)",
                          low=0, low_open=True),
        "meta_weight_decay": HParam(1e-4, "Adam weight decay of g", low=0),
        "hidden": HParam(500, "hidden width of g", kind=int, low=1),
        "q": HParam(0.75, "budgeted-batch base of the meta allocation: exit k gets a share ∝ q^k (q > 1 favours "
                          "late exits)", low=0, low_open=True),
    }

    def __init__(self, **overrides):
        super().__init__(**overrides)
        self.weight_net: WeightNet | None = None
        self.meta_optimizer: torch.optim.Adam | None = None

    def sample_weights(self, losses: Tensor) -> Tensor:
        """w = 1 + δ·centre(g(sg(ℓ))), in float32 whatever autocast is on."""
        with torch.autocast(losses.device.type, enabled=False):
            raw = self.weight_net(losses.detach().float())
            return 1 + self.hp["delta"] * centre_weights(raw, self.hp["centring"])

    def meta_loss(self, model, x_train: Tensor, y_train: Tensor, x_meta: Tensor, y_meta: Tensor,
                  optimizer: torch.optim.Optimizer) -> Tensor:
        """The budgeted-batch loss on the meta half after a differentiable pseudo-step on the g-weighted train
        half: a function of g's parameters through the pseudo-step only."""
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        scratch_buffers = {name: b.clone() for name, b in model.named_buffers()}
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
            losses = per_sample_exit_ce(functional_call(model, scratch_buffers, (x_train,)), y_train)
        pseudo_loss = weighted_exit_loss(self.sample_weights(losses), losses)
        grads = torch.autograd.grad(pseudo_loss, tuple(trainable.values()), create_graph=True)
        stepped = sgd_lookahead(trainable, grads, optimizer)
        meta_logits = functional_call(model, {**stepped, **scratch_buffers}, (x_meta,))
        return budgeted_exit_loss(meta_logits, y_meta, self.hp["q"])

    def meta_update(self, model, x_train: Tensor, y_train: Tensor, x_meta: Tensor, y_meta: Tensor,
                    optimizer: torch.optim.Optimizer) -> None:
        """One Adam step of g on `meta_loss`; the model's parameters, gradients and buffers are left untouched."""
        loss = self.meta_loss(model, x_train, y_train, x_meta, y_meta, optimizer)
        group = optimizer.param_groups[0]
        annealed = group["lr"] / group.get("initial_lr", group["lr"])      # the real schedule's factor now
        self.meta_optimizer.param_groups[0]["lr"] = self.hp["meta_lr"] * annealed
        self.meta_optimizer.zero_grad(set_to_none=True)
        loss.backward(inputs=list(self.weight_net.parameters()))
        self.meta_optimizer.step()

    def real_update(self, model, x: Tensor, y: Tensor, optimizer: torch.optim.Optimizer) -> tuple[Tensor, Tensor]:
        """One step of the real optimizer on the g-weighted loss; returns the loss and ℓ, detached."""
        losses = per_sample_exit_ce(model(x), y)
        with torch.no_grad():
            weights = self.sample_weights(losses)
        loss = weighted_exit_loss(weights, losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss.detach(), losses.detach()

    def ensure_weight_net(self, num_exits: int, device: torch.device) -> WeightNet:
        """g and its Adam, created on first use; deterministic because the trainer seeds torch before each phase."""
        if self.weight_net is None:
            self.weight_net = WeightNet(num_exits, self.hp["hidden"]).to(device)
            self.meta_optimizer = torch.optim.Adam(self.weight_net.parameters(), lr=self.hp["meta_lr"],
                                                   weight_decay=self.hp["meta_weight_decay"])
        return self.weight_net

    def state_dict(self) -> dict:
        if self.weight_net is None:
            return {}
        return {"weight_net": self.weight_net.state_dict(), "meta_optimizer": self.meta_optimizer.state_dict()}

    def load_state_dict(self, state: dict, model) -> None:
        if state:
            self.ensure_weight_net(model.num_exits, next(model.parameters()).device)
            self.weight_net.load_state_dict(state["weight_net"])
            self.meta_optimizer.load_state_dict(state["meta_optimizer"])

    def step_kind(self, ctx):
        """`meta` steps also pseudo-step and update g (every `meta_interval` steps); `plain` steps only update
        the network (a quarter of a meta step's FLOPs on small_cnn), so the trainer counts one of each."""
        return "meta" if ctx.step % self.hp["meta_interval"] == 0 else "plain"

    def step(self, model, x, y, optimizer, ctx):
        self.ensure_weight_net(ctx.num_exits, x.device)
        a, b = zip(x.chunk(2), y.chunk(2))
        meta = self.step_kind(ctx) == "meta"
        real_losses, sample_losses = [], []
        for (x_train, y_train), (x_meta, y_meta) in ((a, b), (b, a)):
            if meta:
                self.meta_update(model, x_train, y_train, x_meta, y_meta, optimizer)
            loss, losses = self.real_update(model, x_train, y_train, optimizer)
            real_losses.append(loss)
            sample_losses.append(losses)
        return {"loss": torch.stack(real_losses).mean(), "exit_ce": torch.cat(sample_losses).mean(dim=0),
                "optimizer_steps": 2}
