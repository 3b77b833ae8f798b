"""The ``dense`` section of a segmentation / detection recipe (``configs/dense/*.yaml``).

One typed section for both tasks (the task is the command: ``mimar eval segment`` or
``mimar eval detect``): ``schedule``, pretraining's ``train`` and ``optim`` sections
(``mimar.downstream.config``) and the dense model's own keys. Every key can be overridden on
the command line (``dense.schedule.epochs=1``; the old flat ``dense.epochs=1`` still works,
with a deprecation note), unknown keys are errors with close matches, as in every other
recipe. The defaults are the papers' GPU settings for a ViT-B (BEiT / SimMIM / iTPN ADE20K
UPerNet, ViTDet COCO); the CPU recipes for the scene benchmark say what they change and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from mimar.config import OptimConfig, TrainConfig, apply_overrides, check_range, read_recipe
from mimar.downstream.config import (
    EpochSchedule,
    build_downstream,
    modernize_overrides,
    modernize_section,
)
from mimar.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "dense"
DEFAULT_RECIPES = {"segment": "segment_fmnist_scenes.yaml", "detect": "detect_fmnist_scenes.yaml"}
TASKS: tuple[str, ...] = ("segment", "detect")


def _schedule() -> EpochSchedule:
    return EpochSchedule(
        epochs=128,  # ADE20K: 160k iterations x 16 images ~ 127 passes over its 20,210
        batch_size=16,  # global; BEiT / SimMIM ADE20K
        warmup_epochs=1.2,  # ~1500 iterations of ADE20K at batch 16
        min_lr=0.0,
        eval_every_epochs=0,  # test at the end only
    )


def _optim() -> OptimConfig:
    # per 16 images (ViTDet / BEiT-style AdamW fine-tuning); layer decay 0.65 for a ViT-B, the
    # neck and head at L + 1; no clipping
    return OptimConfig(base_lr=1e-4, base_batch_size=16, layer_decay=0.65, clip_grad=None)


@dataclass(frozen=True, kw_only=True)
class DenseConfig:
    schedule: EpochSchedule = field(default_factory=_schedule)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(precision="bf16", log_every=10))
    optim: OptimConfig = field(default_factory=_optim)
    drop_path: float = 0.1
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
    eval_batch_size: int = 32

    def __post_init__(self) -> None:
        positive = ("neck_dim", "decoder_dim", "box_head_dim", "box_batch_size_per_image")
        positive += ("rpn_post_nms_top_n_train", "rpn_post_nms_top_n_test")
        positive += ("detections_per_image", "eval_batch_size")
        for key in positive:
            value = getattr(self, key)
            check_range(f"dense.{key}", value, value >= 1, ">= 1")
        check_range("dense.img_size", self.img_size, self.img_size >= 0, ">= 0")
        for key in ("drop_path", "decoder_dropout"):
            value = getattr(self, key)
            check_range(f"dense.{key}", value, 0 <= value < 1, "in [0, 1)")
        sizes = list(self.anchor_sizes)
        ok = len(sizes) == 4 and min(sizes) >= 1
        check_range("dense.anchor_sizes", sizes, ok, "4 sizes >= 1 px (one per pyramid level)")
        ratios = list(self.aspect_ratios)
        check_range("dense.aspect_ratios", ratios, bool(ratios) and min(ratios) > 0, "> 0")


def load_dense_config(
    task: str, recipe: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> DenseConfig:
    """The ``dense`` section of ``recipe`` (default: the task's CPU recipe for the scene
    benchmark) with the ``dense.*`` ``overrides`` applied."""
    if task not in TASKS:
        raise ConfigError(f"dense task must be one of {TASKS}, got {task!r}")
    recipe = RECIPES / DEFAULT_RECIPES[task] if recipe is None else recipe
    raw = read_recipe(recipe)
    modernize_section(raw, "dense", recipe)
    apply_overrides(raw, modernize_overrides(overrides, "dense"))
    unknown = sorted(set(raw) - {"dense"})
    if unknown:
        raise ConfigError(
            f"{recipe} (with overrides): unknown section(s) {unknown}; a dense recipe has one "
            "section, dense (override its keys as dense.schedule.epochs=1)"
        )
    return build_downstream(DenseConfig, raw.get("dense"), "dense")
