"""Layer-wise lr decay of fine-tuning (docs/METHODS.md §1.5): every parameter's lr scale equals
a hand-computed table, for ViT, Swin and HiViT, with the classifier's head on top."""

import pytest
from helpers import tiny_vit

from mimar.backbones.hivit import HiViT, HiViTConfig
from mimar.backbones.swin import Swin, SwinConfig
from mimar.engine.optim import param_groups
from mimar.finetune.classifier import Classifier

DECAY = 0.5


def scales(backbone) -> dict[str, float]:
    model = Classifier(backbone, num_classes=3, pool="avg")
    groups = param_groups(model, 0.05, layer_decay=DECAY)
    return {name: g["lr_scale"] for g in groups for name in g["names"]}


def test_vit_embeddings_blocks_and_head():
    got = scales(tiny_vit(final_norm=False))  # depth 2: L + 1 = 3
    want = {
        "backbone.cls_token": DECAY**3,
        "backbone.pos_embed": DECAY**3,
        "backbone.patch_embed.proj.weight": DECAY**3,  # id 0
        "backbone.blocks.0.attn.qkv.weight": DECAY**2,  # id 1
        "backbone.blocks.1.mlp.fc2.bias": DECAY**1,  # id 2
        "fc_norm.weight": 1.0,  # id L + 1: the classifier
        "head.weight": 1.0,
    }
    assert {k: got[k] for k in want} == pytest.approx(want)
    assert set(got.values()) == {DECAY**3, DECAY**2, DECAY, 1.0}


def test_swin_stage_blocks_and_downsample():
    cfg = SwinConfig(
        img_size=16,
        patch_size=2,
        in_chans=1,
        embed_dim=8,
        depths=(2, 1),
        num_heads=(1, 2),
        window_size=4,
    )
    got = scales(Swin(cfg))
    L = 3  # 2 + 1 blocks: scale = decay ** (L + 1 - id)
    want = {
        "backbone.model.patch_embed.proj.weight": DECAY ** (L + 1),  # id 0
        "backbone.model.layers.0.blocks.0.attn.qkv.weight": DECAY**L,  # id 1
        "backbone.model.layers.0.blocks.1.attn.qkv.weight": DECAY ** (L - 1),  # id 2
        "backbone.model.layers.1.downsample.reduction.weight": DECAY ** (L - 1),  # id 2
        "backbone.model.layers.1.blocks.0.mlp.fc1.weight": DECAY ** (L - 2),  # id 3
        "backbone.model.norm.weight": 1.0,  # id L + 1
        "head.weight": 1.0,
    }
    assert {k: got[k] for k in want} == pytest.approx(want)


def test_hivit_mlp_stages_merges_and_attention_blocks():
    cfg = HiViTConfig(
        img_size=16, patch_size=4, in_chans=1, embed_dim=32, mlp_depth=1, depth=2, num_heads=2
    )
    got = scales(HiViT(cfg))
    L = 4  # 1 + 1 MLP blocks, 2 attention blocks
    want = {
        "backbone.patch_embed.proj.weight": DECAY ** (L + 1),  # id 0
        "backbone.pos_embed": DECAY ** (L + 1),
        "backbone.stage1.0.mlp.fc1.weight": DECAY**L,  # id 1
        "backbone.merge1.reduction.weight": DECAY**L,  # id m = 1: with the block before it
        "backbone.stage2.0.mlp.fc1.weight": DECAY ** (L - 1),  # id 2
        "backbone.merge2.reduction.weight": DECAY ** (L - 1),  # id 2 m = 2
        "backbone.blocks.0.attn.qkv.weight": DECAY ** (L - 2),  # id 3
        "backbone.blocks.1.attn.qkv.weight": DECAY ** (L - 3),  # id 4
        "head.weight": 1.0,
    }
    assert {k: got[k] for k in want} == pytest.approx(want)
