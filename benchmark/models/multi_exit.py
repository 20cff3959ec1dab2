"""The multi-exit network: a backbone cut into blocks, exit heads after some blocks, the backbone's classifier last.

The hidden state passed from block to block is one tensor (a feature map, or ViT tokens) or, for multi-scale nets
(MSDNet), a list of feature maps, finest scale first.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch import nn

Hidden = Union[torch.Tensor, list[torch.Tensor]]
Between = Callable[[int, Hidden], Hidden]
Observe = Callable[[int, Hidden], None]


def every_scale(fn: Callable[[torch.Tensor], torch.Tensor], hidden: Hidden) -> Hidden:
    """``fn`` on the tensor, or on each scale of a multi-scale list: for what must hold on every path into the next
    block (bdl's detach: one scale left attached would carry the gradient)."""
    if isinstance(hidden, torch.Tensor):
        return fn(hidden)
    return [fn(scale) for scale in hidden]


def on_coarsest_scale(fn: Callable[[torch.Tensor], torch.Tensor], hidden: Hidden) -> Hidden:
    """``fn`` on the tensor, or on the last (coarsest) scale of a multi-scale list only, the finer scales untouched:
    for what acts on the state the exits read (gradient equilibrium rescales only ``x[-1]`` in the official
    ``msdnet_ge``)."""
    if isinstance(hidden, torch.Tensor):
        return fn(hidden)
    return [*hidden[:-1], fn(hidden[-1])]


def coarsest_scale(hidden: Hidden) -> torch.Tensor:
    """The tensor itself, or the last (coarsest) scale of a multi-scale list: the one MSDNet's classifiers read."""
    return hidden if isinstance(hidden, torch.Tensor) else hidden[-1]


class MultiExitNet(nn.Module):
    """A backbone as an ordered list of blocks, with internal exit heads and the backbone's own classifier.

    Exit k < K-1 is ``heads[k]`` applied to the output of block ``exit_blocks[k]``; the last exit is
    ``classifier`` applied to the output of the last block. Regimes act on the network only through the
    ``between`` and ``after_block`` hooks of :meth:`forward`, so no regime needs its own model code.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        classifier: nn.Module,
        heads: Sequence[nn.Module] = (),
        exit_blocks: Sequence[int] = (),
        multi_scale: bool = False,
    ):
        super().__init__()
        exit_blocks = [int(b) for b in exit_blocks]
        if len(heads) != len(exit_blocks):
            raise ValueError(f"{len(heads)} heads but {len(exit_blocks)} exit blocks")
        if any(b >= a for b, a in zip(exit_blocks, exit_blocks[1:])):
            raise ValueError(f"exit blocks must be strictly increasing, got {exit_blocks}")
        if exit_blocks and not 0 <= exit_blocks[0] <= exit_blocks[-1] < len(blocks) - 1:
            raise ValueError(f"exit blocks must lie in [0, {len(blocks) - 2}] (the last block feeds the classifier), "
                             f"got {exit_blocks}")
        self.blocks = nn.ModuleList(blocks)
        self.classifier = classifier
        self.heads = nn.ModuleList(heads)
        self.exit_blocks = exit_blocks
        self.multi_scale = multi_scale            # blocks pass a list of scales (MSDNet); what objectives may read
        self._head_after_block = {block: k for k, block in enumerate(exit_blocks)}
        self.combiner: nn.Module | None = None      # set by a regime whose exits output more than their head's logits

    @property
    def num_exits(self) -> int:
        return len(self.heads) + 1

    def forward(self, x: torch.Tensor, between: Between | None = None,
                after_block: Between | None = None, observe: Observe | None = None) -> list[torch.Tensor]:
        """Logits of every exit in order (the last one is the classifier's).

        ``between(i, hidden)`` is called on the output of every block i but the last, and what it returns is
        what block i+1 receives. The head at block i reads the hidden state *before* ``between``, so a
        regime can detach or rescale the path into later blocks without touching that head's own gradient.
        ``after_block(i, hidden)`` is called on the output of every block first, and both the head (or the
        classifier) and ``between`` see what it returns (gradient equilibrium rescales there).
        Both hooks receive the whole hidden state (a tensor, or MSDNet's list of scales) and decide which scales they
        act on (``every_scale``, ``on_coarsest_scale``).
        ``observe(i, hidden)`` is then called with every block's whole hidden state (a tensor or the list), as
        the head reads it; it returns nothing and changes nothing (analyses read activations there).
        With a ``combiner`` (the regime's `Objective.exit_combiner`, e.g. boosted's additive ensemble), exit k
        outputs ``combiner.step(k, head logits, state)``, in training and at inference alike.
        """
        logits = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            x = block(x)
            if after_block is not None:
                x = after_block(i, x)
            if observe is not None:
                observe(i, x)
            if i == last:
                break
            if i in self._head_after_block:
                logits.append(self.heads[self._head_after_block[i]](x))
            if between is not None:
                x = between(i, x)
        logits.append(self.classifier(x))
        return logits if self.combiner is None else self.combined(logits)

    def combined(self, logits: list[torch.Tensor]) -> list[torch.Tensor]:
        """The exits' outputs from their heads' logits through ``combiner`` (causal: exit k reads heads 0..k)."""
        outputs, state = [], None
        for k, z in enumerate(logits):
            out, state = self.combiner.step(k, z, state)
            outputs.append(out)
        return outputs

    def forward_final(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone alone: blocks then classifier, no head computed (phase P1 pays only for this)."""
        for block in self.blocks:
            x = block(x)
        return self.classifier(x)

    def backbone_modules(self) -> list[nn.Module]:
        """Blocks and classifier: what P3 freezes (the trainer also puts them in eval() so BatchNorm stays put)."""
        return [*self.blocks, self.classifier]

    def backbone_parameters(self) -> list[nn.Parameter]:
        return [p for module in self.backbone_modules() for p in module.parameters()]

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def last_phase_parameters(self) -> list[nn.Parameter]:
        """The combiner's parameters that only a last `combiner` phase trains (ztw's ensembles); none without one."""
        fitted_last = getattr(self.combiner, "last_phase_parameters", None)
        return fitted_last() if fitted_last is not None else []

    def network_state(self) -> dict[str, torch.Tensor]:
        """The state without the combiner's: what a shared P1 backbone stores, so that runs whose regimes combine
        their exits differently (or not at all) share it."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("combiner.")}

    def load_network_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load a `network_state`: every key but the combiner's must match."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("combiner.")]
        if missing or unexpected:
            raise RuntimeError(f"stored network state does not fit the model: missing {missing}, "
                               f"unexpected {unexpected}")
