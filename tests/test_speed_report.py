"""The speed report (mimar bench speed, mimar/bench/speed.py): its FLOP count, GEMM shapes,
tensor-memory tracker and matmul peak on hand-checkable models, and one tiny end-to-end report."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import mimar
from mimar.bench.speed import (
    Classifier,
    MatmulPeak,
    Stepper,
    TensorMemory,
    count_step,
    local_teacher,
    main,
    without_decay_rules,
)

RECIPE = "configs/simmim/vit_tiny_fmnist.yaml"
TINY = ["backbone.embed_dim=32", "backbone.depth=1", "backbone.num_heads=2"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg():
    return without_decay_rules(mimar.load_config(RECIPE, [*TINY, "train.precision=fp32"]))


class TwoLinear(nn.Module):
    def __init__(self, d: int, h: int, t: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, t)

    def forward(self, x: torch.Tensor) -> dict:
        return {"loss": self.fc2(self.fc1(x)).sum()}


def test_flops_of_a_linear_step_are_the_hand_count():
    """Forward 2BDH + 2BHT; backward: the weight gradients of both layers (2BDH + 2BHT) and
    the input gradient of fc2 only (2BHT: the input needs no gradient). 4BDH + 6BHT."""
    B, D, H, T = 8, 16, 32, 4
    x = torch.randn(B, D)
    counts = count_step(Stepper(TwoLinear(D, H, T), lambda: {"x": x}, _cfg()))
    assert counts["flops"] == 4 * B * D * H + 6 * B * H * T
    assert sum(counts["gemms"].values()) == counts["flops"]  # every FLOP here is a GEMM
    assert counts["gemms"][B, D, H] == 2 * B * D * H  # fc1 forward: (B, D) @ (D, H)


def test_sdpa_and_matmul_attention_count_the_same_model_flops():
    """SDPA's CPU kernel (unknown to torch's counter) and its fused backward count what the
    plain matmul-softmax-matmul path counts: no recomputed scores."""
    cfg = _cfg()
    images, labels = torch.randn(2, 1, 32, 32), torch.randint(0, 10, (2,))
    flops = {}
    for kernel in ("sdpa", "matmul"):
        torch.manual_seed(0)
        model = Classifier(mimar.build_backbone(cfg.backbone))
        inputs = lambda: {"images": images, "labels": labels}
        flops[kernel] = count_step(Stepper(model, inputs, cfg, kernel))["flops"]
    assert flops["sdpa"] == flops["matmul"] > 0


def test_tensor_memory_follows_activations_until_freed():
    layers = nn.Sequential(*[nn.Linear(256, 256) for _ in range(4)])
    x = torch.randn(1024, 256)  # 1 MiB; so is each layer's output
    memory = TensorMemory(layers.parameters())
    params = sum(p.numel() * 4 for p in layers.parameters())
    with memory:
        y = layers(x)
        assert memory.now == params + 5 * 2**20  # x and the four outputs (saved for backward)
        y.sum().backward()
        del y
    assert memory.now < memory.peak and memory.peak >= params + 5 * 2**20


def test_matmul_peak_measures_both_precisions():
    peak = MatmulPeak([(16, 32, 8), (32, 16, 8)], torch.device("cpu"), reps=1)
    peak.measure()
    report = peak.report()
    for precision in ("fp32", "bf16"):
        assert report[precision]["gflops"] > 0
        assert report[precision]["shape"] in ((16, 32, 8), (32, 16, 8))
        assert set(report[precision]["per_shape"]) == {"16x32x8", "32x16x8"}


def test_unset_mimar_teacher_gets_a_local_random_copy(tmp_path):
    extra, note = local_teacher("configs/eva/vit_tiny_fmnist.yaml", TINY, tmp_path)
    assert extra == [f"teacher.path={tmp_path / 'eva_teacher.safetensors'}"] and note
    mimar.build_method(mimar.load_config("configs/eva/vit_tiny_fmnist.yaml", [*TINY, *extra]))
    assert local_teacher(RECIPE, TINY, tmp_path) == ([], "")


def test_report_end_to_end_writes_every_number(tmp_path, capsys):
    out = tmp_path / "speed" / "report.json"
    argv = ["--recipe", RECIPE, "--steps", "1", "--warmup", "0", "--batch", "2", "--peers"]
    assert main([*argv, "--json", str(out), *TINY]) == 0
    report = json.loads(out.read_text())
    assert {"torch", "threads", "cpu", "device", "max_rss_mib"} <= set(report["machine"])
    (record,) = report["recipes"]
    assert record["recipe"] == RECIPE and record["batch"] == 2
    assert all(record["matmul_peak"][p]["gflops"] > 0 for p in ("fp32", "bf16"))
    models = ["simmim", "classify", "HF ViTForMaskedImageModeling", "HF ViTMAEForPreTraining"]
    rows = {(r["model"], r["precision"]): r for r in record["rows"]}
    assert set(rows) == {(m, p) for m in models for p in ("fp32", "bf16")}
    for row in rows.values():
        assert row["ms_per_step"] > 0 and row["gflop_per_s"] > 0 and row["peak_memory_mib"] > 0
        assert row["images_per_s"] == pytest.approx(2000 / row["ms_per_step"])
    assert rows["simmim", "fp32"]["gflop_per_step"] == rows["simmim", "bf16"]["gflop_per_step"]
    assert rows["classify", "bf16"]["vs_classify"] == 1.0
    assert rows["HF ViTMAEForPreTraining", "bf16"]["mimar_over_hf"] > 0
    assert (
        rows["simmim", "bf16"]["bf16_speedup"] > 0
        and rows["simmim", "fp32"]["bf16_speedup"] is None
    )
    assert "HF ViTForMaskedImageModeling" in capsys.readouterr().out
