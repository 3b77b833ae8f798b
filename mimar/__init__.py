"""mimar: masked and autoregressive visual pretraining, side by side.

The public API is imported on first use (PEP 562), so that ``import mimar.engine`` or
``import mimar.data`` stays light and imports no method module.
"""

from __future__ import annotations

import importlib

__all__ = ["PretrainConfig", "build_backbone", "build_method", "load_backbone", "load_config"]
__version__ = "0.1.0"

_PUBLIC = {
    "PretrainConfig": "mimar.config",
    "load_config": "mimar.config",
    "build_backbone": "mimar.factory",
    "build_method": "mimar.factory",
    "load_backbone": "mimar.loading",
}


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'mimar' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_PUBLIC))
