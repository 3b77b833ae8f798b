"""Dense transfer (``mimar eval segment | detect``): pyramid shapes, the segmentation loss and
metric by hand, a detection step, exact resume, iTPN's neck switch, the GPU recipes, the CLI."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import DEMO, TINY

from mimar.cli import main
from mimar.config import load_config, to_dict
from mimar.dense.coco import DenseSet
from mimar.dense.config import load_dense_config
from mimar.dense.heads import IGNORE, segmentation_loss
from mimar.dense.loader import DenseStepLoader
from mimar.dense.metrics import BoxScore, SegmentationScore
from mimar.dense.model import build_dense_model
from mimar.dense.necks import DensePyramid
from mimar.downstream.config import engine_sections
from mimar.engine import checkpoint
from mimar.engine.logger import MetricsLog
from mimar.engine.loop import train_step
from mimar.engine.optim import build_optimizer, param_groups
from mimar.errors import ConfigError
from mimar.loading import method_backbone

ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path("/usr/share/datasets/fashion-mnist")
DENSE = ["dense.batch_size=4", "dense.progress=false", "dense.precision=fp32",
         "dense.threads=1", "dense.log_every=1", "dense.img_size=32", "dense.epochs=2",
         "dense.neck_dim=16", "dense.decoder_dim=16", "dense.box_head_dim=32"]  # fmt: skip
ITPN = ["backbone.img_size=16", "data.img_size=16", "backbone.embed_dim=48",
        "backbone.depth=1", "backbone.num_heads=2", "method.fpn_dim=16", "method.decoder_dim=32",
        "method.decoder_depth=1", "method.decoder_num_heads=2"]  # fmt: skip


def toy_set(n: int = 4, size: int = 32) -> DenseSet:
    """``n`` canvases with one bright square each: class 1 + i % 3, box the square."""
    images = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    semantic = torch.zeros(n, size, size, dtype=torch.uint8)
    boxes, classes = [], []
    for i in range(n):
        x, y, s = 2 + 3 * i % 12, 4 + 5 * i % 10, 10 + i % 5
        images[i, 0, y : y + s, x : x + s] = 200
        semantic[i, y : y + s, x : x + s] = 1 + i % 3
        boxes.append(torch.tensor([[x, y, x + s, y + s]], dtype=torch.float32))
        classes.append(torch.tensor([1 + i % 3]))
    return DenseSet(images, semantic, boxes, classes, ("a", "b", "c"), "toy")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("dense") / "run"
    assert main(["pretrain", DEMO, *TINY, "train.steps=3", "--run-dir", str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists() and not any(FMNIST.glob("train*")):
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("scenes") / "s"
    argv = ["data", "scenes", "--out", str(out), "--num-train", "8", "--num-test", "4"]
    assert main(argv) == 0
    return out


def _fresh(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    (copy / "checkpoints").mkdir(parents=True)
    (copy / "checkpoints" / "last.pt").write_bytes((run / "checkpoints" / "last.pt").read_bytes())
    return copy


def _curve(folder: Path) -> dict:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], "loss" in r): r.get("loss", r.get("test_miou")) for r in rows}


@pytest.mark.parametrize("size", [16, 32])
def test_vit_simple_feature_pyramid_has_strides_p4_p2_p_2p_at_any_size(size):
    cfg = load_config(ROOT / DEMO, [f"backbone.img_size={size}", f"data.img_size={size}"])
    backbone = method_backbone(cfg)  # patch 4, width 128
    pyramid = DensePyramid(backbone, out_dim=24)
    levels = pyramid(backbone, torch.randn(2, 1, size, size))
    assert list(levels) == ["p1", "p2", "p4", "p8"]
    for stride, level in zip((1, 2, 4, 8), levels.values()):
        assert level.shape == (2, 24, size // stride, size // stride)


def test_segmentation_loss_and_miou_by_hand():
    # 1 image, 2x2 pixels, 3 classes; pixel (1, 1) ignored
    target = torch.tensor([[[0, 1], [2, IGNORE]]])
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0, 0, 0] = 2.0  # pixel (0, 0): class 0 favoured
    loss = segmentation_loss(logits, target)
    # pixel (0,0): -log(e^2 / (e^2 + 2)); the other two counted pixels: -log(1/3)
    import math

    expected = (-math.log(math.e**2 / (math.e**2 + 2)) + 2 * math.log(3)) / 3
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    score = SegmentationScore(num_classes=3)
    pred = torch.tensor([[[0, 1], [1, 0]]])  # (1,1) is ignored whatever it predicts
    score.update(pred, target)
    res = score.compute()
    # class 0: TP 1, FP 0, FN 0 -> 1; class 1: TP 1, FP 1 (pixel (1,0)) -> 1/2; class 2: 0/1 -> 0
    assert res["miou"] == pytest.approx(100 * (1 + 0.5 + 0) / 3)
    assert res["pixel_accuracy"] == pytest.approx(100 * 2 / 3)
    # a class absent from truth and prediction does not count
    score = SegmentationScore(num_classes=4)
    score.update(pred, target)
    assert score.compute()["miou"] == pytest.approx(100 * 1.5 / 3)


def test_box_ap_is_100_for_exact_boxes_and_0_for_wrong_classes():
    target = [{"boxes": torch.tensor([[2.0, 2.0, 12.0, 12.0]]), "labels": torch.tensor([1])}]
    exact = [
        {"boxes": target[0]["boxes"], "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
    ]
    wrong = [{**exact[0], "labels": torch.tensor([2])}]
    for dets, ap in ((exact, 100.0), (wrong, 0.0)):
        score = BoxScore()
        score.update(dets, target)
        assert score.compute()["ap"] == pytest.approx(ap)


def test_a_detection_step_on_two_canvases_is_finite_and_learns():
    cfg = load_config(ROOT / DEMO, ["backbone.img_size=32", "data.img_size=32"])
    dense = load_dense_config("detect", None, ["dense.neck_dim=16", "dense.box_head_dim=32"])
    torch.manual_seed(0)
    model = build_dense_model(cfg, None, "detect", dense, 4, img_size=32)
    loader = DenseStepLoader(toy_set(2), "detect", batch_size=2, mean=(0.3,), std=(0.3,),
                             hflip=True, seed=0)  # fmt: skip
    train, optim = engine_sections(dense, loader.steps_per_epoch)
    optimizer = build_optimizer(model, optim, 1e-3)
    cpu = torch.device("cpu")
    first = train_step(model, model, optimizer, loader, train, None, 0, 1e-3, cpu)
    assert set(first) >= {"loss", "loss_objectness", "loss_rpn_box_reg", "loss_classifier"}
    assert all(torch.isfinite(v) for v in first.values())
    for step in range(1, 10):
        out = train_step(model, model, optimizer, loader, train, None, step, 1e-3, cpu)
    assert out["loss"] < first["loss"]
    model.eval()
    detections = model.predict(torch.randn(2, 1, 32, 32))
    assert len(detections) == 2 and detections[0]["boxes"].shape[-1] == 4


def test_flips_mirror_images_labels_and_boxes_together():
    data = toy_set(4)
    loader = DenseStepLoader(data, "detect", batch_size=4, mean=(0.0,), std=(1.0,),
                             hflip=True, seed=3)  # fmt: skip
    seg = DenseStepLoader(data, "segment", batch_size=4, mean=(0.0,), std=(1.0,),
                          hflip=True, seed=3)  # fmt: skip
    for step in range(3):
        det, lab = loader.inputs(step), seg.inputs(step)
        assert torch.equal(det["images"], lab["images"])
        for image, semantic, box in zip(det["images"], lab["semantic"], det["boxes"][:, 0]):
            x1, y1, x2, y2 = box.long().tolist()
            inside = torch.zeros_like(semantic, dtype=torch.bool)
            inside[y1:y2, x1:x2] = True
            assert torch.equal(semantic > 0, inside)  # the box is the (flipped) square
            assert torch.equal(image[0] > 0.5, inside)
    flips = torch.cat([loader.flips(step) for step in range(3)])
    assert flips.any() and not flips.all()


def test_layer_decay_puts_the_neck_and_head_at_the_top_id():
    cfg = load_config(ROOT / DEMO)
    dense = load_dense_config("segment", None, ["dense.neck_dim=16", "dense.decoder_dim=16"])
    model = build_dense_model(cfg, None, "segment", dense, 11, img_size=32)
    groups = param_groups(model, 0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["neck.fpn.scales.1.weight"] == scale["head.classifier.weight"] == 1.0
    assert scale["backbone.blocks.5.mlp.fc1.weight"] == 0.5
    assert scale["backbone.patch_embed.proj.weight"] == 0.5**7


def _itpn_state(seed: int = 1):
    cfg = load_config(ROOT / "configs/itpn/hivit_tiny_fmnist.yaml", ITPN)
    torch.manual_seed(seed)
    backbone = method_backbone(cfg)
    return cfg, {f"backbone.{k}": v.clone() for k, v in backbone.state_dict().items()}


def test_neck_scratch_reinitialises_exactly_the_itpn_neck():
    cfg, state = _itpn_state()
    dense = load_dense_config("segment", None, ["dense.decoder_dim=16"])
    built = {}
    variants = [("pretrained", state, "pretrained"), ("scratch-neck", state, "scratch"),
                ("random", None, "pretrained")]  # fmt: skip
    for name, weights, neck in variants:
        torch.manual_seed(0)
        model = build_dense_model(cfg, weights, "segment", dense, 11, img_size=32, neck=neck)
        built[name] = {k: v for k, v in model.state_dict().items() if k.startswith("backbone.")}
    neck_keys = [k for k in built["pretrained"] if k.startswith("backbone.neck.")]
    trunk_keys = [k for k in built["pretrained"] if k.startswith("backbone.trunk.")]
    assert neck_keys and trunk_keys
    for k in trunk_keys:  # the trunk stays pretrained
        assert torch.equal(built["scratch-neck"][k], state[k]), k
    for k in neck_keys:  # the neck is the fresh draw of a model built from scratch
        assert torch.equal(built["pretrained"][k], state[k]), k
        assert torch.equal(built["scratch-neck"][k], built["random"][k]), k
    assert any(not torch.equal(built["scratch-neck"][k], state[k]) for k in neck_keys)


def test_neck_scratch_without_a_pretrained_neck_is_refused(run, tmp_path, capsys):
    code = main(["eval", "segment", "--checkpoint", str(run), "--neck", "scratch", *DENSE])
    assert code == 2
    assert "no pretrained pyramid neck" in capsys.readouterr().err


def test_segment_cli_leaves_the_run_folder_json_and_picture(run, scenes, tmp_path):
    copy = _fresh(run, tmp_path)
    argv = ["eval", "segment", "--checkpoint", str(copy), "--data", str(scenes), "--baselines"]
    assert main([*argv, *DENSE]) == 0
    for folder in ("segment", "segment-scratch"):
        for name in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt", "segment.png"):
            assert (copy / "eval" / folder / name).exists(), f"{folder}/{name}"
    result = json.loads((copy / "eval" / "segment.json").read_text())
    assert [r["model"] for r in result["rows"]] == ["random init", "pretrained"]
    assert 0 <= result["miou"] <= 100 and 0 <= result["scratch_miou"] <= 100
    assert result["miou"] == result["rows"][1]["details"]["miou"]
    # the same finished runs are not retrained
    assert main([*argv, *DENSE]) == 0


def test_detect_cli_with_the_coco_format_prefix(run, scenes, tmp_path):
    copy = _fresh(run, tmp_path)
    argv = ["eval", "detect", "--checkpoint", str(copy), "--data", f"coco-format:{scenes}"]
    assert main([*argv, *DENSE, "dense.epochs=1"]) == 0
    result = json.loads((copy / "eval" / "detect.json").read_text())
    assert {"ap", "ap50", "ap75"} <= set(result)
    assert (copy / "eval" / "detect" / "detect.png").exists()


def test_missing_scenes_say_how_to_build_them(run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "segment", "--checkpoint", str(run), *DENSE]) == 2
    err = capsys.readouterr().err
    assert "mimar data scenes --out data/fmnist-scenes" in err and len(err.splitlines()) == 1


def test_resume_continues_a_dense_finetune_exactly(run, scenes, tmp_path, monkeypatch):
    full, cut = _fresh(run, tmp_path / "a"), _fresh(run, tmp_path / "b")
    argv = ["eval", "segment", "--data", str(scenes), *DENSE, "dense.drop_path=0.2"]
    assert main([*argv, "--checkpoint", str(full)]) == 0
    write = MetricsLog.write

    def write_then_signal(self, row):
        write(self, row)
        if row.get("step") == 3 and "loss" in row:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLog, "write", write_then_signal)
    assert main([*argv, "--checkpoint", str(cut)]) == 128 + signal.SIGTERM  # stopped: not done
    assert checkpoint.load(cut / "eval/segment/checkpoints/last.pt")["step"] == 3
    monkeypatch.setattr(MetricsLog, "write", write)
    assert main([*argv, "--checkpoint", str(cut), "--resume"]) == 0
    assert _curve(cut / "eval/segment") == _curve(full / "eval/segment")
    a, b = (checkpoint.load(f / "eval/segment/checkpoints/last.pt")["model"] for f in (full, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _torchrun(*argv: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--standalone", "-m", "mimar.cli", *argv]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_two_process_dense_finetune_equals_one_process(run, scenes, tmp_path):
    one, two = _fresh(run, tmp_path / "a"), _fresh(run, tmp_path / "b")
    extra = ["--data", str(scenes), *DENSE, "dense.drop_path=0.2", "dense.epochs=1"]
    assert main(["eval", "segment", "--checkpoint", str(one), *extra]) == 0
    _torchrun("eval", "segment", "--checkpoint", str(two), *extra)
    a, b = (_rows(f / "eval/segment") for f in (one, two))
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) == 3
    for ra, rb in zip(a, b):  # same rows, flips and drop-path draws; the all-reduce's order
        key = "loss" if "loss" in ra else "test_miou"
        assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-5), (ra["step"], key)
    # detection trains under torchrun too (not bit-equal to 1 process: torchvision's RPN and
    # RoI samplers draw from each process's global RNG)
    _torchrun("eval", "detect", "--checkpoint", str(two), *extra)
    assert all(
        torch.isfinite(torch.tensor(r["loss"])) for r in _rows(two / "eval/detect") if "loss" in r
    )


def _rows(folder: Path) -> list[dict]:
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "dense").glob("*.yaml")))
def test_every_dense_recipe_loads_for_both_tasks(path):
    for task in ("segment", "detect"):
        assert load_dense_config(task, path, ["dense.schedule.epochs=2"]).schedule.epochs == 2
        assert load_dense_config(task, path, ["dense.epochs=2"]).schedule.epochs == 2  # old key
    with pytest.raises(ConfigError, match="dense.epoch"):  # a misspelt key, with a close match
        load_dense_config("segment", path, ["dense.epoch=2"])


GPU_RECIPES = {
    "upernet_vit_base": ("segment", "configs/simmim/vit_base_in1k.yaml"),
    "faster_rcnn_vit_base": ("detect", "configs/simmim/vit_base_in1k.yaml"),
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(GPU_RECIPES))
def test_gpu_recipe_builds_and_runs_a_step_at_batch_2(recipe):
    """The paper recipe's model (ViT-B, its pyramid and head widths) trains one step at batch
    2 on synthetic canvases; only the image size is cut (64 px) to keep it a CPU test."""
    task, pretrain = GPU_RECIPES[recipe]
    cfg = load_config(ROOT / pretrain)
    dense = load_dense_config(task, ROOT / f"configs/dense/{recipe}.yaml", ["dense.batch_size=2"])
    torch.manual_seed(0)
    model = build_dense_model(cfg, None, task, dense, 151, img_size=64)
    data = toy_set(2, size=64)
    data = DenseSet(data.images.expand(-1, 3, -1, -1).contiguous(), data.semantic, data.boxes,
                    data.classes, data.class_names, "toy")  # fmt: skip
    loader = DenseStepLoader(data, task, batch_size=2, mean=(0.5,) * 3, std=(0.25,) * 3,
                             hflip=dense.hflip, seed=0)  # fmt: skip
    train, optim = engine_sections(dense, loader.steps_per_epoch)
    optimizer = build_optimizer(model, optim, optim.lr)  # the peak lr of the schedule
    out = train_step(model, model, optimizer, loader, train, optim.clip_grad, 0, optim.lr,
                     torch.device("cpu"))  # fmt: skip
    assert torch.isfinite(out["loss"])
    assert to_dict(dense)["img_size"] in (512, 1024)  # the recipe's own resolution is kept
