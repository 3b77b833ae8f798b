"""The ``finetune`` section of a fine-tuning recipe, and how a recipe meets a pretraining run.

A fine-tuning recipe (``configs/finetune/*.yaml``) has a ``finetune`` section (this dataclass)
and may have a ``data`` section whose keys override the pretraining run's data (``root``,
``img_size`` ...). Both are overridable on the command line (``finetune.epochs=1``,
``data.root=/data/imagenet``); unknown keys are errors with close matches, as in pretraining
recipes. Defaults are the SimMIM / BEiT / MAE fine-tuning recipe (docs/METHODS.md §2.6).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Literal

from mimar.config import (
    OptimConfig,
    TrainConfig,
    apply_overrides,
    build_section,
    check_loggers,
    read_recipe,
    to_dict,
)
from mimar.data import DataConfig
from mimar.data.supervised import SupervisedAugmentConfig
from mimar.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "finetune"
DEFAULT_RECIPES = {"fashion_mnist": "fmnist.yaml"}  # the CPU recipe per pretraining data set


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    epochs: int = 100  # SimMIM §2.6
    batch_size: int = 2048  # global; SimMIM §2.6 (16 GPUs x 128)
    lr: float | None = None  # absolute peak lr; None -> base_lr * batch_size / base_batch_size
    base_lr: float = 1.25e-3  # SimMIM §2.6: per 512 images
    base_batch_size: int = 512
    warmup_epochs: float = 20.0  # SimMIM §2.6
    min_lr: float = 2.5e-7  # absolute floor of the cosine (SimMIM §2.6, scaled like the lr)
    weight_decay: float = 0.05
    layer_decay: float = 0.65  # ViT-B (§2.6); lr scale decay^(L + 1 - layer_id) (§1.5)
    drop_path: float = 0.1
    clip_grad: float | None = 5.0  # SimMIM §2.6
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    label_smoothing: float = 0.1
    mixup: float = 0.8  # alpha; 0 = off
    cutmix: float = 1.0  # alpha; 0 = off
    mixup_switch_prob: float = 0.5  # probability of CutMix when both are on
    mixup_prob: float = 1.0  # probability of mixing a batch at all
    rand_augment: str = "rand-m9-mstd0.5-inc1"  # timm spec; "" = off
    reprob: float = 0.25  # random erasing (pixel mode)
    color_jitter: float = 0.0  # the official 0.4 never ran: timm drops it under RandAugment
    scale: tuple[float, float] = (0.08, 1.0)  # RandomResizedCrop scale (timm's default)
    model_ema: bool = False  # timm ModelEmaV3 of the weights; when on, it is the result
    model_ema_decay: float = 0.9999  # timm / BEiT default
    pool: Literal["avg", "cls"] = "avg"  # avg: mean of patch tokens + fc_norm (papers' ViT)
    img_size: int = 0  # 0 = the pretraining size; ViT: the position table is resampled
    precision: Literal["fp32", "bf16"] = "bf16"
    attention_kernel: Literal["auto", "sdpa", "matmul"] = "auto"  # as train.attention_kernel
    grad_checkpointing: bool = False  # as train.grad_checkpointing
    compile: bool = False  # as train.compile
    optimizer_implementation: Literal["auto", "for-loop", "foreach", "fused"] = "auto"  # optim.*
    accum_steps: int = 1
    seed: int = 0
    log_every: int = 10
    eval_every_epochs: int = 1  # test top-1 after every this many epochs (and at the end)
    checkpoint_every_epochs: int = 1
    progress: bool = True
    threads: int = 0
    device: str = "auto"
    loggers: tuple[str, ...] = ("jsonl",)  # as train.loggers

    def __post_init__(self) -> None:
        check_loggers(self.loggers, "finetune")
        for key in ("epochs", "batch_size", "accum_steps", "log_every", "base_batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"finetune.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("eval_every_epochs", "checkpoint_every_epochs", "img_size", "threads"):
            if getattr(self, key) < 0:
                raise ValueError(f"finetune.{key} must be >= 0, got {getattr(self, key)}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"finetune.layer_decay must be in (0, 1], got {self.layer_decay}")
        if not 0 <= self.drop_path < 1 or not 0 <= self.label_smoothing < 1:
            raise ValueError("finetune.drop_path and finetune.label_smoothing must be in [0, 1)")
        if self.warmup_epochs < 0 or self.min_lr < 0:
            raise ValueError("finetune.warmup_epochs and finetune.min_lr must be >= 0")
        if not (self.weight_decay >= 0 and self.base_lr > 0 and (self.lr is None or self.lr > 0)):
            raise ValueError(
                f"finetune.weight_decay must be >= 0 and finetune.lr / base_lr > 0, got "
                f"{self.weight_decay}, {self.lr} and {self.base_lr}"
            )
        if self.clip_grad is not None and not self.clip_grad >= 0:
            raise ValueError(
                f"finetune.clip_grad must be >= 0 (null or 0 disables clipping), "
                f"got {self.clip_grad}"
            )
        if not 0 <= self.model_ema_decay < 1:
            raise ValueError(
                f"finetune.model_ema_decay must be in [0, 1), got {self.model_ema_decay}"
            )
        if self.pool not in ("avg", "cls"):
            raise ValueError(f"finetune.pool must be avg or cls, got {self.pool!r}")

    def augment(self) -> SupervisedAugmentConfig:
        """The augmentation fields, for ``mimar.data.supervised.SupervisedAugment``."""
        keys = {f.name for f in fields(SupervisedAugmentConfig)}
        return SupervisedAugmentConfig(**{k: getattr(self, k) for k in keys})

    def schedule(self, steps_per_epoch: int, peak_lr: float) -> tuple[TrainConfig, OptimConfig]:
        """The engine's train / optim sections for ``steps_per_epoch`` optimizer steps."""
        return engine_sections(self, steps_per_epoch, peak_lr)

    def peak_lr(self) -> float:
        """``lr``, or the papers' linear scaling of ``base_lr`` by the global batch."""
        if self.lr is not None:
            return self.lr
        return self.base_lr * self.batch_size * self.accum_steps / self.base_batch_size


def engine_sections(cfg, steps_per_epoch: int, peak_lr: float) -> tuple[TrainConfig, OptimConfig]:
    """The engine's train / optim sections of a downstream recipe (``FinetuneConfig``,
    ``mimar.dense.config.DenseConfig``: the same key names) for ``steps_per_epoch`` steps."""
    train = TrainConfig(
        steps=cfg.epochs * steps_per_epoch,
        log_every=cfg.log_every,
        checkpoint_every=cfg.checkpoint_every_epochs * steps_per_epoch,
        accum_steps=cfg.accum_steps,
        precision=cfg.precision,
        attention_kernel=cfg.attention_kernel,
        grad_checkpointing=cfg.grad_checkpointing,
        compile=cfg.compile,
        seed=cfg.seed,
        device=cfg.device,
        threads=cfg.threads,
        progress=cfg.progress,
        loggers=cfg.loggers,
    )
    optim = OptimConfig(
        lr=peak_lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        min_lr_ratio=min(1.0, cfg.min_lr / peak_lr) if peak_lr > 0 else 0.0,
        clip_grad=cfg.clip_grad,
        layer_decay=cfg.layer_decay,
        implementation=cfg.optimizer_implementation,
    )
    return train, optim


def load_finetune_config(
    run_data: DataConfig, recipe: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[FinetuneConfig, DataConfig]:
    """The fine-tune recipe (default: the CPU recipe of the run's data set) with ``overrides``
    (``finetune.*`` and ``data.*`` keys) applied; ``data`` starts from the run's own."""
    if recipe is None:
        if run_data.name not in DEFAULT_RECIPES:
            raise ConfigError(
                f"no default fine-tune recipe for data.name={run_data.name}: pass --recipe "
                f"(e.g. {RECIPES / 'simmim_vit_base_in1k.yaml'})"
            )
        recipe = RECIPES / DEFAULT_RECIPES[run_data.name]
    raw = read_recipe(recipe)
    unknown = sorted(set(raw) - {"finetune", "data"})
    if unknown:
        raise ConfigError(
            f"{recipe}: unknown section(s) {unknown}; a fine-tune recipe has finetune and data"
        )
    apply_overrides(raw, overrides)
    unknown = sorted(set(raw) - {"finetune", "data"})
    if unknown:
        raise ConfigError(f"overrides name unknown section(s) {unknown}: use finetune.* or data.*")
    ft = build_section(FinetuneConfig, raw.get("finetune") or {}, "finetune")
    data = build_section(DataConfig, {**to_dict(run_data), **(raw.get("data") or {})}, "data")
    data = replace(data, batch_size=ft.batch_size, scale=ft.scale)
    if ft.img_size:
        data = replace(data, img_size=ft.img_size)
    return ft, data
