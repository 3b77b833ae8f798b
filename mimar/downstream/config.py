"""The training part of a downstream recipe section, shared by fine-tuning and dense runs.

A fine-tune (``finetune:``) or dense (``dense:``) section nests three sections and adds only
its task's own keys::

    finetune:
      schedule: {epochs: 2, batch_size: 64, warmup_epochs: 0.2, min_lr: 1.0e-6}
      train: {precision: bf16, log_every: 10}   # pretraining's TrainConfig
      optim: {lr: 2.0e-3, layer_decay: 0.75}    # pretraining's OptimConfig
      drop_path: 0.0                            # the task's keys

The engine counts optimizer steps; a downstream run counts epochs. ``engine_sections`` turns
the schedule into the engine's step counts once the loader knows its steps per epoch; the keys
it derives (``DERIVED``) are refused in a downstream recipe. A section's nested sections start
from the task's defaults (``FinetuneConfig().train`` logs every 10 steps in bf16), not from
pretraining's. Recipes and overrides written before the sections existed (``finetune.lr``,
``dense.batch_size``: ``LEGACY``) keep working, each old key with a one-line deprecation note.
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, fields, replace
from typing import Any

from mimar.config import OptimConfig, TrainConfig, build_section, check_range, to_dict
from mimar.engine.optim import peak_lr
from mimar.errors import ConfigError

log = logging.getLogger("mimar")

SECTIONS = ("schedule", "train", "optim")


@dataclass(frozen=True, kw_only=True)
class EpochSchedule:
    """How long a downstream run trains and how often it tests, in epochs of its data."""

    epochs: int = 100
    batch_size: int = 16  # global images of a micro-batch (train.accum_steps per step)
    warmup_epochs: float = 0.0  # linear warm-up, then a half cosine
    min_lr: float = 0.0  # absolute floor of the cosine (the papers give it absolute)
    eval_every_epochs: int = 1  # test after every this many epochs; 0 = at the end only
    checkpoint_every_epochs: int = 1  # periodic checkpoints; 0 = only checkpoints/last.pt

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size"):
            value = getattr(self, key)
            check_range(f"schedule.{key}", value, value >= 1, ">= 1")
        for key in ("warmup_epochs", "min_lr", "eval_every_epochs", "checkpoint_every_epochs"):
            value = getattr(self, key)
            check_range(f"schedule.{key}", value, value >= 0, ">= 0")


# Keys the schedule sets: a downstream recipe that sets them is refused, naming the one to set.
DERIVED = {
    "train.steps": "schedule.epochs",
    "train.checkpoint_every": "schedule.checkpoint_every_epochs",
    "optim.warmup_steps": "schedule.warmup_epochs",
    "optim.warmup_fraction": "schedule.warmup_epochs",
    "optim.min_lr_ratio": "schedule.min_lr",
}
# Pretraining-only keys: downstream runs are DDP runs without pictures.
UNSUPPORTED = ("train.strategy", "train.picture_every")

# The flat keys of the sections before they nested, and where each lives now.
LEGACY = {
    **{k: f"schedule.{k}" for k in ("epochs", "batch_size", "warmup_epochs", "min_lr")},
    **{k: f"schedule.{k}" for k in ("eval_every_epochs", "checkpoint_every_epochs")},
    **{
        k: f"train.{k}"
        for k in ("log_every", "accum_steps", "precision", "attention_kernel", "seed", "device")
    },
    **{k: f"train.{k}" for k in ("grad_checkpointing", "compile", "threads", "progress")},
    "loggers": "train.loggers",
    **{k: f"optim.{k}" for k in ("lr", "base_lr", "base_batch_size", "weight_decay", "eps")},
    **{k: f"optim.{k}" for k in ("layer_decay", "clip_grad", "betas")},
    "optimizer_implementation": "optim.implementation",
}


def modernize_section(raw: dict, name: str, source: Any) -> None:
    """Move the old flat keys of ``raw[name]`` (a recipe read from ``source``) into their
    nested sections, in place, with one deprecation line per key."""
    section = raw.get(name)
    if not isinstance(section, dict):
        return
    for old in [key for key in section if key in LEGACY]:
        new = LEGACY[old]
        log.warning("%s: %s.%s is deprecated, use %s.%s", source, name, old, name, new)
        group, key = new.split(".")
        nested = section.setdefault(group, {})
        if not isinstance(nested, dict):
            raise ConfigError(f"{source}: {name}.{group} must be a section (mapping)")
        nested.setdefault(key, section[old])  # the nested key wins when a recipe has both
        del section[old]


def modernize_overrides(overrides: list[str] | tuple[str, ...], name: str) -> list[str]:
    """``overrides`` with every old flat ``name.key=value`` renamed to its nested key, with
    one deprecation line per key (``finetune.lr=1e-3`` -> ``finetune.optim.lr=1e-3``)."""
    out = []
    for item in overrides:
        key, sep, value = item.partition("=")
        section, _, leaf = key.strip().partition(".")
        if sep and section == name and leaf in LEGACY:
            new = f"{name}.{LEGACY[leaf]}"
            log.warning("%s is deprecated, use %s", key.strip(), new)
            item = f"{new}={value}"
        out.append(item)
    return out


def build_downstream(cls: type, raw: Any, name: str) -> Any:
    """The downstream section ``cls`` (``FinetuneConfig``, ``DenseConfig``) of the mapping
    ``raw`` (old keys already moved), its nested sections starting from ``cls()``'s."""
    if not isinstance(raw or {}, dict):
        raise ConfigError(f"{name}: expected a section (mapping), got {raw!r}")
    raw, defaults = dict(raw or {}), cls()
    _hint_moved_keys(raw, cls, name)
    for group in SECTIONS:
        given = raw.get(group) or {}
        if not isinstance(given, dict):
            raise ConfigError(f"{name}.{group}: expected a section (mapping), got {given!r}")
        for key in given:
            full = f"{group}.{key}"
            if full in DERIVED:
                raise ConfigError(
                    f"{name}.{full} is derived from {name}.{DERIVED[full]}: set that instead"
                )
            if full in UNSUPPORTED:
                raise ConfigError(f"{name}.{full} is a pretraining key; {name} runs do not take it")
        raw[group] = {**to_dict(getattr(defaults, group)), **given}
    try:
        return build_section(cls, raw, name)
    except ConfigError as err:  # the nested sections' checks name their key without ``name.``
        text = str(err)
        if text.startswith(tuple(f"{group}." for group in SECTIONS)):
            raise ConfigError(f"{name}.{text}") from None
        raise


def _hint_moved_keys(raw: dict, cls: type, name: str) -> None:
    """An unknown key close to a moved one (``dense.epoch``) names its nested place."""
    known = {f.name for f in fields(cls)}
    for key in raw:
        if key in known:
            continue
        close = difflib.get_close_matches(key, list(LEGACY), n=1, cutoff=0.8)
        if close:
            raise ConfigError(
                f"unknown config key '{name}.{key}'; did you mean {name}.{LEGACY[close[0]]}?"
            )


def engine_sections(cfg: Any, steps_per_epoch: int) -> tuple[TrainConfig, OptimConfig]:
    """The engine's ``train`` / ``optim`` sections of the downstream section ``cfg`` for
    ``steps_per_epoch`` optimizer steps: steps, checkpoints, warm-up and the cosine floor
    from the schedule; the peak lr from ``optim`` (``lr``, or ``base_lr`` scaled by the
    images per step)."""
    s = cfg.schedule
    peak = peak_lr(cfg.optim, s.batch_size * cfg.train.accum_steps)
    train = replace(
        cfg.train,
        steps=s.epochs * steps_per_epoch,
        checkpoint_every=s.checkpoint_every_epochs * steps_per_epoch,
    )
    optim = replace(
        cfg.optim,
        lr=peak,
        warmup_steps=round(s.warmup_epochs * steps_per_epoch),
        min_lr_ratio=min(1.0, s.min_lr / peak) if peak > 0 else 0.0,
    )
    return train, optim


def record(cfg: Any) -> dict:
    """``cfg`` as the run folder's ``config.yaml`` holds it: without the keys the schedule
    derives (their defaults would only mislead a reader)."""
    tree = to_dict(cfg)
    for key in (*DERIVED, *UNSUPPORTED):
        group, leaf = key.split(".")
        tree[group].pop(leaf, None)
    return tree
