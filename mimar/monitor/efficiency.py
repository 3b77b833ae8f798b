"""Hardware efficiency of a run: model FLOPs per step, achieved TFLOP/s and MFU.

* FLOPs: one forward and backward of the method on a step's inputs, counted once before
  training with ``torch.utils.flop_counter`` and ``mimar bench speed``'s attention rules
  (:data:`mimar.bench.speed.MODEL_FLOPS`), under a ``FakeTensorMode``: shapes only, so the
  count costs no real compute, touches no weight and no RNG stream, on any device.
* Peak: on a GPU from :data:`GPU_PEAKS` by device name; on a CPU the matmul peak that
  ``mimar bench speed`` measures (:class:`mimar.bench.speed.MatmulPeak` on the step's three
  costliest GEMM shapes), measured once per machine, thread count, precision and shapes and
  kept in a small JSON cache (``$MIMAR_CACHE_DIR`` or ``~/.cache/mimar``).
* MFU = FLOPs per step / ``step_s`` / peak. ``step_s`` and ``data_wait_s`` come with every
  row from the engine.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mimar import writes

log = logging.getLogger("mimar")

# Dense (no 2:4 sparsity) tensor-core peaks in TFLOP/s: bf16, fp16 (both with fp32
# accumulation), tf32, and plain fp32 (CUDA cores). Matched in order against
# torch.cuda.get_device_name(), case-insensitively.
GPU_PEAKS: dict[str, dict[str, float]] = {
    # NVIDIA H100 Tensor Core GPU datasheet (2023), "H100 PCIe" column
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0},
    # same datasheet, "H100 NVL" column (per GPU)
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "tf32": 418.0, "fp32": 60.0},
    # same datasheet, "H100 SXM" column (get_device_name: "NVIDIA H100 80GB HBM3")
    "H100": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    # NVIDIA H200 Tensor Core GPU datasheet (2024), "H200 SXM" column
    "H200": {"bf16": 989.0, "fp16": 989.0, "tf32": 494.0, "fp32": 67.0},
    # NVIDIA A100 Tensor Core GPU datasheet (2021), SXM and PCIe alike
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    # NVIDIA L40S datasheet (2023): 733 / 366 TFLOPS with sparsity, halved
    "L40S": {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0, "fp32": 91.6},
    # NVIDIA L4 datasheet (2023): 242 / 120 TFLOPS with sparsity, halved
    "L4": {"bf16": 121.0, "fp16": 121.0, "tf32": 60.0, "fp32": 30.3},
    # NVIDIA Ada Lovelace architecture whitepaper v2.1, Appendix A, RTX 4090 (fp32 accumulate)
    "RTX 4090": {"bf16": 165.2, "fp16": 165.2, "tf32": 82.6, "fp32": 82.6},
    # NVIDIA RTX Blackwell GPU architecture whitepaper v1.0, Appendix A, RTX 5090
    "RTX 5090": {"bf16": 209.5, "fp16": 209.5, "tf32": 104.8, "fp32": 104.8},
}
TARGET_MFU = 0.35  # what published peers reach (docs/benchmarks.md "Expected speed")


def gpu_peak(name: str, precision: str) -> float | None:
    """The table's dense peak (FLOP/s) of the GPU called ``name`` in ``precision`` (bf16,
    fp16, tf32, fp32), or None for a GPU not in :data:`GPU_PEAKS`."""
    for key, peaks in GPU_PEAKS.items():
        if key.lower() in name.lower():
            return peaks[precision] * 1e12
    return None


def matmul_precision(precision: str, device: torch.device) -> str:
    """The peak column a run's matmuls use: bf16 under autocast, else tf32 on a GPU that
    allows it, else fp32."""
    if precision == "bf16":
        return "bf16"
    if device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "fp32"


def cache_dir() -> Path:
    return Path(os.environ.get("MIMAR_CACHE_DIR") or Path.home() / ".cache" / "mimar")


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_peak(shapes: list, precision: str, cache: Path | None = None, rounds: int = 5) -> float:
    """The CPU matmul peak (FLOP/s) of ``shapes`` in ``precision`` (fp32 or bf16), as ``mimar
    bench speed`` measures it, cached in ``cache`` (default ``cache_dir()/matmul_peak.json``)
    by CPU model, thread count, precision and shapes."""
    from mimar.bench.speed import MatmulPeak  # only on a CPU run, and only on a cache miss

    path = cache or cache_dir() / "matmul_peak.json"
    key = f"{cpu_name()} | {torch.get_num_threads()} threads | {precision} | {sorted(shapes)}"
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        known = {}  # a damaged cache is measured again and rewritten
    if key in known:
        return float(known[key])
    peak = MatmulPeak([tuple(s) for s in shapes], torch.device("cpu"))
    for _ in range(rounds):
        peak.measure()
    # The fastest round of the fastest shape, not the median: other load on the machine only
    # slows a round down, and a peak taken low would inflate every MFU of this machine.
    wanted = "bf16" if precision == "bf16" else "fp32"
    flops = max(
        2 * m * k * n / min(seconds)
        for ((m, k, n), p), seconds in peak.seconds.items()
        if p == wanted and seconds
    )
    with writes.optional("the matmul peak cache"):  # a read-only home: measured next time
        writes.write_text(path, json.dumps({**known, key: flops}, indent=1), "matmul peak cache")
    return flops


def count_step(method: nn.Module, data, loader, precision: str, accum_steps: int = 1) -> dict:
    """Model FLOPs of one optimizer step of ``method`` on this rank's share of the batch
    (forward and backward, ``accum_steps`` micro-batches; images of ``data``'s shape, whose
    values no FLOP depends on; the corruption drawn by a private generator) and its GEMM
    FLOPs by shape ``(M, K, N)``, counted under a FakeTensorMode (shapes only)."""

    b = loader.batch_size // loader.world_size  # this rank's rows of the global batch
    device = next(method.parameters()).device
    corruption = {}
    if hasattr(method, "sample_corruption"):  # real draws (some read values), private RNG
        drawn = method.sample_corruption(b, torch.Generator().manual_seed(0))
        corruption = {k: v.to(device) for k, v in drawn.items()}
    try:
        counter, gemms = _count(method, data, b, corruption, precision, device, fake=True)
    except Exception as err:  # a forward that reads a value (.item()): one real step instead
        log.info("perf: counting FLOPs with real tensors (%s)", type(err).__name__)
        counter, gemms = _count(method, data, b, corruption, precision, device, fake=False)
    shapes = Counter({k: v * accum_steps for k, v in gemms.flops.items()})
    return {"flops": counter.get_total_flops() * accum_steps, "gemms": shapes}


def _count(method, data, b: int, corruption: dict, precision: str, device, fake: bool):
    """One forward and backward of ``method`` under the FLOP and GEMM counters; the
    gradients it leaves are dropped (the real ones, if any, stay) and no RNG stream moves."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from mimar.bench.speed import MODEL_FLOPS, GemmShapes

    counter = FlopCounterMode(display=False, custom_mapping=MODEL_FLOPS)
    gemms = GemmShapes()
    bf16 = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else None
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else nullcontext()
    grads = {p: p.grad for p in method.parameters()}
    try:
        with torch.random.fork_rng(devices=[]), mode:
            images = torch.zeros(b, data.in_chans, data.img_size, data.img_size, device=device)
            with counter, gemms, bf16 or nullcontext():
                method(images=images, **corruption)["loss"].backward()
    finally:
        for p, g in grads.items():
            p.grad = g
    return counter, gemms


class Efficiency:
    """The per-row hook: ``perf/flops_per_step``, ``perf/tflops`` and ``perf/mfu``, and two
    one-time warnings: the loader holding back more than 10 % of a step, and (a GPU of the
    table) an MFU below half of the expected :data:`TARGET_MFU` after warm-up."""

    WARMUP_STEPS = 20  # compile, allocator and cache warm-up: no verdict before

    def __init__(self, flops: float, peak: float | None, device_name: str, data_hint: str):
        self.flops, self.peak, self.device_name = flops, peak, device_name
        self.data_hint = data_hint
        self.gpu_table = device_name != "cpu" and peak is not None
        self.warned: set[str] = set()

    def __call__(self, row: dict, step: int) -> dict:
        step_s = row.get("step_s")
        out = {"perf/flops_per_step": self.flops}
        if not step_s:
            return out
        achieved = self.flops / step_s  # FLOP/s
        out["perf/tflops"] = achieved / 1e12
        if self.peak:
            out["perf/mfu"] = achieved / self.peak
        if step > self.WARMUP_STEPS:
            self._warn_data(row.get("data_wait_s", 0.0), step_s)
            if self.gpu_table and "mfu" not in self.warned and out["perf/mfu"] < TARGET_MFU / 2:
                self.warned.add("mfu")
                log.warning(
                    "perf: MFU %.1f%% on %s, below half of the expected %.0f%% "
                    "(docs/benchmarks.md, Expected speed): try train.precision=bf16, "
                    "train.compile=true, a larger data.batch_size",
                    100 * out["perf/mfu"],
                    self.device_name,
                    100 * TARGET_MFU,
                )
        return out

    def _warn_data(self, wait: float, step_s: float) -> None:
        if "data" in self.warned or wait <= 0.1 * step_s:
            return
        self.warned.add("data")
        log.warning(
            "perf: the data loader holds back %.0f%% of each step (%.3f of %.3f s): %s",
            100 * wait / step_s,
            wait,
            step_s,
            self.data_hint,
        )


def data_hint(data_cfg) -> str:
    """Which knobs speed up ``data_cfg``'s loader, in one clause."""
    hint = f"raise data.num_workers (now {data_cfg.num_workers})"
    if data_cfg.name == "webdataset":
        hint += ", spread the data over more shards than workers"
    else:
        hint += ", or write the images into shards (mimar data shard, data.name=webdataset)"
    decode = getattr(data_cfg, "decode", None)
    if decode is not None:
        hint += f"; data.decode (now {decode}) picks where images are decoded"
    return hint
