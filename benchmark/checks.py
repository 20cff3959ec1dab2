"""Checks of a grid's cells before anything trains: settings that would make a cell's numbers noise.

A cell whose batch is larger than its training split takes one full-batch step per epoch; a validation split with
a handful of samples per class makes every threshold and every validation selection noise. Neither is an error
(a user may want it), so `bench run` and `--dry-run` print one warning per problem, naming the fix.
"""
from __future__ import annotations

from pathlib import Path

import torch

from benchmark.data import load_dataset
from benchmark.errors import UserError
from benchmark.spec import RunSpec

MIN_VAL_PER_CLASS = 10
"""Fewest validation samples per class for thresholds and selections to mean something (the stated minimum)."""


def cell_warnings(specs: list[RunSpec], data_root: Path) -> list[str]:
    """One line per problem of the (dataset, arch, batch size, exits) combinations that `specs` use."""
    from benchmark.models import exit_placement_warnings
    warnings, seen, missing = [], set(), set()
    for spec in specs:
        key = (spec.dataset, spec.arch, spec.train["batch_size"], str(spec.model["exits"]))
        if key in seen or spec.dataset in missing:
            continue
        seen.add(key)
        try:
            data = load_dataset(spec.dataset, data_root)
        except UserError:
            missing.add(spec.dataset)           # said once per dataset, not once per cell
            warnings.append(f"{spec.dataset}: not present under {data_root}, so its batch size and validation "
                            f"split were not checked")
            continue
        cell = f"{spec.dataset}/{spec.arch}"
        n_train = len(data.x_train)
        if spec.train["batch_size"] > n_train:
            warnings.append(f"{cell}: batch size {spec.train['batch_size']} exceeds the {n_train} training samples "
                            f"(one full-batch step per epoch); set a smaller batch_size in [cell_overrides]")
        per_class = validation_samples_per_class(data.y_val.cpu(), data.num_classes)
        if int(per_class.min()) < MIN_VAL_PER_CLASS:
            warnings.append(f"{cell}: the validation split has {int(per_class.min())} "
                            f"{'images showing' if data.y_val.dim() > 1 else 'samples in'} its smallest class "
                            f"(minimum {MIN_VAL_PER_CLASS}): thresholds and validation selections are noise; "
                            f"leave this dataset out or use one with more data")
        warnings += [f"{cell}: {w}" for w in exit_placement_warnings(
            spec.arch, data.num_classes, data.input_shape, spec.model["exits"])]
    return warnings


def validation_samples_per_class(y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Validation samples per class; for label maps (N, H, W) the images each class appears in: per-image exit
    policies fit their thresholds on images, so a class seen in a few images is a few samples however many pixels."""
    if y.dim() == 1:
        return torch.bincount(y, minlength=num_classes)
    return torch.stack([(y == c).flatten(1).any(1).sum() for c in range(num_classes)])
