"""An imported release is a first-class run (issue 25): every command that takes
``--checkpoint RUN`` works on the run ``mimar import`` wrote, through the real CLI, and every
frozen protocol reads ``--data KIND:PATH`` (image folders and WebDataset shards alike).

One tiny SimMIM ViT release (official layout, RGB, 16 px, shared relative position bias,
LayerScale) is imported once; each test drives one consumer on it at the tiniest settings and
checks what it wrote where the run-folder rule says, and that the imported checkpoint is
never changed. An imported iTPN release covers the dense tasks' pretrained neck.
"""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import DEMO, TINY
from PIL import Image
from test_formats import IMG, official_simmim_vit, save_like_simmim
from test_formats_itpn_digpt import DG_T, IT_IMG, official_digpt, official_itpn, save_like_official

import mimar
from mimar.cli import main
from mimar.config import DataConfig
from mimar.engine import checkpoint
from mimar.errors import ConfigError
from mimar.finetune.config import default_recipe

RELEASE = "simmim_pretrain__vit_base__img224__800ep.pth"
# the recipe reads ImageNet in 8 workers: the tiny folders here in the main process
HEADS = ["backbone.num_heads=2", "method.mask_patch_size=8", "data.num_workers=0"]
CLASSES = ["a", "b"]
N_TRAIN, N_VAL = 6, 3  # per class
SMALL = ["--no-feature-cache", "--k", "5", "--epochs", "1", "--batch-size", "8"]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
DENSE = ["dense.batch_size=4", "dense.progress=false", "dense.precision=fp32",
         "dense.threads=1", "dense.log_every=1", "dense.img_size=32", "dense.epochs=1",
         "dense.neck_dim=16", "dense.decoder_dim=16", "dense.box_head_dim=32"]  # fmt: skip
FINETUNE = ["--recipe", "configs/finetune/fmnist.yaml", "finetune.schedule.epochs=1",
            "finetune.batch_size=4", "finetune.progress=false", "finetune.precision=fp32",
            "finetune.threads=1"]  # fmt: skip


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


DIGESTS: dict[Path, str] = {}  # imported run -> its checkpoint's sha256 right after import


def _imported(release: Path, run: Path, overrides: list[str]) -> Path:
    assert main(["import", str(release), "--out", str(run), *overrides]) == 0
    DIGESTS[run] = _digest(run / "checkpoints" / "last.pt")
    return run


def _unchanged(run: Path) -> None:
    """The imported checkpoint is an input of every consumer: never rewritten."""
    assert _digest(run / "checkpoints" / "last.pt") == DIGESTS[run]


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("imported")
    release = base / RELEASE
    save_like_simmim(official_simmim_vit(shared=True, ls=True), release)
    return _imported(release, base / "simmim-vit", HEADS)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """train/ and val/, classes a and b, 6 + 3 RGB images each of 20x24 px; b is brighter."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        for c, cls in enumerate(CLASSES):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = (rng.integers(0, 100, (24, 20, 3)) + 120 * c).astype(np.uint8)
                Image.fromarray(pixels, "RGB").save(root / split / cls / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def scenes(tmp_path_factory) -> Path:
    if not any(FMNIST.glob("train*")):
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("scenes") / "s"
    argv = ["data", "scenes", "--out", str(out), "--num-train", "8", "--num-test", "4"]
    assert main([*argv, "--size", "32"]) == 0
    return out


def _result(folder: Path, protocol: str) -> dict:
    return json.loads((folder / f"{protocol}.json").read_text())


def _top1(result: dict, model: str = "pretrained") -> float:
    return next(r["top1"] for r in result["rows"] if r["model"] == model)


def test_the_import_is_a_simmim_run_of_the_releases_shape(imported):
    report = json.loads((imported / "import.json").read_text())
    assert report["format"] == "simmim-vit" and report["fresh"] == []
    cfg = yaml.safe_load((imported / "config.yaml").read_text())
    assert (cfg["backbone"]["in_chans"], cfg["backbone"]["img_size"]) == (3, IMG)
    assert cfg["backbone"]["rel_pos_bias"] == "shared"


def test_every_frozen_protocol_on_an_image_folder(imported, folder, capsys):
    protocols = ["knn", "linear", "attentive", "lora"]
    argv = ["eval", *protocols, "--checkpoint", str(imported), "--data", f"image_folder:{folder}"]
    assert main([*argv, *SMALL, "--baselines"]) == 0
    out = capsys.readouterr().out
    assert out.count("3 channels (gray images replicated)") == 1  # said once, RGB kept
    assert "simmim vit: image_folder test top-1 (%), 2 classes" in out
    for protocol in protocols:
        result = _result(imported / "eval", protocol)
        assert result["protocol"] == protocol
        assert (result["n_train"], result["n_test"]) == (2 * N_TRAIN, 2 * N_VAL)
        assert result["classes"] == CLASSES
        models = {r["model"] for r in result["rows"]}
        assert {"pretrained", "random init"} <= models, protocol
        assert all(0 <= r["top1"] <= 100 for r in result["rows"]), protocol
    assert "raw pixels" in {r["model"] for r in _result(imported / "eval", "knn")["rows"]}
    _unchanged(imported)


def test_an_rgb_release_reads_fashion_mnist_with_replicated_channels(imported, tmp_path, capsys):
    if not any(FMNIST.glob("train*")):
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    argv = ["eval", "knn", "--checkpoint", str(imported), "--data", f"fashion_mnist:{FMNIST}"]
    argv += ["--max-train", "40", "--max-test", "20", "--out", str(tmp_path), *SMALL]
    assert main(argv) == 0
    out = capsys.readouterr().out
    fitted = f"resized to the backbone's {IMG} px, 3 channels (gray images replicated)"
    assert out.count(fitted) == 1
    assert "fashion_mnist test top-1 (%), 10 classes" in out
    result = _result(tmp_path, "knn")
    assert (result["n_train"], result["n_test"]) == (40, 20)
    assert 0 <= _top1(result) <= 100
    _unchanged(imported)


def test_webdataset_shards_give_the_image_folders_knn_result(imported, folder, tmp_path, capsys):
    shards = tmp_path / "shards"
    for split in ("train", "val"):  # 12 and 6 images in shards of 5: 3 + 2 shards, shuffled
        argv = ["data", "shard", str(folder / split), f"{shards}/{split}-%06d.tar"]
        assert main([*argv, "--shard-size", "5"]) == 0
    assert (shards / "shards.json").is_file()
    base = ["eval", "knn", "--checkpoint", str(imported), *SMALL]
    specs = {
        "folder": f"image_folder:{folder}",
        "shards": f"webdataset:{shards}/train-{{000000..000002}}.tar",
    }
    results = {}
    for name, spec in specs.items():
        assert main([*base, "--data", spec, "--out", str(tmp_path / name)]) == 0
        results[name] = _result(tmp_path / name, "knn")
    out = capsys.readouterr().out
    assert "data webdataset:" in out and "webdataset test top-1" in out
    folder_run, shard_run = results["folder"], results["shards"]
    assert (shard_run["n_train"], shard_run["n_test"]) == (2 * N_TRAIN, 2 * N_VAL)
    assert shard_run["classes"] == folder_run["classes"] == CLASSES
    assert _top1(shard_run) == _top1(folder_run)  # the same images: the same neighbours
    _unchanged(imported)


def test_what_an_import_cannot_know_is_one_line(imported, folder, tmp_path, capsys):
    """The release names no data (the recipe's ImageNet root is a placeholder): each command
    that needs it says what to pass, in one line."""
    run = tmp_path / "run"  # a copy: the other tests' evaluations are not in its eval/
    shutil.copytree(imported, run, ignore=shutil.ignore_patterns("eval"))
    cases = {
        ("eval", "knn"): ("/path/to/imagenet", []),
        ("visualize",): ("/path/to/imagenet", ["--out", str(folder / "v.png")]),
    }
    for command, (words, extra) in cases.items():
        assert main([*command, "--checkpoint", str(run), *extra]) == 2, command
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err


def test_finetune_without_a_recipe_takes_the_papers(imported, folder, tmp_path, capsys):
    """The issue's `mimar eval finetune --checkpoint RUN --data image_folder:DIR`: with no
    --recipe, a run of another data set than Fashion-MNIST fine-tunes with its method's paper
    recipe (SimMIM ViT's §2.6 here), said in one line; keys still override it."""
    run = tmp_path / "run"
    shutil.copytree(imported, run, ignore=shutil.ignore_patterns("eval"))
    small = ["finetune.schedule.epochs=1", "finetune.schedule.batch_size=4",
             "finetune.img_size=16", "finetune.train.precision=fp32",
             "finetune.train.progress=false", "finetune.train.threads=1"]  # fmt: skip
    argv = ["eval", "finetune", "--checkpoint", str(run), "--data", f"image_folder:{folder}"]
    assert main([*argv, "--max-train", "8", "--max-test", "4", *small]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "fine-tune recipe" in line]
    assert len(said) == 1 and "simmim_vit_base_in1k.yaml (the simmim paper's" in said[0]
    cfg = yaml.safe_load((run / "eval" / "finetune" / "config.yaml").read_text())
    ft = cfg["finetune"]
    assert (ft["optim"]["layer_decay"], ft["mixup"], ft["drop_path"]) == (0.65, 0.8, 0.1)
    assert (ft["schedule"]["epochs"], ft["img_size"]) == (1, 16)  # the overrides won
    with pytest.raises(ConfigError, match="--recipe"):  # AIM's paper only probes
        default_recipe(DataConfig(name="image_folder"), ("aim", "vit"))


def test_finetune_then_robustness_on_an_image_folder(imported, folder, capsys):
    data = ["--data", f"image_folder:{folder}"]
    argv = ["eval", "finetune", "--checkpoint", str(imported), *FINETUNE, *data]
    # at twice the pretraining size: the relative position tables are resampled
    assert main([*argv, "--max-train", "8", "--max-test", "4", "finetune.img_size=32"]) == 0
    ft = imported / "eval" / "finetune"
    cfg = yaml.safe_load((ft / "config.yaml").read_text())
    assert (cfg["data"]["name"], cfg["data"]["root"]) == ("image_folder", str(folder))
    assert (cfg["data"]["in_chans"], cfg["num_classes"]) == (3, 2)
    assert (cfg["backbone"]["img_size"], cfg["backbone"]["rel_pos_bias"]) == (32, "per_block")
    table = "backbone.blocks.0.attn.rel_pos_bias.relative_position_bias_table"
    assert checkpoint.load(ft / "checkpoints" / "last.pt")["model"][table].shape == (228, 2)
    assert cfg["pretrained"] == str(imported) and cfg["method"] == "simmim"
    assert (ft / "checkpoints" / "last.pt").is_file()
    result = _result(imported / "eval", "finetune")
    assert result["rows"][0]["details"]["n_train"] == 8
    assert 0 <= _top1(result) <= 100
    argv = ["eval", "robustness", "--checkpoint", str(imported), "--max-test", "4", *data]
    assert main(argv) == 0
    robust = _result(imported / "eval", "robustness")
    assert robust["n_test"] == 4 and 0 <= _top1(robust) <= 100
    assert (imported / "eval" / "robustness.png").is_file()
    _unchanged(imported)


@pytest.mark.parametrize("task, score", [("segment", "miou"), ("detect", "ap")])
def test_dense_tasks(imported, scenes, task, score):
    argv = ["eval", task, "--checkpoint", str(imported), "--data", str(scenes), *DENSE]
    assert main(argv) == 0
    out = imported / "eval" / task
    for name in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", f"{task}.png"):
        assert (out / name).exists(), name
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["pretrained"] == str(imported) and cfg["backbone"]["in_chans"] == 3
    assert cfg["img_size"] == 32  # the backbone (16 px) resampled to the scenes' size
    result = _result(imported / "eval", task)
    assert 0 <= result[score] <= 100
    _unchanged(imported)


@pytest.fixture(scope="module")
def imported_itpn(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("itpn")
    release = base / "itpn_base_1600e.pt"
    save_like_official(official_itpn(), release)
    return _imported(release, base / "itpn", ["backbone.num_heads=2", "method.decoder_num_heads=2"])


@pytest.mark.parametrize(
    "neck, folder", [("pretrained", "segment"), ("scratch", "segment-scratch-neck")]
)
def test_segment_with_the_imported_itpn_neck(imported_itpn, scenes, neck, folder):
    argv = ["eval", "segment", "--checkpoint", str(imported_itpn), "--data", str(scenes)]
    assert main([*argv, "--neck", neck, *DENSE]) == 0
    cfg = yaml.safe_load((imported_itpn / "eval" / folder / "config.yaml").read_text())
    assert cfg["neck"] == neck and cfg["method"] == "itpn"
    assert cfg["img_size"] == IT_IMG
    result = _result(imported_itpn / "eval", "segment")
    assert result["neck"] == neck and 0 <= result["miou"] <= 100
    _unchanged(imported_itpn)


def test_export_to_its_release_format_and_to_timm(imported, tmp_path):
    from mimar.export import create_timm_model
    from mimar.formats.reading import read_release

    back = tmp_path / "back.pth"
    argv = ["export", "--checkpoint", str(imported), "--format", "simmim-vit", "--out", str(back)]
    assert main(argv) == 0
    original = read_release(imported.parent / RELEASE)[0]["model"]
    exported = read_release(back)[0]["model"]
    assert exported.keys() == original.keys()
    assert all(torch.equal(exported[k], v) for k, v in original.items())
    timm_file = tmp_path / "timm.safetensors"
    assert main(["export", "--checkpoint", str(imported), "--out", str(timm_file)]) == 0
    assert json.loads(timm_file.with_suffix(".json").read_text())["timm_model"].startswith("beit")
    x = torch.randn(2, 3, IMG, IMG)
    with torch.no_grad():
        want = mimar.load_backbone(imported)(x)["tokens"]
        assert (create_timm_model(timm_file).forward_features(x) - want).abs().max() < 1e-5
        assert (mimar.load_backbone(timm_file)(x)["tokens"] - want).abs().max() < 1e-5
    _unchanged(imported)


@pytest.mark.parametrize("spec", ["plain", "kind"])
def test_visualize(imported, folder, tmp_path, spec, capsys):
    data = str(folder) if spec == "plain" else f"image_folder:{folder}"
    out = tmp_path / "reconstruction.png"
    argv = ["visualize", "--checkpoint", str(imported), "--data", data, "--num", "4"]
    assert main([*argv, "--out", str(out)]) == 0
    assert ("data image_folder:" in capsys.readouterr().out) == (spec == "kind")
    with Image.open(out) as picture:
        assert picture.size[0] > 4 * IMG and picture.size[1] > 2 * IMG
    _unchanged(imported)


def test_visualize_an_imported_digpt_with_the_teacher_given(folder, tmp_path, capsys):
    """D-iGPT's picture compares with its teacher, which no release holds: the recipe's CLIP
    files are named in one line, and ``teacher.*`` words give another (here a mimar run of
    the release's teacher width)."""
    teacher = tmp_path / "teacher"
    argv = ["pretrain", DEMO, *TINY, f"backbone.embed_dim={DG_T}", "train.steps=1"]
    assert main([*argv, "--run-dir", str(teacher)]) == 0
    release = tmp_path / "digpt_base.pth"
    save_like_official(official_digpt(), release)
    words = ["backbone.num_heads=2", "method.decoder_heads=2", "data.num_workers=0"]
    run = _imported(release, tmp_path / "digpt", words)
    out = tmp_path / "digpt.png"
    argv = ["visualize", "--checkpoint", str(run), "--data", f"image_folder:{folder}"]
    argv += ["--num", "4", "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "teacher.checkpoint=" in err and len(err.splitlines()) == 1
    mimar_teacher = ["teacher.kind=mimar", f"teacher.path={teacher}", "teacher.img_size=0"]
    assert main([*argv, *mimar_teacher]) == 0
    assert out.is_file()
    assert main([*argv, "backbone.depth=3"]) == 2  # only the teacher can change
    assert "only teacher.* keys" in capsys.readouterr().err
    _unchanged(run)


EVA = [
    "data.name=synthetic", "data.synthetic_size=32", "data.batch_size=8", "data.img_size=16",
    "backbone.img_size=16", "backbone.embed_dim=32", "backbone.depth=2", "backbone.num_heads=2",
    "method.min_num_patches=2", "train.precision=fp32", "train.progress=false",
    "train.threads=1", "train.monitor_every=0", "train.checkpoint_every=0",
]  # fmt: skip


def test_an_imported_run_teaches_eva(imported, tmp_path, caplog):
    run = tmp_path / "eva"
    argv = ["pretrain", "configs/eva/vit_tiny_fmnist.yaml", *EVA, "train.steps=2"]
    with caplog.at_level("INFO", logger="mimar"):
        assert main([*argv, f"teacher.path={imported}", "--run-dir", str(run)]) == 0
    # the teacher: the imported RGB ViT at its own 16 px, 32-d features on its 4x4 grid
    assert "32-d features on a 4x4 grid at 16 px" in caplog.text
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    assert state["model"]["lm_head.weight"].shape == (32, 32)  # (teacher width, student width)
    _unchanged(imported)


def test_bench_takes_an_imported_teacher(imported, tmp_path):
    out = tmp_path / "bench"
    argv = ["bench", "quality", "--methods", "eva", "--teacher", str(imported), "--seeds", "1"]
    argv += ["--protocols", "knn", "--data", "synthetic", "--budget-images", "8"]
    argv += ["--calibration-steps", "2", "--out", str(out)]
    argv += ["--set", *[w for w in EVA if not w.startswith("train.")], "train.threads=1"]
    argv += ["train.precision=fp32"]
    assert main(argv) == 0
    cfg = yaml.safe_load((out / "runs" / "eva-seed0" / "config.yaml").read_text())
    assert cfg["teacher"] == cfg["teacher"] | {"kind": "mimar", "path": str(imported)}
    assert not (out / "runs" / "simmim-seed0").exists()  # no bench SimMIM run was needed
    report = json.loads((out / "report.json").read_text())
    assert 0 <= report["runs"]["eva-seed0"]["eval"]["knn"]["pretrained"] <= 100
    _unchanged(imported)
