"""The one factory: a recipe -> its method, built from the names in ``mimar.names``.

The backbone is built first, then the teacher the method's table entry asks for, then the
method itself (which adds its heads, and for iTPN the pyramid neck, in that order: the same
draws from the global RNG as ``mimar.loading.random_init_backbone``). Nothing else maps
strings to classes.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mimar import names
from mimar.backbones import build_backbone
from mimar.config import PretrainConfig, apply_overrides, from_dict, to_dict
from mimar.data import normalization_stats
from mimar.errors import ConfigError
from mimar.loading import load_run, teacher_backbone
from mimar.teachers import FrozenTeacher, build_teacher

__all__ = ["build_backbone", "build_method", "load_method"]


def build_method(cfg: PretrainConfig) -> nn.Module:
    """Build the pretraining method of a :class:`~mimar.config.PretrainConfig`.

    A method that does not fit its backbone or teacher (e.g. SimMIM without a mask token)
    raises a :class:`~mimar.errors.ConfigError` naming the key to change.
    """
    entry = names.entry("method", cfg.method.name)
    backbone = build_backbone(cfg.backbone)
    args = [cfg.method, backbone]
    if entry.teacher != "none":
        args.append(_teacher_for(cfg, backbone, entry))
    try:
        return entry.module_class()(*args)
    except ValueError as err:  # a constructor's check of its parts: the recipe must change
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from None


def load_method(
    source: str | Path, teacher: list[str] | tuple[str, ...] = ()
) -> tuple[PretrainConfig, nn.Module]:
    """The config and the whole trained method of a run folder or checkpoint (pictures).

    ``teacher``: ``teacher.*=value`` words replacing the run's teacher (not in a checkpoint):
    an imported EVA / D-iGPT release names a recipe's teacher files the user may not have.
    """
    cfg, state = load_run(source)
    if teacher:
        stray = [w for w in teacher if not w.startswith("teacher.")]
        if stray:
            raise ConfigError(f"only teacher.* keys can change a trained method, got {stray}")
        cfg = from_dict(apply_overrides(to_dict(cfg), teacher))
    method = build_method(cfg)
    method.load_state_dict(state["model"])
    return cfg, method


def _teacher_for(cfg: PretrainConfig, backbone: nn.Module, entry: names.Entry) -> FrozenTeacher:
    """The frozen teacher of ``cfg.teacher``: aligned to ``backbone``'s patch grid, or on its
    own grid for ``own_grid`` methods (D-iGPT aligns per cluster itself)."""
    kinds = "open_clip, hf_clip, timm, mimar" + (", pixels" if entry.teacher == "own_grid" else "")
    if cfg.teacher.kind == "none":
        raise ConfigError(
            f"method {cfg.method.name} needs a frozen teacher: set teacher.kind ({kinds}) and "
            "its files, e.g. teacher.kind=mimar teacher.path=RUN_DIR"
        )
    if cfg.teacher.kind == "pixels" and entry.teacher != "own_grid":
        raise ConfigError(
            "teacher.kind=pixels is D-iGPT's pixel-target ablation; "
            f"method {cfg.method.name} needs a feature teacher ({kinds})"
        )
    mean, std = normalization_stats(cfg.data)
    return build_teacher(
        cfg.teacher,
        student_grid=backbone.grid_size,
        student_in_chans=backbone.in_chans,
        data_mean=mean,
        data_std=std,
        student_img_size=backbone.img_size,
        resample=entry.teacher == "aligned",
        load_mimar=teacher_backbone,
    )
