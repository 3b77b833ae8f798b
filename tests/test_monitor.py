"""The online monitor (mimar/monitor/): RankMe, the collapse warning, online kNN = mimar eval
knn, exact resume and 1 process = 2 processes with it on, FLOPs, MFU peaks, data wait."""

import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import DEMO, TINY, losses
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mimar.cli import main
from mimar.data import load_images
from mimar.monitor import efficiency, health, probe
from mimar.monitor.plot import read_rows

ROOT = Path(__file__).resolve().parents[1]
MONITOR = ["train.monitor_every=3", "train.monitor_bank=64", "train.monitor_queries=32"]


def pretrain(run_dir, *extra, resume=False):
    argv = ["pretrain", DEMO, *TINY, *extra, "--run-dir", str(run_dir)]
    return main(argv + (["--resume"] if resume else []))


def monitor_rows(run_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_rows(Path(run_dir)) if "monitor/rankme" in r}


# --- RankMe and the collapse warning --------------------------------------------------------


def test_rankme_of_a_rank_k_matrix_is_k():
    gen = torch.Generator().manual_seed(0)
    for k in (1, 3, 10):
        u, _ = torch.linalg.qr(torch.randn(200, k, generator=gen, dtype=torch.float64))
        v, _ = torch.linalg.qr(torch.randn(32, k, generator=gen, dtype=torch.float64))
        features = (u @ v.T).float()  # (200, 32), k equal singular values, the rest 0
        # tolerance: float32 rounding and eps = 1e-7 on 32 - k zero singular values
        assert health.rankme(features) == pytest.approx(k, rel=1e-3)


def test_rankme_formula_by_hand():
    features = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # singular values 3 and 1
    p = [0.75 + 1e-7, 0.25 + 1e-7]
    expected = math.exp(-sum(x * math.log(x) for x in p))  # = 1.7548...
    assert health.rankme(features) == pytest.approx(expected, rel=1e-9)
    assert health.feature_std(torch.ones(5, 3)) == 0.0


class ConstantBackbone(nn.Module):
    """Every image -> the same tokens: a collapsed encoder."""

    num_prefix_tokens = 0

    def __init__(self, random: bool = False) -> None:
        super().__init__()
        self.random, self.proj = random, nn.Linear(16, 24)

    def forward(self, images, attn_mask=None, return_layers=()):
        b = images.shape[0]
        if self.random:  # a fixed random projection of the pixels: spread-out features
            x = images.reshape(b, -1, 16)  # (B, N, 16)
        else:
            x = torch.ones(b, 4, 16)
        return {"tokens": self.proj(x)}


@pytest.mark.parametrize("random", [False, True])
def test_collapse_warning_fires_on_a_constant_backbone_only(random, caplog):
    images = load_images(_synthetic(), "train")
    method = nn.Module()
    method.backbone = ConstantBackbone(random)
    online = probe.OnlineProbe(images, images, ("knn", "rankme"), 16, "fp32", torch.device("cpu"))
    with caplog.at_level(logging.WARNING, logger="mimar"):
        out = online(method, 7)
    warned = [r.message for r in caplog.records if "collapsed" in r.message]
    if random:
        assert not warned and out["monitor/rankme"] > health.COLLAPSE_RANKME
    else:
        assert out["monitor/rankme"] == pytest.approx(1.0, abs=1e-3)
        assert len(warned) == 1 and "step 7" in warned[0]


def _synthetic():
    from mimar.data import DataConfig

    return DataConfig(name="synthetic", synthetic_size=64, img_size=16, in_chans=1)


# --- the run: online kNN = eval knn, resume, two processes ----------------------------------


def test_online_knn_equals_eval_knn_on_the_same_subsets(tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert pretrain(run, "train.steps=6", *MONITOR) == 0
    rows = monitor_rows(run)
    assert sorted(rows) == [3, 6] and (run / "monitor.png").stat().st_size > 0
    online = rows[6]["monitor/knn_top1"]
    # mimar eval knn on the monitor's own subsets (drawn by the monitor's seed)
    from mimar.evaluation import runner

    real = runner.load_images

    def subsets(cfg, split, **kwargs):
        n = 64 if split == "train" else 32
        return probe.fixed_subset(real(cfg, split, **kwargs), n)

    monkeypatch.setattr(runner, "load_images", subsets)
    assert main(["eval", "knn", "--checkpoint", str(run)]) == 0
    table = json.loads((run / "eval" / "knn.json").read_text())
    (row,) = [r for r in table["rows"] if r["model"] == "pretrained"]
    assert table["n_train"] == 64 and table["n_test"] == 32
    assert row["top1"] == online  # exactly


def test_resume_with_the_monitor_on_is_exact(tmp_path, monkeypatch):
    from mimar.engine.logger import MetricsLog

    full, cut = tmp_path / "full", tmp_path / "cut"
    assert pretrain(full, "train.steps=8", *MONITOR) == 0
    write = MetricsLog.write

    def write_then_signal(self, row):
        write(self, row)
        if row["step"] == 5 and "loss" in row:
            os.kill(os.getpid(), __import__("signal").SIGTERM)

    monkeypatch.setattr(MetricsLog, "write", write_then_signal)
    assert pretrain(cut, "train.steps=8", *MONITOR) != 0
    monkeypatch.setattr(MetricsLog, "write", write)
    assert pretrain(cut, "train.steps=8", *MONITOR, resume=True) == 0
    assert losses(cut) == losses(full)
    a, b = monitor_rows(full), monitor_rows(cut)
    assert sorted(a) == sorted(b) == [3, 6, 8]
    for step in a:
        assert a[step]["monitor/knn_top1"] == b[step]["monitor/knn_top1"]
        assert a[step]["monitor/rankme"] == pytest.approx(b[step]["monitor/rankme"], rel=1e-6)


def test_monitor_on_or_off_trains_the_same(tmp_path):
    on, off = tmp_path / "on", tmp_path / "off"
    assert pretrain(on, "train.steps=6", *MONITOR) == 0
    assert pretrain(off, "train.steps=6") == 0
    assert losses(on) == losses(off)  # the monitor draws from no training stream


@pytest.mark.dist
def test_two_processes_equal_one_with_the_monitor_on(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert pretrain(one, "train.steps=4", *MONITOR) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    cmd += ["--standalone", "-m", "mimar.cli", "pretrain", DEMO, *TINY, "train.steps=4"]
    cmd += [*MONITOR, "--run-dir", str(two)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    a, b = losses(one), losses(two)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6)
    ma, mb = monitor_rows(one), monitor_rows(two)
    assert sorted(ma) == sorted(mb) == [3, 4]
    for step in ma:  # rank 0 probes the whole model; weights agree to fp32 rounding
        assert mb[step]["monitor/rankme"] == pytest.approx(ma[step]["monitor/rankme"], rel=1e-3)
        assert abs(mb[step]["monitor/knn_top1"] - ma[step]["monitor/knn_top1"]) <= 100 / 32


# --- efficiency -------------------------------------------------------------------------------


def test_flops_of_a_tiny_step_equal_the_flop_counters(tmp_path):
    import mimar
    from mimar.bench.speed import MODEL_FLOPS
    from mimar.data import build_train_loader

    cfg = mimar.load_config(DEMO, TINY)
    method = mimar.build_method(cfg)
    loader = build_train_loader(cfg.data, seed=0)
    counted = efficiency.count_step(method, cfg.data, loader, "fp32")
    images = loader.inputs(0)["images"]
    drawn = method.sample_corruption(loader.batch_size, torch.Generator().manual_seed(0))
    counter = FlopCounterMode(display=False, custom_mapping=MODEL_FLOPS)
    with counter:
        method(images=images, **drawn)["loss"].backward()
    assert counted["flops"] == counter.get_total_flops() > 0
    assert all(p.grad is None or p.grad.device.type == "cpu" for p in method.parameters())


def test_mfu_uses_the_tables_peak_for_a_named_gpu():
    peak = efficiency.gpu_peak("NVIDIA H100 80GB HBM3", "bf16")
    assert peak == 989e12
    assert efficiency.gpu_peak("NVIDIA H100 PCIe", "bf16") == 756e12
    assert efficiency.gpu_peak("NVIDIA L40S", "tf32") == 183e12
    assert efficiency.gpu_peak("NVIDIA L4", "fp32") == 30.3e12
    assert efficiency.gpu_peak("Some Future GPU", "bf16") is None
    eff = efficiency.Efficiency(1e12, peak, "NVIDIA H100 80GB HBM3", "hint")
    out = eff({"step_s": 0.01, "data_wait_s": 0.0}, 5)
    assert out["perf/tflops"] == pytest.approx(100.0)
    assert out["perf/mfu"] == pytest.approx(100e12 / 989e12)


def test_mfu_on_cpu_uses_the_cached_matmul_peak(tmp_path, monkeypatch):
    cache = tmp_path / "peak.json"
    shapes = [(64, 32, 32)]
    first = efficiency.cpu_peak(shapes, "fp32", cache)
    assert first > 0 and cache.is_file()
    (key,) = json.loads(cache.read_text())
    assert f"{torch.get_num_threads()} threads" in key and "fp32" in key
    cache.write_text(json.dumps({key: 123e9}))  # a cached value is used, not measured again
    assert efficiency.cpu_peak(shapes, "fp32", cache) == 123e9
    eff = efficiency.Efficiency(1.23e9, 123e9, "cpu", "hint")
    assert eff({"step_s": 0.1}, 3)["perf/mfu"] == pytest.approx(0.1)


class SlowLoader:
    def __init__(self, loader, delay: float) -> None:
        self.loader, self.delay = loader, delay

    def inputs(self, index):
        time.sleep(self.delay)
        return self.loader.inputs(index)

    def __getattr__(self, name):
        return getattr(self.loader, name)


def test_data_wait_rises_with_a_slow_loader(tmp_path, monkeypatch, caplog):
    import mimar.pretrain as pretrain_module

    build = pretrain_module.build_train_loader
    waits = {}
    for delay in (0.0, 0.05):
        monkeypatch.setattr(
            pretrain_module,
            "build_train_loader",
            lambda *a, d=delay, **k: SlowLoader(build(*a, **k), d),
        )
        run = tmp_path / f"run{delay}"
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mimar"):
            assert pretrain(run, "train.steps=24") == 0
        rows = [r for r in read_rows(run) if "loss" in r]
        waits[delay] = sum(r["data_wait_s"] for r in rows[-4:]) / 4
        assert all("perf/mfu" in r and "step_s" in r for r in rows)
    assert waits[0.05] >= 0.05 > waits[0.0] * 5
    # the slow loader's run (the last): said once, with the knobs
    warned = [r.message for r in caplog.records if "data loader holds back" in r.message]
    assert len(warned) == 1 and "data.num_workers" in warned[0]


# --- the bench reads the monitor ---------------------------------------------------------------


def _fake_run(run_dir: Path, knn: dict[int, float]) -> None:
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("data: {batch_size: 10}\ntrain: {accum_steps: 1}\n")
    rows = []
    for step in range(1, max(knn) + 1):
        rows.append({"step": step, "loss": 1.0, "images_per_s": 100.0})  # 0.1 s a step
        if step in knn:
            rows.append({"step": step, "monitor/knn_top1": knn[step]})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_bench_report_says_which_methods_still_climb(tmp_path):
    from mimar.bench import quality, report

    runs_ = {}
    for seed in (0, 1):
        climbing, flat = tmp_path / f"aim-seed{seed}", tmp_path / f"eva-seed{seed}"
        _fake_run(climbing, {5: 40.0, 10: 50.0 + seed})
        _fake_run(flat, {5: 60.0, 10: 60.2})
        runs_[climbing.name] = {"method": "aim", "seed": seed, "run_dir": str(climbing)}
        runs_[flat.name] = {"method": "eva", "seed": seed, "run_dir": str(flat)}
    online = report.knn_summary(runs_, ["aim", "eva"])
    assert online["aim"]["climbing"] is True and online["eva"]["climbing"] is False
    curve = online["aim"]["curves"]["0"]
    assert curve["seconds"] == pytest.approx([0.5, 1.0]) and curve["top1"] == [40.0, 50.0]
    assert online["aim"]["last"]["mean"] == 50.5
    lines = "\n".join(report._online_knn_lines(online))
    assert "| aim | " in lines and "still climbing" in lines and "| eva |" in lines
    report.plot_knn_vs_time({"online_knn": online, "seeds": [0, 1]}, tmp_path / "k.png")
    assert (tmp_path / "k.png").stat().st_size > 0
    settings = quality.QualityConfig(budget_minutes=1.0, max_train=500, max_test=100)
    assert quality.monitor_words(settings, 41) == [
        "train.monitor_every=10",
        "train.monitor_bank=500",
        "train.monitor_queries=100",
    ]


def test_gpu_script_runs_in_its_cpu_form(tmp_path):
    """benchmarks/gpu.sh --device cpu --tiny: the GPU check's own code path, so it cannot rot."""
    env = {**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = ["bash", "benchmarks/gpu.sh", "--device", "cpu", "--tiny", "--out", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu.json").read_text())
    kinds = [r["what"] for r in doc["rows"]]
    assert any(k.startswith("bench speed") for k in kinds) and "pretrain (monitor on)" in kinds
    (pre,) = [r for r in doc["rows"] if r["what"] == "pretrain (monitor on)"]
    assert 0 < pre["mfu"] and pre["online_knn"] is not None
    assert "| what |" in (tmp_path / "gpu.md").read_text()
