"""The ``dense`` section of a segmentation / detection recipe (``configs/dense/*.yaml``).

One typed section for both tasks (the task is the command: ``mimar eval segment`` or
``mimar eval detect``); every key can be overridden on the command line (``dense.epochs=1``),
unknown keys are errors with close matches, as in every other recipe. The defaults are the
papers' GPU settings for a ViT-B (BEiT / SimMIM / iTPN ADE20K UPerNet, ViTDet COCO); the CPU
recipes for the scene benchmark say what they change and why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mimar.config import (
    OptimConfig,
    TrainConfig,
    apply_overrides,
    build_section,
    check_loggers,
    read_recipe,
)
from mimar.errors import ConfigError
from mimar.finetune.config import engine_sections

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "dense"
DEFAULT_RECIPES = {"segment": "segment_fmnist_scenes.yaml", "detect": "detect_fmnist_scenes.yaml"}
TASKS: tuple[str, ...] = ("segment", "detect")


@dataclass(frozen=True, kw_only=True)
class DenseConfig:
    epochs: int = 128  # ADE20K: 160k iterations x 16 images ~ 127 passes over its 20,210
    batch_size: int = 16  # global; BEiT / SimMIM ADE20K
    lr: float | None = None  # absolute peak lr; None -> base_lr * batch_size / base_batch_size
    base_lr: float = 1e-4  # per 16 images (ViTDet / BEiT-style AdamW fine-tuning)
    base_batch_size: int = 16
    warmup_epochs: float = 1.2  # ~1500 iterations of ADE20K at batch 16
    min_lr: float = 0.0
    weight_decay: float = 0.05
    layer_decay: float = 0.65  # ViT-B; lr scale decay^(L + 1 - layer_id); the neck/head at L + 1
    drop_path: float = 0.1
    clip_grad: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    img_size: int = 0  # square side the images are resized to; 0 = the data's own size
    hflip: bool = True  # random horizontal flip of image, labels and boxes
    neck_dim: int = 256  # width F of every pyramid level (ViTDet / FPN: 256)
    decoder_dim: int = 512  # UPerNet channels (mmseg's UPerHead for ViT-B)
    decoder_dropout: float = 0.1  # before the UPerNet classifier (mmseg)
    anchor_sizes: tuple[int, ...] = (32, 64, 128, 256)  # px, one per pyramid level, finest first
    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    box_head_dim: int = 1024  # torchvision's TwoMLPHead width
    box_batch_size_per_image: int = 512  # RoIs sampled per image for the box head (torchvision)
    rpn_post_nms_top_n_train: int = 2000  # proposals kept per image (torchvision)
    rpn_post_nms_top_n_test: int = 1000
    detections_per_image: int = 100
    precision: Literal["fp32", "bf16"] = "bf16"  # autocast of backbone, pyramid, decoder
    attention_kernel: Literal["auto", "sdpa", "matmul"] = "auto"  # as train.attention_kernel
    grad_checkpointing: bool = False  # as train.grad_checkpointing
    compile: bool = False  # as train.compile
    optimizer_implementation: Literal["auto", "for-loop", "foreach", "fused"] = "auto"
    accum_steps: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every_epochs: int = 0  # test metrics every this many epochs (0 = at the end only)
    checkpoint_every_epochs: int = 1
    eval_batch_size: int = 32
    progress: bool = True
    threads: int = 0
    device: str = "auto"
    loggers: tuple[str, ...] = ("jsonl",)  # as train.loggers

    def __post_init__(self) -> None:
        check_loggers(self.loggers, "dense")
        positive = ("epochs", "batch_size", "accum_steps", "log_every", "base_batch_size")
        positive += ("neck_dim", "decoder_dim", "box_head_dim", "box_batch_size_per_image")
        positive += ("rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test")
        positive += ("detections_per_image", "eval_batch_size")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"dense.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every_epochs", "checkpoint_every_epochs", "img_size", "threads"):
            if getattr(self, key) < 0:
                raise ValueError(f"dense.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"dense.layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.drop_path < 1 or not 0 <= self.decoder_dropout < 1:
            raise ValueError("dense.drop_path and dense.decoder_dropout must be in [0, 1)")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or self.min_lr < 0:
            raise ValueError("dense.weight_decay, warmup_epochs and min_lr must be >= 0")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ValueError(f"dense.clip_grad must be > 0 or null, got {self.clip_grad}")
        if not (self.base_lr > 0 and (self.lr is None or self.lr > 0)):
            raise ValueError(
                f"dense.lr and dense.base_lr must be > 0, got {self.lr}, {self.base_lr}"
            )
        if len(self.anchor_sizes) != 4 or min(self.anchor_sizes) < 1:
            raise ValueError(
                f"dense.anchor_sizes needs 4 sizes >= 1 px (one per pyramid level), "
                f"got {list(self.anchor_sizes)}"
            )
        if not self.aspect_ratios or min(self.aspect_ratios) <= 0:
            raise ValueError(f"dense.aspect_ratios must be > 0, got {list(self.aspect_ratios)}")

    def schedule(self, steps_per_epoch: int) -> tuple[TrainConfig, OptimConfig]:
        """The engine's train / optim sections for ``steps_per_epoch`` optimizer steps."""
        return engine_sections(self, steps_per_epoch, self.peak_lr())

    def peak_lr(self) -> float:
        """``lr``, or the linear scaling of ``base_lr`` by the global batch."""
        if self.lr is not None:
            return self.lr
        return self.base_lr * self.batch_size * self.accum_steps / self.base_batch_size


def load_dense_config(
    task: str, recipe: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> DenseConfig:
    """The ``dense`` section of ``recipe`` (default: the task's CPU recipe for the scene
    benchmark) with the ``dense.*`` ``overrides`` applied."""
    if task not in TASKS:
        raise ConfigError(f"dense task must be one of {TASKS}, got {task!r}")
    recipe = RECIPES / DEFAULT_RECIPES[task] if recipe is None else recipe
    raw = read_recipe(recipe)
    apply_overrides(raw, overrides)
    unknown = sorted(set(raw) - {"dense"})
    if unknown:
        raise ConfigError(
            f"{recipe} (with overrides): unknown section(s) {unknown}; a dense recipe has one "
            "section, dense (override its keys as dense.epochs=1)"
        )
    return build_section(DenseConfig, raw.get("dense") or {}, "dense")
