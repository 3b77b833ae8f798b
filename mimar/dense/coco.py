"""Dense data in COCO format: images, instance boxes and masks, per-pixel semantic maps.

A folder is read as COCO lays it out (Lin et al., 2014, arXiv:1405.0312)::

    root/annotations/instances_{split}.json   # images, annotations, categories
    root/{split}/{file_name}                  # the images the json names
    root/labels/{split}/{stem}.png            # optional semantic maps, 255 = ignore

``test`` falls back to ``val`` (real COCO and ADE-like folders have no labelled test split).
The sorted COCO category ids become the contiguous labels 1..K; label 0 is background. Without
label maps the semantic map is painted from the instance masks (RLE or polygons), later
annotations over earlier ones and crowd regions as 255, the COCO panoptic convention.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mimar.errors import ConfigError, DataError, MimarError, MissingFileError

IGNORE = 255  # semantic label of pixels no metric counts (crowds, unlabelled)


@dataclass
class DenseSet:
    """One split of a dense (detection + segmentation) dataset, held in memory.

    Attributes:
        images: uint8 ``(N, C, H, W)``, every image resized to the same size.
        semantic: uint8 ``(N, H, W)``: 0 = background, 1..K = categories, 255 = ignore.
        boxes: per image float32 ``(M_i, 4)`` xyxy in pixels of the resized image; the right and
            bottom edges are exclusive (``x2 = x + w`` of the COCO box). Crowds are left out.
        classes: per image int64 ``(M_i,)`` labels in 1..K.
        class_names: the K category names; ``class_names[k - 1]`` names label k.
        source: human description for logs.
    """

    images: torch.Tensor
    semantic: torch.Tensor
    boxes: list[torch.Tensor]
    classes: list[torch.Tensor]
    class_names: tuple[str, ...]
    source: str = ""

    def __post_init__(self) -> None:
        n, _, h, w = self.images.shape
        if self.images.dtype != torch.uint8 or self.semantic.shape != (n, h, w):
            raise DataError(
                f"DenseSet needs uint8 images (N, C, H, W) and semantic (N, H, W), got "
                f"{self.images.dtype} {tuple(self.images.shape)} and {tuple(self.semantic.shape)}"
            )
        if len(self.boxes) != n or len(self.classes) != n:
            raise DataError(f"DenseSet has {n} images but {len(self.boxes)} box lists")

    @property
    def num_classes(self) -> int:
        """K categories plus background."""
        return len(self.class_names) + 1

    def __len__(self) -> int:
        return len(self.images)


def load_coco_dense(
    root: str | Path, split: str, *, img_size: int = 0, in_chans: int = 1, max_images: int = 0
) -> DenseSet:
    """Read one split of a COCO-format folder (see the module docstring for the layout).

    Args:
        root: the folder holding ``annotations/``, the image folders and optionally ``labels/``.
        split: "train" or "test" ("test" reads ``val`` when there is no test json).
        img_size: 0 keeps the images' own size (then they must all be equal); otherwise every
            image becomes ``img_size x img_size`` (bilinear; labels nearest; boxes scaled).
        in_chans: 1 (PIL mode L) or 3 (RGB).
        max_images: keep the first N images by image id; 0 keeps all.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    if img_size < 0 or max_images < 0 or in_chans not in (1, 3):
        raise ConfigError(
            f"need img_size >= 0, max_images >= 0 and in_chans 1 or 3, got {img_size}, "
            f"{max_images}, {in_chans}"
        )
    root = Path(root)
    json_path, folder = _locate(root, split)
    coco = _read_json(json_path)
    category_ids = sorted(int(c["id"]) for c in coco["categories"])
    if len(category_ids) >= IGNORE:
        raise DataError(f"{json_path} has {len(category_ids)} categories; uint8 maps hold 254")
    label_of = {cid: k + 1 for k, cid in enumerate(category_ids)}
    names = {int(c["id"]): str(c["name"]) for c in coco["categories"]}
    records = sorted(coco["images"], key=lambda r: r["id"])[: max_images or None]
    per_image = defaultdict(list)
    for ann in coco.get("annotations", []):
        category_label(ann, label_of, json_path)  # every one, also of images not kept
        per_image[ann["image_id"]].append(ann)
    out_h, out_w = (img_size, img_size) if img_size else _common_size(records, json_path)
    label_dir = root / "labels" / folder.name
    label_maps = label_dir if label_dir.is_dir() else None  # None: paint from the masks
    images = np.zeros((len(records), out_h, out_w, in_chans), dtype=np.uint8)
    semantic = np.zeros((len(records), out_h, out_w), dtype=np.uint8)
    boxes, classes = [], []
    for i, record in enumerate(records):
        anns = per_image[record["id"]]
        picture, labels = _read_pixels(record, anns, folder, label_maps, label_of, in_chans)
        h, w = int(record["height"]), int(record["width"])
        if (w, h) != (out_w, out_h):
            picture = picture.resize((out_w, out_h), Image.Resampling.BILINEAR)
            labels = labels.resize((out_w, out_h), Image.Resampling.NEAREST)
        images[i] = np.asarray(picture).reshape(out_h, out_w, in_chans)
        semantic[i] = np.asarray(labels)
        box, cls = _boxes(anns, label_of, out_w / w, out_h / h, json_path)
        boxes.append(box)
        classes.append(cls)
    _check_labels(semantic, len(category_ids), label_dir)
    return DenseSet(
        images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),  # (N, C, H, W)
        semantic=torch.from_numpy(semantic),  # (N, H, W)
        boxes=boxes,
        classes=classes,
        class_names=tuple(names[cid] for cid in category_ids),
        source=f"COCO-format {folder.name} ({len(records)} images, {len(category_ids)} "
        f"categories) from {root}",
    )


def category_label(ann: dict, label_of: dict[int, int], source: Path | str = "") -> int:
    """The contiguous label of an annotation's ``category_id``; an id that ``categories`` does
    not list is one line naming the file, the annotation and the id (never a KeyError: a
    guessed label would be scored as another category)."""
    category = ann.get("category_id")
    try:
        return label_of[int(category)]  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        known = sorted(label_of)
        shown = ", ".join(map(str, known[:10])) + (" ..." if len(known) > 10 else "")
        raise DataError(
            f"{source}: annotation {ann.get('id')} has category_id {category!r}, which its "
            f"categories do not list (ids: {shown}); add the category or fix the annotation"
        ) from None


def encode_rle(mask: np.ndarray) -> dict:
    """A bool ``(H, W)`` mask as COCO compressed RLE, ``counts`` a str so json can hold it."""
    rle = _mask_tools().encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def decode_segmentation(segmentation: list | dict, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, RLE or compressed RLE) as a bool ``(H, W)`` mask."""
    tools = _mask_tools()
    if isinstance(segmentation, list):  # polygons: one flat [x1, y1, x2, y2, ...] list each
        if not segmentation:
            return np.zeros((height, width), dtype=bool)
        rle = tools.merge(tools.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):  # uncompressed RLE (COCO crowds)
        rle = tools.frPyObjects(segmentation, height, width)
    else:
        counts = segmentation["counts"]
        counts = counts.encode("ascii") if isinstance(counts, str) else counts
        rle = {"size": segmentation["size"], "counts": counts}
    return tools.decode(rle).astype(bool)


def paint_semantic(
    anns: list[dict], label_of: dict[int, int], height: int, width: int, source: Path | str = ""
) -> np.ndarray:
    """The uint8 ``(H, W)`` semantic map of one image's annotations, later ones on top."""
    semantic = np.zeros((height, width), dtype=np.uint8)
    for ann in anns:
        if "segmentation" not in ann:
            raise DataError(
                f"{source}: annotation {ann.get('id')} has no segmentation, so no semantic map "
                f"can be painted; add masks or label maps under labels/"
            )
        mask = decode_segmentation(ann["segmentation"], height, width)
        semantic[mask] = IGNORE if ann.get("iscrowd", 0) else category_label(ann, label_of, source)
    return semantic


def _locate(root: Path, split: str) -> tuple[Path, Path]:
    layout = f"expected {root}/annotations/instances_{split}.json and its images in {root}/{split}/"
    if root.name.endswith("scenes"):
        layout += f"; build it with `mimar data scenes --out {root}`"
    if not root.is_dir():
        raise MissingFileError(f"COCO-format folder {root} not found: {layout}")
    names = [split, "val"] if split == "test" else [split]
    for name in names:
        json_path = root / "annotations" / f"instances_{name}.json"
        if json_path.is_file():
            if not (root / name).is_dir():
                raise MissingFileError(f"image folder {root / name} not found ({layout})")
            return json_path, root / name
    tried = " or ".join(f"instances_{name}.json" for name in names)
    raise MissingFileError(f"{root / 'annotations'} holds no {tried}: {layout}")


def _read_json(path: Path) -> dict:
    try:
        coco = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read COCO json {path}: {err}") from err
    missing = [key for key in ("images", "categories") if key not in coco]
    if not isinstance(coco, dict) or missing:
        raise DataError(f"{path} is not a COCO instances file: it lacks {missing or 'a dict'}")
    return coco


def _common_size(records: list[dict], json_path: Path) -> tuple[int, int]:
    sizes = {(int(r["height"]), int(r["width"])) for r in records}
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for h, w in sorted(sizes)[:3])
        raise DataError(
            f"{json_path} has images of {len(sizes)} sizes ({shown}, ...): set img_size to "
            f"resize them to one square size"
        )
    return sizes.pop() if sizes else (0, 0)


def _read_pixels(record, anns, folder, label_maps, label_of, in_chans):
    """One image (PIL, mode L or RGB) and its semantic map (PIL, 8-bit) at their own size."""
    size = (int(record["width"]), int(record["height"]))
    picture = _open(folder / record["file_name"], "L" if in_chans == 1 else "RGB", size)
    if label_maps is not None:
        return picture, _open(label_maps / f"{Path(record['file_name']).stem}.png", None, size)
    painted = paint_semantic(anns, label_of, size[1], size[0], folder / record["file_name"])
    return picture, Image.fromarray(painted)


def _open(path: Path, mode: str | None, size: tuple[int, int]) -> Image.Image:
    """An image converted to ``mode`` (None: label maps, kept as stored) of a known size."""
    if not path.is_file():
        raise MissingFileError(f"{path} not found (named by the COCO json of {path.parent})")
    try:
        with Image.open(path) as img:
            img.load()
    except OSError as err:
        raise DataError(f"cannot read image {path}: {err}") from err
    if mode is None and img.mode not in ("L", "P"):
        raise DataError(f"label map {path} has PIL mode {img.mode}; expected L or P (8-bit)")
    if img.size != size:
        raise DataError(f"{path} is {img.size[0]}x{img.size[1]}, the json says {size[0]}x{size[1]}")
    return img if mode is None else img.convert(mode)


def _boxes(anns: list[dict], label_of: dict[int, int], sx: float, sy: float, source=""):
    """COCO ``[x, y, w, h]`` boxes as scaled xyxy; crowds and empty boxes are left out."""
    kept = [a for a in anns if not a.get("iscrowd", 0) and a["bbox"][2] > 0 and a["bbox"][3] > 0]
    xywh = np.asarray([a["bbox"] for a in kept], dtype=np.float64).reshape(-1, 4)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1) * [sx, sy, sx, sy]
    labels = [category_label(a, label_of, source) for a in kept]
    return torch.from_numpy(xyxy.astype(np.float32)), torch.tensor(labels, dtype=torch.int64)


def _check_labels(semantic: np.ndarray, num_categories: int, label_dir: Path) -> None:
    bad = (semantic > num_categories) & (semantic != IGNORE)
    if bad.any():
        raise DataError(
            f"semantic labels under {label_dir} reach {int(semantic[bad].max())}, but there are "
            f"only {num_categories} categories (labels 1..{num_categories}, 255 = ignore)"
        )


def _mask_tools():
    try:
        from pycocotools import mask  # the COCO reference RLE code (C); in the dense extra
    except ImportError:
        raise MimarError("COCO masks need pycocotools: pip install 'mimar[dense]'") from None
    return mask
