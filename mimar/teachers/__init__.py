"""Frozen teachers: pretrained encoders whose patch features a student learns to predict
(EVA, D-iGPT, iTPN-CLIP). docs/METHODS.md §1.4, §3.3, §6.4.

``build_teacher(cfg.teacher, ...)`` loads one of four kinds from local files, never the network
(a fifth, ``pixels``, has no files: see below):

* ``open_clip``: ``open_clip.create_model(model, pretrained=checkpoint)``; its vision tower.
* ``hf_clip``: a folder written by ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection``
  ``.save_pretrained`` (a full ``CLIPModel`` folder loads as the latter).
* ``timm``: ``timm.create_model(model, pretrained=False, num_classes=0)`` + a checkpoint file.
* ``mimar``: a mimar run folder (or checkpoint file) or a ``mimar export`` ``.safetensors``.
* ``pixels``: no model; the "features" of a patch are its pixels as the student sees them
  (data normalisation, channel-major inside the patch), on the student's own grid, with no
  class token. D-iGPT uses it for the paper's iGPT-style pixel-target row.

Calling the teacher on the student's batch (normalised with the data mean/std, after the
student's augmentation) returns ``{"tokens": (B, N_student, D_t), "cls": (B, D_t), "ms": float}``
("cls" only when the teacher has a class token; "ms" = wall time of the call). On the way it
un-normalises the images, converts channels (1 -> 3 by replication, 3 -> 1 by luma), resizes to
the teacher's input side, normalises with the teacher's own mean/std, encodes, and resamples
the teacher's feature map bilinearly to the student's grid when the two grids differ
(``resample=False`` keeps the teacher's own grid: D-iGPT aligns per cluster instead).

Features (``teacher.layer``): ``None`` = the model's final patch features, for CLIP the
tokens after ``ln_post`` *and* the projection, as EVA uses them (open_clip: ``ln_post(x) @
proj`` on every token; Hugging Face: ``post_layernorm`` on every token of
``last_hidden_state``, then ``visual_projection`` when the saved model has one; timm:
``forward_features``; mimar: the final normed tokens). An int = the raw output of that block
(0-based, negative counts from the end), before any final norm.

Frozen and out of checkpoints: :class:`FrozenTeacher` is a plain Python object, not an
``nn.Module``. A method that stores it as an attribute does not register it, so the teacher's
weights are not in ``method.parameters()`` (never in the optimizer, DDP or gradient clipping)
nor in ``method.state_dict()`` (checkpoints hold the student; the teacher is rebuilt from
``cfg.teacher``), and ``method.to(device)`` does not move it: it follows the images' device on
its first call. Its parameters also have ``requires_grad=False``; it stays in eval mode and
runs under ``torch.no_grad()`` (not ``inference_mode``: its outputs are saved for the student's
backward, which inference tensors do not allow without a copy).
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from mimar.engine.precision import autocast, autocast_dtype, full_precision
from mimar.errors import ConfigError
from mimar.teachers.config import TeacherConfig
from mimar.teachers.loaders import (
    CLIP_MEAN,
    CLIP_STD,
    LOADERS,
    MimarLoader,
    TeacherModel,
    mimar_source,
    pixel_source,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "FrozenTeacher",
    "TeacherConfig",
    "TeacherModel",
    "build_teacher",
    "convert_channels",
]

log = logging.getLogger("mimar")


class FrozenTeacher:
    """A frozen encoder whose patch features are aligned to the student's token grid.

    Not an ``nn.Module`` on purpose (see the module docstring). ``dim`` is the feature width
    D_t, ``grid`` the teacher's own token grid, ``student_grid`` the grid of the outputs
    (``None`` at construction: the teacher's own grid, no resampling).
    """

    def __init__(
        self,
        source: TeacherModel,
        *,
        student_grid: tuple[int, int] | None,
        data_mean: tuple[float, ...],
        data_std: tuple[float, ...],
        precision: str = "inherit",
    ) -> None:
        self.source, self.precision = source, precision
        self.data_mean, self.data_std = tuple(data_mean), tuple(data_std)
        self.module = source.module.float().eval().requires_grad_(False)  # autocast casts
        probe = torch.zeros(1, source.in_chans, source.img_size, source.img_size)
        with torch.no_grad():
            feature_map, cls = source.encode(probe)  # checks layer index, gives D_t and grid
        self.dim, self.grid = feature_map.shape[1], tuple(feature_map.shape[-2:])
        self.has_cls = cls is not None
        self.student_grid = student_grid or self.grid  # None: outputs on the teacher's grid

    def __call__(self, images: torch.Tensor) -> dict:
        tic = _now(images.device)
        if self._device() != images.device:
            self.module.to(images.device)
        with torch.no_grad():
            x = self.prepare(images.float())  # (B, C_t, S, S) in the teacher's normalisation
            with _autocast(self.precision, images.device):
                feature_map, cls = self.source.encode(x)  # (B, D_t, h, w), (B, D_t) | None
            feature_map = feature_map.float()
            if tuple(feature_map.shape[-2:]) != self.student_grid:
                feature_map = F.interpolate(
                    feature_map, size=self.student_grid, mode="bilinear", align_corners=False
                )  # (B, D_t, h_s, w_s)
            out = {"tokens": feature_map.flatten(2).transpose(1, 2)}  # (B, N_student, D_t)
            if cls is not None:
                out["cls"] = cls.float()  # (B, D_t)
        out["ms"] = (_now(images.device) - tic) * 1000
        return out

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Student-normalised images -> the teacher's channels, size and normalisation."""
        pixels = images * _stat(self.data_std, images) + _stat(self.data_mean, images)  # [0, 1]
        pixels = convert_channels(pixels, self.source.in_chans)
        size = self.source.img_size
        if pixels.shape[-2:] != (size, size):
            shrink = size < pixels.shape[-1]
            pixels = F.interpolate(
                pixels, size=(size, size), mode="bicubic", align_corners=False, antialias=shrink
            ).clamp(0, 1)
        return (pixels - _stat(self.source.mean, pixels)) / _stat(self.source.std, pixels)

    def describe(self) -> str:
        s = self.source
        h, w = self.grid
        line = f"{s.name}: {self.dim}-d features on a {h}x{w} grid at {s.img_size} px"
        if self.grid != self.student_grid:
            line += f", resampled bilinearly to the student's {self.student_grid} grid"
        return line

    def _device(self) -> torch.device:
        first = next(self.module.parameters(), None)
        return first.device if first is not None else torch.device("cpu")


def build_teacher(
    cfg: TeacherConfig,
    *,
    student_grid: int | tuple[int, int],
    student_in_chans: int,
    data_mean: tuple[float, ...],
    data_std: tuple[float, ...],
    student_img_size: int = 0,
    resample: bool = True,
    load_mimar: MimarLoader | None = None,
) -> FrozenTeacher | None:
    """Load the teacher ``cfg`` names (None for ``kind: none``) for a student whose images have
    ``student_in_chans`` channels normalised with ``data_mean`` / ``data_std`` and whose patch
    tokens form ``student_grid``; the outputs are resampled to that grid unless ``resample`` is
    False. ``kind: pixels`` also needs ``student_img_size``; ``kind: mimar`` needs
    ``load_mimar(path) -> (backbone, mean, std)`` (``mimar.loading.teacher_backbone``: passed
    in, so that teachers never import the code that builds runs). Missing or mismatched files raise
    one ``FileNotFoundError`` / ``ValueError`` naming the path and what was expected. The
    global RNG is left untouched, so the student's initialisation does not depend on the
    teacher."""
    if cfg.kind == "none":
        return None
    grid = (student_grid, student_grid) if isinstance(student_grid, int) else tuple(student_grid)
    if len(data_mean) != student_in_chans or len(data_std) != student_in_chans:
        raise ConfigError(f"data mean/std need {student_in_chans} values for the teacher")
    if cfg.kind == "pixels":
        if not student_img_size or student_img_size % grid[0]:
            raise ConfigError("teacher.kind=pixels needs the student's image size and patch grid")
        source = pixel_source(student_img_size // grid[0], student_img_size, student_in_chans)
        source.mean, source.std = tuple(data_mean), tuple(data_std)
        return FrozenTeacher(source, student_grid=grid, data_mean=data_mean, data_std=data_std)
    with torch.random.fork_rng(devices=[]):
        if cfg.kind == "mimar":
            if load_mimar is None:
                raise ConfigError("teacher.kind=mimar: build_teacher needs load_mimar")
            source = mimar_source(cfg, load_mimar)
        else:
            source = LOADERS[cfg.kind](cfg)
    if cfg.mean is not None and cfg.std is not None:
        source.mean, source.std = cfg.mean, cfg.std
    elif not source.mean:  # an exported mimar backbone carries no data statistics
        log.warning("teacher %s: no normalisation stored; using the student's data stats", cfg.path)
        source.mean, source.std = tuple(data_mean), tuple(data_std)
    convert_channels(torch.zeros(1, student_in_chans, 1, 1), source.in_chans)  # fails early
    if len(source.mean) not in (1, source.in_chans):
        raise ConfigError(f"teacher.mean/std need {source.in_chans} values, got {source.mean}")
    teacher = FrozenTeacher(
        source,
        student_grid=grid if resample else None,
        data_mean=data_mean,
        data_std=data_std,
        precision=cfg.precision,
    )
    log.info("teacher %s", teacher.describe())
    return teacher


def convert_channels(pixels: torch.Tensor, in_chans: int) -> torch.Tensor:
    """``(B, C, H, W)`` [0, 1] pixels -> ``in_chans`` channels: gray is replicated, RGB -> gray
    uses ITU-R 601 luma (as PIL's ``convert("L")``, which the data pipeline uses)."""
    C = pixels.shape[1]
    if C == in_chans:
        return pixels
    if C == 1:
        return pixels.expand(-1, in_chans, -1, -1)
    if C == 3 and in_chans == 1:
        luma = pixels.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return (pixels * luma).sum(1, keepdim=True)
    raise ConfigError(f"cannot feed {C}-channel images to a {in_chans}-channel teacher")


def _stat(values: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def _autocast(precision: str, device: torch.device):
    if precision == "inherit":  # whatever autocast the training step runs under
        return nullcontext()
    if precision == "fp32":
        return full_precision(device)
    return autocast(device, autocast_dtype(precision))


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the step syncs on loss.item() anyway
    return time.perf_counter()
