"""A folder of image files, decoded once with PIL into an in-memory uint8 tensor.

Every image is converted to the requested channels, resized so its shorter side is
``img_size`` and center-cropped to a square at load time. Holding the decoded split in memory
is meant for small and medium folders (a 100k-image folder at 64 px RGB is ~1.2 GB);
ImageNet-scale data streams from WebDataset shards instead (``mimar data shard``,
``data.name=webdataset``: mimar/data/shard_loader.py).

Layout: ``root/train`` and ``root/val`` (or ``root/test``) are the splits when present, else
``root`` itself is the train split. Inside a split, if every image sits in a first-level
sub-folder, the sorted names of the sub-folders that hold images are the classes
(torchvision ImageFolder convention, minus empty folders); otherwise the images are unlabelled.
The train split's classes are the one mapping of every split: a held-out class folder that
the train split lacks is an error naming it. Files and folders whose names start with
"." are ignored (editor and notebook checkpoints).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mimar import machine
from mimar.data.config import DataConfig
from mimar.data.image_set import IMAGENET_MEAN, IMAGENET_STD, ImageSet, match_stats
from mimar.errors import DataError, MissingFileError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def load_image_folder(cfg: DataConfig, split: str, unknown_classes: str = "error") -> ImageSet:
    """Decode every image of one split; see the module docstring for the layout.

    ``unknown_classes="wrong"``: a held-out class folder that the train split lacks is kept,
    its class named after the train split's classes (see :func:`class_labels`), for an
    evaluation that scores its images as wrong; "error" (the default) refuses it."""
    folder = split_folder(Path(cfg.root), split)
    paths = list_images(folder)
    if not paths:
        raise MissingFileError(
            f"no images found under {folder}: expected files with extensions "
            f"{', '.join(IMAGE_EXTENSIONS)} (any case), directly or in class sub-folders"
        )
    reference = _reference_classes(Path(cfg.root), split)
    classes, labels = class_labels(folder, paths, reference, unknown_classes)
    if cfg.max_images and len(paths) > cfg.max_images:
        # Files are sorted by class folder, so the first max_images would cover only the first
        # classes; an evenly spaced subset keeps them all. Skipped files still count.
        picks = [i * len(paths) // cfg.max_images for i in range(cfg.max_images)]
        paths = [paths[i] for i in picks]
        labels = [labels[i] for i in picks] if labels else labels
    _check_decoded_size(folder, len(paths), cfg)
    arrays, bad = _decode_all(paths, cfg.img_size, cfg.in_chans, cfg.num_workers)
    if bad and cfg.on_bad_image == "error":
        path, error = bad[0]
        raise DataError(
            f"cannot decode image {path}: {error} "
            f"(set data.on_bad_image=skip to skip unreadable files)"
        )
    if bad:
        shown = ", ".join(str(path) for path, _ in bad[:3])
        more = " ..." if len(bad) > 3 else ""
        warnings.warn(
            f"skipped {len(bad)} unreadable image(s) under {folder}: {shown}{more}", stacklevel=3
        )
    good = [i for i, array in enumerate(arrays) if array is not None]
    if not good:
        raise DataError(f"every image under {folder} was unreadable ({len(bad)} files)")
    images = torch.from_numpy(np.stack([arrays[i] for i in good]))  # (N, H, W, C)
    return ImageSet(
        images=images.permute(0, 3, 1, 2).contiguous(),  # (N, C, H, W)
        labels=torch.tensor([labels[i] for i in good], dtype=torch.long) if classes else None,
        classes=classes,
        mean=match_stats(IMAGENET_MEAN, cfg.in_chans),
        std=match_stats(IMAGENET_STD, cfg.in_chans),
        skipped=len(bad),
        source=f"image folder {split} ({len(good)} images, {len(bad)} skipped) from {folder}",
    )


def _check_decoded_size(folder: Path, n: int, cfg: DataConfig) -> None:
    """Refuse, before decoding starts, a split whose decoded images would not fit in memory
    (this reader holds them all: n x img_size^2 x channels bytes, twice while stacking)."""
    need = 2 * n * cfg.img_size**2 * cfg.in_chans
    free = machine.cpu_memory()
    if need > free:
        raise DataError(
            f"{folder}: {n:,} images at {cfg.img_size} px x {cfg.in_chans} channels need "
            f"{machine.gib(need)} in memory while decoding, and {machine.gib(free)} is free; "
            "stream them instead: mimar data shard "
            f"{folder} 'OUT/train-%06d.tar', then data.name=webdataset "
            "data.root='OUT/train-{000000..N}.tar' (or set data.max_images / a smaller "
            "data.img_size)"
        )


def split_folder(root: Path, split: str) -> Path:
    """The folder holding ``split``: root/train | root, and root/val | root/test."""
    if not root.is_dir():
        raise MissingFileError(f"image folder {root} does not exist or is not a directory")
    held_out = [root / name for name in ("val", "test") if (root / name).is_dir()]
    if split == "train":
        if (root / "train").is_dir():
            return root / "train"
        if held_out:  # root itself would also contain the held-out images
            raise MissingFileError(
                f"{root} has a {held_out[0].name}/ split but no train/ folder; put the "
                f"training images in {root / 'train'}"
            )
        return root
    if held_out:
        return held_out[0]
    raise MissingFileError(
        f"no {split} split in image folder {root}: expected {root / 'val'} or {root / 'test'}"
    )


def list_images(folder: Path) -> list[Path]:
    """All image files under ``folder`` (recursive), sorted by relative path."""
    paths = [
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in IMAGE_EXTENSIONS
        and path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    return sorted(paths, key=lambda path: path.relative_to(folder).as_posix())


def decode_image(path: Path | BinaryIO, size: int, in_chans: int) -> np.ndarray:
    """Decode one file (a path, or an open binary file such as a shard member's bytes) to
    uint8 ``(size, size, in_chans)``: convert, resize short side, crop."""
    with Image.open(path) as img:
        img.load()
        img = convert_mode(img, "L" if in_chans == 1 else "RGB")
        img = _resize_center_crop(img, size)
        array = np.asarray(img, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


def convert_mode(img: Image.Image, mode: str) -> Image.Image:
    """``img`` as PIL mode ``mode`` ("L" or "RGB"): 16-bit rescaled, palette and alpha handled."""
    if img.mode in _SIXTEEN_BIT_MODES:  # PIL's convert would clip at 255; rescale instead
        img = Image.fromarray((np.asarray(img, dtype=np.float64) / 257).round().astype(np.uint8))
    if img.mode == "P":  # via RGBA so palette transparency is read without a PIL warning
        img = img.convert("RGBA")
    if img.mode not in ("L", "RGB"):  # CMYK, RGBA, LA, 1, YCbCr, ...: alpha is dropped
        img = img.convert("RGB")
    return img.convert(mode)


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    width, height = img.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    if (new_w, new_h) != (width, height):
        img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)  # PIL antialiases
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def class_labels(
    folder: Path, paths: list[Path], reference: list[str] | None, unknown_classes: str = "error"
) -> tuple[list[str] | None, list[int]]:
    """Classes from first-level sub-folders when every image has one, else (None, []).

    The classes are the sub-folders that hold images: an empty folder is no class (counting
    it would shift every later label by one). ``reference`` (the train split's classes) is the
    one mapping of a held-out split, which may lack some classes but never add one: such a
    class is an error, or with ``unknown_classes="wrong"`` appended after the reference's
    classes (their labels unchanged), for :func:`mimar.data.image_set.align_classes` to score.
    """
    names = folder_classes(folder, paths)
    if names is None:
        return None, []
    classes = names if reference is None else reference
    unknown = sorted(set(names) - set(classes))
    if unknown and unknown_classes == "wrong":
        classes = [*classes, *unknown]
    elif unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise DataError(
            f"{folder} has {len(unknown)} class folder(s) that the train split lacks: {shown}; "
            f"a test image of a class the model never saw cannot be scored (train classes: "
            f"{len(classes)}; --unknown-classes wrong scores them as wrong)"
        )
    index = {name: i for i, name in enumerate(classes)}
    return classes, [index[path.relative_to(folder).parts[0]] for path in paths]


def folder_classes(folder: Path, paths: list[Path] | None = None) -> list[str] | None:
    """The sorted first-level sub-folders of ``folder`` that hold images (``paths``: its
    images, listed here when not given), or None when some image sits outside a sub-folder
    (an unlabelled folder)."""
    paths = list_images(folder) if paths is None else paths
    parts = [path.relative_to(folder).parts for path in paths]
    if not parts or any(len(p) < 2 for p in parts):
        return None
    return sorted({p[0] for p in parts})


def _reference_classes(root: Path, split: str) -> list[str] | None:
    """The train split's classes, which every held-out split of ``root`` is indexed by."""
    train = root / "train"
    if split == "train" or not train.is_dir():
        return None
    return folder_classes(train)


class _DecodeFiles(Dataset):
    """Decodes by index so a DataLoader can spread the work over processes."""

    def __init__(self, paths: list[Path], size: int, in_chans: int) -> None:
        self.paths, self.size, self.in_chans = paths, size, in_chans

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray | str:
        try:
            return decode_image(self.paths[i], self.size, self.in_chans)
        except Exception as err:  # PIL raises many types for damaged files
            return f"{type(err).__name__}: {err}"


def _unchanged(item: np.ndarray | str) -> np.ndarray | str:
    return item


def _decode_all(
    paths: list[Path], size: int, in_chans: int, num_workers: int
) -> tuple[list[np.ndarray | None], list[tuple[Path, str]]]:
    """Decoded arrays aligned with ``paths`` (None where unreadable) and the failures."""
    files = _DecodeFiles(paths, size, in_chans)
    loader = DataLoader(files, batch_size=None, num_workers=num_workers, collate_fn=_unchanged)
    arrays: list[np.ndarray | None] = []
    bad: list[tuple[Path, str]] = []
    for path, item in zip(paths, loader, strict=True):
        if isinstance(item, str):
            bad.append((path, item))
            arrays.append(None)
        else:
            arrays.append(item)
    return arrays, bad
