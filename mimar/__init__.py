"""mimar: masked and autoregressive visual pretraining, side by side."""

from mimar.config import PretrainConfig, load_config
from mimar.factory import build_backbone, build_method
from mimar.loading import load_backbone

__all__ = ["PretrainConfig", "build_backbone", "build_method", "load_backbone", "load_config"]
__version__ = "0.1.0"
