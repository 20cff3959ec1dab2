"""scikit-learn's stratified `train_test_split`, reproduced index for index without importing scikit-learn: its import
(~0.9 s with the SciPy it pulls in) was a sixth of a small `bench run`'s CPU time and a part of every worker's
start-up. Every committed split was drawn by `train_test_split(..., stratify=labels, random_state=seed)`;
tests/test_stratify.py checks that this draws the same indices on every dataset's labels and on random label sets."""

from __future__ import annotations

import numpy as np


def stratified_sample(labels: np.ndarray, n_held_out: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out), each sorted, holding out `n_held_out` examples with every class in both parts in
    proportion to its size: the sets `train_test_split(arange(n), test_size=n_held_out, stratify=labels,
    random_state=seed)` returns (scikit-learn's StratifiedShuffleSplit: per-class counts by its approximate mode of
    the hypergeometric, then one permutation of each class's members, from one `RandomState(seed)` stream)."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"stratified_sample takes one label per example; got labels of shape {labels.shape}")
    n_kept = len(labels) - n_held_out
    if n_held_out <= 0 or n_kept <= 0:
        raise ValueError(f"cannot hold out {n_held_out} of {len(labels)} examples and keep the rest")
    classes, class_of, counts = np.unique(labels, return_inverse=True, return_counts=True)
    if counts.min() < 2:
        raise ValueError(f"classes {classes[counts < 2].tolist()} have one example: a stratified split needs two")
    if min(n_kept, n_held_out) < len(classes):
        raise ValueError(f"keeping {n_kept} and holding out {n_held_out} examples cannot hold each of "
                         f"{len(classes)} classes in both parts")
    members = np.split(np.argsort(class_of, kind="stable"), np.cumsum(counts)[:-1])
    rng = np.random.RandomState(seed)
    kept_per_class = _apportion(counts, n_kept, rng)
    held_per_class = _apportion(counts - kept_per_class, n_held_out, rng)
    kept, held_out = [], []
    for index, n_k, n_h in zip(members, kept_per_class, held_per_class):
        shuffled = index[rng.permutation(len(index))]
        kept.append(shuffled[:n_k])
        held_out.append(shuffled[n_k:n_k + n_h])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(held_out))


def _apportion(counts: np.ndarray, draws: int, rng: np.random.RandomState) -> np.ndarray:
    """`draws` examples shared between classes of `counts` in proportion, rounded down, the rest one each to the
    classes of largest remainder — ties broken by `rng` (scikit-learn's `_approximate_mode`)."""
    share = counts / counts.sum() * draws
    given = np.floor(share)
    missing = int(draws - given.sum())
    remainder = share - given
    for value in np.unique(remainder)[::-1]:
        if missing == 0:
            break
        (tied,) = np.where(remainder == value)
        add = min(len(tied), missing)
        given[rng.choice(tied, size=add, replace=False)] += 1
        missing -= add
    return given.astype(int)
