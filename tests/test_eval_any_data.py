"""``mimar eval ... --data KIND:PATH``: a run evaluated (frozen and fine-tuned) on images of
another kind than it was pretrained on, fitted to the backbone's size, channels and the run's
normalisation statistics; a plain ``--data PATH`` keeps its meaning; a bad KIND is one line."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import DEMO, TINY
from PIL import Image

from mimar.cli import main
from mimar.data import normalization_stats
from mimar.data.eval_data import parse_data_spec
from mimar.errors import ConfigError
from mimar.evaluation.runner import build_setup, load_source
from mimar.protocols import request

SMALL = ["--no-feature-cache", "--k", "5"]


def _run(root: Path, *extra: str) -> Path:
    run = root / "run"
    assert main(["pretrain", DEMO, *TINY, "train.steps=2", *extra, "--run-dir", str(run)]) == 0
    return run


@pytest.fixture(scope="module")
def gray_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("gray"))  # 1 channel, 16 px


@pytest.fixture(scope="module")
def rgb_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("rgb"), "data.in_chans=3", "backbone.in_chans=3")


def _folder(root: Path, mode: str) -> Path:
    """train/ and val/, classes a and b, 6 + 3 images each of 20x24 px in ``mode``."""
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("val", 3)):
        for c, cls in enumerate("ab"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                shape = (24, 20, 3) if mode == "RGB" else (24, 20)
                pixels = rng.integers(0, 100, shape) + 120 * c  # class b is brighter
                Image.fromarray(pixels.astype(np.uint8), mode).save(root / split / cls / f"{i}.png")
    return root


def test_parse_keeps_plain_paths_and_names_the_kinds():
    assert parse_data_spec("image_folder:/d/x") == ("image_folder", "/d/x")
    assert parse_data_spec("webdataset:/s/train-{0..3}.tar") == (
        "webdataset",
        "/s/train-{0..3}.tar",
    )
    for plain in (None, "/data/fmnist", "data/x", "https://host/shards.tar"):
        assert parse_data_spec(plain) is None
    for bad in ("imagenet:/d", "image_folder:"):
        with pytest.raises(ConfigError, match="image_folder:DIR, fashion_mnist:DIR"):
            parse_data_spec(bad)


def test_gray_run_on_an_rgb_folder(gray_run, tmp_path, capsys):
    folder = _folder(tmp_path / "rgb", "RGB")
    argv = ["eval", "knn", "--checkpoint", str(gray_run), "--data", f"image_folder:{folder}"]
    assert main(argv + SMALL) == 0
    out = capsys.readouterr().out
    assert out.count("1 channel (colour images converted to gray)") == 1
    assert "16 px" in out and "simmim vit: image_folder test top-1" in out
    result = json.loads((gray_run / "eval" / "knn.json").read_text())
    assert (result["n_train"], result["n_test"], result["classes"]) == (12, 6, ["a", "b"])
    assert 0 <= result["rows"][0]["top1"] <= 100


def test_rgb_run_replicates_a_gray_folder_with_the_runs_statistics(rgb_run, tmp_path, capsys):
    folder = _folder(tmp_path / "gray", "L")
    made = request(["knn"], checkpoint=str(rgb_run), data_root=f"image_folder:{folder}")
    source = load_source(rgb_run)
    setup = build_setup(source, made)
    assert "3 channels (gray images replicated)" in capsys.readouterr().out
    images = setup.train.images
    assert images.shape == (12, 3, 16, 16)
    assert (images[:, 0] == images[:, 1]).all() and (images[:, 0] == images[:, 2]).all()
    assert (setup.train.mean, setup.train.std) == normalization_stats(source.data)


def test_plain_data_keeps_the_runs_data_set(gray_run, tmp_path):
    made = request(["knn"], checkpoint=str(gray_run), data_root=str(tmp_path / "elsewhere"))
    source = load_source(gray_run)
    assert source.data.name == "synthetic"
    setup = build_setup(source, made)  # synthetic images ignore the root: still loads
    assert setup.train.images.shape[1:] == (1, 16, 16)


def test_finetune_on_an_image_folder(gray_run, tmp_path, capsys):
    folder = _folder(tmp_path / "rgb", "RGB")
    ft = [
        "--recipe", "configs/finetune/fmnist.yaml", "finetune.schedule.epochs=1",
        "finetune.batch_size=4", "finetune.progress=false", "finetune.precision=fp32",
        "finetune.threads=1",
    ]  # fmt: skip
    argv = ["eval", "finetune", "--checkpoint", str(gray_run), *ft]
    argv += ["--data", f"image_folder:{folder}", "--max-train", "8", "--max-test", "4"]
    assert main(argv) == 0
    assert "converted to gray" in capsys.readouterr().out
    cfg = yaml.safe_load((gray_run / "eval" / "finetune" / "config.yaml").read_text())
    assert (cfg["data"]["name"], cfg["data"]["root"]) == ("image_folder", str(folder))
    assert cfg["data"]["in_chans"] == 1
    result = json.loads((gray_run / "eval" / "finetune.json").read_text())
    assert result["rows"][0]["details"]["n_train"] == 8
    # robustness: the corrupted copies of that folder's test split, as fine-tuned
    argv = ["eval", "robustness", "--checkpoint", str(gray_run), "--max-test", "4"]
    assert main([*argv, "--data", f"image_folder:{folder}"]) == 0
    assert "converted to gray" in capsys.readouterr().out
    assert json.loads((gray_run / "eval" / "robustness.json").read_text())["n_test"] == 4


def test_a_bad_kind_is_one_line(gray_run, capsys):
    argv = ["eval", "knn", "--checkpoint", str(gray_run), "--data", "imagenet:/nowhere"]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "image_folder:DIR, fashion_mnist:DIR, webdataset:PATTERN" in err
