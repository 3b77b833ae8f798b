"""Swin backbone: shapes, parity with timm, SimMIM mask token, layer-decay ids, errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from mimar.backbones.swin import Swin, SwinConfig

# Tiny: 32 px, patch 4 -> 8x8 tokens, window 4 (two windows a side, so the shifted-window
# mask is exercised), stage 1 at 4x4 (window = grid, no shift).
TINY = SwinConfig(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)


def _tiny(**overrides) -> Swin:
    torch.manual_seed(0)
    return Swin(replace(TINY, **overrides)).eval()


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _mask(batch: int = 2, ratio: float = 0.5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(2)
    return torch.rand(batch, 64, generator=gen) < ratio  # (B, N) on the 8x8 grid


def test_tiny_shapes_and_contract_fields():
    model = _tiny()
    out = model(_images(), return_layers=(0, -1))
    assert out["tokens"].shape == (2, 16, 32)  # (32 / 8)^2 tokens, 16 * 2 wide
    assert [t.shape for t in out["layers"]] == [(2, 64, 16), (2, 16, 32)]
    assert (model.embed_dim, model.num_layers, model.num_prefix_tokens) == (32, 4, 0)
    assert (model.patch_size, model.out_stride, model.in_chans, model.img_size) == (4, 8, 3, 32)
    # The last stage's raw output, normed, is the final tokens.
    assert torch.equal(model.model.norm(out["layers"][1]), out["tokens"])
    assert "layers" not in model(_images())


def test_swin_b_192_on_meta_device():
    with torch.device("meta"):
        model = Swin(SwinConfig())  # SimMIM Swin-B, 192 px, window 6
        out = model(torch.empty(2, 3, 192, 192), mask=torch.zeros(2, 48 * 48, dtype=torch.bool))
    # Measured: timm Swin-B without head at window 6 (86,725,176) + mask token (128). The
    # paper's "88M" counts the 1000-class head and window 7 at 224 px.
    assert sum(p.numel() for p in model.parameters()) == 86_725_304
    assert out["tokens"].shape == (2, 36, 1024)  # (192 / 32)^2 tokens
    assert (model.embed_dim, model.num_layers, model.out_stride) == (1024, 24, 32)


def test_matches_timm_forward_features_exactly():
    model = _tiny()
    images = _images()
    expected = model.model.forward_features(images).flatten(1, 2)  # (B, H, W, D) -> (B, N, D)
    assert torch.equal(model(images)["tokens"], expected)


def test_all_false_mask_is_a_no_op():
    model = _tiny()
    images = _images()
    none = model(images)["tokens"]
    assert torch.equal(model(images, mask=torch.zeros(2, 64, dtype=torch.bool))["tokens"], none)


def test_hidden_tokens_are_the_mask_token_after_embedding():
    model = _tiny()
    images, mask = _images(), _mask()
    plain = model.embed(images)  # (B, N, C)
    tokens = model.embed(images, mask)
    token = model.mask_token[0, 0]
    assert torch.equal(tokens[mask], token.expand(int(mask.sum()), -1))
    assert torch.equal(tokens[~mask], plain[~mask])
    # The forward pass uses the same embedding: patch grid is row-major (b, row, col).
    seen = []
    model.model.layers[0].register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    model(images, mask=mask)
    assert torch.equal(seen[0].flatten(1, 2), tokens)


def test_pixels_of_hidden_patch_do_not_change_output():
    model = _tiny()
    images = _images()
    mask = torch.zeros(2, 64, dtype=torch.bool)
    mask[0, 3 * 8 + 5] = True  # row 3, col 5 of image 0 -> pixels [12:16, 20:24]
    changed = images.clone()
    changed[0, :, 12:16, 20:24] = torch.randn(3, 4, 4) * 10
    a = model(images, mask=mask, return_layers=(0,))
    b = model(changed, mask=mask, return_layers=(0,))
    assert torch.equal(a["tokens"], b["tokens"])
    assert torch.equal(a["layers"][0], b["layers"][0])
    # ... while the same change without the mask does change the output.
    assert not torch.equal(model(images)["tokens"], model(changed)["tokens"])


def test_layer_ids_follow_simmim_swin():
    model = _tiny()  # depths (2, 2): L = 4, ids 0..5
    expected = {
        "mask_token": 0,
        "model.patch_embed.proj.weight": 0,
        "model.patch_embed.norm.bias": 0,
        "model.layers.0.blocks.0.attn.qkv.weight": 1,
        "model.layers.0.blocks.1.attn.relative_position_bias_table": 2,
        "model.layers.1.downsample.reduction.weight": 2,  # end of stage 0, official code
        "model.layers.1.downsample.norm.weight": 2,
        "model.layers.1.blocks.0.mlp.fc1.weight": 3,
        "model.layers.1.blocks.1.norm2.bias": 4,
        "model.norm.weight": 5,
    }
    assert {name: model.layer_id(name) for name in expected} == expected
    names = [name for name, _ in model.named_parameters()]
    assert set(expected) <= set(names)
    assert {model.layer_id(name) for name in names} == set(range(model.num_layers + 2))


def test_layer_ids_swin_b():
    with torch.device("meta"):
        model = Swin(SwinConfig())
    assert model.layer_id("model.layers.2.blocks.5.attn.qkv.weight") == 2 + 2 + 5 + 1
    assert model.layer_id("model.layers.3.downsample.reduction.weight") == 22
    assert model.layer_id("model.layers.3.blocks.1.mlp.fc2.weight") == 24
    assert model.layer_id("model.norm.bias") == 25


def test_no_weight_decay():
    model = _tiny()
    names = model.no_weight_decay()
    tables = {n for n, _ in model.named_parameters() if n.endswith("relative_position_bias_table")}
    assert len(tables) == 4
    assert names == tables | {"mask_token"}
    assert "mask_token" not in _tiny(use_mask_token=False).no_weight_decay()


def test_mask_token_gets_gradient_and_init():
    model = _tiny()
    assert 0.01 < model.mask_token.std().item() < 0.03  # trunc-normal std 0.02, 16 values
    model(_images(), mask=_mask())["tokens"].square().mean().backward()
    assert model.mask_token.grad is not None and model.mask_token.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)
    model(_images())["tokens"].square().mean().backward()
    assert model.mask_token.grad is None  # unused without a mask


def test_config_accepts_lists_and_is_frozen():
    cfg = SwinConfig(depths=[2, 2], num_heads=[2, 4], img_size=64, window_size=4)
    assert cfg.depths == (2, 2) and cfg.num_heads == (2, 4)
    with pytest.raises(AttributeError):
        cfg.img_size = 32  # type: ignore[misc]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"img_size": 36}, "img_size"),  # 36 % (4 * 2) != 0
        ({"num_heads": (2,)}, "num_heads"),
        ({"num_heads": (3, 4)}, "num_heads"),  # 3 does not divide 16
        ({"window_size": 3}, "window_size"),  # 3 does not tile the 8x8 grid
        ({"patch_size": 0}, "patch_size"),
        ({"drop_path_rate": 1.0}, "drop_path_rate"),
        ({"name": "vit"}, "name"),
    ],
)
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ValueError, match=field):
        replace(TINY, **overrides)


def test_bad_inputs_raise_clear_errors():
    model = _tiny()
    images = _images()
    with pytest.raises(ValueError, match=r"\(2, 64\)"):
        model(images, mask=torch.zeros(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        model(images, mask=torch.zeros(2, 64))
    with pytest.raises(ValueError, match="keep_ids"):
        model(images, keep_ids=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="attn_mask"):
        model(images, attn_mask=torch.zeros(64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="stages"):
        model(images, return_layers=(2,))
    with pytest.raises(ValueError, match=r"\(2, 3, 32, 32\)"):
        model(torch.zeros(2, 3, 24, 24))
    with pytest.raises(ValueError, match="use_mask_token"):
        _tiny(use_mask_token=False)(images, mask=_mask())
