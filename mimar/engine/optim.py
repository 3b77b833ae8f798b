"""AdamW parameter groups (no decay, layer decay) and the warm-up + cosine schedule."""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from mimar.errors import ConfigError


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float = 1.0,
    decay_on: tuple[str, ...] = (),
) -> list[dict]:
    """Group trainable parameters by (weight decay on/off, layer-decay id).

    No weight decay for 1-D parameters (norms, biases, LayerScale), and for whatever the
    backbone lists in ``no_weight_decay()`` (position embeddings, class/mask tokens, relative
    position tables) unless a pattern of ``decay_on`` (fnmatch, on backbone-relative names)
    names it. With ``layer_decay < 1``, parameters of backbone layer ``j`` get
    ``lr_scale = layer_decay ** (L + 1 - j)`` (docs/METHODS.md §1.5); non-backbone parameters 1.
    """
    backbone = getattr(model, "backbone", None)  # absent: a plain module, no backbone rules
    skip = backbone.no_weight_decay() if backbone is not None else set()
    for pattern in decay_on:
        matched = fnmatch.filter(skip, pattern)
        if not matched:
            raise ConfigError(
                f"optim.weight_decay_on: {pattern!r} names none of the backbone's exempt "
                f"parameters ({', '.join(sorted(skip)) or 'none'})"
            )
        skip = skip - set(matched)
    num_layers = backbone.num_layers if backbone is not None else 0
    groups: dict[tuple[bool, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        inner = name.removeprefix("backbone.") if name.startswith("backbone.") else None
        no_decay = param.ndim <= 1 or name.endswith(".bias") or (inner in skip)
        layer = backbone.layer_id(inner) if inner is not None else num_layers + 1
        scale = layer_decay ** (num_layers + 1 - layer) if layer_decay != 1.0 else 1.0
        key = (no_decay, scale)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "weight_decay": 0.0 if no_decay else weight_decay,
                "lr_scale": scale,
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def build_optimizer(model: nn.Module, cfg, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(
        model, cfg.weight_decay, layer_decay=cfg.layer_decay, decay_on=cfg.weight_decay_on
    )
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    impl = cfg.implementation
    kernel = {} if impl == "auto" else {"foreach": impl == "foreach", "fused": impl == "fused"}
    return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, **kernel)


def peak_lr(cfg, global_batch: int) -> float:
    """Peak lr of an ``OptimConfig``: ``lr`` if set, else the papers' linear scaling of
    ``base_lr`` by the images per optimizer step (``global_batch``, accumulation included).
    The one place for it: pretraining, fine-tuning and dense runs all call it."""
    if cfg.lr is not None:
        return cfg.lr
    return cfg.base_lr * global_batch / cfg.base_batch_size


scaled_lr = peak_lr  # the name the engine loop and older code use


def lr_at(step: int, peak: float, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Per-step linear warm-up from 0 then half-cosine to ``min_ratio * peak``.

    ``step`` counts completed optimizer steps (0 for the first update).
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    floor = peak * min_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def warmup_steps(cfg, total: int) -> int:
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(round(cfg.warmup_fraction * total))
