import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import DEMO, TINY, loss_ends, losses, tiny_vit
from torch._subclasses.fake_tensor import FakeTensor

from mimar.cli import main
from mimar.engine import checkpoint
from mimar.engine.logger import MetricsLog
from mimar.engine.optim import lr_at, param_groups
from mimar.methods.simmim import SimMIM

ROOT = Path(__file__).resolve().parents[1]


def pretrain(run_dir, *extra, resume=False):
    argv = ["pretrain", DEMO, *TINY, *extra, "--run-dir", str(run_dir)]
    return main(argv + (["--resume"] if resume else []))


def test_pretrain_leaves_the_whole_run_folder(tmp_path):
    run = tmp_path / "run"
    assert pretrain(run, "train.steps=20") == 0
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "checkpoints/last.pt",
        "checkpoints/step_0000005.pt",
        "reconstruction.png",
    ):
        assert (run / name).exists(), name
    rows = losses(run)
    assert sorted(rows) == list(range(1, 21))  # log_every defaults to 1
    first, last = loss_ends(run, 3)
    assert last < first
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    assert state["step"] == 20 and "optimizer" in state and state["config"]["train"]["steps"] == 20
    # refuses to overwrite a finished run without --resume
    assert pretrain(run, "train.steps=20") == 2


def test_resume_after_signal_logs_the_same_losses(tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert pretrain(full, "train.steps=12") == 0
    write = MetricsLog.write

    def write_then_signal(self, row):
        write(self, row)
        if row["step"] == 6:
            os.kill(os.getpid(), signal.SIGTERM)  # the real handler path

    monkeypatch.setattr(MetricsLog, "write", write_then_signal)
    assert pretrain(cut, "train.steps=12") == 128 + signal.SIGTERM  # saved, but not finished
    assert checkpoint.load(cut / "checkpoints" / "last.pt")["step"] == 6
    monkeypatch.setattr(MetricsLog, "write", write)
    assert pretrain(cut, "train.steps=12", resume=True) == 0
    assert losses(cut) == losses(full)  # exact equality on CPU


def test_sigterm_saves_a_checkpoint_and_exits_143(tmp_path):
    run = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "mimar.cli",
        "pretrain",
        DEMO,
        *TINY,
        "train.steps=100000",
        "--run-dir",
        str(run),
    ]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text()) > 0):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out  # 128 + SIGTERM, as a killed process: not finished
    assert "stopped by SIGTERM" in out and "Traceback" not in out
    step = checkpoint.load(run / "checkpoints" / "last.pt")["step"]
    assert 1 <= step < 100000 and max(losses(run)) == step


@pytest.mark.parametrize("log_every", [1, 4])
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path, monkeypatch, capsys, log_every
):
    """The host reads the loss only every log_every steps (and before each checkpoint): with 4
    the NaN of step 7 is found at step 8 and still named as step 7; nothing after it is saved."""
    forward, calls = SimMIM.forward, {"n": 0}

    def poisoned(self, images, **corruption):
        out = forward(self, images, **corruption)
        calls["n"] += not isinstance(images, FakeTensor)  # not the monitor's FLOP count
        if calls["n"] == 7:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(SimMIM, "forward", poisoned)
    run = tmp_path / "run"
    assert pretrain(run, "train.steps=20", f"train.log_every={log_every}") == 3
    assert "loss is nan at step 7" in capsys.readouterr().err
    assert checkpoint.load(run / "checkpoints" / "last.pt")["step"] == 5
    assert max(losses(run)) == {1: 6, 4: 5}[log_every]  # logged: 1..6, or 4 and 5 (a save)


# AIM with a fixed prefix length and no crop/flip jitter: nothing random depends on how a
# step's images are split into micro-batches (SimMIM's masks would: each micro-batch draws
# its own). Every image has the same number of loss targets, so the mean of the two
# micro-batch losses is the big batch's loss, and the summed gradients are its gradient.
ACCUM = [
    *[o for o in TINY if not o.startswith("method.")],
    "data.synthetic_size=64",
    "data.scale=[1.0,1.0]",
    "data.ratio=[1.0,1.0]",
    "data.hflip=0",
    "method.head_width=32",
    "method.head_depth=2",
    "method.prefix_min=5",
    "method.prefix_max=5",
    "optim.warmup_steps=0",
    "optim.clip_grad=1.0",  # so that the pre-clip gradient norm is logged
    "train.steps=2",
    "train.checkpoint_every=1",
]


def test_accumulation_matches_one_big_batch(tmp_path):
    big, acc = tmp_path / "big", tmp_path / "acc"
    recipe = "configs/aim/vit_tiny_fmnist.yaml"
    split = ["data.batch_size=8", "train.accum_steps=2"]  # 2 micro-batches of 8 per step
    for run, extra in ((big, ["data.batch_size=16"]), (acc, split)):
        assert main(["pretrain", recipe, *ACCUM, *extra, "--run-dir", str(run)]) == 0
    rows = {}
    for run in (big, acc):
        lines = (run / "metrics.jsonl").read_text().splitlines()
        rows[run] = {r["step"]: r for r in map(json.loads, lines)}
    for step in (1, 2):
        a, b = rows[big][step], rows[acc][step]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6), step
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5), step
        assert b["lr"] == a["lr"]  # the lr is scaled by the same global batch of 16
    assert rows[big][2]["loss"] != pytest.approx(rows[big][1]["loss"], rel=1e-3)
    # AdamW's first steps move a weight by about lr * g / (|g| + eps): a gradient within
    # rounding of eps = 1e-8 can shift its weight by a fraction of lr (seen: 4e-6 at lr 1e-3,
    # one weight), so the weights agree to 1 % of lr while each step moves them by ~lr.
    lr = rows[big][1]["lr"]
    for name in ("step_0000001.pt", "last.pt"):
        a = checkpoint.load(big / "checkpoints" / name)
        b = checkpoint.load(acc / "checkpoints" / name)
        assert a["step"] == b["step"] and a["model"].keys() == b["model"].keys()
        for key, value in a["model"].items():
            torch.testing.assert_close(b["model"][key], value, rtol=0, atol=1e-2 * lr, msg=key)
    one = checkpoint.load(big / "checkpoints" / "step_0000001.pt")["model"]
    two = checkpoint.load(big / "checkpoints" / "last.pt")["model"]
    moved = torch.cat(
        [(two[k] - one[k]).abs().flatten() for k in one if two[k].is_floating_point()]
    )
    assert moved.median() > 0.1 * lr  # the second step moved most weights: not vacuous


def test_lr_schedule_edges():
    peak, total, warm = 1.0, 100, 10
    assert lr_at(0, peak, total, warm) == pytest.approx(0.1)
    assert lr_at(9, peak, total, warm) == pytest.approx(1.0)
    assert lr_at(10, peak, total, warm) == pytest.approx(1.0)
    assert lr_at(55, peak, total, warm) == pytest.approx(0.5)
    assert lr_at(100, peak, total, warm, min_ratio=0.1) == pytest.approx(0.1)


def test_param_groups_skip_decay_for_norms_biases_and_tokens():
    from mimar.methods.simmim import SimMIMConfig

    vit = tiny_vit(use_mask_token=True)
    groups = param_groups(SimMIM(SimMIMConfig(mask_patch_size=8), vit), 0.05)
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    assert {
        "backbone.pos_embed",
        "backbone.cls_token",
        "backbone.mask_token",
        "backbone.norm.weight",
        "backbone.blocks.0.attn.qkv.bias",
        "head.conv.bias",
    } <= no_decay
    assert {
        "backbone.blocks.0.attn.qkv.weight",
        "head.conv.weight",
        "backbone.patch_embed.proj.weight",
    } <= decay
    # layer decay: block 0 of 2 gets decay^(L + 1 - 1) = decay^2
    groups = param_groups(SimMIM(SimMIMConfig(mask_patch_size=8), vit), 0.05, layer_decay=0.5)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert scale["backbone.blocks.0.mlp.fc1.weight"] == 0.25
    assert scale["backbone.patch_embed.proj.weight"] == 0.125
    assert scale["head.conv.weight"] == 1.0


@pytest.mark.dist
def test_two_process_ddp_matches_one_process(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    common = [DEMO, *TINY, "train.steps=4"]
    assert pretrain(one, "train.steps=4") == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--standalone",
        "-m",
        "mimar.cli",
        "pretrain",
        *common,
        "--run-dir",
        str(two),
    ]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    # Same global batch, images, augmentation and masks on both sides; only the order of
    # floating-point sums differs (gradient all-reduce): fp32 rounding, ~1e-7 (measured
    # 1.2e-7 over 4 steps), which Adam's per-element normalisation can grow a little.
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6)
    assert torch.equal(torch.tensor(a[1]), torch.tensor(b[1])) or abs(a[1] - b[1]) < 1e-5


def test_grad_checkpointing_run_logs_the_same_losses(tmp_path):
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    assert pretrain(plain, "train.steps=4", "backbone.drop_path_rate=0.2") == 0
    assert pretrain(ckpt, "train.steps=4", "backbone.drop_path_rate=0.2",
                    "train.grad_checkpointing=true") == 0  # fmt: skip
    a, b = losses(plain), losses(ckpt)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(b[s] == pytest.approx(a[s], rel=1e-5) for s in a)


def test_compile_without_a_cpp_compiler_is_one_clear_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CXX", "no-such-compiler-here")
    assert pretrain(tmp_path / "run", "train.steps=2", "train.compile=true") != 0
    assert "train.compile on a CPU needs a C++ compiler" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None, reason="no C++ compiler")
def test_compiled_run_logs_the_eager_losses_and_its_compile_time(tmp_path, caplog):
    """train.compile=true: torch.compile (inductor, a C++ compiler on CPU) of the same step;
    fused kernels sum in another order, hence the tolerance. fp32: bf16 rounding would hide
    a wrong graph behind its own noise."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    assert pretrain(eager, "train.steps=3", "train.precision=fp32") == 0
    with caplog.at_level("INFO", logger="mimar"):
        assert pretrain(compiled, "train.steps=3", "train.precision=fp32",
                        "train.compile=true") == 0  # fmt: skip
    a, b = losses(eager), losses(compiled)
    assert sorted(a) == sorted(b) == [1, 2, 3]
    assert all(b[s] == pytest.approx(a[s], rel=1e-4) for s in a)
    assert "train.compile: the first step took" in caplog.text


@pytest.mark.parametrize("implementation", ["foreach", "fused"])
def test_adamw_implementations_log_the_for_loop_losses(tmp_path, implementation):
    a, b = tmp_path / "loop", tmp_path / implementation
    assert pretrain(a, "train.steps=4", "optim.implementation=for-loop") == 0
    assert pretrain(b, "train.steps=4", f"optim.implementation={implementation}") == 0
    la, lb = losses(a), losses(b)
    assert all(lb[s] == pytest.approx(la[s], rel=1e-5) for s in la) and len(la) == 4
