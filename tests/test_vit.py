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
    with pytest.raises(ValueError, match="divisible by"):
        ViTConfig(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="num_heads"):
        ViTConfig(embed_dim=30, num_heads=4, img_size=16, patch_size=4)
    with pytest.raises(ValueError, match="cls_token_init must be one of trunc_normal, zeros"):
        ViTConfig(**TINY, cls_token_init="ones")


# --- relative position bias (SimMIM ViT, docs/METHODS.md §2.2, §2.6) ------------------------------


def _rpb_vit(kind="shared", **kw):
    torch.manual_seed(0)
    vit = ViT(ViTConfig(**{**TINY, "pos_embed": "none", "rel_pos_bias": kind, **kw})).eval()
    with torch.no_grad():  # away from the zero init, so that the bias matters
        for name, p in vit.named_parameters():
            if name.endswith("relative_position_bias_table"):
                p.normal_()
    return vit


def test_relative_position_index_is_timms_beit_layout():
    from timm.models.beit import gen_relative_position_index

    from mimar.nn import relative_position_index

    assert torch.equal(relative_position_index(4, 1), gen_relative_position_index((4, 4)))
    assert torch.equal(relative_position_index(3, 0), gen_relative_position_index((3, 3))[1:, 1:])


def test_shared_table_starts_at_zero_no_abs_pos_no_decay_and_its_layer_ids():
    torch.manual_seed(0)
    vit = ViT(ViTConfig(**TINY, pos_embed="none", rel_pos_bias="shared"))
    table = vit.rel_pos_bias.relative_position_bias_table
    assert table.shape == ((2 * 4 - 1) ** 2 + 3, 2) and not table.any()
    assert vit.pos_embed is None
    assert "rel_pos_bias.relative_position_bias_table" in vit.no_weight_decay()
    assert vit.layer_id("rel_pos_bias.relative_position_bias_table") == 3  # as BEiT: L + 1
    per = ViT(ViTConfig(**TINY, rel_pos_bias="per_block"))
    name = "blocks.1.attn.rel_pos_bias.relative_position_bias_table"
    assert name in per.no_weight_decay() and per.layer_id(name) == 2
    assert "relative_position_index" not in str(list(per.state_dict()))  # a buffer, as timm


@pytest.mark.parametrize("kind", ["shared", "per_block"])
def test_bias_is_added_to_the_logits_and_combined_with_a_boolean_mask(kind):
    from mimar.nn import additive_mask

    vit = _rpb_vit(kind)
    plain = ViT(ViTConfig(**{**TINY, "pos_embed": "none"})).eval()
    plain.load_state_dict(vit.state_dict(), strict=False)  # same weights, no tables
    x = torch.randn(2, 1, 16, 16)
    causal = torch.ones(17, 17, dtype=torch.bool).tril()
    with torch.no_grad():
        out = vit(x, attn_mask=causal)["tokens"]
        assert not torch.allclose(out, plain(x, attn_mask=causal)["tokens"])
        # the same network with the bias given by hand as an additive mask, one block at a time
        h = vit.embed(x)
        for block, twin in zip(vit.blocks, plain.blocks):
            table = (vit.rel_pos_bias or block.attn.rel_pos_bias)()  # (heads, T, T)
            h = twin(h, additive_mask(causal, table))
        torch.testing.assert_close(out, vit.norm(h))


@pytest.mark.parametrize("kind", ["shared", "per_block"])
def test_dropped_and_reordered_tokens_keep_their_relative_offsets(kind):
    vit = _rpb_vit(kind)
    x = torch.randn(2, 1, 16, 16)
    order = torch.stack([torch.randperm(16), torch.randperm(16)])
    with torch.no_grad():
        full = vit(x)["tokens"]
        moved = vit(x, order=order)["tokens"]
        kept = vit(x, keep_ids=order[:, :5])["tokens"]
        alone = vit(x, keep_ids=order[:1, :5].expand(2, -1))["tokens"]
    take = lambda t, ids: torch.stack([t[i, 1:][ids[i]] for i in range(2)])  # noqa: E731
    torch.testing.assert_close(moved[:, 0], full[:, 0])
    torch.testing.assert_close(moved[:, 1:], take(full, order))
    assert kept.shape == (2, 6, 32)
    torch.testing.assert_close(alone[0], kept[0])  # per-sample ids index per-sample biases


def test_expand_shared_table_into_every_block_gives_the_same_tokens():
    from dataclasses import replace

    from mimar.backbones.vit import expand_shared_rel_pos_bias

    shared = _rpb_vit("shared", init_values=0.1)
    per_block = ViT(replace(shared.cfg, rel_pos_bias="per_block")).eval()
    per_block.load_state_dict(expand_shared_rel_pos_bias(shared.state_dict()), strict=True)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(per_block(x)["tokens"], shared(x)["tokens"])
    wrapped = {f"backbone.{k}": v for k, v in shared.state_dict().items()}
    expanded = expand_shared_rel_pos_bias(wrapped, prefix="backbone.")
    assert "backbone.blocks.1.attn.rel_pos_bias.relative_position_bias_table" in expanded
    with pytest.raises(ValueError, match="no shared relative position bias"):
        expand_shared_rel_pos_bias(per_block.state_dict())
