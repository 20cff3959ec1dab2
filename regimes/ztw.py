"""`ztw`: Zero Time Waste (Wołczyk et al., NeurIPS 2021), recycling each exit's prediction in the later exits.

Follows the official code (gmum/Zero-Time-Waste: ztw_cv/architectures/early_exits/{ztw,heads}.py,
ztw_cv/methods/early_exit.py and its image scripts, e.g. ztw_cv/scripts/ztw_vit.py):
- **Cascading connections.** Every internal exit but the first also reads the previous internal exit's output,
  detached and layer-normalised: c_k = z_k + W_k·LN_k(sg(c_{k−1})). The official head concatenates LN(sg(c_{k−1}))
  to its pooled features before its one linear layer of fan-in D + C, which is this sum with W_k the layer's extra
  columns; W_k is initialised as those columns are, U(±1/sqrt(D + C)) (D: the features of head k's last linear
  layer, C: the classes). The backbone's own classifier (the last exit) is neither cascaded nor ensembled.
  Cascades train with the heads, under the run's loss: the mean of every exit's cross-entropy, as the official
  training loop.
- **Geometric ensembles.** After the schedule's phases, a last phase fits, for every internal exit k, the weights
  of e_k = mean_{j<=k} exp(w_kj)·log_softmax(c_j) + b_k (w ~ N(0, 0.01), b = 0) on the training data, everything
  else frozen: Adam, lr 1e-3, no weight decay, 2 epochs, mean cross-entropy of the exits' outputs (the official
  image scripts' ensembling stage; 5 epochs at lr 0.1 belong to its NLP scripts). From then on exit k outputs e_k,
  at inference too.
- **Segmentation** (issue 23): all of this per pixel — each pixel's class vector is cascaded, normalised and
  ensembled as a classification exit's logits are; D is the input channels of the head's last 1x1 convolution.
Deviations, stated: the head's own feature columns keep the head's initialisation (fan-in D, shared with every regime
of the cell so that regimes start from the same weights), sqrt((D + C)/D) larger than the official concatenated
layer's (1.07x at D = 64, C = 10); the ensemble phase uses the grid's batch size (the official: 64). Where the
official code trains the heads on a pre-trained backbone (`disjoint+ztw` here), `joint+ztw` and `mixed+ztw` train
the cascades with the backbone, the composition the issue asks for.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from regimes.base import HParam, Phase
from regimes.registry import register_objective
from regimes.uniform import Uniform


def head_features(head: nn.Module) -> int:
    """D: the input features of a head's last linear layer (the one the official cascading head widens by C); of a
    segmentation head, its last 1x1 convolution's input channels (a linear layer applied at every pixel)."""
    linears = [m.in_features for m in head.modules() if isinstance(m, nn.Linear)]
    pixelwise = [m.in_channels for m in head.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)]
    if not linears and not pixelwise:
        raise ValueError(f"ztw's cascades need a head that ends in a linear layer; {type(head).__name__} has none")
    return (linears or pixelwise)[-1]


class GeometricEnsemble(nn.Module):
    """e = mean_j exp(w_j)·log p_j + b over the log-probabilities of exits 0..k (official init: w ~ N(0, 0.01))."""

    def __init__(self, members: int, num_classes: int):
        super().__init__()
        self.log_weight = nn.Parameter(torch.randn(members) * 0.01)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, log_probs: list[Tensor]) -> Tensor:
        stacked = torch.stack(log_probs, dim=1)                         # (N, members, C)
        return (stacked * self.log_weight.exp()[None, :, None]).mean(dim=1) + self.bias


class ZeroTimeWaste(nn.Module):
    """The exit combiner of `ztw`: cascading connections between the internal exits, then (once `ensembled`) the
    geometric ensemble of the cascaded exits so far. State: (previous cascaded output, log-probabilities so far)."""

    def __init__(self, num_exits: int, num_classes: int, feature_dims: Sequence[int]):
        super().__init__()
        internal = num_exits - 1
        if len(feature_dims) != internal:
            raise ValueError(f"{internal} internal exits but {len(feature_dims)} head feature sizes")
        self.final_exit = internal
        self.norms = nn.ModuleList(nn.LayerNorm(num_classes) for _ in range(max(internal - 1, 0)))
        self.cascades = nn.ModuleList(nn.Linear(num_classes, num_classes, bias=False)
                                      for _ in range(max(internal - 1, 0)))
        for cascade, features in zip(self.cascades, feature_dims[1:]):     # exit k >= 1 reads exit k - 1
            bound = 1 / math.sqrt(features + num_classes)                   # the official layer's fan-in D + C
            nn.init.uniform_(cascade.weight, -bound, bound)
        self.ensembles = nn.ModuleList(GeometricEnsemble(k + 1, num_classes) for k in range(internal))
        self.register_buffer("ensembled", torch.tensor(False))    # in model.pt: whether the ensemble phase ran
        self._ensembled = False                                     # the same as a Python bool: no device sync

    def last_phase_parameters(self) -> list[nn.Parameter]:
        """The ensembles' weights: only the last (`combiner`) phase trains them."""
        return list(self.ensembles.parameters())

    def begin_last_phase(self) -> None:
        """From now on internal exits output their ensembles."""
        self.ensembled.fill_(True)
        self._ensembled = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ensembled = bool(self.ensembled)

    def step(self, k: int, head_logits: Tensor, state) -> tuple[Tensor, tuple]:
        if k == self.final_exit:
            return head_logits, state
        if head_logits.dim() == 4:      # segmentation: every pixel's class vector, as a classification exit's
            n, c, h, w = head_logits.shape
            out, state = self.step(k, head_logits.permute(0, 2, 3, 1).reshape(n * h * w, c), state)
            return out.view(n, h, w, c).permute(0, 3, 1, 2), state
        previous, log_probs = state if state is not None else (None, [])
        cascaded = head_logits if k == 0 else head_logits + self.cascades[k - 1](self.norms[k - 1](previous.detach()))
        log_probs = [*log_probs, torch.log_softmax(cascaded, dim=-1)]
        out = self.ensembles[k](log_probs) if self._ensembled else cascaded
        return out, (cascaded, log_probs)


@register_objective
class ZTW(Uniform):
    name = "ztw"
    description = ("cascading connections c_k = z_k + W LN(sg(c_{k-1})), L = mean_k CE_k; then a geometric "
                   "ensemble of exits <= k fitted per exit on the frozen network")
    source = "Wołczyk et al., Zero Time Waste, NeurIPS 2021 (gmum/Zero-Time-Waste)"
    hparams = {
        "ensemble_epochs": HParam(2, "epochs of the last phase that fits the ensembles (0: cascades only)",
                                  kind=int, low=0),
        "ensemble_lr": HParam(1e-3, "Adam learning rate of the ensemble phase (AdamW, weight decay 0)", low=0.0, low_open=True),
    }

    def exit_combiner(self, model, num_classes: int) -> nn.Module:
        return ZeroTimeWaste(model.num_exits, num_classes, [head_features(head) for head in model.heads])

    def final_phases(self) -> list[Phase]:
        return [Phase("ensemble", "combiner", self.hp["ensemble_epochs"],
                      train={"optimizer": "adamw", "lr": self.hp["ensemble_lr"], "weight_decay": 0.0})]
