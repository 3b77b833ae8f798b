"""Fashion-MNIST scenes (mimar.dense.scenes) and the COCO-format reader (mimar.dense.coco)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from mimar.cli import main
from mimar.data.config import DataConfig
from mimar.data.fashion_mnist import CLASSES, load_fashion_mnist
from mimar.dense.coco import decode_segmentation, encode_rle, load_coco_dense
from mimar.dense.scenes import (
    MIN_FRACTION,
    MIN_PIXELS,
    THRESHOLD,
    build_scenes,
    compose_scene,
    resize_item,
    scene_rng,
)
from mimar.errors import ConfigError, DataError, MissingFileError

FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not FMNIST.exists(), reason="needs apt-get install dataset-fashion-mnist"
)
COUNTS = {"train": 12, "test": 6}


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("scenes") / "fmnist-scenes"
    build_scenes(out, num_train=COUNTS["train"], num_test=COUNTS["test"], progress=False)
    return out


@pytest.fixture(scope="module")
def items() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per split: the Fashion-MNIST items (N, 28, 28) and their classes (N,)."""
    cfg = DataConfig(root=str(FMNIST))
    sets = {split: load_fashion_mnist(cfg, split) for split in COUNTS}
    return {s: (d.images[:, 0].numpy(), d.labels.numpy()) for s, d in sets.items()}


def coco_json(out: Path, split: str) -> dict:
    return json.loads((out / "annotations" / f"instances_{split}.json").read_text())


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def file_hashes(out: Path) -> dict[str, str]:
    files = sorted(p for p in out.rglob("*") if p.is_file())
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


# --- the builder -------------------------------------------------------------------------


@needs_fmnist
def test_same_seed_gives_the_same_bytes_and_another_seed_differs(build, tmp_path):
    again = tmp_path / "again"
    build_scenes(again, num_train=COUNTS["train"], num_test=COUNTS["test"], progress=False)
    first = file_hashes(build)
    assert len(first) == 2 * (12 + 6) + 3  # canvases, label maps, two jsons, scenes.json
    assert file_hashes(again) == first
    other = tmp_path / "other"
    build_scenes(other, num_train=12, num_test=6, seed=1, progress=False)
    changed = [name for name, digest in file_hashes(other).items() if first[name] != digest]
    assert "annotations/instances_train.json" in changed and len(changed) > 30


@needs_fmnist
@pytest.mark.parametrize("split", ["train", "test"])
def test_labels_and_pixels_are_the_pasted_items_of_that_split(build, items, split):
    coco = coco_json(build, split)
    fmnist, classes = items[split]
    for image in coco["images"]:
        canvas = png(build / split / image["file_name"])
        semantic = png(build / "labels" / split / image["file_name"])
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        covered = np.zeros_like(semantic, dtype=bool)
        for ann in anns:
            mask = decode_segmentation(ann["segmentation"], 64, 64)
            index, (x, y, side) = ann["fmnist_index"], ann["paste"]
            assert ann["category_id"] == classes[index] + 1
            assert (semantic[mask] == ann["category_id"]).all()
            pasted = np.zeros((64, 64), dtype=np.uint8)
            pasted[y : y + side, x : x + side] = resize_item(fmnist[index], side)
            # the canvas shows this split's item exactly where its visible mask is
            assert np.array_equal(canvas[mask], pasted[mask]) and (pasted[mask] > THRESHOLD).all()
            assert not (covered & mask).any()  # visible masks never overlap
            covered |= mask
        assert (semantic[~covered] == 0).all()


@needs_fmnist
def test_compose_scene_rebuilds_a_written_canvas(build, items):
    scene = compose_scene(scene_rng(0, "train", 3), *items["train"], 64)
    assert np.array_equal(scene.canvas, png(build / "train" / "000003.png"))
    assert np.array_equal(scene.semantic, png(build / "labels" / "train" / "000003.png"))
    anns = [a for a in coco_json(build, "train")["annotations"] if a["image_id"] == 4]
    assert [i.fmnist_index for i in scene.instances] == [a["fmnist_index"] for a in anns]
    for instance, ann in zip(scene.instances, anns):
        assert encode_rle(instance.visible) == ann["segmentation"]


@needs_fmnist
@pytest.mark.parametrize("split", ["train", "test"])
def test_boxes_are_tight_and_occlusion_is_bounded(build, items, split):
    coco = coco_json(build, split)
    fmnist = items[split][0]
    per_image = [
        sum(a["image_id"] == im["id"] for a in coco["annotations"]) for im in coco["images"]
    ]
    assert len(per_image) == COUNTS[split] and all(1 <= n <= 4 for n in per_image)
    assert [c["name"] for c in coco["categories"]] == CLASSES
    for ann in coco["annotations"]:
        mask = decode_segmentation(ann["segmentation"], 64, 64)
        ys, xs = np.nonzero(mask)
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max(), ys.max()
        assert ann["bbox"] == [x0, y0, x1 - x0 + 1, y1 - y0 + 1]  # COCO: pixel extents
        assert ann["bbox"] == mask_utils.toBbox(_rle_bytes(ann["segmentation"])).tolist()
        own = int((resize_item(fmnist[ann["fmnist_index"]], ann["paste"][2]) > THRESHOLD).sum())
        assert ann["area"] == mask.sum() >= max(MIN_PIXELS, MIN_FRACTION * own)
        assert ann["iscrowd"] == 0


def _rle_bytes(rle: dict) -> dict:
    return {"size": rle["size"], "counts": rle["counts"].encode("ascii")}


@needs_fmnist
def test_pycocotools_reads_the_annotations(build):
    coco = COCO(str(build / "annotations" / "instances_train.json"))
    assert len(coco.getImgIds()) == 12 and coco.getCatIds() == list(range(1, 11))
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[1]))[0]
    assert np.array_equal(coco.annToMask(ann), decode_segmentation(ann["segmentation"], 64, 64))


def test_bad_arguments_and_foreign_output_folders(tmp_path):
    with pytest.raises(ConfigError, match="size >= 16.*size=8"):
        build_scenes(tmp_path / "a", size=8)
    with pytest.raises(ConfigError, match="num_test=0"):
        build_scenes(tmp_path / "a", num_test=0)
    (tmp_path / "mine" / "notes.txt").parent.mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not a previous scenes build"):
        build_scenes(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


# --- the COCO reader ---------------------------------------------------------------------


@needs_fmnist
def test_reading_the_build_gives_back_its_files(build):
    data = load_coco_dense(build, "train")
    coco = coco_json(build, "train")
    assert len(data) == 12 and data.num_classes == 11 and data.class_names == tuple(CLASSES)
    assert data.images.shape == (12, 1, 64, 64) and data.semantic.dtype == torch.uint8
    for i, image in enumerate(coco["images"]):
        assert np.array_equal(data.images[i, 0].numpy(), png(build / "train" / image["file_name"]))
        labels = png(build / "labels" / "train" / image["file_name"])
        assert np.array_equal(data.semantic[i].numpy(), labels)
        anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        xyxy = [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)]
        assert data.boxes[i].dtype == torch.float32 and data.boxes[i].tolist() == xyxy
        assert data.classes[i].tolist() == [a["category_id"] for a in anns]


@needs_fmnist
def test_semantic_maps_painted_from_masks_equal_the_label_maps(build, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(build, copy)
    shutil.rmtree(copy / "labels")
    for split in COUNTS:
        assert torch.equal(
            load_coco_dense(copy, split).semantic, load_coco_dense(build, split).semantic
        )


@needs_fmnist
def test_resize_channels_and_subset(build):
    full = load_coco_dense(build, "test")
    half = load_coco_dense(build, "test", img_size=32, in_chans=3, max_images=4)
    assert half.images.shape == (4, 3, 32, 32) and half.semantic.shape == (4, 32, 32)
    for i in range(4):
        assert torch.equal(half.boxes[i], full.boxes[i] / 2)
        assert torch.equal(half.classes[i], full.classes[i])
    assert torch.equal(half.images[:, 0], half.images[:, 2])  # gray replicated by PIL's RGB


@needs_fmnist
def test_test_falls_back_to_val(build, tmp_path):
    copy = tmp_path / "coco"
    shutil.copytree(build, copy)
    (copy / "test").rename(copy / "val")
    (copy / "labels" / "test").rename(copy / "labels" / "val")
    ann = copy / "annotations"
    (ann / "instances_test.json").rename(ann / "instances_val.json")
    data = load_coco_dense(copy, "test")
    assert torch.equal(data.semantic, load_coco_dense(build, "test").semantic)


def write_coco(root: Path, sizes=((8, 8), (8, 8))) -> None:
    """A hand-made COCO folder: RGB images, categories 7 and 3, a polygon, a crowd RLE."""
    (root / "annotations").mkdir(parents=True)
    (root / "train").mkdir()
    images = []
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (10 * i, 20, 30)).save(root / "train" / f"im{i}.png")
        images.append({"id": 5 + i, "file_name": f"im{i}.png", "width": w, "height": h})
    crowd = np.zeros((8, 8), dtype=np.uint8)
    crowd[6:, :] = 1
    counts = [int(c) for c in _runs(crowd.flatten(order="F"))]
    annotations = [
        {"id": 1, "image_id": 5, "category_id": 7, "bbox": [1, 1, 3, 3], "iscrowd": 0,
         "segmentation": [[1, 1, 4, 1, 4, 4, 1, 4]]},
        {"id": 2, "image_id": 5, "category_id": 3, "bbox": [0, 6, 8, 2], "iscrowd": 1,
         "segmentation": {"size": [8, 8], "counts": counts}},
    ]  # fmt: skip
    categories = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]
    coco = {"images": images, "annotations": annotations, "categories": categories}
    (root / "annotations" / "instances_train.json").write_text(json.dumps(coco))


def _runs(bits: np.ndarray) -> list[int]:
    """Uncompressed COCO RLE: run lengths, starting with a (possibly empty) run of zeros."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], bits, [1 - bits[-1]]])))
    return np.diff(np.concatenate([[0], edges])).tolist()


def test_a_hand_made_coco_folder(tmp_path):
    write_coco(tmp_path / "coco")
    data = load_coco_dense(tmp_path / "coco", "train", in_chans=3)
    assert data.class_names == ("three", "seven")  # sorted ids 3, 7 -> labels 1, 2
    assert data.images.shape == (2, 3, 8, 8) and data.images[1, :, 0, 0].tolist() == [10, 20, 30]
    semantic = data.semantic[0]
    assert (semantic[6:] == 255).all()  # the crowd is ignored
    assert (semantic[1:4, 1:4] == 2).all() and semantic.sum() == 9 * 2 + 16 * 255
    assert data.boxes[0].tolist() == [[1, 1, 4, 4]] and data.classes[0].tolist() == [2]
    assert data.boxes[1].shape == (0, 4) and data.classes[1].shape == (0,)  # no annotation


def test_reader_errors_name_the_path(tmp_path):
    with pytest.raises(MissingFileError, match=r"mimar data scenes --out .*fmnist-scenes"):
        load_coco_dense(tmp_path / "data" / "fmnist-scenes", "train")
    write_coco(tmp_path / "mixed", sizes=((8, 8), (6, 8)))
    with pytest.raises(DataError, match="2 sizes.*set img_size"):
        load_coco_dense(tmp_path / "mixed", "train")
    assert load_coco_dense(tmp_path / "mixed", "train", img_size=4).images.shape == (2, 1, 4, 4)
    (tmp_path / "mixed" / "train" / "im1.png").unlink()
    with pytest.raises(MissingFileError, match=r"im1\.png not found"):
        load_coco_dense(tmp_path / "mixed", "train", img_size=4)
    with pytest.raises(MissingFileError, match="instances_test.json or instances_val.json"):
        load_coco_dense(tmp_path / "mixed", "test")


def test_an_annotation_of_an_unlisted_category_is_one_line(tmp_path):
    """Issue 27 class 1: a category_id that categories lacks was a KeyError traceback."""
    write_coco(tmp_path / "coco")
    path = tmp_path / "coco" / "annotations" / "instances_train.json"
    coco = json.loads(path.read_text())
    coco["annotations"][0]["category_id"] = 9
    path.write_text(json.dumps(coco))
    message = r"instances_train\.json: annotation 1 has category_id 9.*ids: 3, 7"
    with pytest.raises(DataError, match=message):
        load_coco_dense(tmp_path / "coco", "train")
    coco["annotations"][0]["image_id"] = 6
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=message):  # also when its image is not read
        load_coco_dense(tmp_path / "coco", "train", max_images=1)
    coco["annotations"][0]["category_id"] = None
    path.write_text(json.dumps(coco))
    with pytest.raises(DataError, match="annotation 1 has category_id None"):
        load_coco_dense(tmp_path / "coco", "train")


# --- the command line --------------------------------------------------------------------


@needs_fmnist
def test_cli_builds_and_rebuilds_the_folder(tmp_path, capsys):
    out = tmp_path / "data" / "fmnist-scenes"
    argv = ["data", "scenes", "--out", str(out), "--num-train", "8", "--num-test", "4"]
    assert main(argv) == 0
    line = capsys.readouterr().out.strip()
    assert (
        "\n" not in line and line.startswith("wrote 8 train + 4 test scenes") and str(out) in line
    )
    assert len(list((out / "train").glob("*.png"))) == 8
    assert main([*argv[:-1], "2"]) == 0  # a previous build is replaced
    assert len(list((out / "test").glob("*.png"))) == 2
    assert [p.name for p in out.parent.iterdir()] == ["fmnist-scenes"]  # no work folders left


def test_cli_missing_fashion_mnist_is_one_line(tmp_path, capsys):
    argv = ["data", "scenes", "--out", str(tmp_path / "s"), "--fmnist-root", str(tmp_path / "no")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mimar data: error: Fashion-MNIST train files not found")
    assert "\n" not in err and not (tmp_path / "s").exists()
