"""``mimar eval finetune``: end-to-end fine-tuning of a pretrained backbone on the same engine.

The papers' headline protocol (SimMIM, EVA, iTPN, D-iGPT): the whole network trains with
layer-wise lr decay, Mixup/CutMix, RandAugment, random erasing and label smoothing
(docs/METHODS.md §2.6, §4.5, §6.7). The fine-tune is a run of its own in
``RUN_DIR/eval/finetune/`` (``config.yaml``, ``metrics.jsonl`` with per-step loss / lr /
images_per_s and per-epoch ``test_top1``, ``checkpoints/last.pt``), with pretraining's
guarantees (exact resume, signals, NaN stop, bf16, accumulation, DDP under torchrun), since it
runs through the downstream runner (``mimar.downstream.runner``, also the dense tasks') on the
same ``mimar.engine.loop.fit``: this module gives it the task (``FinetuneTask``).
``scratch=True`` trains the same recipe from random initialisation into
``RUN_DIR/eval/finetune-scratch/``: the papers' comparison.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mimar import runs
from mimar.config import to_dict
from mimar.data import DataConfig, ImageSet, iterate_eval_batches, load_images
from mimar.data.eval_data import data_for_backbone, parse_data_spec
from mimar.data.image_set import align_classes
from mimar.downstream.config import record
from mimar.downstream.runner import refuse_existing, tested_rows, train_downstream
from mimar.engine import checkpoint
from mimar.engine.loop import RunResult, Session
from mimar.engine.precision import autocast
from mimar.errors import DataError, MissingFileError
from mimar.finetune.classifier import Classifier, build_classifier, finetune_backbone_config
from mimar.finetune.config import FinetuneConfig, load_finetune_config
from mimar.finetune.loader import SupervisedStepLoader
from mimar.loading import load_run, resolve_checkpoint

log = logging.getLogger("mimar")

FOLDERS = {False: "finetune", True: "finetune-scratch"}


def finetune_dir(run_dir: str | Path, scratch: bool = False, out: str | Path | None = None) -> Path:
    """``RUN_DIR/eval/finetune`` (or ``finetune-scratch``; under ``out`` with ``--out``): a
    fine-tune's own run folder."""
    return runs.eval_folder(run_dir, out) / FOLDERS[scratch]


def finetune(
    source: str | Path,
    *,
    recipe: str | Path | None = None,
    overrides: tuple[str, ...] = (),
    max_train: int = 0,
    max_test: int = 0,
    scratch: bool = False,
    resume: bool = False,
    data_spec: str | None = None,
    unknown_classes: str = "error",
    eval_out: str | Path | None = None,
) -> dict:
    """Fine-tune the backbone of ``source`` (a run folder, a checkpoint, or an exported
    ``.safetensors`` backbone, whose fine-tune goes to ``eval/`` beside it); returns the summary
    ``{"top1": final-epoch test top-1, "best_top1", "best_epoch", "curve", ...}``.

    ``data_spec``: ``KIND:PATH`` (``--data``) fine-tunes on those images instead of the recipe's,
    with the backbone's channels and the run's statistics (:mod:`mimar.data.eval_data`).
    ``unknown_classes="wrong"``: test images of a class the train split lacks count as wrong
    (:func:`mimar.data.image_set.align_classes`; the summary's ``unknown_classes``).
    ``eval_out``: ``--out``, the folder that takes ``finetune/`` instead of ``RUN/eval``."""
    spec = parse_data_spec(data_spec)  # a bad KIND fails before anything is read
    source_backbone, source_data, method, state = _source(source)
    out = finetune_dir(source, scratch, eval_out)
    if not resume:
        refuse_existing(out, "fine-tune")
    ft, data = load_finetune_config(source_data, recipe, overrides, (method, source_backbone.name))
    if spec is not None:
        data, note = data_for_backbone(source_data, *spec, base=data)
        print(note)
    train_set = load_images(replace(data, max_images=max_train), "train")
    test_set = load_images(
        replace(data, max_images=max_test), "test", unknown_classes=unknown_classes
    )
    if train_set.labels is None or test_set.labels is None:
        raise DataError(f"{data.root} has no labels (class sub-folders) to fine-tune with")
    test_set, unknown = align_classes(train_set, test_set, str(data.root), unknown_classes)
    num_classes = int(max(train_set.labels.max(), test_set.labels.max())) + 1
    backbone_cfg = finetune_backbone_config(
        source_backbone, drop_path=ft.drop_path, pool=ft.pool, img_size=ft.img_size
    )
    config = {
        "finetune": record(ft),
        "data": to_dict(data),
        "backbone": to_dict(backbone_cfg),
        "num_classes": num_classes,
        "pretrained": None if scratch else str(source),
        "method": method,
    }
    task = FinetuneTask(
        ft, data, backbone_cfg, source_backbone, None if scratch else state["model"],
        num_classes, train_set, test_set,
    )  # fmt: skip
    result = train_downstream(task, out, config, resume=resume)
    summary = summarize(out, result, ft, len(train_set), len(test_set))
    return summary | ({"unknown_classes": unknown} if unknown_classes == "wrong" else {})


@dataclass
class FinetuneTask:
    """Image classification for the downstream runner: the classifier over the pretrained
    backbone, the augmented step loader, test top-1 after each evaluated epoch."""

    cfg: FinetuneConfig
    data: DataConfig
    backbone_cfg: Any
    source_backbone: Any
    weights: dict | None  # the pretraining checkpoint's model state; None: from scratch
    num_classes: int
    train_set: ImageSet
    test_set: ImageSet
    name: str = "finetune"

    def build_model(self, session: Session) -> Classifier:
        ft = self.cfg
        return build_classifier(
            self.backbone_cfg,
            self.num_classes,
            pool=ft.pool,
            state=self.weights,
            source_cfg=self.source_backbone,
            ema_decay=ft.model_ema_decay if ft.model_ema else None,
        )

    def build_loader(self, session: Session) -> SupervisedStepLoader:
        return SupervisedStepLoader(
            self.train_set,
            self.data,
            self.cfg.augment(),
            self.num_classes,
            seed=self.cfg.train.seed,
            rank=session.rank,
            world_size=session.world,
        )

    def evaluate(self, classifier: Classifier, step: int, session: Session, loader) -> dict:
        size, precision = self.data.img_size, self.cfg.train.precision
        top1 = accuracy(classifier.final(), self.test_set, size, precision, session.device)
        log.info("epoch %.2f: test top-1 %.2f", loader.epoch_of(step), top1)
        if classifier.ema is None:
            return {"test_top1": top1}
        raw = accuracy(classifier, self.test_set, size, precision, session.device)
        log.info("  without the weight average: %.2f", raw)
        return {"test_top1": top1, "test_top1_raw": raw}

    def finish(self, model: Classifier, session: Session) -> None:
        pass  # the fine-tune's result is its checkpoint and its test curve


def _source(source: str | Path) -> tuple:
    """(backbone config, data config, method name, checkpoint state) of what is fine-tuned.
    An exported file has no data section: the data defaults to Fashion-MNIST at the
    backbone's size (a recipe's ``data`` section or ``data.*`` overrides say otherwise)."""
    from mimar.loading import load_backbone

    if Path(source).suffix != ".safetensors":
        run_cfg, state = load_run(source)
        return run_cfg.backbone, run_cfg.data, run_cfg.method.name, state
    backbone = load_backbone(source)  # also reads timm Beit names
    state = {"model": {f"backbone.{k}": v for k, v in backbone.state_dict().items()}}
    c = backbone.cfg
    return c, DataConfig(img_size=c.img_size, in_chans=c.in_chans), "exported", state


@torch.no_grad()
def accuracy(
    classifier: torch.nn.Module, images: ImageSet, img_size: int, precision: str, device
) -> float:
    """Test top-1 (%) of ``classifier`` on the eval view of ``images`` under the autocast
    ``precision`` (``fp32`` / ``bf16``) it trained in."""
    was_training = classifier.training
    classifier.eval()
    dtype = torch.bfloat16 if precision == "bf16" else None
    correct = 0
    for batch, labels in iterate_eval_batches(images, img_size, 256):
        with autocast(device, dtype):
            logits = classifier.logits(batch.to(device))
        correct += (logits.argmax(-1).cpu() == labels).sum().item()
    classifier.train(was_training)
    return 100.0 * correct / len(images)


def summarize(out: Path, result: RunResult, ft, n_train: int, n_test: int) -> dict:
    """The fine-tune's per-epoch test top-1 read back from its metrics: final and best."""
    curve = [
        {"epoch": round(row["epoch"], 4), "top1": row["test_top1"]}
        for row in tested_rows(out, "test_top1")
    ]
    if not curve:
        return {"top1": None, "curve": [], "stopped_by": result.stopped_by}
    best = max(curve, key=lambda r: r["top1"])
    return {
        "top1": curve[-1]["top1"],  # the headline: the final epoch, never the best one
        "best_top1": best["top1"],
        "best_epoch": best["epoch"],
        "curve": curve,
        "epochs": ft.schedule.epochs,
        "n_train": n_train,
        "n_test": n_test,
        "run_dir": str(out),
        "stopped_by": result.stopped_by,
    }


def load_finetuned(
    run_dir: str | Path, scratch: bool = False, eval_out: str | Path | None = None
) -> tuple[Classifier, dict]:
    """The fine-tuned classifier of ``RUN_DIR/eval/finetune`` (or ``eval_out/finetune``; eval
    mode) and its config."""
    out = finetune_dir(run_dir, scratch, eval_out)
    ckpt = runs.last_checkpoint(out)
    if not ckpt.is_file():
        what = "from-scratch fine-tune" if scratch else "fine-tuned model"
        flag = " --baselines" if scratch else ""
        raise MissingFileError(
            f"{run_dir} has no {what} ({ckpt} is missing): run "
            f"`mimar eval finetune --checkpoint {run_dir}{flag}` first"
        )
    state = checkpoint.load(ckpt)
    return classifier_from_state(state), state["config"]


def load_for_export(source: str | Path) -> torch.nn.Module:
    """What ``mimar export`` writes from ``source`` (read once): a fine-tune run's classifier,
    else the pretrained backbone of a run folder, checkpoint or exported file."""
    from mimar.config import from_dict
    from mimar.loading import backbone_from_state, load_backbone

    if Path(source).suffix == ".safetensors":
        return load_backbone(source)
    state = checkpoint.load(resolve_checkpoint(source))
    if "finetune" in state["config"]:
        return classifier_from_state(state)
    return backbone_from_state(from_dict(state["config"]), state)


def classifier_from_state(state: dict) -> Classifier:
    """A fine-tune checkpoint's classifier with its trained weights, eval mode."""
    from mimar.config import section_from_dict

    cfg = state["config"]
    backbone_cfg = section_from_dict("backbone", cfg["backbone"])
    ft = cfg["finetune"]
    ema_decay = ft["model_ema_decay"] if ft.get("model_ema") else None
    model = build_classifier(
        backbone_cfg, cfg["num_classes"], pool=ft["pool"], state=None, ema_decay=ema_decay
    )
    model.load_state_dict(state["model"])
    return model.final().eval()


def trained_precision(config: dict) -> str:
    """The autocast precision a fine-tune trained in, from its saved config (``finetune.train.
    precision``; fine-tunes written before the sections nested: ``finetune.precision``)."""
    ft = config["finetune"]
    return ft["train"]["precision"] if "train" in ft else ft["precision"]
