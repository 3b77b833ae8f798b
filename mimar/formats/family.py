"""What every release format provides: detection, import to mimar's names, export back."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[2] / "configs"  # the paper recipes


@dataclass(frozen=True)
class Converted:
    """A release under mimar's names (``backbone.*``, ``head.*``, ...), with its bookkeeping."""

    weights: dict[str, torch.Tensor]
    keys: dict[str, str]  # release name -> mimar name (q/v biases: "...qkv.bias[q]")
    ignored: dict[str, str] = field(default_factory=dict)  # release name -> why not imported
    fields: dict = field(default_factory=dict)  # backbone.* the release's own config tells
    method_fields: dict = field(default_factory=dict)  # method.* its weights tell (head shape)
    teacher_dim: int | None = None  # a teacher method's target width, from its head's shape


@dataclass(frozen=True)
class Format:
    """One release layout. ``to_mimar(weights, extra)`` renames the unwrapped weights
    (``extra``: the release's other top-level objects, e.g. a Hugging Face config);
    ``export(method_weights, backbone_fields)`` gives the object the official loader reads."""

    name: str
    method: str  # the mimar method whose run an import becomes
    recipe: str  # the paper recipe under configs/: what the weights cannot tell
    detect: Callable[[dict[str, torch.Tensor]], bool]
    to_mimar: Callable[[dict[str, torch.Tensor], dict], Converted]
    export: Callable[[dict[str, torch.Tensor], dict], dict] | None = None
    # how an exported object is written (default: torch.save of the official wrapper)
    write: Callable[[dict, Path], None] | None = None
    # backbone.* fields from the weights (``backbone.`` removed) and the recipe's backbone
    # section; None: a ViT's (mimar.formats.vit_shapes.vit_fields)
    architecture: Callable[[dict[str, torch.Tensor], dict], dict] | None = None
    # a format spanning several backbones (timm: ViT-family or Swin) names the one of
    # the unwrapped weights: its own recipe, map and architecture reader
    variant: Callable[[dict[str, torch.Tensor]], Format] | None = None

    def for_weights(self, weights: dict[str, torch.Tensor]) -> Format:
        """This layout, or the variant of it that ``weights`` (unwrapped) are."""
        return self if self.variant is None else self.variant(weights)

    @property
    def recipe_path(self) -> Path:
        return CONFIGS / self.recipe
