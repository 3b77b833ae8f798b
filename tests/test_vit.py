import math

import pytest
import torch

from mimar.backbones.vit import ViT, ViTConfig
from mimar.nn import sincos_pos_embed_2d

TINY = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)


def test_sincos_values_match_hand_computation():
    table = sincos_pos_embed_2d(8, 2)  # (4 tokens, 8 channels): 4 for column, 4 for row
    assert table.shape == (4, 8)
    # token 3 = row 1, col 1; frequencies for dim 4: w_k = 1/10000^(k/2), k = 0, 1
    w = [1.0, 1.0 / 100.0]
    expected_col = [math.sin(w[0]), math.sin(w[1]), math.cos(w[0]), math.cos(w[1])]
    torch.testing.assert_close(table[3, :4], torch.tensor(expected_col))
    torch.testing.assert_close(table[3, 4:], torch.tensor(expected_col))
    # token 1 = row 0, col 1: column half varies, row half is position 0 -> [0, 0, 1, 1]
    torch.testing.assert_close(table[1, 4:], torch.tensor([0.0, 0.0, 1.0, 1.0]))
    torch.testing.assert_close(table[1, :4], torch.tensor(expected_col))


def test_shapes_prefix_and_layers():
    vit = ViT(ViTConfig(**TINY))
    x = torch.randn(3, 1, 16, 16)
    out = vit(x, return_layers=(0, -1))
    assert out["tokens"].shape == (3, 17, 32)
    assert [t.shape for t in out["layers"]] == [(3, 17, 32)] * 2
    # the final tokens are the final norm of the last raw block output
    torch.testing.assert_close(out["tokens"], vit.norm(out["layers"][1]))
    with pytest.raises(ValueError, match="out of range"):
        vit(x, return_layers=(5,))


def test_mask_token_replaces_hidden_patches_before_pos_embed():
    vit = ViT(ViTConfig(**TINY, use_mask_token=True))
    x = torch.randn(2, 1, 16, 16)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, 5] = True
    emb = vit.embed(x, mask)
    expected = vit.mask_token[0, 0] + vit.pos_embed[0, 1 + 5]
    torch.testing.assert_close(emb[0, 1 + 5], expected)
    # changing a hidden patch's pixels changes nothing anywhere
    y = x.clone()
    y[0, :, 4:8, 4:8] += 10  # patch (row 1, col 1) = index 5
    torch.testing.assert_close(vit(x, mask=mask)["tokens"], vit(y, mask=mask)["tokens"])
    assert not torch.allclose(vit(x)["tokens"], vit(y)["tokens"])


def test_keep_ids_drop_tokens_and_keep_positions():
    vit = ViT(ViTConfig(**TINY, class_token=False, pos_embed="sincos"))
    x = torch.randn(2, 1, 16, 16)
    keep = torch.tensor([[0, 3, 7], [15, 1, 2]])
    emb = vit.embed(x, keep_ids=keep)
    full = vit.embed(x)
    assert emb.shape == (2, 3, 32)
    torch.testing.assert_close(emb[1], full[1, [15, 1, 2]])
    assert vit(x, keep_ids=keep)["tokens"].shape == (2, 3, 32)
    assert not vit.pos_embed.requires_grad  # fixed sin-cos


def test_attn_mask_is_applied():
    vit = ViT(ViTConfig(**TINY, class_token=False))
    x = torch.randn(1, 1, 16, 16)
    causal = torch.ones(16, 16, dtype=torch.bool).tril()
    a = vit(x, attn_mask=causal)["tokens"]
    y = x.clone()
    y[..., 12:, 12:] += 5  # only the last patch (index 15) changes
    b = vit(y, attn_mask=causal)["tokens"]
    torch.testing.assert_close(a[:, :15], b[:, :15])  # earlier tokens cannot see it
    assert not torch.allclose(a[:, 15], b[:, 15])


def test_layer_ids_and_no_weight_decay():
    vit = ViT(ViTConfig(**TINY, use_mask_token=True))
    assert vit.layer_id("patch_embed.proj.weight") == 0
    assert vit.layer_id("mask_token") == 0
    assert vit.layer_id("blocks.0.attn.qkv.weight") == 1
    assert vit.layer_id("blocks.1.mlp.fc2.bias") == 2
    assert vit.layer_id("norm.weight") == 3
    assert {"cls_token", "mask_token", "pos_embed"} <= vit.no_weight_decay()


def test_init_truncated_at_one_std_and_fix_init():
    vit = ViT(ViTConfig(**TINY, fix_init=True, init_values=0.1))
    w = vit.blocks[0].mlp.fc1.weight
    assert w.abs().max() <= 0.02 + 1e-6 and w.std() > 0.01
    assert vit.blocks[1].mlp.fc2.weight.abs().max() <= 0.02 / math.sqrt(4) + 1e-6
    assert torch.equal(vit.blocks[0].ls1.gamma, torch.full((32,), 0.1))


def test_default_init_zero_conv_bias_and_trunc_normal_class_token():
    vit = ViT(ViTConfig(**TINY))
    assert not vit.patch_embed.proj.bias.any()
    assert vit.cls_token.abs().max() <= 0.02 and vit.cls_token.std() > 0.005


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="not divisible"):
        ViTConfig(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="num_heads"):
        ViTConfig(embed_dim=30, num_heads=4, img_size=16, patch_size=4)
    with pytest.raises(ValueError, match="cls_token_init must be one of trunc_normal, zeros"):
        ViTConfig(**TINY, cls_token_init="ones")
