"""Generic layers shared by backbones and heads (imports only torch; timm.layers lazily)."""

from mimar.nn.attention import (
    Attention,
    CrossAttention,
    additive_mask,
    attend,
    set_attention_kernel,
)
from mimar.nn.block import Block
from mimar.nn.init import default_bias_, init_linears, trunc_normal_, xavier_uniform_split_
from mimar.nn.layers import DropPath, GradCheckpointing, LayerScale, step_draws
from mimar.nn.mlp import Mlp, MLPBlock
from mimar.nn.pos_embed import (
    RelativePositionBias,
    relative_position_index,
    sincos_pos_embed_1d,
    sincos_pos_embed_2d,
)

__all__ = [
    "Attention",
    "Block",
    "CrossAttention",
    "DropPath",
    "GradCheckpointing",
    "LayerScale",
    "MLPBlock",
    "Mlp",
    "RelativePositionBias",
    "additive_mask",
    "attend",
    "default_bias_",
    "init_linears",
    "relative_position_index",
    "set_attention_kernel",
    "sincos_pos_embed_1d",
    "sincos_pos_embed_2d",
    "step_draws",
    "trunc_normal_",
    "xavier_uniform_split_",
]
