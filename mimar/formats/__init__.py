"""Released checkpoints in and out: ``mimar import`` / ``mimar export --format`` / ``train.init``.

One small module of key maps per family (``simmim``, ``timm``, ...), each next to a citation
of the official file and commit it was read from; :mod:`mimar.formats.reading` reads foreign
files safely (never ``weights_only=False``); :mod:`mimar.formats.importing` turns a release
into a normal run folder; :mod:`mimar.formats.init` starts a pretraining from one.
"""

from __future__ import annotations

import torch

from mimar.errors import ConfigError
from mimar.formats.aim import AIM_L3M, AIM_V1
from mimar.formats.digpt import DIGPT_VIT
from mimar.formats.eva import EVA01
from mimar.formats.family import Converted, Format
from mimar.formats.itpn import ITPN_PIXEL
from mimar.formats.simmim import SIMMIM_SWIN, SIMMIM_VIT
from mimar.formats.timm import TIMM
from mimar.formats.transformers import TRANSFORMERS

# --format name -> its layout; detection tries them in this order (most specific first)
FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        ITPN_PIXEL,
        DIGPT_VIT,
        SIMMIM_VIT,
        SIMMIM_SWIN,
        EVA01,
        AIM_V1,
        AIM_L3M,
        TRANSFORMERS,
        TIMM,
    )
}


def get_format(name: str) -> Format:
    """The format called ``name``; a ConfigError lists the ones there are."""
    if name in FORMATS:
        return FORMATS[name]
    raise ConfigError(f"unknown --format {name!r}; choose one of: auto, {', '.join(FORMATS)}")


def detect_format(weights: dict[str, torch.Tensor]) -> Format:
    """The first format whose layout ``weights`` (unwrapped) have."""
    for fmt in FORMATS.values():
        if fmt.detect(weights):
            return fmt
    shown = ", ".join(list(weights)[:5])
    raise ConfigError(
        f"--format auto: the weights ({shown}, ...) match no known layout; name one with "
        f"--format ({', '.join(FORMATS)})"
    )


__all__ = ["FORMATS", "Converted", "Format", "detect_format", "get_format"]
