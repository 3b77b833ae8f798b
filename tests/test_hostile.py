"""Issue 27, a hostile world: one test per failure class, each one that the original failure
would have failed (labels, run lock, hostile recipes, closed pipes, failing writes, resume,
sizes, partial artifacts)."""

import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mimar.config import load_config
from mimar.data import DataConfig, load_images
from mimar.errors import ConfigError, DataError

DEMO = "configs/simmim/vit_tiny_fmnist.yaml"


# --- class 1: labels -------------------------------------------------------------------------
def _folder(root: Path, classes: dict[str, list[str]]) -> Path:
    """``root/<split>/<class>/*.png``: 3 images per class, the class's grey level its index
    in the sorted non-empty list (so a shifted label is visible)."""
    for split, names in classes.items():
        for k, name in enumerate(names):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((8, 8), 40 * k + i, np.uint8)).save(folder / f"{i}.png")
    return root


def _cfg(root: Path) -> DataConfig:
    return DataConfig(name="image_folder", root=str(root), img_size=8, in_chans=1)


def test_an_empty_class_folder_shifts_no_label(tmp_path):
    ref = _folder(tmp_path / "ref", {"train": ["a", "b"], "val": ["a", "b"]})
    hostile = _folder(tmp_path / "hostile", {"train": ["a", "b"], "val": ["a", "b"]})
    (hostile / "train" / "000_empty").mkdir()  # sorts first, holds nothing
    (hostile / "val" / "000_empty").mkdir()
    for split in ("train", "test"):
        a, b = load_images(_cfg(ref), split), load_images(_cfg(hostile), split)
        assert a.classes == b.classes == ["a", "b"]
        assert a.labels.tolist() == b.labels.tolist()


def test_held_out_split_uses_the_train_mapping(tmp_path):
    root = _folder(tmp_path / "d", {"train": ["a", "b", "c"], "val": ["b", "c"]})
    test = load_images(_cfg(root), "test")
    assert test.classes == ["a", "b", "c"] and sorted(set(test.labels.tolist())) == [1, 2]


def test_a_test_class_unknown_to_training_is_named(tmp_path):
    root = _folder(tmp_path / "d", {"train": ["a", "b"], "val": ["a", "zebra"]})
    with pytest.raises(DataError, match="zebra"):
        load_images(_cfg(root), "test")


# --- class 7: hostile recipes ----------------------------------------------------------------
def _bomb(path: Path, base: str) -> Path:
    lines = ["x0: &x0 [0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25]"]
    for i in range(1, 10):
        lines.append(f"x{i}: &x{i} [" + ", ".join([f"*x{i - 1}"] * 10) + "]")
    lines += [f"base: {base}", "data: {mean: *x9}"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize(
    "text, message",
    [
        (None, "aliases expand"),  # the 10^9-value bomb
        ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nesting deeper"),
        ("a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 500)), "nesting"),
        ("a: &a [1, *a]\n", "contains itself"),
        ("optim:\n  lr: 1.0\ntrain:\n  steps: 3\noptim:\n  weight_decay: 0.1\n", "lines 1 and 5"),
        ("train:\n  steps: 3\n  steps: 4\n", "lines 2 and 3"),
    ],
)
def test_hostile_recipes_are_refused_fast(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    if text is None:
        _bomb(path, str(Path(DEMO).resolve()))
    else:
        path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message) as err:
        load_config(path)
    assert time.perf_counter() - start < 1.0
    assert len(str(err.value)) < 600


def test_an_error_quotes_at_most_200_characters_of_a_value(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"base: {Path(DEMO).resolve()}\ndata:\n  mean: [{', '.join(['x'] * 50000)}]\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert len(str(err.value)) < 600


def test_anchors_within_bounds_still_work(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        f"base: {Path(DEMO).resolve()}\n"
        "stats: &s [0.5]\ndata:\n  mean: *s\n  std: *s\n".replace("stats", "x")
    )
    with pytest.raises(ConfigError, match="unknown config key 'x'"):  # anchors parse
        load_config(path)
    path.write_text(f"base: {Path(DEMO).resolve()}\ndata:\n  mean: &s [0.5]\n  std: *s\n")
    assert load_config(path).data.std == (0.5,)


def test_a_merge_key_may_be_overridden(tmp_path):
    from mimar import recipe_yaml

    assert recipe_yaml.load("a: &a {x: 1, y: 2}\nb:\n  <<: *a\n  x: 3\n")["b"] == {"x": 3, "y": 2}
