"""``mimar eval finetune`` end to end on tiny runs: the run folder, exact resume, 2 processes =
1 process, learning on a separable set, the loss of a mixed batch by hand, the recipes."""

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
from mimar.data.supervised import SupervisedAugment, SupervisedAugmentConfig
from mimar.engine import checkpoint
from mimar.engine.logger import MetricsLog
from mimar.finetune.classifier import Classifier
from mimar.loading import method_backbone

ROOT = Path(__file__).resolve().parents[1]
FMNIST = "configs/finetune/fmnist.yaml"
# synthetic labelled data (4 classes) for the fine-tune, small and quick
FT = [
    "--recipe", FMNIST,
    "finetune.batch_size=16", "finetune.progress=false", "finetune.precision=fp32",
    "finetune.threads=1", "finetune.log_every=1",
]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("ft") / "run"
    argv = ["pretrain", DEMO, *TINY, "data.synthetic_size=128", "train.steps=3"]
    assert main([*argv, "--run-dir", str(path)]) == 0
    return path


def _ft(run_dir: Path, *extra: str, resume: bool = False) -> int:
    argv = ["eval", "finetune", "--checkpoint", str(run_dir), *FT, *extra]
    return main(argv + (["--resume"] if resume else []))


def _curve(folder: Path) -> dict:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return {(r["step"], "loss" in r): r.get("loss", r.get("test_top1")) for r in rows}


def _fresh(run: Path, tmp_path: Path) -> Path:
    """A copy of the pretraining run without any fine-tune of its own."""
    copy = tmp_path / "run"
    (copy / "checkpoints").mkdir(parents=True)
    (copy / "checkpoints" / "last.pt").write_bytes((run / "checkpoints" / "last.pt").read_bytes())
    return copy


def test_finetune_leaves_its_run_folder_and_the_json(run, tmp_path):
    copy = _fresh(run, tmp_path)
    assert _ft(copy, "finetune.epochs=2", "--baselines") == 0
    for scratch in ("finetune", "finetune-scratch"):
        folder = copy / "eval" / scratch
        for name in ("config.yaml", "metrics.jsonl", "checkpoints/last.pt"):
            assert (folder / name).exists(), f"{scratch}/{name}"
        rows = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        assert {"loss", "lr", "images_per_s"} <= set(rows[0])
        assert [r["epoch"] for r in rows if "test_top1" in r] == [1.0, 2.0]  # per epoch
    result = json.loads((copy / "eval" / "finetune.json").read_text())
    names = [r["model"] for r in result["rows"]]
    assert names == ["random init", "pretrained"]
    final = result["rows"][1]["details"]
    assert final["top1"] == final["curve"][-1]["top1"]  # the headline is the final epoch
    # a finished fine-tune is not overwritten without --resume
    assert _ft(copy, "finetune.epochs=2") == 2


def test_resume_continues_a_finetune_exactly(run, tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    for folder in (full, cut):
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "last.pt").write_bytes((run / "checkpoints/last.pt").read_bytes())
    extra = ("finetune.epochs=2", "finetune.mixup=0.8", "finetune.cutmix=1.0",
             "finetune.reprob=0.25", "finetune.rand_augment=rand-m9-mstd0.5-inc1",
             "finetune.model_ema=true", "finetune.model_ema_decay=0.9")  # fmt: skip
    assert _ft(full, *extra) == 0
    write = MetricsLog.write

    def write_then_signal(self, row):
        write(self, row)
        if row.get("step") == 5 and "loss" in row:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLog, "write", write_then_signal)
    assert _ft(cut, *extra) == 128 + signal.SIGTERM  # stopped: not done, nothing written
    assert not (cut / "eval" / "finetune.json").exists()
    assert checkpoint.load(cut / "eval/finetune/checkpoints/last.pt")["step"] == 5
    monkeypatch.setattr(MetricsLog, "write", write)
    assert _ft(cut, *extra, resume=True) == 0
    assert _curve(cut / "eval/finetune") == _curve(full / "eval/finetune")  # exact on CPU
    a, b = (checkpoint.load(f / "eval/finetune/checkpoints/last.pt")["model"] for f in (full, cut))
    assert any(k.startswith("ema.module.") for k in a)  # the weight average is carried too
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_process_finetune_equals_one_process(run, tmp_path):
    one, two = _fresh(run, tmp_path / "a"), _fresh(run, tmp_path / "b")
    # Mixup/CutMix partners and lambdas, drop-path masks: drawn for the global batch per step
    extra = [
        "finetune.epochs=1",
        "finetune.mixup=0.8",
        "finetune.cutmix=1.0",
        "finetune.drop_path=0.3",
    ]
    assert _ft(one, *extra) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--standalone", "-m", "mimar.cli", "eval", "finetune", "--checkpoint", str(two),
           *FT, *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    a, b = _curve(one / "eval/finetune"), _curve(two / "eval/finetune")
    assert sorted(a) == sorted(b) and len(a) > 4
    for key in a:  # same rows, partners and draws; only the all-reduce's float order differs
        assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), key


def test_finetune_learns_a_separable_synthetic_set(run, tmp_path):
    copy = _fresh(run, tmp_path)
    extra = ("finetune.epochs=50", "finetune.lr=5e-3", "finetune.warmup_epochs=2",
             "finetune.layer_decay=1.0", "finetune.drop_path=0", "finetune.clip_grad=5.0",
             "finetune.label_smoothing=0.1")  # fmt: skip
    assert _ft(copy, *extra) == 0
    result = json.loads((copy / "eval" / "finetune.json").read_text())
    assert result["rows"][0]["top1"] >= 95.0  # 4 well-separated classes (chance 25); 100 seen


def test_classifier_loss_of_a_mixed_batch_is_the_hand_computed_soft_cross_entropy():
    torch.manual_seed(0)
    from helpers import images, tiny_vit

    model = Classifier(tiny_vit(final_norm=False), num_classes=4).eval()
    aug = SupervisedAugment(
        SupervisedAugmentConfig(mixup=0.8, label_smoothing=0.1), 4, (0.5,), (0.25,)
    )
    draws = aug.sample(4, torch.Generator().manual_seed(3))
    assert draws["mix"] and not draws["cutmix"] and 0 < draws["lam"] < 1
    pixels = (images(4, size=16) * 0.1 + 0.5).clamp(0, 1)
    labels = torch.tensor([0, 1, 2, 3])
    x, targets = aug.apply(pixels, labels, draws, slice(0, 4))
    lam, off = draws["lam"], 0.1 / 4
    smooth = torch.full((4, 4), off) + torch.eye(4) * (1 - 0.1)
    want_t = lam * smooth + (1 - lam) * smooth.flip(0)  # row i mixes with row 3 - i
    torch.testing.assert_close(targets, want_t)
    logits = model.logits(x).float()
    want = -(want_t * torch.log_softmax(logits, -1)).sum(-1).mean()
    torch.testing.assert_close(model(x, targets)["loss"], want)


def test_weight_average_is_timm_model_ema_by_hand_and_is_the_result():
    from helpers import tiny_vit

    from mimar.finetune.run import classifier_from_state

    torch.manual_seed(0)
    model = Classifier(tiny_vit(final_norm=False), num_classes=4)
    model.attach_ema(0.9)
    assert not any(p.requires_grad for p in model.ema.parameters())
    head = model.head.weight
    with torch.no_grad():
        head.fill_(1.0)
        model.after_step(1)  # the first update copies
        torch.testing.assert_close(model.final().head.weight, head)
        head.fill_(3.0)
        model.after_step(2)  # then ema = 0.9 * ema + 0.1 * weights
        torch.testing.assert_close(model.final().head.weight, torch.full_like(head, 1.2))
    assert model.final() is model.ema.module and model.final().ema is None
    cfg = {"backbone": to_dict(model.backbone.cfg), "num_classes": 4,
           "finetune": {"pool": "avg", "model_ema": True, "model_ema_decay": 0.9}}  # fmt: skip
    loaded = classifier_from_state({"model": model.state_dict(), "config": cfg})
    torch.testing.assert_close(loaded.head.weight, torch.full_like(head, 1.2))  # the average


def test_robustness_without_a_finetune_is_one_clear_line(run, tmp_path, capsys):
    copy = _fresh(run, tmp_path)
    assert main(["eval", "robustness", "--checkpoint", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mimar eval finetune --checkpoint" in err[0]


def test_out_takes_the_finetune_and_robustness_reads_it_there(run, tmp_path):
    """``mimar eval ... --out DIR`` (a read-only run): the fine-tune's own run folder and its
    JSON go under DIR, robustness reads the fine-tune from there, and the run folder gains
    nothing."""
    copy, out = _fresh(run, tmp_path), tmp_path / "results"
    before = sorted(p.relative_to(copy) for p in copy.rglob("*"))
    small = ["finetune.epochs=1", "--max-train", "32", "--max-test", "16"]
    assert _ft(copy, *small, "--out", str(out)) == 0
    assert (out / "finetune" / "checkpoints" / "last.pt").is_file()
    assert json.loads((out / "finetune.json").read_text())["rows"][0]["protocol"] == "finetune"
    argv = ["eval", "robustness", "--checkpoint", str(copy), "--max-test", "8", "--out", str(out)]
    assert main(argv) == 0
    assert json.loads((out / "robustness.json").read_text())["n_test"] == 8
    assert sorted(p.relative_to(copy) for p in copy.rglob("*")) == before


PAPER = {
    "simmim_vit_base_in1k": "configs/simmim/vit_base_in1k.yaml",
    "simmim_swin_base_in1k": "configs/simmim/swin_base_in1k.yaml",
    "eva_vit_base_in1k": "configs/eva/vit_base_clip_l14_in1k.yaml",
    "itpn_base_in1k": "configs/itpn/hivit_base_in1k.yaml",
    "digpt_vit_base_in1k": "configs/digpt/vit_base_clip_in1k.yaml",
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(PAPER))
def test_paper_recipe_builds_and_runs_a_step_at_paper_resolution(recipe, tmp_path):
    """A pretraining run of the paper backbone (weights only: no teacher files needed) is
    fine-tuned for one step at batch 2 on synthetic images at the recipe's resolution."""
    cfg = load_config(ROOT / PAPER[recipe])
    torch.manual_seed(0)
    backbone = method_backbone(cfg)
    state = {"model": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}
    state |= {"config": to_dict(cfg), "step": 0}
    checkpoint.save_atomic(state, tmp_path / "run" / "checkpoints" / "last.pt")
    argv = ["eval", "finetune", "--checkpoint", str(tmp_path / "run"),
            "--recipe", f"configs/finetune/{recipe}.yaml", "data.name=synthetic",
            "data.synthetic_size=2", "data.synthetic_classes=2", "finetune.batch_size=2",
            "finetune.epochs=1", "finetune.progress=false", "finetune.threads=2"]  # fmt: skip
    assert main(argv) == 0
    rows = (tmp_path / "run/eval/finetune/metrics.jsonl").read_text().splitlines()
    assert torch.isfinite(torch.tensor(json.loads(rows[0])["loss"]))


def test_an_exported_backbone_fine_tunes_too(run, tmp_path):
    exported = tmp_path / "vit.safetensors"
    assert main(["export", "--checkpoint", str(run), "--out", str(exported)]) == 0
    argv = ["eval", "finetune", "--checkpoint", str(exported), *FT, "finetune.epochs=1",
            "data.name=synthetic", "data.synthetic_size=64"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads((tmp_path / "eval" / "finetune.json").read_text())  # beside the file
    assert result["rows"][0]["details"]["curve"]  # one epoch scored
    assert (tmp_path / "eval" / "finetune" / "checkpoints" / "last.pt").exists()
