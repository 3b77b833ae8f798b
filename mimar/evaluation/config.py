"""``EvalConfig``: everything one ``mimar eval`` call takes, checked once."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from mimar.errors import ConfigError
from mimar.evaluation.features import POOLS, Pool
from mimar.evaluation.protocols import PROTOCOLS

Attention = Literal["bidirectional", "causal"]
ATTENTIONS: tuple[str, ...] = ("bidirectional", "causal")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """One evaluation of a run's backbone (and, with ``baselines``, its controls).

    ``protocols`` and ``blocks`` may be given as any sequence; they are stored as tuples.
    """

    protocols: tuple[str, ...]  # any of PROTOCOLS, each at most once; run in this order
    checkpoint: str | Path  # a run folder or a checkpoint file
    layer: int | Literal["all"] | None = None  # kNN/linear: None = final normed tokens
    pool: Pool = "avg"  # kNN/linear: mean of the patch tokens, or the class token
    data_root: str | None = None  # None: the run's data.root
    max_train: int = 0  # first N train images (0 = all)
    max_test: int = 0  # first N test images (0 = all)
    baselines: bool = False  # add raw pixels (kNN/linear) and the random-init backbone
    batch_size: int = 256  # feature extraction and every trained protocol
    k: int = 20  # kNN neighbours (DINO)
    epochs: int | None = None  # every trained protocol; None = each one's default
    attention: Attention = "bidirectional"  # causal: in the model's patch order (AIM Tab. 3d)
    blocks: tuple[int, ...] | None = None  # attentive: blocks averaged; None = the last 3
    lora_rank: int = 8  # LoRA: rank of the adapters (alpha 16)
    classifier_bias: bool = False  # attentive: a classifier bias (as an earlier ml-aim)
    device: str = "auto"  # auto: cuda when available, else cpu
    recipe: str | None = None  # finetune/segment/detect: the recipe (None: the CPU recipe)
    overrides: tuple[str, ...] = ()  # finetune.* / data.* or dense.* key=value overrides
    resume: bool = False  # finetune/segment/detect: continue an interrupted run exactly
    feature_cache: bool = True  # kNN/linear: reuse pooled features in RUN_DIR/eval/features/
    neck: Literal["pretrained", "scratch"] = "pretrained"  # segment/detect: iTPN's neck
    out: str | None = None  # kNN/linear/...: results folder (None: RUN_DIR/eval; a read-only run)

    def __post_init__(self) -> None:
        object.__setattr__(self, "protocols", tuple(self.protocols))
        object.__setattr__(self, "overrides", tuple(self.overrides))
        if self.blocks is not None:
            object.__setattr__(self, "blocks", tuple(self.blocks))
        unknown = [p for p in self.protocols if p not in PROTOCOLS]
        if unknown or not self.protocols:
            raise ConfigError(f"protocols must be among {PROTOCOLS}, got {list(self.protocols)}")
        if len(set(self.protocols)) < len(self.protocols):
            raise ConfigError(f"protocols must be distinct, got {list(self.protocols)}")
        if not (self.layer is None or self.layer == "all" or _is_int(self.layer)):
            raise ConfigError(f"layer must be a block index, 'all' or None, got {self.layer!r}")
        if self.pool not in POOLS:
            raise ConfigError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if self.neck not in ("pretrained", "scratch"):
            raise ConfigError(f"neck must be pretrained or scratch, got {self.neck!r}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.blocks is not None and not (self.blocks and all(map(_is_int, self.blocks))):
            raise ConfigError(
                f"blocks must be a non-empty list of block indices, got {self.blocks}"
            )
        for name in ("max_train", "max_test"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (0 = all), got {getattr(self, name)!r}")
        for name in ("batch_size", "k", "lora_rank"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if "knn" in self.protocols and self.max_train and self.k > self.max_train:
            raise ConfigError(
                f"k={self.k} neighbours but max_train={self.max_train} train images: "
                "lower --k or raise --max-train"
            )
        if self.epochs is not None and not (_is_int(self.epochs) and self.epochs >= 1):
            raise ConfigError(f"epochs must be a positive integer or None, got {self.epochs!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError):
                raise ConfigError(
                    f"device must be 'auto' or a torch device (cpu, cuda, cuda:1), "
                    f"got {self.device!r}"
                ) from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
