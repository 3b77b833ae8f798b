"""Heads and decoders that map encoder tokens to predictions."""

from __future__ import annotations

import torch
from torch import nn

from mimar.nn import Attention, Block, CrossAttention, Mlp, init_linears, sincos_pos_embed_2d


class PixelShuffleHead(nn.Module):
    """SimMIM's one-layer linear decoder (docs/METHODS.md §2.3).

    A 1x1 convolution maps every token of the ``(B, D, h, w)`` feature map to
    ``stride^2 * C`` values, and ``PixelShuffle(stride)`` lays them out as the
    ``stride x stride`` pixels the token covers: ``(B, C, h*stride, w*stride)``.
    Keeps PyTorch's default Conv2d init, as the official code does (§10.7).
    """

    def __init__(self, embed_dim: int, encoder_stride: int, out_chans: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(embed_dim, encoder_stride**2 * out_chans, kernel_size=1)
        self.shuffle = nn.PixelShuffle(encoder_stride)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.shuffle(self.conv(feature_map))


class AIMHeadBlock(nn.Module):
    """One per-token block of AIM's pretraining head: ``h += MLP(LN(h))``, MLP without biases.

    ``residual_norm`` reproduces the released l3m config, which builds the head from
    transformer blocks with an identity in the attention slot, so each block also adds its
    normalised input: ``h += LN_a(h)`` first (docs/METHODS.md §5.3; the paper's text omits it).
    """

    def __init__(self, width: int, mlp_ratio: float, residual_norm: bool, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps) if residual_norm else None
        self.norm2 = nn.LayerNorm(width, eps=eps)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(width, hidden, bias=False), nn.GELU(), nn.Linear(hidden, width, bias=False)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.norm1 is not None:
            h = h + self.norm1(h)
        return h + self.mlp(self.norm2(h))


class AIMHead(nn.Module):
    """AIM's heavy MLP head (docs/METHODS.md §5.3): every token is decoded on its own.

    ``Linear(D -> W) + sincos positions -> depth x AIMHeadBlock(W) -> LN -> Linear(W -> T)``.
    All linears are xavier-uniform with zero biases (§10: the official scaled init of the last
    layer is overwritten by the generic one).
    """

    def __init__(
        self,
        embed_dim: int,
        width: int,
        depth: int,
        mlp_ratio: float,
        out_dim: int,
        pos_embed: torch.Tensor,
        residual_norm: bool = True,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.proj = nn.Linear(embed_dim, width)
        self.register_buffer("pos_embed", pos_embed, persistent=False)  # (N, W), row-major
        self.blocks = nn.ModuleList(
            AIMHeadBlock(width, mlp_ratio, residual_norm, eps) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width, eps=eps)
        self.pred = nn.Linear(width, out_dim)
        init_linears(self, "xavier")

    def forward(self, tokens: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """``tokens (B, N, D)`` in sequence order; ``order (N,)`` their row-major patch ids."""
        h = self.proj(tokens) + self.pos_embed[order].to(tokens.dtype)  # (B, N, W)
        for block in self.blocks:
            h = block(h)
        return self.pred(self.norm(h))  # (B, N, T)


class PyramidEmbed(nn.Module):
    """Each pyramid level -> one ``dim`` vector per main patch (iTPN, docs/METHODS.md §4.3, §4.6).

    Level l with s x s sub-tokens per patch is embedded per sub-token by
    ``LN -> Linear(F -> dim / s^2)`` and its sub-tokens are concatenated row-major: a learned
    downsampling of every level to the main-patch grid. Returns a list of ``(B, n, dim)``.
    Linears trunc-normal std 0.02, as the official ``_init_weights``.
    """

    def __init__(
        self, fpn_dim: int, dim: int, sub_tokens: tuple[int, ...] = (4, 2, 1), eps: float = 1e-6
    ) -> None:
        super().__init__()
        if any(dim % (s * s) for s in sub_tokens):
            raise ValueError(f"width {dim} must be divisible by {[s * s for s in sub_tokens]}")
        self.dim = dim
        self.levels = nn.ModuleList(
            nn.Sequential(nn.LayerNorm(fpn_dim, eps=eps), nn.Linear(fpn_dim, dim // (s * s)))
            for s in sub_tokens
        )
        init_linears(self.levels)

    def forward(self, levels: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        """``levels[l]``: ``(B, n, s, s, F)``, finest first -> ``[(B, n, dim)] * 3``."""
        B, n = levels[0].shape[:2]
        return [embed(x).reshape(B, n, self.dim) for x, embed in zip(levels, self.levels)]


class PyramidPixelDecoder(nn.Module):
    """iTPN's multi-level fusion decoder (docs/METHODS.md §4.3): the pyramid of the kept patches
    -> decoder tokens of all N patches, ``(B, N, dim)`` after the final LayerNorm.

    Each level is embedded by :class:`PyramidEmbed` (widths dim, dim/4, dim/16 per sub-token);
    hidden patches get one mask token shared by all levels (§10.11).
    ``z = e16 + pos + e8 + e4`` (a hidden patch: 3 mask tokens + pos) -> ``depth`` attention
    blocks -> LN. Linears trunc-normal std 0.02 as the official ``_init_weights``; the mask
    token normal std 0.02; the sin-cos positions fixed.
    """

    def __init__(
        self,
        fpn_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        grid: int,
        mlp_ratio: float = 4.0,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.embed = PyramidEmbed(fpn_dim, dim, eps=eps)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid), persistent=False)
        self.blocks = nn.ModuleList(
            Block(dim, num_heads, mlp_ratio=mlp_ratio) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)
        init_linears(self.blocks)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, levels: tuple[torch.Tensor, ...], keep_ids: torch.Tensor) -> torch.Tensor:
        """``levels[l]``: ``(B, n, s, s, F)`` of the kept patches ``keep_ids (B, n)``."""
        B = keep_ids.shape[0]
        z = self.pos_embed.to(levels[0].dtype).expand(B, -1, -1)  # (B, N, dim)
        for e in self.embed(levels):  # (B, n, dim) per level
            z = z + self.restore(e, keep_ids)  # (B, N, dim)
        for block in self.blocks:
            z = block(z)
        return self.norm(z)

    def restore(self, e: torch.Tensor, keep_ids: torch.Tensor) -> torch.Tensor:
        """Kept tokens back to their grid places, the mask token elsewhere: ``(B, N, dim)``."""
        B, N = e.shape[0], self.pos_embed.shape[0]
        full = self.mask_token.to(e.dtype).expand(B, N, self.dim).clone()
        return full.scatter(1, keep_ids.unsqueeze(-1).expand(-1, -1, self.dim), e)


class PyramidFusionHead(nn.Module):
    """iTPN-CLIP's head (docs/METHODS.md §4.6): the levels downsampled to the main-patch grid by
    :class:`PyramidEmbed` (widths D, D/4, D/16 per sub-token) and summed -- no mask tokens, no
    decoder transformer -- then ``LN -> Linear(D -> D_t)`` (the code's ``lm_head``)."""

    def __init__(self, fpn_dim: int, dim: int, out_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.embed = PyramidEmbed(fpn_dim, dim, eps=eps)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.head = nn.Linear(dim, out_dim)
        init_linears(self.head)

    def forward(self, levels: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``levels[l]``: ``(B, N, s, s, F)`` -> ``(B, N, D_t)``."""
        return self.head(self.norm(torch.stack(self.embed(levels)).sum(0)))


class DiGPTDecoderBlock(nn.Module):
    """D-iGPT's decoder block (docs/METHODS.md §6.5), pre-norm, one mask for both attentions:

    ``q += SelfAttn(LN1(q)); q += CrossAttn(LN2a(q), LN2b(memory)); q += MLP(LN3(q))``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, eps: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads, qkv_bias=True, proj_bias=True)
        self.norm2_q = nn.LayerNorm(dim, eps=eps)
        self.norm2_kv = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=True)

    def forward(
        self, q: torch.Tensor, memory: torch.Tensor, attn_mask: torch.Tensor
    ) -> torch.Tensor:
        q = q + self.attn(self.norm1(q), attn_mask)
        q = q + self.cross_attn(self.norm2_q(q), self.norm2_kv(memory), attn_mask)
        return q + self.mlp(self.norm3(q))


class DiGPTDecoder(nn.Module):
    """One of D-iGPT's two decoders (docs/METHODS.md §6.3, §6.5): position-only queries that read a
    multi-depth memory of the encoder and predict teacher features.

    Memory: the raw outputs of ``num_layers`` encoder blocks, each through one shared
    ``LayerNorm(D)`` (eps 1e-5, as the code's repeated module), concatenated and mapped by one
    ``Linear(num_layers * D -> depth * dim)``; decoder block l reads slice l of the last axis
    of its ``(B, T, dim, depth)`` reshape. Queries: one learnable token + the sin-cos position
    of the patch each query stands for; the class-token query (index 0) gets position zero.
    After the blocks: ``LN -> Linear(dim -> out_dim)``. Init as MAE: xavier-uniform linears
    with zero biases, the query token normal std 0.02.
    """

    def __init__(
        self,
        embed_dim: int,
        num_layers: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        out_dim: int,
        grid: int,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by {num_heads} heads")
        self.dim, self.depth = dim, depth
        self.memory_norm = nn.LayerNorm(embed_dim, eps=1e-5)
        self.memory_proj = nn.Linear(num_layers * embed_dim, depth * dim)
        self.query_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid), persistent=False)
        self.blocks = nn.ModuleList(
            DiGPTDecoderBlock(dim, num_heads, mlp_ratio, eps) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.head = nn.Linear(dim, out_dim)
        init_linears(self, "xavier")
        nn.init.normal_(self.query_token, std=0.02)

    def forward(
        self, layers: list[torch.Tensor], query_ids: torch.Tensor, attn_mask: torch.Tensor
    ) -> torch.Tensor:
        """``layers``: encoder block outputs ``(B, 1 + n, D)`` (class token first);
        ``query_ids``: long ``(B, n)`` row-major patch ids whose positions the patch queries
        carry; ``attn_mask``: bool ``(1 + n, 1 + n)``. Returns ``(B, 1 + n, out_dim)``."""
        B, T = layers[0].shape[:2]
        memory = self.memory_proj(torch.cat([self.memory_norm(x) for x in layers], dim=-1))
        memory = memory.reshape(B, T, self.dim, self.depth)  # (B, T, dim, depth)
        pos = self.pos_embed[query_ids]  # (B, n, dim)
        pos = torch.cat([pos.new_zeros(B, 1, self.dim), pos], dim=1)  # class query: zero
        q = self.query_token + pos.to(memory.dtype)  # (B, T, dim)
        for layer, block in enumerate(self.blocks):
            q = block(q, memory[..., layer], attn_mask)
        return self.head(self.norm(q))  # (B, T, out_dim)
