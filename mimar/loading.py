"""Load what a run produced: its config, its method, its pretrained backbone."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from mimar.config import PretrainConfig, from_dict
from mimar.engine import checkpoint
from mimar.factory import build_backbone, build_method, build_method_backbone


def resolve_checkpoint(source: str | Path) -> Path:
    """A run folder -> its ``checkpoints/last.pt``; a file -> itself."""
    path = Path(source)
    if path.is_dir():
        ckpt = path / "checkpoints" / "last.pt"
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"{path} holds no checkpoints/last.pt: is it a mimar run folder whose run "
                "finished or was stopped after its first step?"
            )
        return ckpt
    if not path.is_file():
        raise FileNotFoundError(f"no run folder or checkpoint file at {path}")
    return path


def load_run(source: str | Path) -> tuple[PretrainConfig, dict]:
    """The config and checkpoint state of a run folder or checkpoint file."""
    state = checkpoint.load(resolve_checkpoint(source))
    return from_dict(state["config"]), state


def load_method(source: str | Path) -> tuple[PretrainConfig, nn.Module]:
    cfg, state = load_run(source)
    method = build_method(cfg)
    method.load_state_dict(state["model"])
    return cfg, method


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
    backbone = build_method_backbone(cfg)  # iTPN: HiViT with its pretrained pyramid neck
    prefix = "backbone."
    weights = {k[len(prefix) :]: v for k, v in state["model"].items() if k.startswith(prefix)}
    backbone.load_state_dict(weights)
    return cfg, backbone.eval()


def _load_exported(path: Path) -> nn.Module:
    from safetensors.torch import load_file

    from mimar.config import BACKBONE_CONFIGS, _build

    meta_path = path.with_suffix(".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} has no {meta_path.name} beside it (written by export)")
    meta = json.loads(meta_path.read_text())
    raw = meta["mimar_backbone"]
    cfg = _build(BACKBONE_CONFIGS[raw["name"]], raw, "backbone")
    backbone = build_backbone(cfg)
    missing, unexpected = backbone.load_state_dict(load_file(path), strict=False)
    if unexpected or [k for k in missing if k != "mask_token"]:
        raise ValueError(f"{path}: missing {missing}, unexpected {unexpected}")
    return backbone.eval()


def random_init_backbone(cfg: PretrainConfig) -> nn.Module:
    """The run's backbone exactly as it was before its first step (same seed, same order).

    Every method builds its backbone (and iTPN its neck) first, so building only that part
    draws the same initial weights, without the rest of the method or its teacher's files.
    """
    torch.manual_seed(cfg.train.seed)
    return build_method_backbone(cfg).eval()
