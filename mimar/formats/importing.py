"""``mimar import``: a release -> a normal run folder.

``RUN/config.yaml`` (the full config of the format's method: architecture read from the
weights, the rest from the paper recipe and the overrides), ``RUN/checkpoints/last.pt``
(written by the engine's checkpoint writer, content hash included; step 0, no optimizer: it
is a start, ``train.init=RUN`` continues from it, ``--resume`` does not) and
``RUN/import.json`` (source and sha256, format, which release key went where, which parts
were imported and which start fresh, what was ignored and why, any resampling).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from mimar import runs, writes
from mimar.config import (
    PretrainConfig,
    apply_overrides,
    from_dict,
    read_recipe,
    save_config,
    to_dict,
)
from mimar.engine import checkpoint
from mimar.errors import CheckpointError, ConfigError
from mimar.formats import Format, detect_format, get_format
from mimar.formats.keymap import ema_copies, unwrap
from mimar.formats.reading import read_release
from mimar.formats.resample import fit_positions
from mimar.formats.vit_shapes import vit_fields

log = logging.getLogger("mimar")
IMPORT_JSON = "import.json"
HEAD_WIDTH = 64  # ViT-S/B/L/H, AIM: the head width when the recipe's width differs


def import_release(
    source: str | Path,
    out: str | Path,
    fmt: str = "auto",
    recipe: str | Path | None = None,
    img_size: int | None = None,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict:
    """Write the run folder ``out`` of the release ``source``; returns ``import.json``'s
    content. ``fmt`` "auto" detects the layout; ``recipe`` replaces the format's paper recipe;
    ``img_size`` resamples the position tables to that resolution."""
    out = Path(out)
    if runs.newest_checkpoint(out) is not None:
        raise ConfigError(f"{out} already holds a run: choose another --out")
    obj, weights_file = read_release(source)
    weights, other = unwrap(obj)
    layout = (detect_format(weights) if fmt == "auto" else get_format(fmt)).for_weights(weights)
    log.info("format: %s (%s)", layout.name, "detected" if fmt == "auto" else "given")
    converted = layout.to_mimar(weights, obj)
    cfg, untold_values = import_config(
        layout, converted.weights, recipe, img_size, overrides, converted.fields,
        converted.method_fields,
    )  # fmt: skip
    method = _build_method(cfg, converted.teacher_dim)
    target = method.state_dict()
    resampled = fit_positions(converted.weights, target, _prefix_tokens(cfg))
    check_fit(converted.weights, target)
    copies = ema_copies(converted.weights, target)
    # assign: the module takes the release's tensors (memory-mapped for zip files) instead of
    # copying them into its random ones, which are freed: one copy of the weights, not two
    weights = {k: v.to(target[k].dtype) for k, v in (converted.weights | copies).items()}
    method.load_state_dict(weights, strict=False, assign=True)
    del target, weights
    fresh = sorted(k for k in method.state_dict() if k not in converted.weights | copies)
    state = {"model": method.state_dict(), "step": 0, "config": to_dict(cfg)}
    checkpoint.save(state, runs.last_checkpoint(out))
    save_config(cfg, out / runs.CONFIG)
    report = {
        "source": {"path": str(Path(source).resolve()), "file": str(weights_file)},
        "sha256": _sha256(weights_file),
        "format": layout.name,
        "detected": fmt == "auto",
        "method": cfg.method.name,
        "recipe": str(recipe or layout.recipe_path),
        "overrides": list(overrides),
        "not_in_weights": untold_values,
        "imported_parts": sorted({k.split(".")[0] for k in converted.weights}),
        "fresh": fresh,
        "copied": {
            f"{p}.*": "backbone.* (the EMA teacher starts as the student)"
            for p in sorted({k.split(".")[0] for k in copies})
        },
        "keys": converted.keys,
        "ignored": converted.ignored | {k: "training state, not weights" for k in other},
        "resampled": resampled,
    }
    writes.write_text(out / IMPORT_JSON, json.dumps(report, indent=1), "import report")
    _log_summary(report, out)
    return report


def import_config(
    layout: Format,
    weights: dict[str, torch.Tensor],
    recipe: str | Path | None,
    img_size: int | None,
    overrides: list[str] | tuple[str, ...],
    told: dict | None = None,
    method_told: dict | None = None,
) -> tuple[PretrainConfig, dict]:
    """The run's config: the format's method, the architecture the weights tell, the rest
    from the recipe (``told``: what the release's own config says), ``overrides`` last. Also
    returns what came from neither the weights nor the release."""
    raw = read_recipe(recipe or layout.recipe_path)
    if raw.get("method", {}).get("name") != layout.method:
        raise ConfigError(
            f"--recipe: a {layout.name} release is a {layout.method} run, the recipe's method "
            f"is {raw.get('method', {}).get('name')!r}"
        )
    backbone = raw.setdefault("backbone", {})
    body = {k.removeprefix("backbone."): v for k, v in weights.items()}
    fields = (layout.architecture or vit_fields)(body, backbone)
    # the recipe's heads do not fit another width: 64-wide heads (ViT-S/B/L/H, AIM)
    if "num_heads" not in fields and fields["embed_dim"] != backbone.get("embed_dim"):
        heads = max(fields["embed_dim"] // HEAD_WIDTH, 1)
        backbone["num_heads"] = heads if fields["embed_dim"] % heads == 0 else 1
    fields |= told or {}
    backbone.update(fields)
    raw.setdefault("method", {}).update(method_told or {})
    if img_size:
        backbone["img_size"] = img_size
    apply_overrides(raw, overrides)
    given = {o.partition("=")[0].strip() for o in overrides}
    data = raw.setdefault("data", {})
    for key in ("img_size", "in_chans"):  # the data follows the backbone unless told
        if f"data.{key}" not in given:
            data[key] = raw["backbone"][key]
    fitted = _fit_mask_cells(raw, given)
    cfg = from_dict(raw)
    untold = ("num_heads", "norm_eps", "img_size")  # what a ViT's tensors cannot tell
    from_recipe = {
        f"backbone.{k}": getattr(cfg.backbone, k)
        for k in untold
        if k not in fields and f"backbone.{k}" not in given and hasattr(cfg.backbone, k)
    }
    return cfg, from_recipe | fitted


def _fit_mask_cells(raw: dict, given: set[str]) -> dict:
    """SimMIM's mask cells must tile the image and hold whole patches: a recipe's 32-px cells
    on a smaller import become the largest size that fits (reported; override it)."""
    method, backbone = raw.get("method", {}), raw["backbone"]
    cell = method.get("mask_patch_size")
    if not cell or "method.mask_patch_size" in given:
        return {}
    size, patch = backbone["img_size"], backbone["patch_size"]
    if size % cell == 0 and cell % patch == 0:
        return {}
    fits = [m for m in range(patch, min(cell, size) + 1, patch) if size % m == 0]
    method["mask_patch_size"] = max(fits, default=patch)
    return {"method.mask_patch_size": method["mask_patch_size"]}


def check_fit(weights: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> None:
    """One line naming a key the built method lacks, or a key whose shapes disagree."""
    extra = sorted(k for k in weights if k not in target)
    if extra:
        raise CheckpointError(f"the built method has no {', '.join(extra[:5])}")
    for key, value in weights.items():
        if value.shape != target[key].shape:
            raise CheckpointError(
                f"{key}: the release has shape {tuple(value.shape)}, the config builds "
                f"{tuple(target[key].shape)} (check the backbone.* overrides)"
            )


def _build_method(cfg: PretrainConfig, teacher_dim: int | None) -> torch.nn.Module:
    """The method of ``cfg``, seeded as a run is (the fresh parts). A method with a teacher
    (EVA) is built around a stand-in of the teacher's width: the teacher is never part of a
    release or a checkpoint, and importing must not need its files."""
    from mimar import names
    from mimar.backbones import build_backbone
    from mimar.factory import build_method  # the one factory

    torch.manual_seed(cfg.train.seed)
    entry = names.entry("method", cfg.method.name)
    if entry.teacher == "none":
        return build_method(cfg)
    if teacher_dim is None:
        raise CheckpointError("the release holds no head that tells the teacher's width")
    backbone = build_backbone(cfg.backbone)
    grid = getattr(backbone, "grid_size", None)
    return entry.module_class()(cfg.method, backbone, TeacherWidth(teacher_dim, grid))


class TeacherWidth:
    """Stands in for a frozen teacher while an import builds the method: its width, and a
    token grid (the student's) for a method that cuts the teacher's tokens into clusters
    (D-iGPT): the teacher's grid shapes no weight, only index buffers that are not saved."""

    def __init__(self, dim: int, grid: int | None = None) -> None:
        self.dim = dim
        self.grid = (grid, grid)

    def __call__(self, images):
        raise RuntimeError("an imported run's method has no teacher: set teacher.* to train")


def _prefix_tokens(cfg: PretrainConfig) -> int:
    return int(getattr(cfg.backbone, "class_token", False))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _log_summary(report: dict, out: Path) -> None:
    n = len({v.split("[")[0] for v in report["keys"].values()})
    log.info(
        "imported %d tensors (%s) from %s", n, ", ".join(report["imported_parts"]), report["format"]
    )
    if report["not_in_weights"]:
        told = ", ".join(f"{k}={v}" for k, v in report["not_in_weights"].items())
        log.info("not in the weights (recipe, or 64-wide heads; override with key=value): %s", told)
    for part, source in report["copied"].items():
        log.info("copied %s from %s", part, source)
    if report["fresh"]:
        log.info("start fresh (not in the release): %s", ", ".join(report["fresh"]))
    for row in report["resampled"]:
        log.info("resampled %s from %s to %s", row["key"], row["from"], row["to"])
    log.info("wrote %s (%s, config.yaml, checkpoints/last.pt)", out, IMPORT_JSON)


def export_release(source: str | Path, fmt: str, out: str | Path) -> Path:
    """Write the run ``source`` in the release layout ``fmt`` (the wrapper its official loader
    expects) to ``out``; importing that file gives back the same weights."""
    from mimar.loading import load_run

    layout = get_format(fmt)
    if layout.export is None:
        raise ConfigError(f"--format {fmt} has no export yet")
    cfg, state = load_run(source)
    if cfg.method.name != layout.method:
        raise ConfigError(
            f"--format {fmt} exports a {layout.method} run; {source} is a {cfg.method.name} run"
        )
    release = layout.export(state["model"], to_dict(cfg.backbone))
    out = Path(out)
    if layout.write is not None:
        layout.write(release, out)
    else:
        checkpoint.save_atomic(release, out)
    return out
