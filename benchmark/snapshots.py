"""Information-plane snapshots taken during training: they cannot be recomputed from the final model, so a
grid that wants them (`snapshot_every` in [analyses]) records them while it trains."""
from __future__ import annotations

import pandas as pd
import torch

from analysis.information import information_table, stratified_indices


def analysis_subset(data, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed stratified subset of the non-augmented training split, identical for every run: the samples of every
    model analysis (rank, information, landscape, snapshots), each with its own n."""
    index = stratified_indices(data.y_train.cpu(), min(n, len(data.y_train)), seed=0)
    index = torch.as_tensor(index, device=data.x_train.device)
    return data.x_train[index], data.y_train[index]


class InformationSnapshots:
    """Renyi I(X;T), I(T;Y) per block at global epoch 0 and every `every` epochs after it."""

    def __init__(self, model, data, every: int, samples: int):
        self.model, self.every = model, every
        self.x, self.y = analysis_subset(data, samples)
        self.frames: list[pd.DataFrame] = []

    def __call__(self, global_epoch: int) -> None:
        if global_epoch % self.every == 0:
            table = information_table(self.model, self.x, self.y, estimator="renyi", n_samples=None)
            self.frames.append(table.assign(epoch=global_epoch, stage="snapshot"))

    def table(self) -> pd.DataFrame:
        return pd.concat(self.frames, ignore_index=True) if self.frames else pd.DataFrame()
