"""The fine-tuning model: a pretrained backbone, pooling, and a linear classifier.

As the papers' fine-tuning code (SimMIM, BEiT, MAE; docs/METHODS.md §2.6, §6.7): ``avg`` pools
the patch tokens and normalises them with a fresh ``fc_norm`` LayerNorm, the backbone's own
final norm removed (ViT, HiViT); ``cls`` classifies the class token after the final norm. Swin
keeps its final norm and average-pools (SimMIM-Swin). The head starts at trunc-normal std 2e-5
with zero bias (MAE's fine-tuning init). How a pretraining run becomes this backbone: the
run's backbone config with ``drop_path_rate`` set, no mask token (unused downstream), no final
norm for ``avg``, a shared relative position table copied into every block (§2.6), and the
position table and relative position tables resampled when the fine-tuning image size differs
(ViT).
"""

from __future__ import annotations

from dataclasses import fields, replace

import torch
import torch.nn.functional as F
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

from mimar.backbones import build_backbone
from mimar.backbones.vit import expand_shared_rel_pos_bias
from mimar.engine.contracts import MethodDefaults
from mimar.errors import ConfigError
from mimar.formats.resample import fit_positions


class Classifier(MethodDefaults, nn.Module):
    """``backbone -> pool -> fc_norm -> head``; ``forward(images, targets)`` returns the
    soft-target cross-entropy (targets: ``(B, K)`` mixed / smoothed label distributions).

    With :meth:`attach_ema` it also keeps an exponential moving average of its weights
    (``finetune.model_ema``), which is then the fine-tune's result (:meth:`final`).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, pool: str = "avg") -> None:
        super().__init__()
        if pool == "cls" and backbone.num_prefix_tokens == 0:
            raise ConfigError("finetune.pool=cls needs a backbone with a class token")
        self.backbone, self.pool, self.num_classes = backbone, pool, num_classes
        D = backbone.embed_dim
        own_norm = _has_final_norm_switch(backbone.cfg)
        eps = getattr(backbone.cfg, "norm_eps", 1e-6)
        self.fc_norm = nn.LayerNorm(D, eps=eps) if pool == "avg" and own_norm else nn.Identity()
        self.head = nn.Linear(D, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)
        nn.init.zeros_(self.head.bias)
        self.criterion = SoftTargetCrossEntropy()
        self.ema: ModelEmaV3 | None = None

    def attach_ema(self, decay: float) -> None:
        """Average the weights after every optimizer step (timm ``ModelEmaV3``: the first
        update copies, then ``ema = decay * ema + (1 - decay) * weights``). The average is a
        frozen submodule, so checkpoints and exact resume carry it."""
        ema = ModelEmaV3(self, decay=decay)  # a deep copy, taken before it is registered
        ema.requires_grad_(False)
        self.ema = ema  # registered last: our own state_dict entries come first, in its order

    def after_step(self, step: int) -> None:
        """Called by the engine after optimizer step ``step`` (1-based)."""
        if self.ema is not None:
            # ModelEmaV3 zips our state_dict with its copy's; the copy has no ``ema.`` entries
            # and ours come last, so the pairs line up
            self.ema.update(self, step=step)

    def final(self) -> Classifier:
        """The network the fine-tune delivers: the weight average when one is kept."""
        return self.ema.module if self.ema is not None else self

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.backbone(images)["tokens"]  # (B, P + N, D)
        P = self.backbone.num_prefix_tokens
        x = tokens[:, P:].mean(1) if self.pool == "avg" else tokens[:, 0]  # (B, D)
        return self.head(self.fc_norm(x))  # (B, K)

    def forward(self, images: torch.Tensor, targets: torch.Tensor) -> dict:
        logits = self.logits(images).float()
        loss = self.criterion(logits, targets)  # -sum(t * log_softmax), mean over the batch
        hits = (logits.argmax(-1) == targets.argmax(-1)).float().mean()  # vs the top target
        return {"loss": loss, "train_top1": hits * 100}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.logits(images).float(), dim=-1)


def finetune_backbone_config(backbone_cfg, *, drop_path: float, pool: str, img_size: int):
    """The pretraining backbone config as fine-tuning builds it (see the module docstring)."""
    names = {f.name for f in fields(backbone_cfg)}
    changes: dict = {"drop_path_rate": drop_path}
    if "use_mask_token" in names:
        changes["use_mask_token"] = False
    if pool == "avg" and "final_norm" in names:
        changes["final_norm"] = False
    if getattr(backbone_cfg, "rel_pos_bias", "none") == "shared":
        changes["rel_pos_bias"] = "per_block"
    if img_size and img_size != backbone_cfg.img_size:
        if backbone_cfg.name != "vit":
            raise ConfigError(
                f"finetune.img_size={img_size}: only a ViT's position table is resampled; this "
                f"{backbone_cfg.name} was pretrained at {backbone_cfg.img_size} (use 0)"
            )
        changes["img_size"] = img_size
    return replace(backbone_cfg, **changes)


def pretrained_weights(state: dict, source_cfg, target: nn.Module) -> dict:
    """The ``backbone.*`` weights of a pretraining checkpoint, made to fit ``target`` (the
    fine-tuning backbone): iTPN's trunk without its neck (unless ``target`` has one: the
    dense models), no mask token, no final norm when
    the target has none, the shared rel-pos table per block, the position tables resampled."""
    # iTPN's trunk without its neck for a plain HiViT target; all of it for a pyramid one
    neckless = not hasattr(target, "trunk")
    trunk = any(k.startswith("backbone.trunk.") for k in state)
    prefix = "backbone.trunk." if trunk and neckless else "backbone."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if getattr(source_cfg, "rel_pos_bias", "none") == "shared":
        weights = expand_shared_rel_pos_bias(weights)
    wanted = target.state_dict()
    weights = {k: v for k, v in weights.items() if k in wanted}  # mask token, final norm
    # another image size: the position table and the relative position tables (SimMIM's,
    # BEiT's), both sized by the token grid, are resampled to it
    fit_positions(weights, wanted, getattr(target, "num_prefix_tokens", 0))
    return weights


def build_classifier(
    backbone_cfg,
    num_classes: int,
    *,
    pool: str,
    state: dict | None,
    source_cfg=None,
    ema_decay: float | None = None,
) -> Classifier:
    """A classifier on ``backbone_cfg`` (already the fine-tuning config); with ``state``
    (a pretraining checkpoint's ``model``) its backbone starts from the pretrained weights,
    else from the random initialisation drawn by building it; ``ema_decay`` attaches a
    weight average that starts from those weights."""
    backbone = build_backbone(backbone_cfg)
    if state is not None:
        weights = pretrained_weights(state, source_cfg, backbone)
        missing, unexpected = backbone.load_state_dict(weights, strict=False)
        fresh = [k for k in missing if not _fresh_ok(k)]
        if fresh or unexpected:
            raise ConfigError(
                f"the pretrained backbone does not fit the fine-tuning one: missing {fresh}, "
                f"unexpected {unexpected}"
            )
    model = Classifier(backbone, num_classes, pool)
    if ema_decay is not None:
        model.attach_ema(ema_decay)
    return model


def _fresh_ok(name: str) -> bool:
    # fine-tuning may add nothing to the backbone but a resampled index buffer
    return name.endswith("relative_position_index")


def _has_final_norm_switch(cfg) -> bool:
    # ViT and HiViT drop their final norm for avg pooling (fc_norm instead); Swin keeps it
    return "final_norm" in {f.name for f in fields(cfg)}
