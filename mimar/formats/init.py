"""``train.init=RUN|FILE``: start a pretraining from other weights (continued pretraining).

Weights only: the run still starts at step 0 with a fresh optimizer and schedule. The source
is a mimar run folder or checkpoint (an imported release is one) or a release file in any
format ``mimar import`` reads. Every tensor of the method whose name is in the source is
loaded; position tables made for another resolution are resampled, a shared relative
position table is copied into every block when the method has per-block ones; what the
source lacks starts fresh. A teacher is not part of ``method.state_dict()``: it stays what
``teacher.*`` says. With ``--resume`` the run's own checkpoint wins and this never runs.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from mimar.errors import CheckpointError, MissingFileError
from mimar.formats.keymap import ema_copies
from mimar.formats.resample import fit_positions

log = logging.getLogger("mimar")
_SHARED = "backbone.rel_pos_bias.relative_position_bias_table"


def init_from(method: nn.Module, source: str, resume: bool = False) -> dict | None:
    """:func:`init_method` unless there is no ``source`` or the run resumes (then None)."""
    if not source or resume:
        return None
    return init_method(method, source)


def init_method(method: nn.Module, source: str | Path) -> dict:
    """Load the weights of ``source`` into ``method`` (in place); returns the report
    ``{"loaded", "fresh", "resampled", "unused"}``, which is also logged."""
    weights = source_weights(source)
    target = method.state_dict()
    if _SHARED in weights and _SHARED not in target:  # per-block tables: a copy each (BEiT)
        from mimar.backbones.vit import expand_shared_rel_pos_bias

        weights = expand_shared_rel_pos_bias(weights, "backbone.")
    weights = weights | ema_copies(weights, target)  # a release's missing EMA teacher
    prefix = getattr(getattr(method, "backbone", None), "num_prefix_tokens", 0)
    resampled = fit_positions(weights, target, prefix)
    for key, value in weights.items():
        if key in target and value.shape != target[key].shape:
            raise CheckpointError(
                f"train.init={source}: {key} has shape {tuple(value.shape)} there, "
                f"{tuple(target[key].shape)} in this run (its backbone.* must match)"
            )
    loaded = [k for k in target if k in weights]
    if not loaded:
        raise CheckpointError(f"train.init={source}: none of its weights fits this method")
    method.load_state_dict({k: weights[k] for k in loaded}, strict=False)
    report = {
        "loaded": loaded,
        "fresh": [k for k in target if k not in weights],
        "resampled": resampled,
        "unused": sorted(k for k in weights if k not in target),
    }
    log.info("train.init: loaded %d tensors from %s", len(loaded), source)
    for name in ("fresh", "unused"):
        if report[name]:
            log.info("train.init: %s: %s", name, ", ".join(report[name]))
    for row in resampled:
        log.info("train.init: resampled %s from %s to %s", row["key"], row["from"], row["to"])
    return report


def source_weights(source: str | Path) -> dict[str, torch.Tensor]:
    """The method-named weights of a mimar run / checkpoint, or of a release file."""
    from mimar.engine import checkpoint
    from mimar.loading import resolve_checkpoint

    path = Path(source)
    if not path.exists():
        raise MissingFileError(f"train.init: no run folder or file at {path}")
    if path.is_dir() and not (path / "config.json").is_file():  # a run (not an HF folder)
        return checkpoint.load(resolve_checkpoint(path))["model"]
    if path.suffix in (".pt", ".pth"):
        try:
            return checkpoint.load(path)["model"]
        except CheckpointError:  # not a mimar checkpoint: a release
            pass
    return release_weights(path)


def release_weights(path: Path) -> dict[str, torch.Tensor]:
    """A release file's weights under mimar's names (its layout detected)."""
    from mimar.formats import detect_format
    from mimar.formats.keymap import unwrap
    from mimar.formats.reading import read_release

    obj, _ = read_release(path)
    weights, _ = unwrap(obj)
    layout = detect_format(weights).for_weights(weights)
    log.info("train.init: %s is a %s release", path, layout.name)
    return layout.to_mimar(weights, obj).weights
