"""TeacherConfig: the recipe's top-level ``teacher`` section (see ``mimar.teachers``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from mimar.errors import check_range

TeacherKind = Literal["none", "open_clip", "hf_clip", "timm", "mimar", "pixels"]
TeacherPrecision = Literal["inherit", "fp32", "bf16", "fp16"]


@dataclass(frozen=True, kw_only=True)
class TeacherConfig:
    # pixels: the student's own patches as targets (D-iGPT's iGPT-style pixel row); no files
    kind: TeacherKind = "none"
    model: str = ""  # open_clip / timm model name (open_clip also takes "local-dir:DIR")
    checkpoint: str = ""  # weights file for open_clip and timm
    path: str = ""  # hf_clip: save_pretrained folder; mimar: run folder or .safetensors
    layer: int | None = None  # None = final features (CLIP: ln_post + proj); int = raw block
    img_size: int = 0  # teacher input side in pixels; 0 = the teacher's native size
    precision: TeacherPrecision = "inherit"  # inherit = the training autocast (train.precision)
    mean: tuple[float, ...] | None = None  # None = the teacher's own normalisation
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("mean", "std"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.kind not in get_args(TeacherKind):
            raise ValueError(f"teacher.kind must be one of {get_args(TeacherKind)}")
        if self.precision not in get_args(TeacherPrecision):
            raise ValueError(f"teacher.precision must be one of {get_args(TeacherPrecision)}")
        check_range("teacher.img_size", self.img_size, self.img_size >= 0, ">= 0 (0 = native)")
        if (self.mean is None) != (self.std is None):
            raise ValueError("teacher.mean and teacher.std must be given together")
