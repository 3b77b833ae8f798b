"""One loader per teacher kind: local files -> a frozen module and how to encode with it.

Each loader returns a :class:`TeacherModel` whose ``encode(x)`` maps images already at the
teacher's input size and normalisation to ``(feature map (B, D_t, h, w), class token (B, D_t)
or None)``; ``mimar.teachers.FrozenTeacher`` does the rest. Errors name the path and the kind.
"""

from __future__ import annotations

import importlib
import json
import math
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mimar.errors import ConfigError, MissingFileError
from mimar.teachers.config import TeacherConfig

# ``kind: mimar``: path -> (backbone, mean, std), given by the caller (mimar.loading)
MimarLoader = Callable[[Path], tuple[nn.Module, tuple, tuple]]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP (docs/METHODS.md §1.4)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class TeacherModel:
    """What a loader returns: a frozen module and how to encode images at its input."""

    module: nn.Module
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]  # -> map, cls
    img_size: int  # input side the images are resized to
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str


def _open_clip(cfg: TeacherConfig) -> TeacherModel:
    open_clip = _require("open_clip", "open_clip_torch", cfg.kind)
    if not cfg.model:
        raise ConfigError("teacher.kind=open_clip needs teacher.model (e.g. ViT-L-14)")
    local = cfg.model.startswith("local-dir:")  # open_clip's own folder layout, weights inside
    if not local:
        if open_clip.get_model_config(cfg.model) is None:
            raise ConfigError(
                f"teacher.model={cfg.model!r} is not an open_clip model name "
                "(see open_clip.list_models()) nor local-dir:FOLDER"
            )
        _need_file(cfg.checkpoint, "teacher.checkpoint", f"open_clip weights for {cfg.model}")
        _check_activation(open_clip, cfg)
    try:
        clip = open_clip.create_model(
            cfg.model,
            pretrained=None if local else cfg.checkpoint,
            force_image_size=cfg.img_size or None,  # open_clip resamples pos-embed on load
            require_pretrained=True,
        )
    except Exception as err:  # open_clip raises RuntimeError/AssertionError on bad files
        raise ConfigError(
            f"teacher.checkpoint {cfg.checkpoint or cfg.model} does not load as open_clip model "
            f"{cfg.model!r}: {_first_line(err)}"
        ) from None
    visual = clip.visual
    plain = getattr(visual, "attn_pool", None) is None
    if not isinstance(visual, open_clip.transformer.VisionTransformer) or not plain:
        raise ConfigError(
            f"open_clip model {cfg.model!r}: only plain ViT vision towers are supported"
        )
    layer = -1 if cfg.layer is None else cfg.layer

    def encode(x: torch.Tensor):
        out = visual.forward_intermediates(
            x, indices=[layer], intermediates_only=True, output_fmt="NLC", output_extra_tokens=True
        )
        tokens, cls = out["image_intermediates"][0], out["image_intermediates_prefix"][0][:, 0]
        if cfg.layer is None:  # EVA (§3.3): ln_post and the projection, on every token
            tokens, cls = visual.ln_post(tokens), visual.ln_post(cls)
            if visual.proj is not None:
                tokens, cls = tokens @ visual.proj, cls @ visual.proj
        return _to_map(tokens), cls

    pre = getattr(visual, "preprocess_cfg", None) or {}
    return TeacherModel(
        visual,
        encode,
        visual.image_size[0],
        3,
        tuple(pre.get("mean", CLIP_MEAN)),
        tuple(pre.get("std", CLIP_STD)),
        f"open_clip {cfg.model}",
    )


def _hf_clip(cfg: TeacherConfig) -> TeacherModel:
    transformers = _require("transformers", "transformers", cfg.kind)
    folder = Path(cfg.path)
    expected = "a folder written by CLIPVisionModel(WithProjection).save_pretrained"
    if not cfg.path or not (folder / "config.json").is_file():
        raise MissingFileError(
            f"teacher.path={cfg.path!r} has no config.json: kind hf_clip expects {expected}"
        )
    meta = json.loads((folder / "config.json").read_text())
    archs = meta.get("architectures") or []
    with_proj = any("WithProjection" in a or a == "CLIPModel" for a in archs)
    cls_ = transformers.CLIPVisionModelWithProjection if with_proj else transformers.CLIPVisionModel
    quiet = transformers.utils.logging  # our error below replaces its load report
    verbosity, bar = quiet.get_verbosity(), quiet.is_progress_bar_enabled()
    quiet.set_verbosity_error()
    quiet.disable_progress_bar()
    try:
        model, info = cls_.from_pretrained(
            folder, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except Exception as err:
        raise ConfigError(
            f"teacher.path {folder} does not load as {cls_.__name__} "
            f"({expected}): {_first_line(err)}"
        ) from None
    finally:
        quiet.set_verbosity(verbosity)
        if bar:
            quiet.enable_progress_bar()
    bad = [*(info.get("missing_keys") or []), *(info.get("mismatched_keys") or [])]
    if bad:
        raise ConfigError(
            f"teacher.path {folder}: the weights do not fit its config.json "
            f"({cls_.__name__}); missing or mismatched: {sorted(map(str, bad))[:3]}"
        )
    vision = getattr(model, "vision_model", model)  # the tower in transformers 4.x and 5.x
    config = model.config
    size = cfg.img_size or config.image_size

    def encode(x: torch.Tensor):
        resized = {"interpolate_pos_encoding": True} if size != config.image_size else {}
        out = model(pixel_values=x, output_hidden_states=cfg.layer is not None, **resized)
        if cfg.layer is None:  # post_layernorm (+ projection) on every token, as EVA's CLIP
            tokens = vision.post_layernorm(out.last_hidden_state)
            if with_proj:
                tokens = model.visual_projection(tokens)
        else:  # hidden_states[0] is the embedding output, [i + 1] the output of block i
            tokens = out.hidden_states[cfg.layer + 1 if cfg.layer >= 0 else cfg.layer]
        return _to_map(tokens[:, 1:]), tokens[:, 0]

    processor = folder / "preprocessor_config.json"
    pre = json.loads(processor.read_text()) if processor.is_file() else {}
    return TeacherModel(
        model,
        encode,
        size,
        config.num_channels,
        tuple(pre.get("image_mean", CLIP_MEAN)),
        tuple(pre.get("image_std", CLIP_STD)),
        f"hf_clip {folder.name} ({cls_.__name__})",
    )


def _timm(cfg: TeacherConfig) -> TeacherModel:
    import timm

    if not cfg.model:
        raise ConfigError("teacher.kind=timm needs teacher.model (e.g. vit_base_patch16_224)")
    _need_file(cfg.checkpoint, "teacher.checkpoint", f"timm weights for {cfg.model}")
    try:
        model = timm.create_model(cfg.model, pretrained=False, num_classes=0)
    except Exception as err:
        raise ConfigError(
            f"teacher.model={cfg.model!r} is not a timm model: {_first_line(err)}"
        ) from None
    try:
        state = timm.models.load_state_dict(cfg.checkpoint)
    except Exception as err:
        raise ConfigError(
            f"teacher.checkpoint {cfg.checkpoint} is not a weights file: {_first_line(err)}"
        ) from None
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    state = {k: v for k, v in state.items() if not k.startswith(tuple(f"{h}." for h in heads))}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:
        missing, unexpected = [_first_line(err)], []
    if missing or unexpected:
        raise ConfigError(
            f"teacher.checkpoint {cfg.checkpoint} does not fit timm model "
            f"{cfg.model!r}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    embed = getattr(model, "patch_embed", None)
    native = embed.img_size[0] if embed is not None else model.pretrained_cfg["input_size"][-1]
    if cfg.img_size and cfg.img_size != native and hasattr(model, "set_input_size"):
        model.set_input_size(img_size=(cfg.img_size, cfg.img_size))  # resamples the pos-embed
    prefix = getattr(model, "num_prefix_tokens", 0)
    has_cls = getattr(model, "has_class_token", False)

    def encode(x: torch.Tensor):
        if cfg.layer is None:
            out = model.forward_features(x)  # ViT: (B, P + N, D) after norm; CNN: (B, D, h, w)
            if out.ndim == 4:
                return out, None
            return _to_map(out[:, prefix:]), out[:, 0] if has_cls else None
        kw = {"return_prefix_tokens": True} if prefix else {}
        (item,) = model.forward_intermediates(
            x, indices=[cfg.layer], output_fmt="NCHW", intermediates_only=True, **kw
        )
        if not prefix:
            return item, None
        return item[0], item[1][:, 0] if has_cls else None

    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return TeacherModel(
        model,
        encode,
        cfg.img_size or native,
        first_conv.in_channels,
        tuple(model.pretrained_cfg.get("mean", CLIP_MEAN)),
        tuple(model.pretrained_cfg.get("std", CLIP_STD)),
        f"timm {cfg.model}",
    )


def mimar_source(cfg: TeacherConfig, load: MimarLoader) -> TeacherModel:
    """A mimar run or exported backbone, read by ``load(path) -> (backbone, mean, std)`` (the
    run's own data statistics; ``()`` when the file stores none)."""
    path = Path(cfg.path)
    expected = "a mimar run folder (checkpoints/last.pt) or a .safetensors file from mimar export"
    if not cfg.path or not path.exists():
        raise MissingFileError(
            f"teacher.path={cfg.path!r} does not exist: kind mimar expects {expected}"
        )
    backbone, mean, std = load(path)
    if cfg.img_size not in (0, backbone.img_size):
        raise ConfigError(
            f"a mimar teacher runs at its training size ({backbone.img_size} px); "
            f"got teacher.img_size={cfg.img_size} (use 0)"
        )
    P = backbone.num_prefix_tokens

    def encode(x: torch.Tensor):
        out = backbone(x, return_layers=() if cfg.layer is None else (cfg.layer,))
        tokens = out["tokens"] if cfg.layer is None else out["layers"][0]  # (B, P + N, D)
        return _to_map(tokens[:, P:]), tokens[:, 0] if P else None

    name = f"mimar {type(backbone).__name__} from {path}"
    return TeacherModel(backbone, encode, backbone.img_size, backbone.in_chans, mean, std, name)


def _check_activation(open_clip, cfg: TeacherConfig) -> None:
    """OpenAI's CLIP towers use QuickGELU (docs/METHODS.md §10.9); open_clip's plain names build
    exact GELU and load OpenAI weights without complaint, silently changing every target.
    Refuse that pairing: an OpenAI checkpoint is recognised by its file name or by being a
    TorchScript archive (how OpenAI released them)."""
    if open_clip.get_model_config(cfg.model).get("quick_gelu", False):
        return
    path = Path(cfg.checkpoint)
    if "openai" in path.name.lower() or _is_torchscript(path):
        raise ConfigError(
            f"teacher.checkpoint {path} looks like an OpenAI CLIP checkpoint, which needs "
            f"QuickGELU: use teacher.model={cfg.model}-quickgelu (open_clip's {cfg.model} "
            "uses exact GELU and would change the teacher's features)"
        )


def _is_torchscript(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _to_map(tokens: torch.Tensor) -> torch.Tensor:
    """``(B, N, D)`` row-major patch tokens of a square grid -> ``(B, D, h, w)``."""
    B, N, D = tokens.shape
    side = math.isqrt(N)
    if side * side != N:
        raise ConfigError(f"teacher returned {N} patch tokens, not a square grid")
    return tokens.transpose(1, 2).reshape(B, D, side, side)


def _require(module: str, package: str, kind: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(
            f"teacher.kind={kind} needs the {package} package: pip install "
            f"'mimar[clip]' (or {package})"
        ) from err


def _need_file(path: str, key: str, what: str) -> None:
    if not path:
        raise ConfigError(f"{key} is empty: give the path of the {what}")
    if not Path(path).is_file():
        raise MissingFileError(f"{key}={path}: no such file (expected the {what})")


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return text.splitlines()[0][:300]


def pixel_source(patch_size: int, img_size: int, in_chans: int) -> TeacherModel:
    """``teacher.kind=pixels``: each patch's ``C * p * p`` pixel values as its feature vector
    (``pixel_unshuffle``: channel-major, then row-major inside the patch); no class token.
    The caller sets mean/std to the data's, so the values are the student's own input."""
    unshuffle = nn.PixelUnshuffle(patch_size)
    return TeacherModel(
        module=unshuffle,
        encode=lambda x: (unshuffle(x), None),
        img_size=img_size,
        in_chans=in_chans,
        mean=(),
        std=(),
        name=f"pixels ({in_chans}x{patch_size}x{patch_size} per patch)",
    )


LOADERS = {"open_clip": _open_clip, "hf_clip": _hf_clip, "timm": _timm}  # mimar: mimar_source
