"""The ``finetune`` section of a fine-tuning recipe, and how a recipe meets a pretraining run.

A fine-tuning recipe (``configs/finetune/*.yaml``) has a ``finetune`` section (this dataclass:
``schedule``, pretraining's ``train`` and ``optim`` sections, the fine-tune's own keys,
``mimar.downstream.config``) and may have a ``data`` section whose keys override the
pretraining run's data (``root``, ``img_size`` ...). Both are overridable on the command line
(``finetune.schedule.epochs=1``, ``finetune.optim.lr=1e-3``, ``data.root=/data/imagenet``; the
old flat ``finetune.epochs=1`` still works, with a deprecation note); unknown keys are errors
with close matches, as in pretraining recipes. Defaults are the SimMIM / BEiT / MAE
fine-tuning recipe (docs/METHODS.md §2.6).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

from mimar.config import (
    OptimConfig,
    TrainConfig,
    apply_overrides,
    build_section,
    check_range,
    read_recipe,
    to_dict,
)
from mimar.data import DataConfig
from mimar.data.supervised import SupervisedAugmentConfig
from mimar.downstream.config import (
    EpochSchedule,
    build_downstream,
    modernize_overrides,
    modernize_section,
)
from mimar.errors import ConfigError

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "finetune"
DEFAULT_RECIPES = {"fashion_mnist": "fmnist.yaml"}  # the CPU recipe per pretraining data set
# Any other data (an imported release, a run on the user's images): the paper's own fine-tuning
# recipe of the run's method and backbone (docs/METHODS.md). AIM's paper only probes, so an
# AIM run names a recipe with --recipe.
PAPER_RECIPES = {
    ("simmim", "vit"): "simmim_vit_base_in1k.yaml",
    ("simmim", "swin"): "simmim_swin_base_in1k.yaml",
    ("eva", "vit"): "eva_vit_base_in1k.yaml",
    ("itpn", "hivit"): "itpn_base_in1k.yaml",
    ("itpn_clip", "hivit"): "itpn_base_in1k.yaml",
    ("digpt", "vit"): "digpt_vit_base_in1k.yaml",
}


def _schedule() -> EpochSchedule:
    return EpochSchedule(
        epochs=100,  # SimMIM §2.6
        batch_size=2048,  # global; SimMIM §2.6 (16 GPUs x 128)
        warmup_epochs=20.0,  # SimMIM §2.6
        min_lr=2.5e-7,  # SimMIM §2.6 (scaled like the lr)
        eval_every_epochs=1,
    )


def _optim() -> OptimConfig:
    # SimMIM §2.6: base_lr per 512 images, layer decay 0.65 (ViT-B), clipping at 5
    return OptimConfig(base_lr=1.25e-3, base_batch_size=512, layer_decay=0.65, clip_grad=5.0)


@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    schedule: EpochSchedule = field(default_factory=_schedule)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(precision="bf16", log_every=10))
    optim: OptimConfig = field(default_factory=_optim)
    drop_path: float = 0.1
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

    def __post_init__(self) -> None:
        for key in ("drop_path", "label_smoothing"):
            value = getattr(self, key)
            check_range(f"finetune.{key}", value, 0 <= value < 1, "in [0, 1)")
        decay = self.model_ema_decay
        check_range("finetune.model_ema_decay", decay, 0 <= decay < 1, "in [0, 1)")
        check_range("finetune.img_size", self.img_size, self.img_size >= 0, ">= 0")
        check_range("finetune.pool", self.pool, self.pool in ("avg", "cls"), "avg or cls")
        try:  # the augmentation keys are checked when the recipe loads, not when training starts
            self.augment()
        except ValueError as err:
            raise ConfigError(f"finetune.{err}") from None

    def augment(self) -> SupervisedAugmentConfig:
        """The augmentation fields, for ``mimar.data.supervised.SupervisedAugment``."""
        keys = {f.name for f in fields(SupervisedAugmentConfig)}
        return SupervisedAugmentConfig(**{k: getattr(self, k) for k in keys})


def default_recipe(run_data: DataConfig, method: tuple[str, str] = ("", "")) -> Path:
    """The fine-tune recipe when ``--recipe`` is not given: the CPU recipe of the run's data
    set (Fashion-MNIST), else the paper recipe of ``method`` = (method name, backbone name),
    said in one line."""
    if run_data.name in DEFAULT_RECIPES:
        return RECIPES / DEFAULT_RECIPES[run_data.name]
    if method in PAPER_RECIPES:
        recipe = RECIPES / PAPER_RECIPES[method]
        print(
            f"fine-tune recipe: {recipe} (the {method[0]} paper's; --recipe R.yaml or "
            "finetune.KEY=VALUE to change it)"
        )
        return recipe
    raise ConfigError(
        f"no default fine-tune recipe for data.name={run_data.name} and method {method[0] or '?'}"
        f": pass --recipe (e.g. {RECIPES / 'simmim_vit_base_in1k.yaml'})"
    )


def load_finetune_config(
    run_data: DataConfig,
    recipe: str | Path | None,
    overrides: list[str] | tuple[str, ...] = (),
    method: tuple[str, str] = ("", ""),
) -> tuple[FinetuneConfig, DataConfig]:
    """The fine-tune recipe (default: :func:`default_recipe`) with ``overrides``
    (``finetune.*`` and ``data.*`` keys) applied; ``data`` starts from the run's own."""
    if recipe is None:
        recipe = default_recipe(run_data, method)
    raw = read_recipe(recipe)
    unknown = sorted(set(raw) - {"finetune", "data"})
    if unknown:
        raise ConfigError(
            f"{recipe}: unknown section(s) {unknown}; a fine-tune recipe has finetune and data"
        )
    modernize_section(raw, "finetune", recipe)
    apply_overrides(raw, modernize_overrides(overrides, "finetune"))
    unknown = sorted(set(raw) - {"finetune", "data"})
    if unknown:
        raise ConfigError(f"overrides name unknown section(s) {unknown}: use finetune.* or data.*")
    ft = build_downstream(FinetuneConfig, raw.get("finetune"), "finetune")
    data = build_section(DataConfig, {**to_dict(run_data), **(raw.get("data") or {})}, "data")
    data = replace(data, batch_size=ft.schedule.batch_size, scale=ft.scale)
    if ft.img_size:
        data = replace(data, img_size=ft.img_size)
    return ft, data
