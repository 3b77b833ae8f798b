"""Export a pretrained ViT or Swin to timm: a safetensors file plus the kwargs to build it.

``FILE.json`` beside ``FILE.safetensors`` holds ``timm_model`` and ``kwargs`` for
``timm.create_model(timm_model, pretrained=False, num_classes=0, **kwargs)``, which then loads
the file with ``load_state_dict(strict=True)``; ``norm_eps`` (timm builds its LayerNorms with
1e-6, and a kwarg cannot carry another value: :func:`create_timm_model` sets it); and
``mimar_backbone``, our config, from which ``mimar.load_backbone`` rebuilds the backbone.

* A plain ViT -> timm's ``VisionTransformer`` (``vit_base_patch16_224`` + kwargs): same
  weight names, no key surgery.
* A ViT with a relative position bias (SimMIM's, ``rel_pos_bias`` shared or per block) ->
  timm's ``Beit`` (``beit_base_patch16_224`` + kwargs), under Beit's names
  (``mimar.backbones.timm_beit``).
* A Swin -> timm's ``SwinTransformer`` (``swin_tiny_patch4_window7_224`` + kwargs), the very
  model it holds: its names without ``model.`` (``mimar.formats.timm_swin``).

Either way ``forward_features`` equals our ``tokens`` (flattened, for a Swin; ``fc_norm`` off:
timm's final ``norm`` stays inside ``forward_features``), and pooling is the class token when
there is one, else the mean of the patch tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from mimar import writes
from mimar.backbones.swin import Swin
from mimar.backbones.timm_beit import to_beit
from mimar.backbones.vit import ViT
from mimar.config import to_dict
from mimar.errors import ConfigError

TIMM_NORM_EPS = 1e-6  # the eps of timm's LayerNorm, used by VisionTransformer and Beit


def _shape_kwargs(c) -> dict:
    """The kwargs timm's VisionTransformer and Beit share: the ViT's shape."""
    keys = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
    return {key: getattr(c, key) for key in keys}


def timm_kwargs(backbone: ViT) -> dict:
    """kwargs for ``timm.create_model("vit_base_patch16_224", num_classes=0, **kwargs)``."""
    c = backbone.cfg
    return {
        **_shape_kwargs(c),
        "qkv_bias": c.qkv_bias,
        "proj_bias": c.proj_bias,
        "init_values": c.init_values,
        "class_token": c.class_token,
        "global_pool": "token" if c.class_token else "avg",
        "fc_norm": False,
        "pos_embed": "none" if c.pos_embed == "none" else "learn",
        "no_embed_class": False,
        **({"embed_norm_layer": "layernorm"} if c.patch_norm else {}),
        **({} if c.final_norm else {"final_norm": False}),
    }


def beit_kwargs(backbone: ViT, pooled: bool = False) -> dict:
    """kwargs for ``timm.create_model("beit_base_patch16_224", num_classes=0, **kwargs)``;
    ``pooled``: a fine-tuned classifier that averages its tokens into ``fc_norm``."""
    c = backbone.cfg
    unsupported = {
        "class_token=false": not c.class_token,  # Beit always has a class token
        "patch_norm=true": c.patch_norm,  # and no norm after the patch projection
        # its norm is either final or fc_norm (the pooled classifier's case)
        "final_norm=false": not c.final_norm and not pooled,
    }
    if bad := [name for name, hit in unsupported.items() if hit]:
        raise ConfigError(
            f"a ViT with rel_pos_bias={c.rel_pos_bias} exports to timm's Beit, which has no "
            f"equivalent of backbone.{', backbone.'.join(bad)}"
        )
    return {
        **_shape_kwargs(c),
        "qkv_bias": c.qkv_bias,  # q and v biases; the k bias is dropped (softmax-invariant)
        # 0, not None, for no LayerScale: create_model drops None kwargs, and
        # beit_base_patch16_224 defaults to 0.1
        "init_values": c.init_values or 0.0,
        "use_abs_pos_emb": c.pos_embed != "none",
        "use_rel_pos_bias": c.rel_pos_bias == "per_block",
        "use_shared_rel_pos_bias": c.rel_pos_bias == "shared",
        "global_pool": "token",
        "use_fc_norm": False,
    }


def export_timm(model: nn.Module, out: str | Path) -> tuple[Path, Path]:
    """Write ``model`` (a ViT backbone, or a fine-tuned ``mimar.finetune`` classifier on one,
    whose pooling, ``fc_norm`` and head go along) as timm weights + kwargs."""
    classifier = model if hasattr(model, "head") and hasattr(model, "backbone") else None
    backbone = model.backbone if classifier is not None else model
    if not isinstance(backbone, (ViT, Swin)):
        raise ConfigError(
            "--format timm exports mimar's ViT and Swin; this run's backbone is "
            f"{type(backbone).__name__}"
        )
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"--out must end with .safetensors, got {out}")
    if isinstance(backbone, Swin):  # timm's own SwinTransformer inside (mimar.formats.timm_swin)
        from mimar.formats import timm_swin

        return _write(out, *timm_swin.export_timm(backbone, classifier))
    beit = backbone.cfg.rel_pos_bias != "none"
    pooled = classifier is not None and classifier.pool == "avg"
    kwargs = beit_kwargs(backbone, pooled) if beit else timm_kwargs(backbone)
    weights = {
        k: v.detach().contiguous().cpu()
        for k, v in backbone.state_dict().items()
        if k != "mask_token"  # a pretraining-only parameter timm's models do not have
    }
    if beit:
        weights = {k: v.contiguous() for k, v in to_beit(weights, backbone.embed_dim).items()}
    if classifier is not None:
        kwargs.pop("final_norm", None)  # timm's fc_norm stands in for the removed final norm
        kwargs |= _head_kwargs(classifier, beit)
        for name in ("fc_norm", "head"):
            for key, value in getattr(classifier, name).state_dict().items():
                weights[f"{name}.{key}"] = value.detach().contiguous().cpu()
    meta = {
        "timm_model": "beit_base_patch16_224" if beit else "vit_base_patch16_224",
        "kwargs": kwargs,
        "norm_eps": backbone.cfg.norm_eps,
        "mimar_backbone": to_dict(backbone.cfg),
    }
    if backbone.cfg.norm_eps != TIMM_NORM_EPS:
        meta["note"] = (
            f"LayerNorm eps {backbone.cfg.norm_eps}, timm's default is {TIMM_NORM_EPS}: build "
            "with mimar.export.create_timm_model(path) or set every LayerNorm's eps by hand"
        )
    return _write(out, weights, meta)


def _write(out: Path, weights: dict, meta: dict) -> tuple[Path, Path]:
    writes.make_dir(out.parent, "export folder")
    writes.save_with(out, lambda name: save_file(weights, name), "export")
    meta_path = out.with_suffix(".json")
    writes.write_text(meta_path, json.dumps(meta, indent=2), "export metadata")
    return out, meta_path


def _head_kwargs(classifier: nn.Module, beit: bool) -> dict:
    """timm's pooling / head kwargs of a fine-tuned classifier: mean of the patch tokens into
    ``fc_norm`` (the backbone's final norm removed), or the class token after the norm."""
    avg = classifier.pool == "avg"
    kwargs = {"num_classes": classifier.num_classes, "global_pool": "avg" if avg else "token"}
    if beit:
        return kwargs | {"use_fc_norm": avg}
    kwargs["fc_norm"] = avg  # timm: fc_norm replaces the final norm; no final_norm key then
    return kwargs


def create_timm_model(path: str | Path) -> nn.Module:
    """The timm model of an exported file, weights loaded strictly, eval mode, with the
    exported LayerNorm eps (which the kwargs alone cannot set)."""
    import timm

    path = Path(path)
    meta = json.loads(path.with_suffix(".json").read_text())
    kwargs = {"num_classes": 0, **meta["kwargs"]}  # a fine-tuned classifier keeps its head
    model = timm.create_model(meta["timm_model"], pretrained=False, **kwargs)
    eps = meta.get("norm_eps", TIMM_NORM_EPS)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.eps = eps
    model.load_state_dict(load_file(path), strict=True)
    return model.eval()
