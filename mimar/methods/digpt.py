"""D-iGPT: Rejuvenating image-GPT as Strong Visual Representation Learners.

Ren, Wang, Wei, Yuille, Xie. ICML 2024. arXiv:2312.02147.

Idea: image GPT, but the "tokens" predicted autoregressively are a frozen teacher's (CLIP's)
features, and the sequence elements are large clusters of patches. The patch grid is cut into
4 quadrant clusters read in a random order per image. The encoder sees the first 3 clusters
(plus a class token) under a cluster-causal mask, so one pass gives, for every i, a context
built from clusters 0..i only. Two light decoders read several encoder depths through
cross-attention under the same mask: the *generative* one predicts the teacher features of
the next cluster i+1, the *discriminative* one those of the cluster i it has already seen.
Loss ``2 - 2 cos`` on every predicted token and the class token, generative + discriminative.
After pretraining the encoder is an ordinary bidirectional ViT.

Glossary (paper / official code -> code): cluster -> ``clusters`` (row-major patch ids per
cluster, ``masking.cluster_index``); ``randperm(4)`` -> ``order`` (``order[b, i]`` = the
cluster read at slot i); ``num_seg`` visible clusters -> ``num_slots``; the
lower-triangular-plus-reflect-pad mask -> ``masking.cluster_causal_mask``; ``ar_token``
decoder ([Gen]) -> ``gen_decoder``; ``kd_token`` decoder ([Dis]) -> ``dis_decoder``; memories
after blocks 6/8/10/12 -> ``memory_layers``; ViT-H/14 CLIP tokens -> ``teacher(images)``.

Checked against OliverRensu/D-iGPT (``DiGPT_torch``) via docs/METHODS.md §6 and §10.5-6: 3 of 4
clusters into the encoder, class token visible only to the last visible cluster, no final
LayerNorm in pretraining, one shared LayerNorm + one Linear per decoder path for the memory,
each decoder layer its own memory slice, queries = one token + next-/current-cluster sin-cos
positions, both attentions of the decoder under the encoder's mask, predictions resized
bilinearly per cluster to the teacher's cluster grid, loss over clusters and class token.
Ours: the class token sits first in the sequence (the mask gives it the code's role), the
cluster grids and memory depths follow from the config rather than being hard-coded, and a
teacher without class token (``teacher.kind=pixels``, or a class-token-free mimar run) leaves
the class-token term out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from mimar.engine.contracts import MethodDefaults
from mimar.errors import check_range
from mimar.heads import DiGPTDecoder
from mimar.losses import cosine_distance
from mimar.masking import cluster_causal_mask, cluster_index, random_cluster_orders


@dataclass(frozen=True, kw_only=True)
class DiGPTConfig:
    name: Literal["digpt"] = "digpt"
    clusters_per_side: int = 2  # 2 -> 4 quadrant clusters (§6.1); must divide both grids
    memory_layers: tuple[int, ...] = ()  # 1-based encoder blocks; () -> default_memory_layers
    decoder_dim: int = 1024  # §6.5: depth 2, Dd 1024, 32 heads, MLP 4 (each decoder)
    decoder_depth: int = 2
    decoder_heads: int = 32
    decoder_mlp_ratio: float = 4.0
    dis_decoder: bool = True  # False: generative decoder only (paper Table 9 ablation)

    def __post_init__(self) -> None:
        side = self.clusters_per_side
        check_range(
            "method.clusters_per_side",
            side,
            side >= 2,
            ">= 2 (at least 4 clusters to read in order)",
        )
        for key in ("decoder_depth", "decoder_dim", "decoder_heads"):
            check_range(f"method.{key}", getattr(self, key), getattr(self, key) >= 1, ">= 1")
        dim, heads = self.decoder_dim, self.decoder_heads
        check_range(
            "method.decoder_dim",
            dim,
            dim % heads == 0,
            f"divisible by method.decoder_heads={heads}",
        )
        ratio = self.decoder_mlp_ratio
        check_range("method.decoder_mlp_ratio", ratio, ratio > 0, "> 0")

    def check_backbone(self, backbone) -> None:
        """The memory blocks exist in ``backbone`` (a config: checked when a recipe loads)."""
        depth = getattr(backbone, "depth", None)
        if depth is None:
            return
        layers = self.memory_layers or default_memory_layers(depth)
        check_range(
            "method.memory_layers",
            list(layers),
            bool(layers) and all(1 <= i <= depth for i in layers),
            f"one or more blocks, and blocks are numbered 1..{depth} (backbone.depth)",
        )


def default_memory_layers(depth: int) -> tuple[int, ...]:
    """The code's blocks 6, 8, 10, 12 of 12, spread the same way over other depths: 4 evenly
    spaced blocks from the middle to the last (1-based; depth 6 -> 3, 4, 5, 6)."""
    start = max(depth // 2, 1)  # depth 1: block 1 (block 0 does not exist)
    return tuple(dict.fromkeys(start + round(i * (depth - start) / 3) for i in range(4)))


class DiGPT(MethodDefaults, nn.Module):
    """D-iGPT on a ViT with a class token; the teacher is a plain attribute (not trained, not
    in ``state_dict()``), as in :class:`~mimar.methods.eva.EVA`."""

    def __init__(self, cfg: DiGPTConfig, backbone: nn.Module, teacher) -> None:
        super().__init__()
        if backbone.num_prefix_tokens != 1 or backbone.stage_dims != ():
            raise ValueError(
                "D-iGPT needs a ViT with a class token: set backbone.name=vit "
                "backbone.class_token=true"
            )
        if backbone.cfg.final_norm:  # no final LayerNorm in pretraining (§6.3)
            raise ValueError(
                "D-iGPT pretrains its ViT without a final LayerNorm (docs/METHODS.md §6.3): set "
                "backbone.final_norm=false"
            )
        self.cfg, self.backbone, self.teacher = cfg, backbone, teacher
        k, grid = cfg.clusters_per_side, backbone.grid_size
        self.register_buffer("clusters", cluster_index(grid, k), persistent=False)  # (K, s)
        self.num_clusters, self.cluster_size = self.clusters.shape
        self.num_slots = self.num_clusters - 1  # clusters the encoder sees (3 of 4)
        th, tw = teacher.grid
        if th != tw or th % k:
            raise ValueError(
                f"the teacher's {th}x{tw} token grid cannot be cut into {k}x{k} clusters like "
                f"the student's {grid}x{grid} grid: pick teacher.img_size or "
                "method.clusters_per_side so that both grids split evenly"
            )
        self.register_buffer("teacher_clusters", cluster_index(th, k), persistent=False)
        self.student_side, self.teacher_side = grid // k, th // k  # cluster sides: 7 and 8
        depth = backbone.num_layers
        self.memory_layers = cfg.memory_layers or default_memory_layers(depth)
        if not all(1 <= i <= depth for i in self.memory_layers):
            raise ValueError(
                f"method.memory_layers={list(self.memory_layers)}: blocks are numbered 1..{depth}"
            )
        mask = cluster_causal_mask(self.num_slots, self.cluster_size)  # (T, T), class token first
        self.register_buffer("attn_mask", mask, persistent=False)
        self.gen_decoder = self._decoder()
        self.dis_decoder = self._decoder() if cfg.dis_decoder else None

    def _decoder(self) -> DiGPTDecoder:
        c, b = self.cfg, self.backbone
        return DiGPTDecoder(
            b.embed_dim,
            len(self.memory_layers),
            c.decoder_dim,
            c.decoder_depth,
            c.decoder_heads,
            c.decoder_mlp_ratio,
            self.teacher.dim,
            b.grid_size,
        )

    def sample_corruption(self, batch_size: int, generator: torch.Generator | None = None) -> dict:
        """One random cluster order per image, drawn by the engine for the global batch."""
        return {"order": random_cluster_orders(batch_size, self.num_clusters, generator)}

    def forward(self, images: torch.Tensor, *, order: torch.Tensor) -> dict:
        order = order.to(images.device)  # (B, K)
        preds = self.predict(images, order)
        target = self.teacher(images)  # the teacher sees the whole image
        clusters = self.teacher_tokens(target["tokens"], order)  # (B, K, s_t, D_t) read order
        cls = target.get("cls")
        out = {"teacher_ms": torch.tensor(target["ms"], device=images.device)}
        # generative: slot i predicts cluster i + 1; discriminative: slot i its own cluster i
        out["loss_gen"] = self.cluster_loss(preds["gen"], clusters[:, 1:], cls)
        out["loss"] = out["loss_gen"]
        if "dis" in preds:
            out["loss_dis"] = self.cluster_loss(preds["dis"], clusters[:, :-1], cls)
            out["loss"] = out["loss_gen"] + out["loss_dis"]  # 1:1 (§6.6)
        return out

    def predict(self, images: torch.Tensor, order: torch.Tensor) -> dict:
        """Encode the first ``num_slots`` clusters of ``order`` under the cluster-causal mask;
        decode. Returns ``{"gen": (B, T, D_t), "dis": ...}``, ``T = 1 + num_slots * s``, class
        token first, then the slots in reading order (each cluster's patches row-major)."""
        ids = self.clusters[order]  # (B, K, s) patch ids, clusters in reading order
        seen = ids[:, :-1].flatten(1)  # (B, num_slots * s): the last cluster is never shown
        out = self.backbone(
            images,
            keep_ids=seen,
            attn_mask=self.attn_mask,
            return_layers=tuple(i - 1 for i in self.memory_layers),
        )
        memory = out["layers"]  # raw block outputs (B, T, D)
        preds = {"gen": self.gen_decoder(memory, ids[:, 1:].flatten(1), self.attn_mask)}
        if self.dis_decoder is not None:
            preds["dis"] = self.dis_decoder(memory, seen, self.attn_mask)
        return preds

    def teacher_tokens(self, tokens: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
        """Teacher tokens ``(B, N_t, D_t)`` on its own grid -> ``(B, K, s_t, D_t)``, the
        clusters permuted into each image's reading order (§6.4)."""
        clusters = tokens[:, self.teacher_clusters]  # (B, K, s_t, D_t), clusters row-major
        index = order[:, :, None, None].expand(-1, -1, *clusters.shape[2:])
        return clusters.gather(1, index)

    def cluster_loss(
        self, pred: torch.Tensor, target: torch.Tensor, cls: torch.Tensor | None
    ) -> torch.Tensor:
        """``2 - 2 cos`` averaged over every target token of the ``num_slots`` clusters and the
        class token (when the teacher has one) of every image: 3 * 64 + 1 = 193 per image at
        ViT-B/16 with a ViT-H/14 teacher (§6.6)."""
        patches = self.to_teacher_grid(pred[:, 1:])  # (B, slots, s_t, D_t)
        pred_tokens, target_tokens = patches.flatten(1, 2), target.flatten(1, 2)
        if cls is not None:
            pred_tokens = torch.cat([pred[:, :1], pred_tokens], dim=1)
            target_tokens = torch.cat([cls[:, None], target_tokens], dim=1)
        return cosine_distance(pred_tokens, target_tokens)

    def to_teacher_grid(self, pred: torch.Tensor) -> torch.Tensor:
        """Per-cluster predictions ``(B, slots * s, D_t)`` -> ``(B, slots, s_t, D_t)``, each
        cluster's map resized bilinearly from the student's cluster side to the teacher's
        (7x7 -> 8x8 for ViT-B/16 against ViT-H/14, §6.6); unchanged when the sides agree."""
        B, D = pred.shape[0], pred.shape[-1]
        a, b = self.student_side, self.teacher_side
        if a == b:
            return pred.reshape(B, self.num_slots, a * a, D)
        maps = pred.float().reshape(B * self.num_slots, a, a, D).permute(0, 3, 1, 2)
        maps = F.interpolate(maps, size=(b, b), mode="bilinear", align_corners=False)
        return maps.permute(0, 2, 3, 1).reshape(B, self.num_slots, b * b, D)
