"""Pretrained backbones: a grid's `[model] weights`, where its runs start from instead of a random backbone.

Attaching exits to a pretrained network is how many practitioners start. `weights` is either
- a local file: a state dict (`torch.save(model.state_dict(), path)` of the suite's network for this arch and
  dataset, e.g. of a run's model.pt) holding every `blocks.*` tensor and, optionally, the `classifier.*` ones;
  exit heads in it are ignored (the regime trains its own). The file's SHA-256 is what the runs' `model.weights`
  holds ("sha256:<hex>"), so it enters their run ids: other weights, other runs; the same file moved, the same runs.
  `bench run` copies it into results/<grid>/weights/<hex>.pt before training, and every run loads that copy after
  checking its digest, so a grid's results hold the exact weights they started from.
- "imagenet": the torchvision/timm ImageNet weights of the arch (`build_model(pretrained=True)`), downloaded by the
  package when the machine can (offline, the run fails and names the download).

What a pretrained backbone changes (BENCHMARK.md, "Pretrained backbones"): the P1 phase is skipped — the pretrained
backbone is the backbone-first result — and recorded as skipped in the run's cost; `disjoint` trains its heads on the
pretrained backbone and classifier (so the file must hold a classifier for the dataset's classes), `joint` and `mixed`
fine-tune from it (a classifier of another class count is left freshly initialised, and the run says so).
"""
from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

from benchmark.errors import UserError

IMAGENET = "imagenet"
DIGEST_PREFIX = "sha256:"
BACKBONE_PREFIXES = ("blocks.", "classifier.")


def read_weights(path: Path) -> dict:
    """The state dict in `path`, loaded safely (`weights_only`: tensors and plain containers, never code)."""
    import torch
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise UserError(f"{path} is not a state dict saved by torch.save ({type(error).__name__}: "
                        f"{str(error).splitlines()[0][:200]})") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict (names -> tensors): save "
                        f"model.state_dict()")
    return state


def classifier_fits(state: dict, model) -> bool:
    """Whether `state` holds every `blocks.*` tensor of `model` in its shape — else a UserError naming the first key
    that is missing or of another shape — and every `classifier.*` one (False: the classifier stays fresh)."""
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()
                if key.startswith(BACKBONE_PREFIXES)}
    for key, shape in expected.items():
        if not key.startswith("blocks."):
            continue
        if key not in state:
            raise UserError(f"has no '{key}' (the backbone's keys are those of model.state_dict() of the suite's "
                            f"network: blocks.* and classifier.*)")
        if tuple(state[key].shape) != shape:
            raise UserError(f"'{key}' has shape {tuple(state[key].shape)}, the network's is {shape}")
    return all(key in state and tuple(state[key].shape) == shape for key, shape in expected.items()
               if key.startswith("classifier."))


def load_backbone(model, state: dict) -> bool:
    """Copy the backbone of `state` into `model` (its classifier too where it fits: `classifier_fits`); returns
    whether the classifier was loaded."""
    import torch
    with_classifier = classifier_fits(state, model)
    prefixes = BACKBONE_PREFIXES if with_classifier else ("blocks.",)
    with torch.no_grad():
        missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k.startswith(prefixes)},
                                                    strict=False)
    assert not unexpected, unexpected
    return with_classifier


def staged_file(root: Path, weights: str) -> Path:
    """Where `bench run` keeps a file's copy in a results folder: <root>/weights/<hex>.pt."""
    return Path(root) / "weights" / f"{weights.removeprefix(DIGEST_PREFIX)}.pt"


def stage(root: Path, sources: dict[str, Path]) -> None:
    """Copy each weights file ("sha256:<hex>" -> source path) into the results folder, once; a copy whose digest is
    not its name is replaced."""
    from benchmark.store import copy_file, file_digest
    for weights, source in sources.items():
        target = staged_file(root, weights)
        if target.is_file() and DIGEST_PREFIX + file_digest(target) == weights:
            continue
        if DIGEST_PREFIX + file_digest(source) != weights:
            raise UserError(f"{source} changed since the grid was read (its SHA-256 differs): rerun the command")
        copy_file(source, target)


def staged_weights(root: Path, weights: str) -> dict:
    """The state dict a run starts from, from the results folder's copy, its digest checked."""
    from benchmark.store import CorruptFile, file_digest
    path = staged_file(root, weights)
    if not path.is_file():
        raise UserError(f"{path} is missing: `bench run` copies a grid's [model] weights there before training")
    if DIGEST_PREFIX + file_digest(path) != weights:
        raise CorruptFile(f"{path} does not have the SHA-256 its name says: delete it and rerun `bench run`, which "
                          f"copies the grid's weights file again")
    return read_weights(path)
