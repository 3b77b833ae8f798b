"""Fashion-MNIST scenes: a small, deterministic dense benchmark written in COCO format.

Each canvas is a textured background (a few low-frequency sinusoids plus smoothed noise) with
1-4 Fashion-MNIST items (Xiao et al., 2017, arXiv:1708.07747) pasted at random sides and
positions; later items occlude earlier ones, but never below half of an item's own mask nor
below ``min_visible_pixels``. Train canvases use train items only, test canvases test items.

Canvas ``i`` of a split is drawn from ``np.random.default_rng([seed, split_id, i])`` alone, so
any canvas can be rebuilt without the others (:func:`compose_scene`), and two builds with the
same arguments are byte-identical (no timestamps; PNGs and json written with fixed settings).

Layout under ``out``::

    train/000000.png ...            canvases, 8-bit gray
    test/000000.png ...
    labels/{train,test}/000000.png  semantic maps (mode L): 0 = background, k + 1 = class k
    annotations/instances_{train,test}.json
    scenes.json                     the build's parameters and counts

Annotations are COCO's: image ids are the canvas index + 1 (pycocotools' evaluator reads id 0
as "unmatched"), ``bbox = [x_min, y_min, width, height]`` of the visible mask with
``width = x_max - x_min + 1`` (pixel extents, as ``pycocotools.mask.toBbox``), ``area`` the
visible pixel count, ``segmentation`` compressed RLE. Two extra keys say where an instance came
from: ``fmnist_index`` (index into the split's Fashion-MNIST items) and ``paste`` ``[x, y,
side]`` (the square the resized item was pasted into).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import MofNCompleteColumn, Progress, TimeElapsedColumn

from mimar import writes
from mimar.data.config import DataConfig
from mimar.data.fashion_mnist import CLASSES, load_fashion_mnist
from mimar.dense.coco import encode_rle
from mimar.errors import ConfigError, DataError

log = logging.getLogger("mimar")

SPLITS = {"train": 0, "test": 1}  # split name -> the second word of every canvas's seed
MAX_ITEMS = 4  # items drawn per canvas: uniform in 1..MAX_ITEMS (fewer when some do not fit)
SIDE_RANGE = (16, 40)  # pasted item side in pixels at size 64, scaled with size / 64
THRESHOLD = 40  # an item's mask: its resized pixels above this (of 255)
MIN_FRACTION = 0.5  # an instance keeps at least this share of its own mask visible...
MIN_PIXELS = 20  # ...and at least this many pixels at size 64 (scaled with the area)
TRIES = 5  # positions tried per item before it is skipped


@dataclass
class Instance:
    """One pasted item: where it came from, where it went, what of it stays visible."""

    fmnist_index: int
    category: int  # Fashion-MNIST class + 1
    x: int
    y: int
    side: int
    own_area: int  # mask pixels of the resized item before any occlusion
    visible: np.ndarray  # bool (size, size)


@dataclass
class Scene:
    canvas: np.ndarray  # uint8 (size, size)
    semantic: np.ndarray  # uint8 (size, size), 0 = background, 1..10
    instances: list[Instance]


def build_scenes(
    out: str | Path,
    *,
    fmnist_root: str = "/usr/share/datasets/fashion-mnist",
    size: int = 64,
    num_train: int = 4000,
    num_test: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Write the scenes benchmark under ``out`` (layout in the module docstring).

    The build goes into a hidden sibling folder that is renamed to ``out`` at the end; an
    existing ``out`` is replaced only if it is empty or a previous build.

    Returns:
        ``{"out", "images": {split: n}, "instances": {split: n}, "seconds"}``.
    """
    start = time.perf_counter()
    counts = {"train": num_train, "test": num_test}
    if size < 16 or min(counts.values()) < 1 or seed < 0:
        raise ConfigError(
            f"scenes need size >= 16, num_train >= 1, num_test >= 1 and seed >= 0, got "
            f"size={size}, num_train={num_train}, num_test={num_test}, seed={seed}"
        )
    out = Path(out)
    _check_target(out)
    cfg = DataConfig(name="fashion_mnist", root=fmnist_root, in_chans=1)
    sources = {split: load_fashion_mnist(cfg, split) for split in SPLITS}  # fails before writing
    params = {"seed": seed, "size": size, "num_train": num_train, "num_test": num_test}
    params |= _drawing_rules(size)
    writes.make_dir(out.parent, "scenes folder")
    work = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    instances = {}
    try:
        columns = (*Progress.get_default_columns(), MofNCompleteColumn(), TimeElapsedColumn())
        console = Console(stderr=True)
        shown = progress and console.is_terminal
        with Progress(*columns, console=console, disable=not shown) as bar:
            for split, n in counts.items():
                task = bar.add_task(f"scenes {split}", total=n)
                source = sources[split]
                items = source.images[:, 0].numpy()  # (N, 28, 28)
                labels = source.labels.numpy()  # type: ignore[union-attr]
                advance = partial(bar.advance, task)
                coco = _write_split(work, split, n, seed, items, labels, size, params, advance)
                instances[split] = len(coco["annotations"])
                log.info("scenes %s: %d canvases, %d instances", split, n, instances[split])
        summary = {"images": counts, "instances": instances}
        text = json.dumps(params | summary, sort_keys=True, indent=2)
        writes.write_text(work / "scenes.json", text, "scenes")
        _move_into_place(work, out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return {"out": str(out), **summary, "seconds": round(time.perf_counter() - start, 2)}


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator that draws canvas ``index`` of ``split``: its only source of randomness."""
    return np.random.default_rng([seed, SPLITS[split], index])


def compose_scene(
    rng: np.random.Generator, items: np.ndarray, labels: np.ndarray, size: int
) -> Scene:
    """Draw one canvas from uint8 ``items`` ``(N, 28, 28)`` with classes ``labels`` ``(N,)``."""
    canvas = _background(rng, size)  # (size, size)
    lo, hi = _side_range(size)
    min_pixels = _min_pixels(size)
    placed: list[Instance] = []
    wanted, drawn = int(rng.integers(1, MAX_ITEMS + 1)), 0
    while drawn < wanted or not placed:  # a canvas always holds at least one instance
        drawn += 1
        if drawn > 100 * MAX_ITEMS:
            raise DataError(
                f"Fashion-MNIST items too faint: none has {min_pixels} pixels > {THRESHOLD}"
            )
        index, side = int(rng.integers(len(items))), int(rng.integers(lo, hi + 1))
        pixels = resize_item(items[index], side)  # (side, side)
        mask = pixels > THRESHOLD
        if mask.sum() < min_pixels:
            continue
        for _ in range(TRIES):
            x, y = (int(v) for v in rng.integers(0, size - side + 1, size=2))
            cover = np.zeros((size, size), dtype=bool)
            cover[y : y + side, x : x + side] = mask
            if all(_stays_visible(other, cover, min_pixels) for other in placed):
                break
        else:
            continue  # no position leaves every earlier item visible enough: skip this item
        for other in placed:
            other.visible &= ~cover
        canvas[cover] = pixels[mask]
        placed.append(Instance(index, int(labels[index]) + 1, x, y, side, int(mask.sum()), cover))
    semantic = np.zeros((size, size), dtype=np.uint8)
    for instance in placed:
        semantic[instance.visible] = instance.category
    return Scene(canvas=canvas, semantic=semantic, instances=placed)


def resize_item(item: np.ndarray, side: int) -> np.ndarray:
    """A uint8 28x28 item resized to ``side x side`` (PIL bilinear)."""
    return np.asarray(Image.fromarray(item).resize((side, side), Image.Resampling.BILINEAR))


def _write_split(work, split, n, seed, items, labels, size, params, advance) -> dict:
    for folder in (work / split, work / "labels" / split, work / "annotations"):
        writes.make_dir(folder, "scenes folder")
    images, annotations = [], []
    for i in range(n):
        scene = compose_scene(scene_rng(seed, split, i), items, labels, size)
        name = f"{i:06d}.png"
        _save_png(scene.canvas, work / split / name)
        _save_png(scene.semantic, work / "labels" / split / name)
        images.append({"id": i + 1, "file_name": name, "width": size, "height": size})
        for instance in scene.instances:
            annotations.append(_annotation(instance, len(annotations) + 1, i + 1))
        advance()
    categories = [
        {"id": k + 1, "name": name, "supercategory": "fashion"} for k, name in enumerate(CLASSES)
    ]
    info = {"description": f"Fashion-MNIST scenes, {split} split", **params}
    coco = {"info": info, "images": images, "annotations": annotations, "categories": categories}
    path = work / "annotations" / f"instances_{split}.json"
    writes.write_text(path, json.dumps(coco, sort_keys=True), "scene annotations")
    return coco


def _annotation(instance: Instance, ann_id: int, image_id: int) -> dict:
    ys, xs = np.nonzero(instance.visible)
    x0, y0 = int(xs.min()), int(ys.min())
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": instance.category,
        "bbox": [x0, y0, int(xs.max()) - x0 + 1, int(ys.max()) - y0 + 1],  # COCO pixel extents
        "area": int(len(xs)),
        "iscrowd": 0,
        "segmentation": encode_rle(instance.visible),
        "fmnist_index": instance.fmnist_index,
        "paste": [instance.x, instance.y, instance.side],
    }


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Mid-low gray texture: a base level, three random plane waves, smoothed noise."""
    t = np.arange(size) / size  # pixel coordinates in [0, 1)
    field = np.full((size, size), rng.uniform(25, 70))
    for _ in range(3):
        cycles = rng.uniform(0.5, 3)
        angle, phase = rng.uniform(0, 2 * np.pi, size=2)
        k = 2 * np.pi * cycles  # cycles across the canvas -> radians per unit
        wave = (k * np.sin(angle) * t)[:, None] + (k * np.cos(angle) * t + phase)[None, :]
        field += rng.uniform(4, 14) * np.sin(wave)  # (size, size)
    coarse = rng.normal(0, 8, (max(2, size // 8),) * 2).astype(np.float32)
    field += np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BILINEAR))
    return np.clip(np.rint(field), 0, 255).astype(np.uint8)


def _stays_visible(instance: Instance, cover: np.ndarray, min_pixels: int) -> bool:
    left = int(np.count_nonzero(instance.visible & ~cover))
    return left >= MIN_FRACTION * instance.own_area and left >= min_pixels


def _drawing_rules(size: int) -> dict:
    """The constants that shape every canvas, as recorded in the json ``info``."""
    return {
        "max_items": MAX_ITEMS,
        "side_range": list(_side_range(size)),
        "threshold": THRESHOLD,
        "min_visible_fraction": MIN_FRACTION,
        "min_visible_pixels": _min_pixels(size),
        "tries": TRIES,
    }


def _side_range(size: int) -> tuple[int, int]:
    lo, hi = SIDE_RANGE
    return max(1, round(lo * size / 64)), min(size, round(hi * size / 64))


def _min_pixels(size: int) -> int:
    return max(1, round(MIN_PIXELS * (size / 64) ** 2))


def _save_png(array: np.ndarray, path: Path) -> None:
    with writes.guard(path, "scene image"):  # the whole folder is put into place at the end
        Image.fromarray(array).save(path, format="PNG", compress_level=1)


def _check_target(out: Path) -> None:
    if out.is_file() or (
        out.is_dir()
        and any(out.iterdir())
        and not (out / "annotations" / "instances_train.json").is_file()
    ):
        raise ConfigError(
            f"{out} exists and is not a previous scenes build: choose another --out or remove it"
        )


def _move_into_place(work: Path, out: Path) -> None:
    if out.exists():  # a previous build (checked before): swap, then delete the old one
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        writes.rename(out, old, "scenes")
        writes.rename(work, out, "scenes")
        shutil.rmtree(old)
    else:
        writes.rename(work, out, "scenes")
