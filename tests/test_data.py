"""Tests for mimar.data: sources, batched augmentation, and the stateless step loader."""

from __future__ import annotations

import gzip
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mimar.data import (
    BatchAugment,
    CropParams,
    DataConfig,
    StepLoader,
    build_step_loader,
    eval_transform,
    iterate_eval_batches,
    load_images,
)

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray, magic: int, gz: bool = True) -> None:
    """Write uint8 ``array`` as an idx file: BE magic, BE uint32 dims, raw bytes."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)


def write_fmnist(folder: Path, prefix: str = "train", n: int = 5, gz: bool = True) -> np.ndarray:
    images = (np.arange(n * 28 * 28) * 7 % 256).astype(np.uint8).reshape(n, 28, 28)
    suffix = ".gz" if gz else ""
    write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, 0x803, gz)
    write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, 0x801, gz)
    return images


# --- Fashion-MNIST idx files -------------------------------------------------------------


def test_idx_round_trip(tmp_path: Path) -> None:
    expected = write_fmnist(tmp_path)
    data = load_images(DataConfig(root=str(tmp_path)), "train")
    assert data.images.dtype == torch.uint8 and data.images.shape == (5, 1, 28, 28)
    assert torch.equal(data.images[:, 0], torch.from_numpy(expected))
    assert data.labels is not None and data.labels.dtype == torch.int64
    assert data.labels.tolist() == [0, 1, 2, 3, 4]
    assert data.classes is not None and len(data.classes) == 10
    assert data.mean == (0.2860,) and data.std == (0.3530,)


def test_idx_plain_files_in_torchvision_layout_and_three_channels(tmp_path: Path) -> None:
    expected = write_fmnist(tmp_path / "FashionMNIST" / "raw", prefix="t10k", gz=False)
    data = load_images(DataConfig(root=str(tmp_path), in_chans=3, max_images=3), "test")
    assert data.images.shape == (3, 3, 28, 28) and len(data.mean) == len(data.std) == 3
    for c in range(3):
        assert torch.equal(data.images[:, c], torch.from_numpy(expected[:3]))


def test_idx_missing_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist") as info:
        load_images(DataConfig(root=str(tmp_path)), "train")
    for part in (str(tmp_path), "train-images-idx3-ubyte", "data.download=true"):
        assert part in str(info.value)


def test_idx_bad_magic_and_bad_size(tmp_path: Path) -> None:
    write_fmnist(tmp_path)
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    write_idx(bad, np.arange(5), 0x803)
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz.*magic"):
        load_images(DataConfig(root=str(tmp_path)), "train")
    bad.write_bytes(gzip.compress(bytes.fromhex("00000801 00000009") + bytes(5)))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz has 13 bytes"):
        load_images(DataConfig(root=str(tmp_path)), "train")


@pytest.mark.skipif(not FMNIST.exists(), reason="needs apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist() -> None:
    data = load_images(DataConfig(root=str(FMNIST)), "train")
    assert data.images.shape == (60000, 1, 28, 28)
    assert data.labels is not None and sorted(data.labels.unique().tolist()) == list(range(10))


# --- image folders -----------------------------------------------------------------------


def save(path: Path, img: Image.Image, **kwargs: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)


def mixed_modes(folder: Path) -> None:
    """One image per awkward mode/format, spread over three class folders."""
    rgb = Image.new("RGB", (40, 24), (10, 200, 30))
    save(folder / "cat" / "gray.png", Image.new("L", (32, 32), 100))
    save(folder / "cat" / "rgb.JPG", rgb, quality=95)
    save(folder / "cat" / "deep" / "rgb.webp", rgb, lossless=True)
    save(folder / "dog" / "rgb.bmp", rgb)
    save(folder / "dog" / "rgba.png", Image.new("RGBA", (20, 30), (1, 2, 3, 0)))
    save(folder / "dog" / "cmyk.jpeg", Image.new("CMYK", (16, 16), (0, 0, 0, 0)))
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([255, 0, 0] * 256)
    save(folder / "eel" / "palette.png", palette, transparency=0)
    deep = Image.fromarray(np.full((16, 16), 257 * 60, dtype=np.uint16))  # 16-bit gray
    save(folder / "eel" / "gray16.png", deep)
    (folder / "eel" / "notes.txt").write_text("not an image")
    save(folder / "eel" / ".hidden" / "skip.png", Image.new("L", (8, 8)))


def test_image_folder_classes_and_modes(tmp_path: Path) -> None:
    mixed_modes(tmp_path)
    data = load_images(DataConfig(name="image_folder", root=str(tmp_path), in_chans=3), "train")
    assert data.images.shape == (8, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.classes == ["cat", "dog", "eel"]
    # sorted by relative path: cat/deep/rgb.webp, cat/gray.png, cat/rgb.JPG, dog/..., eel/...
    assert data.labels is not None and data.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2]
    gray = data.images[1]
    assert (gray == 100).all()  # grayscale replicated to three equal channels
    assert torch.equal(data.images[0], torch.tensor([10, 200, 30]).view(3, 1, 1).expand(3, 32, 32))
    assert (data.images[6] == 60).all()  # 16-bit gray rescaled, not clipped to 255
    assert (data.images[7] == torch.tensor([255, 0, 0]).view(3, 1, 1)).all()  # palette
    assert (data.images[3] == 255).all()  # CMYK (0, 0, 0, 0) is white
    assert (data.images[5] == torch.tensor([1, 2, 3]).view(3, 1, 1)).all()  # alpha dropped
    assert data.mean == (0.485, 0.456, 0.406) and data.skipped == 0


def test_image_folder_rgb_to_one_channel(tmp_path: Path) -> None:
    save(tmp_path / "a.png", Image.new("RGB", (48, 32), (10, 200, 30)))
    data = load_images(DataConfig(name="image_folder", root=str(tmp_path), img_size=16), "train")
    assert data.images.shape == (1, 1, 16, 16)
    luma = 0.299 * 10 + 0.587 * 200 + 0.114 * 30
    assert (data.images.float() - luma).abs().max() <= 1
    assert len(data.mean) == 1 and data.mean[0] == pytest.approx(np.mean([0.485, 0.456, 0.406]))


def test_image_folder_flat_and_nested_is_unlabelled(tmp_path: Path) -> None:
    save(tmp_path / "top.png", Image.new("L", (8, 8), 1))
    save(tmp_path / "a" / "b" / "c" / "deep.bmp", Image.new("L", (8, 8), 2))
    cfg = DataConfig(name="image_folder", root=str(tmp_path), img_size=8)
    data = load_images(cfg, "train")
    assert data.labels is None and data.classes is None
    assert [int(img[0, 0, 0]) for img in data.images] == [2, 1]  # a/b/c/deep.bmp < top.png


def test_image_folder_splits_and_shared_class_index(tmp_path: Path) -> None:
    for name in ("ant", "bee", "cow"):
        save(tmp_path / "train" / name / "x.png", Image.new("L", (8, 8)))
    save(tmp_path / "val" / "cow" / "y.png", Image.new("L", (8, 8)))
    cfg = DataConfig(name="image_folder", root=str(tmp_path), img_size=8)
    assert len(load_images(cfg, "train")) == 3
    test = load_images(cfg, "test")
    assert test.classes == ["ant", "bee", "cow"] and test.labels.tolist() == [2]


def test_image_folder_max_images_spans_classes(tmp_path: Path) -> None:
    for name in ("ant", "bee", "cow"):
        for i in range(4):
            save(tmp_path / name / f"{i}.png", Image.new("L", (8, 8), i))
    cfg = DataConfig(name="image_folder", root=str(tmp_path), img_size=8, max_images=3)
    data = load_images(cfg, "train")
    assert data.labels.tolist() == [0, 1, 2] and data.images[:, 0, 0, 0].tolist() == [0, 0, 0]


def test_image_folder_missing_parts(tmp_path: Path) -> None:
    cfg = DataConfig(name="image_folder", root=str(tmp_path), img_size=8)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_images(replace(cfg, root=str(tmp_path / "nope")), "train")
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=r"no images found.*\.png"):
        load_images(cfg, "train")
    save(tmp_path / "x.png", Image.new("L", (8, 8)))
    with pytest.raises(FileNotFoundError, match="val"):
        load_images(cfg, "test")
    save(tmp_path / "test" / "y.png", Image.new("L", (8, 8)))
    with pytest.raises(FileNotFoundError, match="no train/ folder"):
        load_images(cfg, "train")


def test_image_folder_corrupt_file(tmp_path: Path) -> None:
    save(tmp_path / "good.png", Image.new("L", (8, 8), 5))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 definitely not a jpeg")
    cfg = DataConfig(name="image_folder", root=str(tmp_path), img_size=8)
    with pytest.raises(ValueError, match=r"broken\.jpg"):
        load_images(cfg, "train")
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable.*broken\.jpg"):
        data = load_images(replace(cfg, on_bad_image="skip"), "train")
    assert data.skipped == 1 and len(data) == 1 and (data.images == 5).all()


def test_image_folder_workers_match_main_process(tmp_path: Path) -> None:
    for i in range(6):
        save(tmp_path / f"{i}.png", Image.new("RGB", (20 + i, 12), (i, 2 * i, 3 * i)))
    cfg = DataConfig(name="image_folder", root=str(tmp_path), img_size=8, in_chans=3)
    serial = load_images(cfg, "train")
    parallel = load_images(replace(cfg, num_workers=2), "train")
    assert torch.equal(serial.images, parallel.images)


# --- config ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [("name", "imagenet"), ("in_chans", 2), ("scale", (0.5, 0.2)), ("hflip", 1.5),
     ("batch_size", 0), ("std", (0.0,)), ("on_bad_image", "ignore")],
)  # fmt: skip
def test_config_rejects(field: str, value: object) -> None:
    extra = {"mean": (0.5,)} if field == "std" else {}
    with pytest.raises(ValueError, match=f"data.{field}"):
        DataConfig(**{field: value, **extra})


def test_config_lists_become_tuples_and_mean_override(tmp_path: Path) -> None:
    write_fmnist(tmp_path)
    cfg = DataConfig(root=str(tmp_path), scale=[0.5, 1.0], mean=[0.5], std=[0.25], in_chans=3)
    assert cfg.scale == (0.5, 1.0)
    data = load_images(cfg, "train")
    assert data.mean == (0.5, 0.5, 0.5) and data.std == (0.25, 0.25, 0.25)


# --- synthetic -----------------------------------------------------------------------------


def test_synthetic_deterministic_and_separable() -> None:
    cfg = DataConfig(name="synthetic", synthetic_size=256, synthetic_classes=4)  # gray: no tint
    train, test = load_images(cfg, "train"), load_images(cfg, "test")
    assert train.images.shape == (256, 1, 32, 32)
    assert torch.equal(train.images, load_images(cfg, "train").images)
    assert not torch.equal(train.images, test.images)
    assert torch.bincount(train.labels).tolist() == [64] * 4
    x_train, x_test = train.images.flatten(1).float(), test.images.flatten(1).float()
    centroids = torch.stack([x_train[train.labels == k].mean(0) for k in range(4)])
    accuracy = (torch.cdist(x_test, centroids).argmin(1) == test.labels).float().mean()
    assert accuracy > 0.9  # chance is 0.25; measured 1.0


# --- augmentation --------------------------------------------------------------------------


def make_augment(**kwargs: object) -> BatchAugment:
    args = {"img_size": 16, "scale": (0.67, 1.0), "ratio": (3 / 4, 4 / 3), "hflip": 0.5,
            "mean": (0.5,), "std": (0.25,)} | kwargs  # fmt: skip
    return BatchAugment(**args)


def random_images(batch: int = 6, size: int = 20, chans: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (batch, chans, size, size), generator=gen, dtype=torch.uint8)


def test_augment_shape_and_determinism() -> None:
    augment, images = make_augment(), random_images()
    out = augment(images, torch.Generator().manual_seed(3))
    assert out.shape == (6, 1, 16, 16) and out.dtype == torch.float32
    assert torch.equal(out, augment(images, torch.Generator().manual_seed(3)))
    assert not torch.allclose(out, augment(images, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_augment_identity_crop_and_flip(hflip: float) -> None:
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)
    augment = make_augment(img_size=20, scale=(1, 1), ratio=(1, 1), hflip=hflip, mean=mean, std=std)
    images = random_images(chans=3)
    out = augment(images, torch.Generator().manual_seed(0))
    mean_t, std_t = (torch.tensor(v).view(1, 3, 1, 1) for v in (mean, std))
    expected = (images.float() / 255 - mean_t) / std_t
    expected = expected.flip(-1) if hflip else expected
    assert (out - expected).abs().max() < 1e-5


def sorted_pair(lo: float, hi: float) -> st.SearchStrategy[list[float]]:
    return st.tuples(st.floats(lo, hi), st.floats(lo, hi)).map(sorted)


@settings(max_examples=60, deadline=None)
@given(
    hw=st.tuples(st.integers(4, 64), st.integers(4, 64)),
    scale=sorted_pair(0.05, 1.0),
    ratio=sorted_pair(0.2, 5.0),
    seed=st.integers(0, 2**31),
)
def test_crop_boxes_respect_bounds(
    hw: tuple[int, int], scale: list[float], ratio: list[float], seed: int
) -> None:
    (height, width), augment = hw, make_augment(scale=scale, ratio=ratio)
    p = augment.sample_params(32, hw, torch.Generator().manual_seed(seed))
    top, left, h, w = p.top.double(), p.left.double(), p.height.double(), p.width.double()
    assert (top >= 0).all() and (left >= 0).all() and (h >= 1).all() and (w >= 1).all()
    assert (top + h <= height).all() and (left + w <= width).all()
    # torchvision's fallback box: whole image with the aspect clamped into ratio.
    in_ratio = width / height
    fb_h, fb_w = height, width
    if in_ratio < ratio[0]:
        fb_h = round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fb_w = round(height * ratio[1])
    fallback = (h == fb_h) & (w == fb_w) & (top == (height - fb_h) // 2)
    # A sampled box came from real (area, aspect) in range, then each side was rounded.
    area = height * width
    sampled = (
        ((w + 0.5) * (h + 0.5) >= scale[0] * area - 1e-6)
        & ((w - 0.5) * (h - 0.5) <= scale[1] * area + 1e-6)
        & ((w + 0.5) / (h - 0.5).clamp(min=1e-9) >= ratio[0] - 1e-6)
        & ((w - 0.5) / (h + 0.5) <= ratio[1] + 1e-6)
    )
    assert (fallback | sampled).all()


def test_params_slice_equals_sliced_apply() -> None:
    augment, images = make_augment(), random_images(batch=8)
    params = augment.sample_params(8, (20, 20), torch.Generator().manual_seed(1))
    full = augment.apply(images, params)
    assert torch.equal(full[2:5], augment.apply(images[2:5], params.select(slice(2, 5))))
    assert torch.equal(full[7:], augment.apply(images[7:], params.select(7)))


@pytest.mark.parametrize(("box", "size"), [((3, 5, 32, 32), 16), ((3, 5, 10, 12), 24)])
def test_apply_matches_torchvision_resized_crop(box: tuple[int, ...], size: int) -> None:
    from torchvision.transforms.v2.functional import resized_crop

    images = random_images(batch=1, size=40, chans=3)
    params = CropParams(*(torch.tensor([v]) for v in box), torch.tensor([False]), (40, 40))
    augment = make_augment(img_size=size, mean=(0.0,) * 3, std=(1.0,) * 3)
    ours = augment.apply(images, params)
    ref = resized_crop(images.float() / 255, *box, [size, size], antialias=False)
    # Enlarging differs on the outer ring only: torchvision clamps at the crop edge, we don't.
    assert (ours - ref)[..., 2:-2, 2:-2].abs().max() < 1e-5
    if size < box[2]:
        assert (ours - ref).abs().max() < 1e-5


def test_eval_transform_resize_and_identity() -> None:
    images = random_images(batch=2, size=16)
    out = eval_transform(images, 16, (0.5,), (0.25,))
    assert (out - (images.float() / 255 - 0.5) / 0.25).abs().max() < 1e-6
    wide = torch.full((1, 1, 10, 30), 200, dtype=torch.uint8)
    out = eval_transform(wide, 20, (0.0,), (1.0,))
    assert out.shape == (1, 1, 20, 20) and torch.allclose(out, torch.tensor(200 / 255))


# --- step loader ---------------------------------------------------------------------------


def synthetic_loader(world_size: int = 1, rank: int = 0, batch_size: int = 8) -> StepLoader:
    cfg = DataConfig(name="synthetic", synthetic_size=36, img_size=16, batch_size=batch_size)
    return build_step_loader(cfg, load_images(cfg, "train"), seed=7, rank=rank,
                             world_size=world_size)  # fmt: skip


def test_step_loader_is_a_function_of_step() -> None:
    loader = synthetic_loader()
    five, three = loader.batch(5), loader.batch(3)
    assert five.shape == (8, 1, 16, 16)
    assert torch.equal(loader.batch(5), five) and not torch.equal(five, three)
    assert torch.equal(synthetic_loader().batch(5), five)  # a fresh loader (resume) agrees
    assert loader.steps_per_epoch == 4 and loader.epoch_of(6) == pytest.approx(1.5)
    draws = [torch.rand(3, generator=loader.generator_for(s)) for s in (2, 2, 3)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_two_ranks_see_the_one_rank_batch() -> None:
    single = synthetic_loader()
    ranks = [synthetic_loader(world_size=2, rank=r) for r in range(2)]
    for step in (0, 9):
        halves = torch.cat([loader.batch(step) for loader in ranks])
        assert torch.equal(halves, single.batch(step))


def test_each_image_once_per_epoch() -> None:
    loader = synthetic_loader()
    for epoch in range(2):
        steps = range(epoch * 4, (epoch + 1) * 4)
        seen = torch.cat([loader.indices(s) for s in steps])
        assert len(seen.unique()) == 32  # 36 images, batch 8: 4 steps, last 4 dropped
    assert not torch.equal(loader.indices(0), loader.indices(4))  # reshuffled


def test_step_loader_errors() -> None:
    with pytest.raises(ValueError, match="divisible by the world size 3"):
        synthetic_loader(world_size=3)
    with pytest.raises(ValueError, match=r"36 images, fewer than data\.batch_size=40"):
        synthetic_loader(batch_size=40)


def test_iterate_eval_batches_keeps_the_tail() -> None:
    data = load_images(DataConfig(name="synthetic", synthetic_size=10, img_size=8), "test")
    batches = list(iterate_eval_batches(data, 8, 4))
    assert [len(x) for x, _ in batches] == [4, 4, 2]
    assert torch.equal(torch.cat([y for _, y in batches]), data.labels)
    assert torch.equal(batches[2][0], eval_transform(data.images[8:], 8, data.mean, data.std))
