"""``mimar eval segment | detect``: dense transfer of a pretrained backbone on the same engine.

A dense fine-tune is a run of its own in ``RUN_DIR/eval/<task>/`` (``<task>-scratch/`` for the
randomly initialised control, ``<task>-scratch-neck/`` for iTPN's pretrained trunk with a fresh
neck): ``config.yaml``, ``metrics.jsonl`` (per-step loss, lr, images/s; test scores),
``checkpoints/last.pt``, and the picture ``<task>.png`` of test images (input, ground truth,
prediction). It runs through the downstream runner (``mimar.downstream.runner``, also the
fine-tune's; this module gives it the task, ``DenseTask``) on ``mimar.engine.loop.fit``:
exact resume, SIGTERM, NaN stop, bf16, DDP under torchrun, progress with ETA, and layer decay
from ``backbone.layer_id``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from mimar import runs
from mimar.config import to_dict
from mimar.data.image_set import check_same_classes
from mimar.data.sources import normalization_stats
from mimar.dense.coco import DenseSet, load_coco_dense
from mimar.dense.config import DenseConfig, load_dense_config
from mimar.dense.heads import unpad_targets
from mimar.dense.loader import DenseStepLoader, normalise, padded_boxes
from mimar.dense.metrics import BoxScore, SegmentationScore
from mimar.dense.model import DenseModel, build_dense_model, check_neck
from mimar.downstream.config import record
from mimar.downstream.runner import refuse_existing, tested_rows, train_downstream
from mimar.engine.loop import Session
from mimar.engine.precision import autocast, autocast_dtype
from mimar.errors import ConfigError
from mimar.loading import load_run

log = logging.getLogger("mimar")

DEFAULT_DATA = "data/fmnist-scenes"  # where `mimar data scenes` builds the benchmark
HEADLINE = {"segment": "miou", "detect": "ap"}


def dense_dir(
    run_dir: str | Path,
    task: str,
    scratch: bool = False,
    neck: str = "pretrained",
    out: str | Path | None = None,
) -> Path:
    """``RUN_DIR/eval/<task>[-scratch | -scratch-neck]`` (under ``out`` with ``--out``): a dense
    fine-tune's run folder."""
    suffix = "-scratch" if scratch else "-scratch-neck" if neck == "scratch" else ""
    return runs.eval_folder(run_dir, out) / f"{task}{suffix}"


def data_root(spec: str | None) -> Path:
    """``--data``: a folder, ``coco-format:FOLDER``, or None for the default scenes."""
    if spec is None:
        return Path(DEFAULT_DATA)
    return Path(spec.removeprefix("coco-format:"))


def dense_finetune(
    source: str | Path,
    task: str,
    *,
    data: str | None = None,
    recipe: str | Path | None = None,
    overrides: tuple[str, ...] = (),
    max_train: int = 0,
    max_test: int = 0,
    scratch: bool = False,
    neck: str = "pretrained",
    resume: bool = False,
    eval_out: str | Path | None = None,
) -> dict:
    """Train ``task``'s head (and the whole backbone, with layer decay) on the dense data from
    the run ``source``'s pretrained backbone (``scratch``: from random initialisation); returns
    the summary with the test scores (``miou`` / ``ap`` first)."""
    if Path(source).suffix == ".safetensors":
        raise ConfigError("dense evaluation needs a run folder or checkpoint, not an export")
    run_cfg, state = load_run(source)
    check_neck(run_cfg, neck)
    out = dense_dir(source, task, scratch, neck, eval_out)
    dense = load_dense_config(task, recipe, overrides)
    root = data_root(data)
    in_chans = run_cfg.backbone.in_chans
    train_set = load_coco_dense(
        root, "train", img_size=dense.img_size, in_chans=in_chans, max_images=max_train
    )
    test_set = load_coco_dense(
        root, "test", img_size=dense.img_size, in_chans=in_chans, max_images=max_test
    )
    check_same_classes(train_set.class_names, test_set.class_names, str(root))
    img_size = train_set.images.shape[-1]
    mean, std = normalization_stats(run_cfg.data)  # the backbone's own input statistics
    config = {
        "dense": record(dense),
        "task": task,
        "data": str(root),
        "img_size": img_size,
        "num_classes": train_set.num_classes,
        "class_names": list(train_set.class_names),
        "pretrained": None if scratch else str(source),
        "neck": neck,
        "method": run_cfg.method.name,
        "backbone": to_dict(run_cfg.backbone),
        "mean": list(mean),
        "std": list(std),
    }
    tic = time.perf_counter()
    if not resume and runs.last_checkpoint(out).exists():
        steps = len(train_set) // dense.schedule.batch_size * dense.schedule.epochs
        if _finished(out, task, config, steps):  # e.g. the scratch control of an earlier call
            log.info("%s: finished with the same config; its scores are reused", out)
            return summarize(out, task) | _sizes(train_set, test_set, img_size, dense, out, tic)
        refuse_existing(out, f"{task} fine-tune with another config or unfinished")
    job = DenseTask(
        dense, task, run_cfg, None if scratch else state["model"], neck, img_size,
        train_set, test_set, mean, std, picture_path=out / f"{task}.png",
    )  # fmt: skip
    result = train_downstream(job, out, config, resume=resume)
    sizes = _sizes(train_set, test_set, img_size, dense, out, tic)
    return summarize(out, task) | sizes | {"stopped_by": result.stopped_by}


@dataclass
class DenseTask:
    """Segmentation or detection for the downstream runner: the dense model over the
    pretrained backbone, the scenes' step loader, the test scores, the picture at the end."""

    cfg: DenseConfig
    name: str  # the task: segment or detect
    run_cfg: Any  # the pretraining run's config
    weights: dict | None  # the pretraining checkpoint's model state; None: from scratch
    neck: str
    img_size: int
    train_set: DenseSet
    test_set: DenseSet
    mean: tuple
    std: tuple
    picture_path: Path

    def build_model(self, session: Session) -> DenseModel:
        try:
            return build_dense_model(
                self.run_cfg,
                self.weights,
                self.name,
                self.cfg,
                self.train_set.num_classes,
                img_size=self.img_size,
                neck=self.neck,
            )
        except ValueError as err:  # a backbone that cannot take this image size
            backbone = self.run_cfg.backbone.name
            raise ConfigError(f"{backbone} at {self.img_size} px: {err}") from None

    def build_loader(self, session: Session) -> DenseStepLoader:
        return DenseStepLoader(
            self.train_set,
            self.name,
            batch_size=self.cfg.schedule.batch_size,
            mean=self.mean,
            std=self.std,
            hflip=self.cfg.hflip,
            seed=self.cfg.train.seed,
            rank=session.rank,
            world_size=session.world,
        )

    def evaluate(self, model: DenseModel, step: int, session: Session, loader) -> dict:
        scores = score(model, self.test_set, self.cfg, self.mean, self.std, session.device)
        log.info("epoch %.2f: %s", loader.epoch_of(step), _describe(scores))
        return {f"test_{k}": v for k, v in scores.items() if not isinstance(v, list)}

    def finish(self, model: DenseModel, session: Session) -> None:
        picture(
            model, self.test_set, self.cfg, self.mean, self.std, session.device, self.picture_path
        )


def _sizes(train_set, test_set, img_size: int, dense, out: Path, tic: float) -> dict:
    return {
        "n_train": len(train_set),
        "n_test": len(test_set),
        "img_size": img_size,
        "epochs": dense.schedule.epochs,
        "seconds": round(time.perf_counter() - tic, 1),
        "run_dir": str(out),
    }


def _finished(out: Path, task: str, config: dict, steps: int) -> bool:
    """Whether ``out`` holds a dense fine-tune of exactly ``config`` tested at its last step."""
    saved = out / runs.CONFIG
    if not saved.is_file() or yaml.safe_load(saved.read_text()) != yaml.safe_load(
        yaml.safe_dump(config, sort_keys=False)
    ):
        return False
    return any(r["step"] == steps for r in tested_rows(out, f"test_{HEADLINE[task]}"))


def _describe(scores: dict) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if isinstance(v, float))


@torch.no_grad()
def score(model: DenseModel, data: DenseSet, dense: DenseConfig, mean, std, device) -> dict:
    """Test scores of ``model`` on all of ``data`` (segment: mIoU, pixel accuracy; detect: box
    AP, AP50, AP75), under the autocast the model trained in."""
    was_training = model.training
    model.eval()
    metric = SegmentationScore(data.num_classes) if model.task == "segment" else BoxScore()
    dtype = autocast_dtype(dense.train.precision)
    for start in range(0, len(data), dense.eval_batch_size):
        rows = torch.arange(start, min(start + dense.eval_batch_size, len(data)))
        images = normalise(data.images[rows], mean, std).to(device)
        with autocast(device, dtype):
            pred = model.predict(images)
        if model.task == "segment":
            metric.update(pred, data.semantic[rows])
        else:
            metric.update(pred, unpad_targets(*padded_boxes(data, rows)))
    model.train(was_training)
    return metric.compute()


def summarize(out: Path, task: str) -> dict:
    """The last test scores in ``out``'s metrics, and the curve of the headline score."""
    key = f"test_{HEADLINE[task]}"
    tested = tested_rows(out, key)
    if not tested:
        return {HEADLINE[task]: None, "curve": []}
    last = {k.removeprefix("test_"): v for k, v in tested[-1].items() if k.startswith("test_")}
    curve = [{"epoch": round(r["epoch"], 4), HEADLINE[task]: r[key]} for r in tested]
    return {**last, "curve": curve}


@torch.no_grad()
def picture(model, data: DenseSet, dense, mean, std, device, path: Path, n: int = 6) -> Path:
    """Rows input / ground truth / prediction of the first ``n`` test images."""
    from mimar.dense.viz import save_dense_picture

    model.eval()
    rows = torch.arange(min(n, len(data)))
    images = normalise(data.images[rows], mean, std).to(device)
    with autocast(device, autocast_dtype(dense.train.precision)):
        pred = model.predict(images)
    return save_dense_picture(data, rows, pred, model.task, path)
