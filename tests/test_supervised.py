"""Fine-tuning augmentation (mimar.data.supervised): soft targets and the loss, Mixup/CutMix over
the global batch, RandAugment op by op against timm's PIL ops, and the draws that make a run
the same on any number of ranks."""

import math
import random
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from timm.data import auto_augment, random_erasing
from torchvision.transforms import functional as TF

from mimar.data.augment import normalize
from mimar.data.supervised import (
    BatchRandAugment,
    SupervisedAugment,
    SupervisedAugmentConfig,
    soft_target_cross_entropy,
)

SPEC = "rand-m9-mstd0.5-inc1"  # SimMIM / BEiT / MAE fine-tuning
FULL = dict(rand_augment=SPEC, reprob=0.5, mixup=0.8, cutmix=1.0, label_smoothing=0.1)


def _images(batch: int, chans: int = 1, size: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, chans, size, size), generator=gen, dtype=torch.uint8)


def _augment(num_classes: int = 5, chans: int = 1, **cfg) -> SupervisedAugment:
    mean, std = (0.5,) * chans, (0.25,) * chans
    return SupervisedAugment(SupervisedAugmentConfig(**cfg), num_classes, mean, std)


def _draws(aug: SupervisedAugment, batch: int, seed: int) -> dict:
    return aug.sample(batch, torch.Generator().manual_seed(seed))


def _plain(images: torch.Tensor) -> torch.Tensor:
    return (images.float() / 255 - 0.5) / 0.25


# ---- soft targets and the loss ----------------------------------------------------------------


def test_mixup_loss_matches_a_hand_computed_soft_cross_entropy():
    aug = _augment(num_classes=3, mixup=1.0, label_smoothing=0.1)
    images, labels = _images(4), torch.tensor([0, 1, 2, 1])
    draws = _draws(aug, 4, seed=0)
    lam = draws["lam"]  # the Beta(1, 1) draw of this step
    assert draws["mix"] and not draws["cutmix"] and 0 < lam < 1
    x, targets = aug.apply(images, labels, draws, slice(0, 4))
    # row i mixes with row 3 - i; smoothing 0.1 over K = 3: off = 0.1 / 3, on = 0.9 + off
    off, on = 0.1 / 3, 0.9 + 0.1 / 3
    smooth = [[on if k == y else off for k in range(3)] for y in labels.tolist()]
    expected = [
        [lam * smooth[i][k] + (1 - lam) * smooth[3 - i][k] for k in range(3)] for i in range(4)
    ]
    torch.testing.assert_close(targets, torch.tensor(expected))
    torch.testing.assert_close(x, lam * _plain(images) + (1 - lam) * _plain(images).flip(0))
    logits = [[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 1.0, 3.0], [1.0, -2.0, 0.0]]
    hand = 0.0
    for row, t in zip(logits, expected):
        log_z = math.log(sum(math.exp(v) for v in row))
        hand -= sum(t_k * (v - log_z) for t_k, v in zip(t, row)) / len(logits)
    loss = soft_target_cross_entropy(torch.tensor(logits), targets)
    assert loss.item() == pytest.approx(hand, rel=1e-6)


def test_unmixed_soft_targets_are_label_smoothed_cross_entropy():
    aug = _augment(num_classes=7, label_smoothing=0.1)
    labels = torch.tensor([0, 3, 6, 2, 2])
    _, targets = aug.apply(_images(5), labels, _draws(aug, 5, 0), slice(0, 5))
    assert torch.allclose(targets.sum(1), torch.ones(5))
    assert targets[0, 0].item() == pytest.approx(0.9 + 0.1 / 7)
    assert targets[0, 1].item() == pytest.approx(0.1 / 7)
    logits = torch.randn(5, 7)
    expected = F.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(soft_target_cross_entropy(logits, targets), expected)


def test_everything_off_is_plain_normalisation_and_one_hot():
    images, labels = _images(6, chans=3), torch.tensor([0, 1, 2, 3, 0, 1])
    aug = _augment(num_classes=4, chans=3)
    draws = _draws(aug, 6, 0)
    assert not draws["mix"] and aug.partner_rows(draws, slice(0, 6)) is None
    x, targets = aug.apply(images, labels, draws, slice(0, 6))
    assert torch.equal(x, normalize(images.float() / 255, aug.mean, aug.std))
    assert torch.equal(targets, F.one_hot(labels, 4).float())
    unit = torch.rand(6, 3, 8, 8)  # a float crop in [0, 1] passes through untouched
    assert torch.equal(
        aug.apply(unit, labels, draws, slice(0, 6))[0], normalize(unit, aug.mean, aug.std)
    )


def test_mixup_prob_zero_never_mixes():
    aug = _augment(mixup=0.8, cutmix=1.0, mixup_prob=0.0)
    for seed in range(20):
        assert not _draws(aug, 4, seed)["mix"]


# ---- exactness: seeds, ranks, the draws ---------------------------------------------------------


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**32), other=st.integers(0, 2**32), chans=st.sampled_from([1, 3]))
def test_same_seed_same_batch_other_seed_other_batch(seed, other, chans):
    aug = _augment(chans=chans, **FULL)
    images, labels = _images(6, chans, size=12), torch.arange(6) % 5
    first = aug.apply(images, labels, _draws(aug, 6, seed), slice(0, 6))
    again = aug.apply(images, labels, _draws(aug, 6, seed), slice(0, 6))
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    if other != seed:
        assert not torch.equal(
            first[0], aug.apply(images, labels, _draws(aug, 6, other), slice(0, 6))[0]
        )


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    per_rank=st.integers(1, 4),
    world=st.sampled_from([2, 4]),
    chans=st.sampled_from([1, 3]),
)
def test_ranks_reproduce_the_rows_of_one_process(seed, per_rank, world, chans):
    batch = per_rank * world
    aug = _augment(num_classes=5, chans=chans, **FULL)
    images, labels = _images(batch, chans, size=10, seed=seed % 7), torch.arange(batch) % 5
    draws = _draws(aug, batch, seed)
    whole = aug.apply(images, labels, draws, slice(0, batch))
    parts = []
    for rank in range(world):
        rows = slice(rank * per_rank, (rank + 1) * per_rank)
        partners = aug.partner_rows(draws, rows)  # what the loader fetches besides its rows
        extra = () if partners is None else (images[partners], labels[partners])
        parts.append(aug.apply(images[rows], labels[rows], draws, rows, *extra))
    assert torch.equal(whole[0], torch.cat([p[0] for p in parts]))
    assert torch.equal(whole[1], torch.cat([p[1] for p in parts]))


def test_no_global_random_state_is_touched():
    aug = _augment(chans=3, color_jitter=0.4, reprob=1.0, mixup=0.8, cutmix=1.0)
    ra_aug = _augment(chans=3, **FULL)
    before = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    for a in (aug, ra_aug):
        a.apply(_images(8, chans=3), torch.arange(8) % 5, _draws(a, 8, 0), slice(0, 8))
    after = random.getstate(), np.random.get_state()[1], torch.get_rng_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1])
    assert torch.equal(before[2], after[2])


def test_partner_rows_outside_rows_need_partner_images():
    aug = _augment(mixup=1.0)
    draws = _draws(aug, 4, 0)
    with pytest.raises(ValueError, match="pass partner_images"):
        aug.apply(_images(2), torch.tensor([0, 1]), draws, slice(0, 2))


def test_toggling_a_part_leaves_the_other_draws_alone():
    """A fixed number of draws, RandAugment's last: switching mixing or RandAugment on changes
    neither the erasing and jitter draws nor the generator's state after the others."""
    plain = _draws(_augment(reprob=0.5), 8, seed=3)
    mixed = _draws(_augment(reprob=0.5, mixup=0.8, cutmix=1.0), 8, seed=3)
    rand_aug = _draws(_augment(reprob=0.5, rand_augment=SPEC), 8, seed=3)
    for key, value in plain["rows"].items():
        assert torch.equal(value, mixed["rows"][key]) and torch.equal(value, rand_aug["rows"][key])
    assert plain["box_center"] == mixed["box_center"]


# ---- CutMix ------------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32), size=st.integers(4, 16))
def test_cutmix_pastes_a_box_whose_area_is_one_minus_lambda(seed, size):
    aug = _augment(num_classes=4, cutmix=1.0)
    images = (torch.arange(4) * 60 + 10).to(torch.uint8).view(4, 1, 1, 1).expand(4, 1, size, size)
    labels = torch.tensor([0, 1, 2, 3])
    draws = _draws(aug, 4, seed)
    assert draws["mix"] and draws["cutmix"]
    x, targets = aug.apply(images.contiguous(), labels, draws, slice(0, 4))
    (yl, yh, xl, xh), lam = aug.cutmix_box(draws, (size, size))
    pasted = x != _plain(images)  # (4, 1, S, S): where a row shows its partner's value
    for row in range(4):
        assert pasted[row].sum().item() == (yh - yl) * (xh - xl)
        assert pasted[row, :, yl:yh, xl:xh].all()
    assert lam == pytest.approx(1 - pasted[0].sum().item() / size**2)
    partner_hot = F.one_hot(labels.flip(0), 4).float()
    torch.testing.assert_close(
        targets, lam * F.one_hot(labels, 4).float() + (1 - lam) * partner_hot
    )


# ---- per-image parts: on changes pixels, off does not ------------------------------------------


@pytest.mark.parametrize(
    "part", [{"rand_augment": SPEC}, {"color_jitter": 0.4}, {"reprob": 1.0}], ids=str
)
def test_each_pixel_part_changes_pixels_only_when_on(part):
    images, labels = _images(16, chans=3, size=16), torch.zeros(16, dtype=torch.long)
    off = _augment(chans=3)
    on = _augment(chans=3, **part)
    draws = _draws(on, 16, seed=1)
    baseline = off.apply(images, labels, draws, slice(0, 16))[0]
    assert torch.equal(baseline, normalize(images.float() / 255, off.mean, off.std))
    changed = (on.apply(images, labels, draws, slice(0, 16))[0] != baseline).flatten(1).any(1)
    assert changed.sum() >= 4  # jitter/RandAugment may leave a few images as they were


@pytest.mark.parametrize("chans", [1, 3])
def test_color_jitter_is_torchvisions_on_pil_in_the_drawn_order(chans):
    aug = _augment(chans=chans, color_jitter=0.4)
    images, labels = _images(6, chans=chans, size=10), torch.zeros(6, dtype=torch.long)
    draws = _draws(aug, 6, seed=4)
    x = aug.apply(images, labels, draws, slice(0, 6))[0]
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)  # fn ids 0, 1, 2
    for i in range(6):
        array = images[i].permute(1, 2, 0).numpy()
        pil = Image.fromarray(array[..., 0] if chans == 1 else array)
        for k in draws["rows"]["jitter_order"][i].tolist():
            factor = float(draws["rows"]["jitter_factor"][i, k])
            assert 0.6 <= factor <= 1.4
            pil = adjust[k](pil, factor)
        pixels = torch.from_numpy(np.array(pil).reshape(array.shape)).permute(2, 0, 1).float()
        assert torch.equal(x[i], normalize(pixels[None] / 255, aug.mean, aug.std)[0]), i


def test_erasing_writes_one_box_of_noise_per_erased_image():
    aug = _augment(reprob=1.0)
    images = torch.full((8, 1, 32, 32), 128, dtype=torch.uint8)
    x = aug.apply(images, torch.zeros(8, dtype=torch.long), _draws(aug, 8, 0), slice(0, 8))[0]
    for img in (x != _plain(images)).squeeze(1):
        rows, cols = img.any(1).nonzero().squeeze(1), img.any(0).nonzero().squeeze(1)
        assert len(rows) and img[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()
        area = len(rows) * len(cols) / 32**2  # timm: target area in [0.02, 1/3] of the image
        assert 0.015 < area < 0.36


@pytest.mark.parametrize("size", [6, 16])
def test_erasing_boxes_are_timms_for_the_same_uniforms(size):
    """timm's RandomErasing run with ``random`` replaced by our draws erases the same boxes."""
    aug = _augment(reprob=1.0)
    images, labels = torch.full((8, 1, size, size), 128, dtype=torch.uint8), torch.zeros(8).long()
    draws = _draws(aug, 8, seed=5)
    ours = aug.apply(images, labels, draws, slice(0, 8))[0] != _plain(images)
    rows = draws["rows"]
    for i in range(8):
        tries = torch.stack([rows["erase_area"][i], rows["erase_log_aspect"][i]], 1).flatten()
        offsets = iter(rows["erase_offset"][i].tolist())
        randint = lambda lo, hi, u=offsets: lo + math.floor(next(u) * (hi - lo + 1))
        img = torch.zeros(1, size, size)
        with (
            mock.patch.object(random_erasing.random, "random", lambda: 0.0),
            mock.patch.object(random_erasing.random, "uniform", side_effect=tries.tolist()),
            mock.patch.object(random_erasing.random, "randint", side_effect=randint),
        ):
            random_erasing.RandomErasing(1.0, mode="pixel", device="cpu")(img)
        assert torch.equal(ours[i], img != 0), i


def test_float_crops_are_rounded_to_the_uint8_grid_for_pixel_ops():
    aug = _augment(rand_augment=SPEC)
    images, labels = _images(8), torch.zeros(8, dtype=torch.long)
    draws = _draws(aug, 8, 2)
    from_uint8 = aug.apply(images, labels, draws, slice(0, 8))[0]
    assert torch.equal(aug.apply(images.float() / 255, labels, draws, slice(0, 8))[0], from_uint8)


# ---- RandAugment -------------------------------------------------------------------------------


def _op_names(spec: str) -> list[str]:
    return [op.name for op in auto_augment.rand_augment_transform(spec, None).ops]


OPS = sorted({*_op_names("rand-m9"), *_op_names("rand-m9-inc1"), "PosterizeOriginal"})


def _timm_op(image: torch.Tensor, name: str, magnitude: float, negate: bool, fill, resample):
    """timm's op (auto_augment.NAME_TO_OP / LEVEL_TO_ARG) on one PIL image, sign forced."""
    array = image.permute(1, 2, 0).numpy().astype(np.uint8)
    pil = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    level = auto_augment.LEVEL_TO_ARG[name]
    # _randomly_negate negates when random.random() > 0.5: force the sign under test
    with mock.patch.object(auto_augment.random, "random", lambda: 0.9 if negate else 0.1):
        args = level(magnitude, {}) if level else ()
    if name.startswith("Posterize") and args[0] <= 0:
        return None  # Pillow 13 raises on 0 bits; tested apart
    kwargs = {"fillcolor": fill if len(fill) == 3 else fill[0], "resample": resample}
    out = np.array(auto_augment.NAME_TO_OP[name](pil, *args, **kwargs)).reshape(array.shape)
    return torch.from_numpy(out).permute(2, 0, 1).float()


@pytest.mark.parametrize("name", OPS)
def test_each_op_matches_timms_pil_op_exactly(name):
    gen = torch.Generator().manual_seed(0)
    for chans in (1, 3):
        fill = (120,) * chans
        for interpolation, resample in (("bicubic", Image.BICUBIC), ("bilinear", Image.BILINEAR)):
            ra = BatchRandAugment("rand-m9", fill, interpolation)
            for magnitude in (0.0, 3.0, 7.3, 10.0):
                for negate in (False, True):
                    x = torch.randint(0, 256, (3, chans, 9, 11), generator=gen).float()
                    x[1] = x[1] // 4 + 60  # a low-contrast image too
                    m = torch.full((3,), magnitude, dtype=torch.float64)
                    sign = torch.full((3,), -1.0 if negate else 1.0, dtype=torch.float64)
                    ours = ra.apply_op(x.clone(), name, m, sign)
                    for i in range(3):
                        ref = _timm_op(x[i], name, magnitude, negate, fill, resample)
                        if ref is not None:
                            assert torch.equal(ours[i], ref), (chans, interpolation, magnitude)


def test_zero_bit_posterize_is_black():
    """timm asks for 0 bits at magnitude 10; Pillow < 10 zeroed the image, Pillow 13 raises."""
    ra = BatchRandAugment("rand-m9", (0,))
    x = torch.randint(0, 256, (2, 1, 8, 8)).float()
    out = ra.apply_op(
        x, "PosterizeIncreasing", torch.full((2,), 10.0).double(), torch.ones(2).double()
    )
    assert not out.any()


@pytest.mark.parametrize(
    "name",
    ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel", "SolarizeIncreasing",
     "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
     "SharpnessIncreasing"],
)  # fmt: skip
def test_magnitude_zero_is_the_identity(name):
    """For the ops whose strength is the magnitude; AutoContrast, Equalize and Invert ignore it
    and PosterizeIncreasing keeps 4 bits at 0, as in timm."""
    x = _images(4, chans=3).float()
    zero, plus = torch.zeros(4).double(), torch.ones(4).double()
    assert torch.equal(BatchRandAugment(SPEC, (0, 0, 0)).apply_op(x.clone(), name, zero, plus), x)


def test_rand_augment_applies_the_drawn_op_to_the_rows_that_drew_it():
    ra = BatchRandAugment("rand-n1-m9", (128,))
    x = _images(6).float()
    rows = ra.sample(6, torch.Generator().manual_seed(0))
    rows["ra_op"][:, 0] = torch.tensor([0, 2, 2, 5, 0, 1])
    rows["ra_apply"][:, 0] = torch.tensor([True, True, False, True, True, True])
    out = ra(x.clone(), rows)
    for i in range(6):
        name = ra.names[int(rows["ra_op"][i, 0])]
        m, s = rows["ra_magnitude"][i : i + 1, 0], rows["ra_sign"][i : i + 1, 0]
        expected = (
            ra.apply_op(x[i : i + 1].clone(), name, m, s)
            if rows["ra_apply"][i, 0]
            else x[i : i + 1]
        )
        assert torch.equal(out[i : i + 1], expected), i


def test_rand_augment_draws_follow_the_spec():
    ra = BatchRandAugment("rand-m9-n3-mstd0.5-inc1", (0,))
    rows = ra.sample(4000, torch.Generator().manual_seed(0))
    assert rows["ra_op"].shape == (4000, 3) and ra.names == _op_names("rand-m9-inc1")
    assert 0 <= rows["ra_op"].min() and rows["ra_op"].max() == len(ra.names) - 1
    assert rows["ra_apply"].float().mean().item() == pytest.approx(0.5, abs=0.02)  # timm p 0.5
    m = rows["ra_magnitude"]
    assert m.max() == 10 and m.mean().item() == pytest.approx(9.0, abs=0.05)  # N(9, 0.5) <= 10
    assert set(rows["ra_sign"].unique().tolist()) == {-1.0, 1.0}


# ---- configuration -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cfg, match",
    [
        ({"rand_augment": "rand-m9-x3"}, "not a timm RandAugment spec"),
        ({"rand_augment": "augmix-m5"}, "not a timm RandAugment spec"),
        ({"rand_augment": "rand-m9-tweights"}, "weighted choice"),
        ({"rand_augment": "rand-m9-t3a"}, "unsupported"),
        ({"rand_augment": SPEC, "color_jitter": 0.4}, "skips colour jitter"),
        ({"reprob": 1.5}, "reprob"),
        ({"mixup": -1.0}, "mixup"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
    ],
)
def test_bad_configs_are_refused(cfg, match):
    with pytest.raises(ValueError, match=match):
        SupervisedAugmentConfig(**cfg)
