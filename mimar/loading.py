"""Load what a run produced: its config, its pretrained backbone, an exported backbone.

Layering: this module builds backbones only (``mimar.backbones``), never methods, so that
loading a ViT run imports no method module beyond the one its config names (SimMIM's config
dataclass), and ``mimar.factory`` can hand :func:`teacher_backbone` to a ``kind: mimar``
teacher without an import cycle.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mimar import names
from mimar.backbones import build_backbone
from mimar.backbones.pyramid import pyramid_backbone
from mimar.config import PretrainConfig, from_dict, section_from_dict
from mimar.data import normalization_stats
from mimar.engine import checkpoint
from mimar.engine.fsdp import is_sharded_checkpoint
from mimar.errors import CheckpointError, MissingFileError
from mimar.runs import newest_checkpoint


def resolve_checkpoint(source: str | Path) -> Path:
    """A run folder -> its ``checkpoints/last.pt`` (or an FSDP run's ``last.dcp/``); a
    checkpoint file or DCP folder -> itself."""
    path = Path(source)
    if is_sharded_checkpoint(path):
        return path
    if path.is_dir():
        ckpt = newest_checkpoint(path)
        if ckpt is None:
            raise MissingFileError(
                f"{path} holds no checkpoints/last.pt (or last.dcp/): is it a mimar run folder "
                "whose run finished or was stopped after its first step?"
            )
        return ckpt
    if not path.is_file():
        raise MissingFileError(f"no run folder or checkpoint file at {path}")
    return path


def load_run(source: str | Path) -> tuple[PretrainConfig, dict]:
    """The config and checkpoint state of a run folder or checkpoint file (read once)."""
    state = checkpoint.load(resolve_checkpoint(source))
    return from_dict(state["config"]), state


def method_backbone(cfg: PretrainConfig, backbone_cfg=None) -> nn.Module:
    """The module a method trains as ``method.backbone`` (weights ``backbone.*``), built
    without the rest of the method: the backbone, or for iTPN the backbone with its neck.
    ``backbone_cfg`` replaces ``cfg.backbone`` (a downstream variant of it)."""
    backbone = build_backbone(backbone_cfg or cfg.backbone)
    if names.entry("method", cfg.method.name).pyramid_neck:
        return pyramid_backbone(backbone, cfg.method.fpn_dim, cfg.method.fpn_depth)
    return backbone


def load_backbone(source: str | Path) -> nn.Module:
    """The pretrained backbone of a run folder, a checkpoint, or a ``mimar export`` file.

    Returns the module in eval mode; ``backbone(images)["tokens"]`` are the features
    (``(B, P + N, D)``, prefix tokens first, after the final norm). For an iTPN run it is
    HiViT with its pretrained pyramid neck (``PyramidBackbone``), whose
    ``feature_maps(images)`` gives the P4/P8/P16 maps of full images.
    """
    path = Path(source)
    if path.suffix == ".safetensors":
        return _load_exported(path)
    return load_run_backbone(path)[1]


def load_run_backbone(source: str | Path) -> tuple[PretrainConfig, nn.Module]:
    """The config and pretrained backbone (eval mode) of a run folder or checkpoint file."""
    cfg, state = load_run(source)
    return cfg, backbone_from_state(cfg, state)


def backbone_from_state(cfg: PretrainConfig, state: dict) -> nn.Module:
    """``method.backbone`` of ``cfg`` with the ``backbone.*`` weights of a checkpoint state."""
    backbone = method_backbone(cfg)  # iTPN: HiViT with its pretrained pyramid neck
    prefix = "backbone."
    weights = {k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)}
    backbone.load_state_dict(weights)
    return backbone.eval()


def teacher_backbone(source: str | Path) -> tuple[nn.Module, tuple, tuple]:
    """A ``teacher.kind=mimar`` backbone and the normalisation it was trained with: a run's
    own data statistics, or ``()`` for an exported file (which stores none)."""
    path = Path(source)
    if path.suffix == ".safetensors":
        return load_backbone(path), (), ()
    run, backbone = load_run_backbone(path)
    mean, std = normalization_stats(run.data)
    return backbone, mean, std


def _load_exported(path: Path) -> nn.Module:
    from safetensors.torch import load_file

    meta_path = path.with_suffix(".json")
    if not path.is_file():
        raise MissingFileError(f"no exported backbone at {path}")
    if not meta_path.is_file():
        raise MissingFileError(f"{path} has no {meta_path.name} beside it (written by export)")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(
            f"{meta_path} is not valid JSON (truncated?): export the run again"
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("mimar_backbone"), dict):
        raise CheckpointError(
            f"{meta_path} has no mimar_backbone section: not written by mimar export (export "
            "the run again)"
        )
    backbone = build_backbone(section_from_dict("backbone", meta["mimar_backbone"]))
    try:
        weights = load_file(path)
    except Exception as err:  # safetensors raises its own error types for damaged files
        first = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read {path} (truncated or corrupt safetensors: {first}): export it again"
        ) from None
    missing, unexpected = backbone.load_state_dict(weights, strict=False)
    if unexpected or [k for k in missing if k != "mask_token"]:
        raise CheckpointError(f"{path}: missing {missing}, unexpected {unexpected}")
    return backbone.eval()


def random_init_backbone(cfg: PretrainConfig) -> nn.Module:
    """The run's backbone exactly as it was before its first step (same seed, same order).

    Every method builds its backbone (and iTPN its neck) first, so building only that part
    draws the same initial weights, without the rest of the method or its teacher's files.
    """
    torch.manual_seed(cfg.train.seed)
    return method_backbone(cfg).eval()
