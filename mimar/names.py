"""The one name table per kind: recipe names -> the modules that implement them.

``method.name`` and ``backbone.name`` in a recipe are looked up here and nowhere else. A module
is imported only when its name is used, so that loading a ViT run never imports iTPN and
``import mimar.engine`` imports no method at all (tested).

A method's entry also carries what the rest of mimar needs to know about it: its tiny
Fashion-MNIST recipe (the quality bench, the speed report, the fine-tune scripts and the test
sweeps list the methods from here) and its picture function (``mimar.viz`` draws it). Adding a
method (say MAE) is one line in :data:`METHODS` plus its own file ``mimar/methods/mae.py`` and
its recipes (tested with a toy method in tests/test_names.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
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
    ``tiny_recipe``: the method's CPU-sized Fashion-MNIST recipe, relative to the repository
    root (or absolute); ``tiny_variants``: more of them, as ``(suffix, recipe)`` pairs, each
    benched as ``<name>-<suffix>`` (SimMIM on Swin: ``simmim-swin``).
    ``title``: how tables and reports write the name (``D-iGPT``).
    ``picture``: the dotted name of the method's picture function, ``rows(method, images,
    generator) -> {row title: images, "caption": str}`` (see :mod:`mimar.viz`), imported only
    when a picture is drawn; empty = the method has no picture.
    """

    module: str
    config: str
    cls: str
    teacher: Literal["none", "aligned", "own_grid"] = "none"
    pyramid_neck: bool = False
    tiny_recipe: str = ""
    tiny_variants: tuple[tuple[str, str], ...] = ()
    picture: str = ""
    title: str = ""

    def config_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.config)

    def module_class(self) -> type:
        return getattr(importlib.import_module(self.module), self.cls)

    def picture_function(self):
        """The picture function named by ``picture`` (imported now), or ``None``."""
        if not self.picture:
            return None
        module, _, attr = self.picture.rpartition(".")
        return getattr(importlib.import_module(module), attr)

    def is_class_of(self, obj: object) -> bool:
        """Whether ``obj`` is an instance of this entry's class, without importing its module
        (a module not yet imported holds no instance)."""
        kind = type(obj)
        return kind.__module__ == self.module and kind.__qualname__ == self.cls


METHODS: dict[str, Entry] = {
    "simmim": Entry(
        "mimar.methods.simmim",
        "SimMIMConfig",
        "SimMIM",
        title="SimMIM",
        tiny_recipe="configs/simmim/vit_tiny_fmnist.yaml",
        tiny_variants=(("swin", "configs/simmim/swin_tiny_fmnist.yaml"),),
        picture="mimar.viz.simmim_rows",
    ),
    "eva": Entry(
        "mimar.methods.eva",
        "EVAConfig",
        "EVA",
        title="EVA",
        teacher="aligned",
        tiny_recipe="configs/eva/vit_tiny_fmnist.yaml",
        picture="mimar.viz.eva_rows",
    ),
    "itpn": Entry(
        "mimar.methods.itpn",
        "ITPNConfig",
        "ITPN",
        title="iTPN",
        pyramid_neck=True,
        tiny_recipe="configs/itpn/hivit_tiny_fmnist.yaml",
        picture="mimar.viz.itpn_rows",
    ),
    "itpn_clip": Entry(
        "mimar.methods.itpn_clip",
        "ITPNCLIPConfig",
        "ITPNCLIP",
        title="iTPN-CLIP",
        teacher="aligned",
        pyramid_neck=True,
        tiny_recipe="configs/itpn/hivit_tiny_clip_fmnist.yaml",
        picture="mimar.viz.itpn_clip_rows",
    ),
    "aim": Entry(
        "mimar.methods.aim",
        "AIMConfig",
        "AIM",
        title="AIM",
        tiny_recipe="configs/aim/vit_tiny_fmnist.yaml",
        picture="mimar.viz.aim_rows",
    ),
    "digpt": Entry(
        "mimar.methods.digpt",
        "DiGPTConfig",
        "DiGPT",
        title="D-iGPT",
        teacher="own_grid",
        tiny_recipe="configs/digpt/vit_tiny_fmnist.yaml",
        picture="mimar.viz.digpt_rows",
    ),
}
BACKBONES: dict[str, Entry] = {
    "vit": Entry("mimar.backbones.vit", "ViTConfig", "ViT", title="ViT"),
    "swin": Entry("mimar.backbones.swin", "SwinConfig", "Swin", title="Swin"),
    "hivit": Entry("mimar.backbones.hivit", "HiViTConfig", "HiViT", title="HiViT"),
}
TABLES = {"method": METHODS, "backbone": BACKBONES}


def entry(kind: Literal["method", "backbone"], name: str) -> Entry:
    """The table entry of ``name``; an unknown name is a :class:`ConfigError` listing them."""
    table = TABLES[kind]
    if name not in table:
        raise ConfigError(f"{kind}.name: unknown {kind} {name!r}; choose one of {sorted(table)}")
    return table[name]


ROOT = Path(__file__).resolve().parents[1]  # the repository: tiny recipes are relative to it


def tiny_recipes() -> dict[str, Path]:
    """Every method's tiny recipes by bench name, in :data:`METHODS` order: ``simmim``,
    ``simmim-swin``, ``eva``, ... (a method name's ``_`` written ``-``). The quality bench, the
    speed report and the fine-tune scripts take their method lists from here."""
    out = {}
    for name, e in METHODS.items():
        if e.tiny_recipe:
            bench = name.replace("_", "-")
            out[bench] = ROOT / e.tiny_recipe
            out |= {f"{bench}-{suffix}": ROOT / path for suffix, path in e.tiny_variants}
    return out


def method_of_bench_name(bench: str) -> str:
    """The method name of a bench name of :func:`tiny_recipes` (``simmim-swin`` -> ``simmim``)."""
    for name, e in METHODS.items():
        first = name.replace("_", "-")
        if bench == first or bench in {f"{first}-{s}" for s, _ in e.tiny_variants}:
            return name
    raise ConfigError(f"unknown bench name {bench!r}; choose one of {sorted(tiny_recipes())}")


def method_entry_of(method: object) -> Entry | None:
    """The :data:`METHODS` entry of a built method (``None`` for anything else)."""
    return next((e for e in METHODS.values() if e.is_class_of(method)), None)
