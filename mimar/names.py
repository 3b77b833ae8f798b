"""The one name table per kind: recipe names -> the modules that implement them.

``method.name`` and ``backbone.name`` in a recipe are looked up here and nowhere else. A module
is imported only when its name is used, so that loading a ViT run never imports iTPN and
``import mimar.engine`` imports no method at all (tested). Adding a method (say MAE) is one
line in :data:`METHODS` plus its own file ``mimar/methods/mae.py`` and a recipe.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

from mimar.errors import ConfigError


@dataclass(frozen=True)
class Entry:
    """Where a name's config dataclass and its ``nn.Module`` live.

    ``teacher``: what the method needs from ``cfg.teacher``: ``none``; ``aligned`` (a feature
    teacher whose outputs are resampled to the student's grid: EVA, iTPN-CLIP); ``own_grid``
    (features kept on the teacher's own grid, or ``kind: pixels``: D-iGPT).
    ``pyramid_neck``: the method trains ``backbone + PyramidNeck`` as its ``backbone`` (iTPN),
    built from the method config's ``fpn_dim`` / ``fpn_depth``.
    """

    module: str
    config: str
    cls: str
    teacher: Literal["none", "aligned", "own_grid"] = "none"
    pyramid_neck: bool = False

    def config_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.config)

    def module_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.cls)


METHODS: dict[str, Entry] = {
    "simmim": Entry("mimar.methods.simmim", "SimMIMConfig", "SimMIM"),
    "aim": Entry("mimar.methods.aim", "AIMConfig", "AIM"),
    "eva": Entry("mimar.methods.eva", "EVAConfig", "EVA", teacher="aligned"),
    "itpn": Entry("mimar.methods.itpn", "ITPNConfig", "ITPN", pyramid_neck=True),
    "itpn_clip": Entry(
        "mimar.methods.itpn_clip", "ITPNCLIPConfig", "ITPNCLIP", "aligned", pyramid_neck=True
    ),
    "digpt": Entry("mimar.methods.digpt", "DiGPTConfig", "DiGPT", teacher="own_grid"),
}
BACKBONES: dict[str, Entry] = {
    "vit": Entry("mimar.backbones.vit", "ViTConfig", "ViT"),
    "swin": Entry("mimar.backbones.swin", "SwinConfig", "Swin"),
    "hivit": Entry("mimar.backbones.hivit", "HiViTConfig", "HiViT"),
}
TABLES = {"method": METHODS, "backbone": BACKBONES}


def entry(kind: Literal["method", "backbone"], name: str) -> Entry:
    """The table entry of ``name``; an unknown name is a :class:`ConfigError` listing them."""
    table = TABLES[kind]
    if name not in table:
        raise ConfigError(f"{kind}.name: unknown {kind} {name!r}; choose one of {sorted(table)}")
    return table[name]
