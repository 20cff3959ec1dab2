"""Segmentation data (issue 23): the generated MNIST scenes against their construction, and the Pascal VOC 2012 and
Cityscapes readers on small folders written in the official layouts."""
import re

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from benchmark.cli import main
from benchmark.data import IGNORE_INDEX, Dataset, clear_cache, dataset_task, load_dataset
from benchmark.data import cityscapes, voc
from benchmark.data.build import seeded_split
from benchmark.data.digit_sources import generated_fingerprint, mnist_sources, split_seed
from benchmark.data.mnist_scenes import BACKGROUND, MNIST_SCENES, digit_scenes
from benchmark.errors import DataUnavailable, UserError
from benchmark.grid import load_grid

# --- MNIST scenes --------------------------------------------------------------------------------------------------


def flat_digits(values, side):
    """Source 'digits' of one constant value each: a value in a scene names the source it came from."""
    return np.repeat(np.asarray(values, dtype=np.uint8)[:, None, None], side, 1).repeat(side, 2)


def test_a_scene_holds_one_to_three_of_its_own_sources_in_boxes_that_do_not_overlap():
    values = np.arange(130, 170)                      # all at least the ink threshold: every digit pixel is labelled
    digits, labels = flat_digits(values, 6), np.arange(40) % 10
    images, maps, used = digit_scenes(digits, labels, 300, 0, (16, 20), (1, 3), 128)
    assert images.shape == (300, 1, 16, 20) and maps.shape == (300, 16, 20)
    assert images.dtype == maps.dtype == np.uint8
    counts = (used >= 0).sum(axis=1)
    assert set(counts.tolist()) == {1, 2, 3}
    for image, label_map, sources in zip(images[:, 0], maps, used):
        sources = sources[sources >= 0]
        present = set(np.unique(image).tolist()) - {0}
        assert present == set(values[sources].tolist())          # each source a whole 6x6 box: no overlap hides one
        for source in set(sources.tolist()):
            ink = image == values[source]
            assert ink.sum() % 36 == 0 and (label_map[ink] == labels[source]).all()
        assert (label_map[image == 0] == BACKGROUND).all()


def test_faint_digit_pixels_are_ignored_and_ink_takes_the_digits_class():
    digits = np.zeros((2, 4, 4), dtype=np.uint8)
    digits[0] = [[0, 40, 127, 0], [128, 255, 0, 0], [0, 0, 0, 0], [0, 0, 0, 200]]
    digits[1] = digits[0]
    images, maps, used = digit_scenes(digits, np.array([7, 7]), 20, 1, (4, 4), (1, 1), 128)
    expected = np.array([[BACKGROUND, 255, 255, BACKGROUND], [7, 7, BACKGROUND, BACKGROUND],
                         [BACKGROUND] * 4, [BACKGROUND, BACKGROUND, BACKGROUND, 7]])
    assert all(np.array_equal(m, expected) for m in maps) and (used[:, 0] >= 0).all()


def test_every_scene_split_is_remade_from_its_own_source_digits():
    """Each split is exactly its construction from that split's sources, which are disjoint (test_generated_data)."""
    data, sources = load_dataset("mnist_scenes", "."), mnist_sources(MNIST_SCENES["digit"])
    for split in ("train", "val", "test"):
        images, maps, used = digit_scenes(*sources[split], MNIST_SCENES["scenes"][split],
                                          split_seed(MNIST_SCENES["seed"], split), MNIST_SCENES["canvas"],
                                          MNIST_SCENES["digits"], MNIST_SCENES["ink"])
        assert np.array_equal(data.stored(split).numpy(), images)
        assert np.array_equal(getattr(data, f"y_{split}").numpy(), maps)
        assert used.max() < len(sources[split][0])


def test_mnist_scenes_are_fixed_to_the_byte_and_sized_for_a_readable_validation():
    data = load_dataset("mnist_scenes", ".")
    assert (data.task, data.kind, data.num_classes, data.input_shape, data.storage) == \
        ("segmentation", "image", 11, (1, 32, 42), "uint8")
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (2000, 1000, 1000)
    assert len(data.y_val) * 0.005 >= 5         # per-image exit decisions: half a point is at least 5 images
    assert data.y_train.dtype == torch.uint8 and data.y_train.shape == (2000, 32, 42)
    assert set(np.unique(data.y_train.numpy())) == {*range(11), IGNORE_INDEX}
    arrays = [data.stored(split).numpy() for split in ("train", "val", "test")]
    labels = [getattr(data, f"y_{split}").numpy() for split in ("train", "val", "test")]
    assert generated_fingerprint(*arrays, *labels) == \
        "8f4082a16560af50b7f8b5af82c46be815b4826e06e31f3aba73a6f6ea860fac"


# --- the dataset container -----------------------------------------------------------------------------------------


def segmentation_dataset(augmentation="crop", padding=1, **changes):
    x = torch.arange(2 * 3 * 3, dtype=torch.uint8).view(2, 1, 3, 3)
    y = torch.tensor([[[0, 1, 2], [3, 4, 5], [6, 7, 8]], [[9] * 3] * 3], dtype=torch.uint8)
    fields = dict(name="toy", kind="image", num_classes=10, input_shape=(1, 3, 3), x_train=x, y_train=y,
                  x_val=x, y_val=y, x_test=x, y_test=y, augmentation=augmentation, crop_padding=padding,
                  mean=(0.5,), std=(0.25,), task="segmentation")
    return Dataset(**{**fields, **changes})


def test_a_training_pair_crops_and_mirrors_the_label_map_with_the_image_padding_with_ignore():
    data = segmentation_dataset("crop+flip")
    generator = torch.Generator().manual_seed(3)
    x, y = data.training_pair(torch.tensor([0, 1]), generator)
    top, left, flip = data._crop_draws(2, torch.Generator().manual_seed(3))
    pixels = data.stored("train")
    for row in range(2):
        padded_x = torch.zeros(5, 5, dtype=torch.uint8)
        padded_y = torch.full((5, 5), IGNORE_INDEX, dtype=torch.uint8)
        padded_x[1:4, 1:4], padded_y[1:4, 1:4] = pixels[row, 0], data.y_train[row]
        window = (slice(int(top[row]), int(top[row]) + 3), slice(int(left[row]), int(left[row]) + 3))
        want_x, want_y = padded_x[window], padded_y[window]
        if flip[row]:
            want_x, want_y = want_x.flip(1), want_y.flip(1)
        assert torch.equal(x[row, 0], data.normalise(want_x[None, None])[0, 0])
        assert torch.equal(y[row], want_y)
    assert y.dtype == torch.uint8


def test_a_training_pair_without_augmentation_is_the_stored_rows():
    data = segmentation_dataset("none", 0)
    x, y = data.training_pair(torch.tensor([1]), torch.Generator())
    assert torch.equal(y, data.y_train[1:]) and torch.equal(x, data.inputs("train", torch.tensor([1])))


def test_segmentation_labels_must_be_uint8_maps_of_the_images():
    labels = segmentation_dataset().y_val
    with pytest.raises(ValueError, match=re.escape("uint8 (N, H, W) maps")):
        segmentation_dataset(y_val=labels.long())
    with pytest.raises(ValueError, match=re.escape("labels (2, 3, 2)")):
        segmentation_dataset(y_test=labels[:, :, :2])
    with pytest.raises(ValueError, match="task must be one of"):
        segmentation_dataset(task="detection")


def test_a_seeded_split_holds_out_a_fixed_share_and_at_least_one():
    kept, held = seeded_split(np.zeros((50, 4, 4)), 0.1)
    assert len(held) == 5 and len(kept) == 45 and not set(kept) & set(held) and set(kept) | set(held) == set(range(50))
    assert np.array_equal(held, seeded_split(np.zeros((50, 2, 2)), 0.1)[1])          # fixed: SPLIT_SEED
    assert len(seeded_split(np.zeros(3), 0.1)[1]) == 1


def test_a_segmentation_task_needs_an_arch_that_predicts_per_pixel_labels(grid_file):
    with pytest.raises(UserError, match=re.escape("'mnist_scenes' holds image inputs with per-pixel labels "
                                                  "(segmentation) but no arch in archs takes them (registered "
                                                  "archs that do: deeplabv3_mobilenet_v3_large, deeplabv3_resnet50, "
                                                  "fcn_resnet50, seg_cnn)")):
        load_grid(str(grid_file(datasets=("mnist_scenes",))))
    with pytest.raises(UserError, match=re.escape("'seg_cnn' takes image inputs with per-pixel labels "
                                                  "(segmentation) but no dataset holds them")):
        load_grid(str(grid_file(archs=("small_cnn", "seg_cnn"))))
    segmentation = grid_file(datasets=("mnist_scenes",), archs=("seg_cnn",))
    segmentation.write_text(segmentation.read_text().replace('head = "pool"', 'head = "auto"'))
    assert {(s.dataset, s.arch) for s in load_grid(str(segmentation)).specs} == {("mnist_scenes", "seg_cnn")}
    assert dataset_task("mnist_scenes") == dataset_task("voc2012") == dataset_task("cityscapes") == "segmentation"
    assert dataset_task("cluttered_mnist") == "classification"


def test_segmentation_datasets_are_listed_with_per_pixel_classes():
    out = CliRunner().invoke(main, ["list", "datasets"]).stdout
    assert re.search(r"voc2012\s+image\s+21 per-pixel classes", out)
    assert re.search(r"cityscapes\s+image\s+19 per-pixel classes", out)
    assert re.search(r"mnist_scenes\s+image\s+11 per-pixel classes", out)
    assert re.search(r"cifar10\s+image\s+10 classes", out)


# --- Pascal VOC 2012 -----------------------------------------------------------------------------------------------

VOC_SIZES = {"a": (40, 30), "b": (30, 40), "c": (20, 20), "d": (40, 20), "e": (10, 40)}     # id -> (width, height)
VOC_CLASS = {"a": 1, "b": 15, "c": 20, "d": 7, "e": 3}


def write_voc(root, train=("a", "b", "c"), val=("d", "e")):
    """A VOC 2012 folder: each image grey level 10 x its class, its label a palette PNG of that class with a
    255 border column on the right."""
    folder = root / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for name, (width, height) in VOC_SIZES.items():
        Image.new("RGB", (width, height), (10 * VOC_CLASS[name],) * 3).save(folder / "JPEGImages" / f"{name}.jpg",
                                                                              quality=100)
        classes = np.full((height, width), VOC_CLASS[name], dtype=np.uint8)
        classes[:, -1] = 255
        label = Image.frombytes("P", (width, height), classes.tobytes())
        label.putpalette([v for k in range(256) for v in (k, 255 - k, 0)])
        label.save(folder / "SegmentationClass" / f"{name}.png")
    (folder / "ImageSets" / "Segmentation" / "train.txt").write_text("\n".join(train) + "\n")
    (folder / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(val) + "\n")
    return folder


def assert_names_the_voc_layout(message, root):
    assert str(root) in message and "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt" in message
    assert "SegmentationClass/<id>.png" in message and voc.VOC_URL in message and "untar" in message


def test_voc_reads_the_official_layout_letterboxed_with_ignored_padding(tmp_path):
    write_voc(tmp_path)
    data = load_dataset("voc2012", tmp_path)
    side = voc.VOC_SIDE
    assert (data.task, data.num_classes, data.input_shape, data.augmentation) == \
        ("segmentation", 21, (3, side, side), "crop+flip")
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (2, 1, 2)        # val carved from train
    assert data.y_test.shape == (2, side, side) and data.y_test.dtype == torch.uint8
    for label_map, name in zip(data.y_test, ("d", "e")):          # the official val split, in val.txt's order
        width, height = VOC_SIZES[name]
        scale = side / max(width, height)
        rows, cols = (label_map == VOC_CLASS[name]).nonzero(as_tuple=True)
        assert abs((rows.max() - rows.min() + 1) - height * scale) <= 1                # aspect kept, centred
        assert abs(int(rows.min()) - (side - round(height * scale)) // 2) <= 0
        assert set(label_map.unique().tolist()) == {VOC_CLASS[name], IGNORE_INDEX}      # padding and border ignored
    train_classes = {int(m[side // 2, side // 4]) for m in torch.cat([data.y_train, data.y_val])}
    assert train_classes == {VOC_CLASS[n] for n in "abc"}
    mean, std = torch.tensor(data.mean).view(3, 1, 1), torch.tensor(data.std).view(3, 1, 1)
    grey = ((data.x_test[0] * std + mean) * 255)[:, side // 2, side // 2]
    assert torch.allclose(grey, torch.full((3,), 70.0), atol=2)


def test_voc_is_cached_and_rebuilt_when_its_listing_changes(tmp_path, monkeypatch):
    write_voc(tmp_path)
    first = load_dataset("voc2012", tmp_path)
    assert (tmp_path / "voc2012.exitbench.npz").is_file()
    clear_cache()
    monkeypatch.setattr(voc, "_decode_pairs", lambda *args: pytest.fail("decoded despite the cache"))
    assert torch.equal(load_dataset("voc2012", tmp_path).y_test, first.y_test)
    monkeypatch.undo()
    write_voc(tmp_path, val=("d", "e", "a"))
    clear_cache()
    assert len(load_dataset("voc2012", tmp_path).y_test) == 3


@pytest.mark.parametrize("damage, problem", [
    ("no folder", "does not exist"),
    ("no val.txt", "val.txt is missing"),
    ("missing image", "b.jpg, listed in"),
    ("rgb label", "is a RGB image, not the official palette PNG"),
    ("unknown class", "holds values [42]"),
    ("size mismatch", "is 12x12 pixels but its image is 40x30"),
])
def test_voc_malformed_layouts_are_named(tmp_path, damage, problem):
    folder = write_voc(tmp_path)
    labels = folder / "SegmentationClass"
    if damage == "no folder":
        import shutil
        shutil.rmtree(tmp_path / "VOCdevkit")
    elif damage == "no val.txt":
        (folder / "ImageSets" / "Segmentation" / "val.txt").unlink()
    elif damage == "missing image":
        (folder / "JPEGImages" / "b.jpg").unlink()
    elif damage == "rgb label":
        Image.new("RGB", (40, 30)).save(labels / "a.png")
    elif damage == "unknown class":
        Image.fromarray(np.full((30, 40), 42, dtype=np.uint8)).save(labels / "a.png")
    elif damage == "size mismatch":
        Image.fromarray(np.zeros((12, 12), dtype=np.uint8)).save(labels / "a.png")
    with pytest.raises(DataUnavailable) as raised:
        load_dataset("voc2012", tmp_path)
    assert problem in str(raised.value) and "\n" not in str(raised.value)
    assert_names_the_voc_layout(str(raised.value), tmp_path)


# --- Cityscapes ----------------------------------------------------------------------------------------------------

def write_cityscapes(root, frames={"train": ["aachen_000000_000019", "aachen_000001_000019", "bonn_000000_000019"],
                                   "val": ["lindau_000000_000019"]}):
    """A Cityscapes folder of 64x32 frames: left half labelId 7 (road), right half 26 (car) with a 0 (unlabelled)
    stripe on top; each frame's grey level 10 x (its index + 1)."""
    ids = np.full((32, 64), 7, dtype=np.uint8)
    ids[:, 32:] = 26
    ids[:4] = 0
    for split, names in frames.items():
        for number, name in enumerate(names):
            city = name.split("_")[0]
            for sub, suffix in (("leftImg8bit", "leftImg8bit"), ("gtFine", "gtFine_labelIds")):
                (root / sub / split / city).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (64, 32), (10 * (number + 1),) * 3).save(
                root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
            Image.fromarray(ids).save(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png")


def test_cityscapes_reads_the_official_layout_as_train_ids(tmp_path):
    write_cityscapes(tmp_path)
    data = load_dataset("cityscapes", tmp_path)
    height, width = cityscapes.CITYSCAPES_SIZE
    assert (data.task, data.num_classes, data.input_shape) == ("segmentation", 19, (3, height, width))
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (2, 1, 1)
    label_map = data.y_test[0]
    assert (label_map[height // 8:, : width // 2] == 0).all()            # road: trainId 0
    assert (label_map[height // 8:, width // 2:] == 13).all()            # car: trainId 13
    assert (label_map[: height // 8] == IGNORE_INDEX).all()              # unlabelled: ignored
    assert [cityscapes.TRAIN_IDS[i] for i in (7, 26, 24, 33)] == [0, 13, 11, 18] and len(cityscapes.TRAIN_IDS) == 19


@pytest.mark.parametrize("damage, problem", [
    ("no folder", "leftImg8bit/train does not exist"),
    ("missing label", "bonn_000000_000019_gtFine_labelIds.png is missing"),
    ("wrong aspect", "is 40x40 pixels; Cityscapes frames are twice as wide as high"),
])
def test_cityscapes_malformed_layouts_are_named(tmp_path, damage, problem):
    write_cityscapes(tmp_path)
    if damage == "no folder":
        import shutil
        shutil.rmtree(tmp_path / "leftImg8bit" / "train")
    elif damage == "missing label":
        (tmp_path / "gtFine" / "train" / "bonn" / "bonn_000000_000019_gtFine_labelIds.png").unlink()
    elif damage == "wrong aspect":
        Image.new("RGB", (40, 40)).save(tmp_path / "leftImg8bit" / "val" / "lindau" /
                                        "lindau_000000_000019_leftImg8bit.png")
    with pytest.raises(DataUnavailable) as raised:
        load_dataset("cityscapes", tmp_path)
    message = str(raised.value)
    assert problem in message and str(tmp_path) in message and "gtFine_trainvaltest.zip" in message
    assert "<city>_<seq>_<frame>_gtFine_labelIds.png" in message


def test_missing_segmentation_folders_are_unavailable_and_nothing_is_written(tmp_path):
    from benchmark.data import dataset_available
    assert not dataset_available("voc2012", tmp_path) and not dataset_available("cityscapes", tmp_path)
    assert not dataset_available("voc2012") and list(tmp_path.iterdir()) == []


def test_full_gains_voc_and_cityscapes_cells_of_the_segmentation_archs_only_when_they_are_present(tmp_path):
    write_voc(tmp_path)
    write_cityscapes(tmp_path)
    clear_cache()
    try:
        full = load_grid("full", tmp_path, check_models=False)
    finally:
        clear_cache()
    segmentation = {(s.dataset, s.arch) for s in full.specs if s.dataset in ("voc2012", "cityscapes")}
    archs = {"fcn_resnet50", "deeplabv3_resnet50", "deeplabv3_mobilenet_v3_large"}
    assert segmentation == {(d, a) for d in ("voc2012", "cityscapes") for a in archs}
    assert not {s.arch for s in full.specs if s.dataset in ("cifar10", "cifar100")} & archs
    voc = next(s for s in full.specs if s.dataset == "voc2012")
    assert (voc.train["optimizer"], voc.train["epochs"], voc.train["batch_size"]) == ("adamw", 100, 16)
    assert {s.regime for s in full.specs if s.dataset == "voc2012"} == {s.regime for s in full.specs}
