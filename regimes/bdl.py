"""`bdl`: block-dependent losses (Han et al., IEEE TNNLS 2023, "Improving Low-Latency Predictions in Multi-Exit
Neural Networks via Block-Dependent Losses") — RECONSTRUCTED from the paper's description, not its code.

Conventional training lets block j receive the losses of every exit at or after it, so early blocks are pulled
towards features the deep exits want. Here the K exits are split into `groups` contiguous groups (as equal as
possible, earlier groups larger) and block j receives only the losses of the exits of its own group: the hidden
state entering each group is detached. With `overlap` = o > 0 a block also receives the losses of the first o
exits of the next group: those exits' logits are recomputed from the *attached* group boundary through the next
group's blocks with detached parameters and BatchNorm buffers copied, so that extra path sends gradient only into
the earlier group and the loss value is unchanged. The total is the mean of the exits' cross-entropies.
"""
import numpy as np
import torch
from torch.func import functional_call

from benchmark.models.multi_exit import every_scale
from regimes.base import HParam, Objective
from regimes.losses import cross_entropy
from regimes.registry import register_objective


def exit_groups(num_exits: int, groups: int) -> list[list[int]]:
    """Contiguous groups of exit indices, e.g. 5 exits in 2 groups -> [[0, 1, 2], [3, 4]]."""
    return [list(map(int, g)) for g in np.array_split(np.arange(num_exits), groups)]


def frozen_call(module, x):
    """`module(x)` with detached parameters and copied buffers: gradient flows to x only, state is untouched."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    buffers = {name: b.clone() for name, b in module.named_buffers()}
    return functional_call(module, {**params, **buffers}, (x,))


@register_objective
class BlockDependentLoss(Objective):
    name = "bdl"
    description = "each block learns only from the exits of its own group (+ the first `overlap` exits of the next)"
    source = "Han et al., Block-Dependent Losses, IEEE TNNLS 2023"
    reconstructed = True
    hparams = {
        "groups": HParam(2, "G: contiguous groups of exits; the hidden state entering each group is detached",
                         kind=int, low=1),
        "overlap": HParam(0, "o: a block also learns from the first o exits of the next group", kind=int, low=0),
    }
    uses_between = True

    def _layout(self, model):
        num_exits = model.num_exits
        if self.hp["groups"] > num_exits:
            raise ValueError(f"bdl.groups={self.hp['groups']} exceeds the model's {num_exits} exits")
        exit_block = [*model.exit_blocks, len(model.blocks) - 1]
        groups = exit_groups(num_exits, self.hp["groups"])
        boundaries = [exit_block[g[-1]] for g in groups[:-1]]   # block after which each group ends
        return exit_block, groups, boundaries

    def forward(self, model, x):
        exit_block, groups, self._boundaries = self._layout(model)
        self._hidden_at = {}
        logits = super().forward(model, x)
        overlap = int(self.hp["overlap"])
        if overlap == 0:
            return logits
        for g, boundary in enumerate(self._boundaries):
            extra = groups[g + 1][:overlap]
            hidden = self._hidden_at[boundary]
            last_block = exit_block[extra[-1]]
            for j in range(boundary + 1, last_block + 1):
                hidden = frozen_call(model.blocks[j], hidden)
                for k in extra:
                    if exit_block[k] == j:
                        head = model.heads[k] if k < model.num_exits - 1 else model.classifier
                        z = frozen_call(head, hidden)
                        logits[k] = logits[k] + (z - z.detach())   # same value, extra gradient into group g
        return logits

    def between(self, i, hidden):
        if i in self._boundaries:
            self._hidden_at[i] = hidden
            return every_scale(torch.Tensor.detach, hidden)
        return hidden

    def loss(self, logits, y, ctx):
        return torch.stack([cross_entropy(z, y) for z in logits]).mean()
