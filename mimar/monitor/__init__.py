"""The online monitor: what a run shows while it trains, as engine hooks (mimar/engine/hooks.py).

* every row: ``perf/flops_per_step``, ``perf/tflops``, ``perf/mfu`` (:mod:`.efficiency`),
  next to the engine's ``step_s`` and ``data_wait_s``;
* every ``train.monitor_every`` steps and at the last one (rank 0, the whole backbone: under
  FSDP the engine gathers it for a hook with ``needs_model=True``): ``monitor/knn_top1``,
  ``monitor/rankme``, ``monitor/feature_std`` on a fixed subset (:mod:`.probe`), and
  ``RUN_DIR/monitor.png`` redrawn (:mod:`.plot`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from mimar.engine.hooks import Hook, StepView
from mimar.monitor.efficiency import (
    Efficiency,
    count_step,
    cpu_peak,
    data_hint,
    gpu_peak,
    matmul_precision,
)

log = logging.getLogger("mimar")

GEMM_SHAPES = 3  # the CPU peak: the best of the step's 3 costliest GEMM shapes (bench speed)


def training_hooks(
    cfg, method: nn.Module, loader, run_dir: str | Path, device: torch.device, rank: int = 0
) -> list[Hook]:
    """The monitor's hooks for a pretraining run of ``cfg`` (a ``PretrainConfig``). Every rank
    gets the same hooks (the engine calls them on rank 0); their state is built on rank 0."""
    t, run_dir = cfg.train, Path(run_dir)
    efficiency = _efficiency(cfg, method, loader, device) if rank == 0 else None
    hooks = [Hook(0, lambda view: efficiency(view.row, view.step), needs_model=False, name="perf")]
    if t.monitor_every and t.monitor:
        probe = _probe(cfg, loader, device) if rank == 0 else None

        def monitor(view: StepView) -> dict:
            from mimar.monitor.plot import draw

            out = probe(view.model, view.step)
            draw(run_dir, [{"step": view.step, **out}])
            return out | {"monitor/picture": run_dir / "monitor.png"}

        hooks.append(Hook(t.monitor_every, monitor, at_end=True, name="monitor"))
    return hooks


def _efficiency(cfg, method: nn.Module, loader, device: torch.device) -> Efficiency:
    t = cfg.train
    count = count_step(method, cfg.data, loader, t.precision, t.accum_steps)
    precision = matmul_precision(t.precision, device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak(name, precision)
        if peak is None:
            log.info(
                "perf: %s is not in the peak table (mimar/monitor/efficiency.py): no MFU", name
            )
    else:
        name = "cpu"
        shapes = [shape for shape, _ in count["gemms"].most_common(GEMM_SHAPES)]
        peak = cpu_peak(shapes, precision) if shapes else None
    log.info(
        "perf: %.3g GFLOP per step (model FLOPs, forward + backward); peak %s",
        count["flops"] / 1e9,
        f"{peak / 1e12:.3g} TFLOP/s ({name}, {precision})" if peak else "unknown",
    )
    return Efficiency(count["flops"], peak, name, data_hint(cfg.data))


def _probe(cfg, loader, device: torch.device):
    from mimar.data import ImageSet, load_images
    from mimar.errors import DataError, MissingFileError
    from mimar.monitor.probe import OnlineProbe, fixed_subset

    t = cfg.train
    images = getattr(loader, "images", None)
    train = images if isinstance(images, ImageSet) else load_images(cfg.data, "train")
    try:
        test = load_images(cfg.data, "test") if "knn" in t.monitor else None
    except (DataError, MissingFileError) as err:  # e.g. shards without val-*.tar: health only
        log.info("monitor: no test split for the online kNN, health metrics only (%s)", err)
        test = None
    bank = fixed_subset(train, t.monitor_bank)
    queries = None if test is None else fixed_subset(test, t.monitor_queries)
    log.info(
        "monitor: every %d steps, %s on %d train%s images",
        t.monitor_every,
        "+".join(t.monitor),
        len(bank),
        "" if queries is None else f" / {len(queries)} test",
    )
    return OnlineProbe(bank, queries, t.monitor, cfg.data.img_size, t.precision, device)
