"""The Backbone contract of ``mimar.backbones.base`` on every backbone: the attributes callers
read, and the ``order`` argument (re-order patch tokens after the position embedding)."""

import pytest
import torch
from helpers import images, tiny_vit
from torch import nn

from mimar.backbones.hivit import HiViT, HiViTConfig
from mimar.backbones.pyramid import PyramidBackbone, PyramidNeck
from mimar.backbones.swin import Swin, SwinConfig

HIVIT = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, mlp_depth=1, depth=2, num_heads=2)
SWIN = dict(img_size=16, patch_size=2, in_chans=1, embed_dim=8, depths=(1, 1), num_heads=(1, 2))
SWIN = {**SWIN, "window_size": 4}
N = 16  # the 4x4 patch grid of the tiny ViT and HiViT


def _hivit(**kw) -> HiViT:
    torch.manual_seed(0)
    return HiViT(HiViTConfig(**{**HIVIT, **kw})).eval()


def _backbones() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    trunk = _hivit(use_mask_token=True)
    return {
        "vit": tiny_vit(use_mask_token=True).eval(),
        "swin": Swin(SwinConfig(**SWIN)).eval(),
        "hivit": _hivit(),
        "pyramid": PyramidBackbone(trunk, PyramidNeck(trunk.stage_dims, 16, 1)).eval(),
    }


@pytest.mark.parametrize("name", ["vit", "swin", "hivit", "pyramid"])
def test_every_backbone_declares_the_contract_attributes(name):
    backbone = _backbones()[name]
    for key in ("embed_dim", "num_layers", "num_prefix_tokens", "patch_size", "out_stride"):
        assert isinstance(getattr(backbone, key), int), key
    for key in ("in_chans", "img_size", "grid_size", "num_patches"):
        assert isinstance(getattr(backbone, key), int), key
    assert backbone.grid_size == backbone.img_size // backbone.patch_size
    assert backbone.num_patches == backbone.grid_size**2
    assert backbone.mask_token is None or isinstance(backbone.mask_token, nn.Parameter)
    assert isinstance(backbone.stage_dims, tuple)
    if backbone.stage_dims:
        assert backbone.stage_dims[-1] == backbone.embed_dim
    out = backbone(images(2, size=16))["tokens"]
    side = backbone.img_size // backbone.out_stride
    assert out.shape == (2, backbone.num_prefix_tokens + side**2, backbone.embed_dim)


def test_stage_dims_per_backbone_and_no_duplicate_parameters_in_the_pyramid():
    b = _backbones()
    assert b["vit"].stage_dims == ()
    assert b["swin"].stage_dims == (8, 16)
    assert b["hivit"].stage_dims == (8, 16, 32)
    pyramid = b["pyramid"]
    assert pyramid.stage_dims == (8, 16, 32) and pyramid.mask_token is pyramid.trunk.mask_token
    assert "mask_token" not in pyramid.state_dict() and "trunk.mask_token" in pyramid.state_dict()
    assert b["hivit"].mask_token is None and b["swin"].mask_token is not None


def _permutations():
    gen = torch.Generator().manual_seed(4)
    return torch.randperm(N, generator=gen), torch.stack(
        [torch.randperm(N, generator=gen) for _ in range(2)]
    )


@pytest.mark.parametrize("batched", [False, True])
def test_vit_order_permutes_patch_tokens_after_positions_and_keeps_the_prefix_first(batched):
    vit = tiny_vit(use_mask_token=True).eval()
    order = _permutations()[batched]
    x = images(2)
    mask = torch.rand(2, N, generator=torch.Generator().manual_seed(5)) < 0.5  # row-major
    index = order.expand(2, N)
    with torch.no_grad():
        plain = vit(x, mask=mask, return_layers=(0,))
        moved = vit(x, mask=mask, order=order, return_layers=(0,))
    # full attention is permutation-equivariant: the same tokens, in the new order
    for a, b in ((plain["tokens"], moved["tokens"]), (plain["layers"][0], moved["layers"][0])):
        torch.testing.assert_close(b[:, 0], a[:, 0])
        torch.testing.assert_close(b[:, 1:], torch.stack([a[i, 1:][index[i]] for i in range(2)]))
    # a causal mask acts in sequence order: order equals keep_ids with all ids
    causal = torch.ones(N + 1, N + 1, dtype=torch.bool).tril()
    with torch.no_grad():
        torch.testing.assert_close(
            vit(x, order=order, attn_mask=causal)["tokens"],
            vit(x, keep_ids=index, attn_mask=causal)["tokens"],
        )


def test_hivit_order_permutes_tokens_stages_and_the_mask():
    hivit = _hivit(use_mask_token=True)
    order = _permutations()[1]
    x = images(2)
    mask = torch.rand(2, N, generator=torch.Generator().manual_seed(5)) < 0.5  # row-major
    with torch.no_grad():
        plain = hivit(x, mask=mask)
        moved = hivit(x, mask=mask, order=order)
    take = lambda t: torch.stack([t[i][order[i]] for i in range(2)])  # noqa: E731
    torch.testing.assert_close(moved["tokens"], take(plain["tokens"]))
    for a, b in zip(plain["stages"], moved["stages"]):
        torch.testing.assert_close(b, take(a))


def test_order_errors_name_the_argument():
    vit, hivit = tiny_vit(), _hivit()
    order = torch.arange(N)
    for backbone in (vit, hivit):
        with pytest.raises(ValueError, match="not both"):
            backbone(images(2), order=order, keep_ids=order[None, :4].expand(2, -1))
        with pytest.raises(ValueError, match="order must be long"):
            backbone(images(2), order=order[:5])
    with pytest.raises(ValueError, match="re-order"):
        Swin(SwinConfig(**SWIN))(images(2), order=torch.arange(64))


def test_vit_without_final_norm_returns_the_raw_last_block():
    vit = tiny_vit(final_norm=False).eval()
    assert not [k for k in vit.state_dict() if k.startswith("norm.")]
    x = images(2)
    with torch.no_grad():
        out = vit(x, return_layers=(-1,))
    torch.testing.assert_close(out["tokens"], out["layers"][0])


def test_layer_dims_say_what_return_layers_taps_and_evaluation_follows_them():
    from mimar.evaluation.attentive import default_blocks
    from mimar.evaluation.features import tap_indices

    b = _backbones()
    assert b["vit"].layer_dims == (32, 32)
    assert b["swin"].layer_dims == (8, 16)  # stages
    assert b["hivit"].layer_dims == (8, 16, 32, 32) == b["pyramid"].layer_dims  # every block
    assert tap_indices(b["hivit"]) == (0, 1, 2, 3) and tap_indices(b["swin"]) == (0, 1)
    assert default_blocks(b["hivit"]) == (2, 3)  # stage-3 blocks only: one width
    assert default_blocks(b["swin"]) == (1,)  # the last stage
    x = images(2, size=16)
    for name in ("vit", "swin", "hivit"):
        layers = b[name](x, return_layers=tap_indices(b[name]))["layers"]
        assert tuple(t.shape[-1] for t in layers) == b[name].layer_dims, name
