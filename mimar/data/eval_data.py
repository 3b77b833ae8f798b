"""``--data KIND:PATH``: evaluate a backbone on any data set, whatever it was pretrained on.

The images follow the backbone, not the data: its ``img_size`` and ``in_chans`` (gray images
are replicated to 3 channels, colour ones converted to gray by the loaders) and the
normalisation statistics of the run's own data (what the backbone saw in pretraining). A plain
``--data PATH`` (no ``KIND:``) keeps its older meaning: the run's data set at another root.
"""

from __future__ import annotations

import re
from dataclasses import replace

from mimar.data.config import DataConfig
from mimar.data.sources import normalization_stats
from mimar.errors import ConfigError

DATA_KINDS = {"image_folder": "DIR", "fashion_mnist": "DIR", "webdataset": "PATTERN"}
_KIND = re.compile(r"[A-Za-z][\w-]*")  # what a KIND looks like (a path prefix does not)


def parse_data_spec(value: str | None) -> tuple[str, str] | None:
    """``"image_folder:/data/x"`` -> ``("image_folder", "/data/x")``; ``None`` for a plain path
    (or a URL, ``scheme://...``); a word before ``:`` that is no kind is one clear line."""
    if value is None:
        return None
    kind, sep, path = str(value).partition(":")
    if not sep or not _KIND.fullmatch(kind) or path.startswith("//"):
        return None
    if kind not in DATA_KINDS or not path:
        kinds = ", ".join(f"{k}:{v}" for k, v in DATA_KINDS.items())
        raise ConfigError(
            f"--data {value!r}: expected one of {kinds} (or a plain PATH: the run's data set "
            "at that root)"
        )
    return kind, path


def data_for_backbone(
    run_data: DataConfig, kind: str, path: str, base: DataConfig | None = None
) -> tuple[DataConfig, str]:
    """``base`` (default ``run_data``; a fine-tune passes its recipe's data, whose size it
    trains at) reading ``kind`` at ``path``, with the channels and normalisation statistics of
    ``run_data`` (the run's: what the backbone saw); returns it and the one line that says how
    the images are fitted to the backbone."""
    mean, std = normalization_stats(run_data)  # the run's statistics, per backbone channel
    base = run_data if base is None else base
    data = replace(base, name=kind, root=path, in_chans=run_data.in_chans, mean=mean, std=std)
    return data, fitted_note(data)


def fitted_note(data: DataConfig) -> str:
    """How ``data``'s images reach the backbone: size, channels, statistics (said once)."""
    chans = (
        "3 channels (gray images replicated)"
        if data.in_chans == 3
        else "1 channel (colour images converted to gray)"
    )
    stats = f"mean {_fmt(data.mean)} std {_fmt(data.std)}"
    return (
        f"data {data.name}:{data.root}: resized to the backbone's {data.img_size} px, {chans}, "
        f"normalised with the run's statistics ({stats})"
    )


def _fmt(values: tuple[float, ...] | None) -> str:
    return "(" + ", ".join(f"{v:.3f}" for v in values or ()) + ")"
