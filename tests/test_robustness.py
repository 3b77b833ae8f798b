"""Robustness evaluation: deterministic ImageNet-C-style corruptions, top-1 under them, pictures."""

import colorsys
import math

import pytest
import torch
from PIL import Image

from mimar.data import DataConfig, ImageSet, eval_transform
from mimar.data.synthetic import make_synthetic
from mimar.evaluation import corruptions
from mimar.evaluation.corruptions import CORRUPTIONS, corrupt
from mimar.evaluation.robustness import evaluate_robustness
from mimar.evaluation.robustness_plots import plot_corruptions, plot_robustness

# corruptions whose pixels depend on the seed; the others are fixed functions of the image
RANDOM = {
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "elastic_transform",
    "rotation",
    "translation",
}


def _images(n=16, size=28, chans=1, seed=0) -> torch.Tensor:
    """Structured uint8 images (the synthetic set's stripes and blobs): blur and shifts show."""
    cfg = DataConfig(name="synthetic", img_size=size, in_chans=chans, synthetic_size=n)
    return make_synthetic(cfg, "test").images


def _blob(size=32, offset=(6.0, 0.0)) -> torch.Tensor:
    """One gray image of a small bright Gaussian blob at ``offset`` (x, y) from the centre."""
    ys, xs = torch.meshgrid(torch.arange(size) * 1.0, torch.arange(size) * 1.0, indexing="ij")
    centre = (size - 1) / 2
    blob = torch.exp(-((xs - centre - offset[0]) ** 2 + (ys - centre - offset[1]) ** 2) / 2)
    return (blob * 255).round().to(torch.uint8)[None, None]  # (1, 1, H, W)


def _centroid(image: torch.Tensor) -> torch.Tensor:
    """Intensity-weighted (x, y) of a (1, 1, H, W) image, relative to the centre."""
    h, w = image.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h) * 1.0, torch.arange(w) * 1.0, indexing="ij")
    weight = image[0, 0].float()
    centre = torch.tensor([(w - 1) / 2, (h - 1) / 2])
    return torch.stack([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum() - centre


# --- corrupt -------------------------------------------------------------------------------------


def test_at_least_ten_imagenet_c_types_plus_shifts():
    assert len(CORRUPTIONS) >= 12 and len(set(CORRUPTIONS)) == len(CORRUPTIONS)
    assert {"rotation", "translation", "gaussian_noise", "jpeg_compression"} <= set(CORRUPTIONS)


@pytest.mark.parametrize("name", CORRUPTIONS)
@pytest.mark.parametrize("chans", [1, 3])
def test_same_seed_same_pixels_dtype_shape_range(name, chans):
    x = _images(6, chans=chans)
    for severity in range(1, 6):
        a = corrupt(x, name, severity, seed=3)
        assert a.dtype == torch.uint8 and a.shape == x.shape  # uint8 is [0, 255] by construction
        assert torch.equal(a, corrupt(x, name, severity, seed=3))
        assert not torch.equal(a, x), f"{name} severity {severity} left the images unchanged"


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_severity_zero_is_the_identity(name):
    x = _images(4, chans=3)
    assert torch.equal(corrupt(x, name, 0, seed=5), x)


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_seed_changes_exactly_the_random_corruptions(name):
    x = _images(16)
    same = torch.equal(corrupt(x, name, 3, seed=0), corrupt(x, name, 3, seed=1))
    assert same == (name not in RANDOM)


@pytest.mark.parametrize("name", sorted(RANDOM))
def test_an_image_keeps_its_corruption_in_any_batch(name):
    x = _images(16)
    whole = corrupt(x, name, 4, seed=2)
    assert torch.equal(corrupt(x[:8], name, 4, seed=2), whole[:8])
    assert torch.equal(corrupt(x[8:], name, 4, seed=2, indices=range(8, 16)), whole[8:])
    assert not torch.equal(corrupt(x[8:], name, 4, seed=2), whole[8:])  # indices matter


@pytest.mark.parametrize(
    "name", ["gaussian_noise", "impulse_noise", "defocus_blur", "zoom_blur", "contrast"]
)
def test_distortion_grows_with_severity(name):
    x = _images(16)
    dist = [(corrupt(x, name, s).float() - x.float()).abs().mean().item() for s in range(6)]
    assert dist[0] == 0 and all(a < b for a, b in zip(dist, dist[1:])), dist


@pytest.mark.parametrize("name", sorted(set(CORRUPTIONS) - RANDOM))
def test_fixed_corruptions_treat_gray_rgb_like_gray(name):
    gray = _images(4)
    rgb = corrupt(gray.repeat(1, 3, 1, 1), name, 4)
    assert torch.equal(rgb, corrupt(gray, name, 4).repeat(1, 3, 1, 1))


def test_any_image_size():
    x = _images(3, size=24)[..., :20, :]  # (3, 1, 20, 24)
    for name in CORRUPTIONS:
        assert corrupt(x, name, 5).shape == x.shape


def test_brightness_adds_to_the_hsv_value():
    x = torch.randint(0, 256, (2, 3, 4, 4), generator=torch.Generator().manual_seed(0))
    x = x.to(torch.uint8)
    out = corrupt(x, "brightness", 5)  # CIFAR-10-C: V + 0.3
    for n, i, j in [(0, 0, 0), (0, 1, 2), (1, 3, 3), (1, 2, 0)]:
        h, s, v = colorsys.rgb_to_hsv(*(x[n, :, i, j].double() / 255).tolist())
        expected = torch.tensor(colorsys.hsv_to_rgb(h, s, min(v + 0.3, 1.0))) * 255
        assert (out[n, :, i, j].double() - expected).abs().max() <= 0.5 + 1e-6


def test_impulse_noise_sets_its_fraction_to_black_and_white():
    x = torch.full((8, 1, 28, 28), 128, dtype=torch.uint8)
    out = corrupt(x, "impulse_noise", 5)  # CIFAR-10-C amount 0.07, half salt, half pepper
    assert (out == 0).float().mean().item() == pytest.approx(0.035, abs=0.01)
    assert (out == 255).float().mean().item() == pytest.approx(0.035, abs=0.01)
    assert ((out == 0) | (out == 255) | (out == 128)).all()


def test_contrast_is_the_mean_plus_scaled_deviation():
    x = _images(2, chans=3)
    xf = x.float()
    mean = xf.mean(dim=(2, 3), keepdim=True)
    expected = ((xf - mean) * 0.15 + mean).round()  # severity 5 of CIFAR-10-C
    assert (corrupt(x, "contrast", 5).float() - expected).abs().max() <= 1


def test_glass_blur_copies_a_neighbour_as_the_released_datasets_do():
    """ImageNet-C's numpy "swap" of (H, W, 3) pixels assigns through views: a copy, read from
    a pixel not yet visited. Severity 1 blurs with sigma 0.05 px (no effect), so the interior
    pixel (i, j) holds one of (i, j), (i-1, j), (i, j-1), (i-1, j-1), all channels together."""
    x = torch.randint(0, 256, (3, 3, 28, 28), generator=torch.Generator().manual_seed(0))
    x = x.to(torch.uint8)
    out = corrupt(x, "glass_blur", 1)
    assert torch.equal(out[..., :2, :], x[..., :2, :]) and torch.equal(out[..., :2], x[..., :2])
    inner = out[..., 2:, 2:]  # (3, 3, 26, 26)
    sources = [x[..., 2 - di : 28 - di, 2 - dj : 28 - dj] for di in (0, 1) for dj in (0, 1)]
    match = torch.stack([(inner == src).all(dim=1) for src in sources])  # (4, 3, 26, 26)
    assert match.any(dim=0).all()
    assert match[0].float().mean() < 0.5  # most pixels did take a neighbour's value


def test_rotation_turns_by_the_severity_angle():
    blob = _blob()
    for severity, degrees in zip(range(1, 6), (6, 12, 18, 24, 30)):
        x, y = _centroid(corrupt(blob, "rotation", severity)).tolist()
        assert abs(abs(math.degrees(math.atan2(y, x))) - degrees) < 1.5
        assert math.hypot(x, y) == pytest.approx(6.0, abs=0.3)


def test_translation_shifts_by_the_severity_length():
    blob = _blob(offset=(0.0, 0.0))
    for severity, fraction in zip(range(1, 6), (0.03, 0.06, 0.09, 0.12, 0.15)):
        shift = _centroid(corrupt(blob, "translation", severity)).norm().item()
        assert shift == pytest.approx(fraction * 32, abs=0.15)


def test_bad_arguments_are_refused():
    x = _images(2)
    with pytest.raises(ValueError, match="unknown corruption 'fog'"):
        corrupt(x, "fog", 1)
    with pytest.raises(ValueError, match="severity must be 0-5"):
        corrupt(x, "contrast", 6)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(x.float(), "contrast", 1)
    with pytest.raises(ValueError, match="one index per image"):
        corrupt(x, "contrast", 1, indices=[0])


# --- evaluate_robustness -------------------------------------------------------------------------


def _test_set(n=20, size=16) -> ImageSet:
    images = _images(n, size=size)
    labels = torch.tensor([0] * 5 + [1] * 7 + [2] * 8)[torch.randperm(n)]
    return ImageSet(images, labels, None, mean=(0.5,), std=(0.25,), source="tiny")


def _lookup(data: ImageSet, img_size: int):
    """A classifier that knows every clean test image: the true label, else class 0."""
    views = eval_transform(data.images, img_size, data.mean, data.std)
    table = {v.numpy().tobytes(): int(y) for v, y in zip(views, data.labels)}

    def classify(x: torch.Tensor) -> torch.Tensor:
        found = torch.tensor([table.get(v.numpy().tobytes(), 0) for v in x])
        return torch.nn.functional.one_hot(found, 3).float()

    return classify


def test_an_oracle_is_perfect_on_clean_images():
    data = _test_set()
    out = evaluate_robustness(_lookup(data, 16), data, img_size=16, batch_size=7, progress=False)
    assert out["clean_top1"] == 100.0
    assert out["n_test"] == 20 and out["severities"] == [1, 2, 3, 4, 5]
    assert set(out["per_corruption"]) == set(CORRUPTIONS)
    assert set(out["per_corruption"]["contrast"]) == {"1", "2", "3", "4", "5", "mean"}
    assert out["implementation"] == corruptions.IMPLEMENTATION


def test_a_constant_classifier_scores_the_class_frequency_everywhere():
    data = _test_set()
    constant = lambda x: torch.tensor([0.0, 0.0, 1.0]).expand(len(x), 3)  # always class 2
    out = evaluate_robustness(constant, data, img_size=16, batch_size=6, progress=False)
    assert out["clean_top1"] == out["mean_corruption_top1"] == pytest.approx(40.0)
    for row in out["per_corruption"].values():
        assert all(v == pytest.approx(40.0) for v in row.values())


def test_top1_matches_a_direct_count_on_the_whole_set():
    data = _test_set()
    weight = torch.randn(16 * 16, 3, generator=torch.Generator().manual_seed(0))
    linear = lambda x: x.flatten(1) @ weight
    names, severities = ("gaussian_noise", "rotation", "pixelate"), (2, 5)
    out = evaluate_robustness(
        linear,
        data,
        img_size=16,
        batch_size=3,
        seed=7,
        corruptions=names,
        severities=severities,
        progress=False,
    )
    for name in names:
        for s in severities:
            views = eval_transform(corrupt(data.images, name, s, seed=7), 16, data.mean, data.std)
            expected = 100 * (linear(views).argmax(1) == data.labels).float().mean().item()
            assert out["per_corruption"][name][str(s)] == pytest.approx(expected)
        row = out["per_corruption"][name]
        assert row["mean"] == pytest.approx((row["2"] + row["5"]) / 2)
    means = [out["per_corruption"][n]["mean"] for n in names]
    assert out["mean_corruption_top1"] == pytest.approx(sum(means) / 3)


def test_two_calls_give_the_same_dict_and_the_bar_runs():
    data = _test_set(size=28)
    weight = torch.randn(32 * 32, 3, generator=torch.Generator().manual_seed(1))
    linear = lambda x: x.flatten(1) @ weight
    first = evaluate_robustness(linear, data, img_size=32, batch_size=8, progress=True)
    assert first == evaluate_robustness(linear, data, img_size=32, batch_size=8, progress=False)


def test_evaluate_refuses_unlabelled_sets_and_unknown_names():
    data = _test_set()
    unlabelled = ImageSet(data.images, None, None, data.mean, data.std)
    with pytest.raises(ValueError, match="no labels"):
        evaluate_robustness(lambda x: x, unlabelled, img_size=16, batch_size=4)
    with pytest.raises(ValueError, match="unknown corruptions"):
        evaluate_robustness(lambda x: x, data, img_size=16, batch_size=4, corruptions=["fog"])
    with pytest.raises(ValueError, match="severities"):
        evaluate_robustness(lambda x: x, data, img_size=16, batch_size=4, severities=[0])


# --- pictures ------------------------------------------------------------------------------------


def _fake_results(clean: float, drop: float) -> dict:
    per = {
        n: {str(s): clean - drop * s * (k + 1) / 14 for s in range(1, 6)}
        for k, n in enumerate(CORRUPTIONS)
    }
    for row in per.values():
        row["mean"] = sum(row.values()) / 5
    mean = sum(r["mean"] for r in per.values()) / len(per)
    return {
        "clean_top1": clean,
        "mean_corruption_top1": mean,
        "per_corruption": per,
        "n_test": 10,
        "seed": 0,
        "severities": [1, 2, 3, 4, 5],
        "implementation": "fake",
    }


def test_plot_robustness_writes_a_png_per_layout(tmp_path):
    one = plot_robustness(_fake_results(90, 8), tmp_path / "one.png")
    two = plot_robustness(
        [("pretrained", _fake_results(90, 6)), ("from scratch", _fake_results(85, 10))],
        tmp_path / "sub" / "two.png",
    )
    with Image.open(one) as a, Image.open(two) as b:
        assert a.format == b.format == "PNG"
        assert b.width > a.width > 400 and a.height == b.height > 300


@pytest.mark.parametrize("chans", [1, 3])
def test_plot_corruptions_draws_every_type_and_severity(tmp_path, chans):
    path = plot_corruptions(_images(1, chans=chans)[0], tmp_path / "grid.png", seed=0)
    with Image.open(path) as picture:
        assert picture.format == "PNG"
        assert picture.height > picture.width > 500  # 14 rows x 6 columns
    few = plot_corruptions(_images(1)[0], tmp_path / "few.png", ["contrast"], [0, 5])
    with Image.open(few) as small:
        assert small.height < 200
