"""The one way to run an evaluation forward: eval mode and no gradients for its duration, every module's own mode
back afterwards."""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """Run the body with `model` in eval mode under `torch.no_grad()`, then give every submodule back its own
    `training` flag. Per module, because a model can be in mixed modes: in phase P3 the frozen backbone is in
    eval (BatchNorm statistics stay put) inside a model in train mode, and `model.train(was_training)` would
    switch that backbone's BatchNorm back to updating its statistics."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        for module, training in modes:
            module.training = training
