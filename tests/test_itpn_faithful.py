"""iTPN against the official code (issue 11): neck init, the switch for the extra LayerNorm
before the neck, the official position resampling's early return, iTPN-CLIP's LayerScale and
aux blocks (docs/METHODS.md §4, §10.10, §11.3-11.4)."""

import pytest
import torch
from helpers import patch_teacher
from torch import nn

from mimar.backbones.hivit import HiViT, HiViTConfig
from mimar.backbones.pyramid import pyramid_backbone

TINY = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, mlp_depth=1, depth=2, num_heads=2)


def _hivit(**kw) -> HiViT:
    torch.manual_seed(0)
    return HiViT(HiViTConfig(**{**TINY, **kw})).eval()


def test_neck_linears_start_trunc_normal_002_with_zero_bias():
    torch.manual_seed(0)
    neck = pyramid_backbone(_hivit(embed_dim=64), fpn_dim=32, fpn_depth=2).neck
    linears = [m for m in neck.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 1 + 2 + 2 + 2 * (2 + 2 + 3)  # reduce16, splits, laterals, MLP blocks
    weights = torch.cat([m.weight.flatten() for m in linears])
    # timm's / torch's trunc_normal_(std=0.02) cuts at +-2 absolute: in effect N(0, 0.02)
    assert abs(weights.std().item() - 0.02) < 0.0005 and abs(weights.mean().item()) < 0.0005
    assert all(m.bias is None or not m.bias.any() for m in linears)


def test_final_norm_off_gives_the_raw_stage3_tokens():
    plain, raw = _hivit(), _hivit(final_norm=False)
    raw.load_state_dict({k: v for k, v in plain.state_dict().items() if not k.startswith("norm.")})
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    out = raw(x, return_layers=(-1,))
    assert torch.equal(out["tokens"], out["layers"][0])
    assert not [k for k in raw.state_dict() if k.startswith("norm.")]
    torch.testing.assert_close(plain.norm(out["layers"][0]), plain(x)["tokens"])


def test_official_resampling_applies_only_when_tokens_are_dropped():
    plain, official = _hivit(), _hivit(pos_embed_resample=True)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(official(x)["tokens"], plain(x)["tokens"], rtol=0, atol=0)
    all_ids = torch.arange(16).expand(2, -1)  # every patch kept: the stored table as well
    torch.testing.assert_close(official(x, keep_ids=all_ids)["tokens"], plain(x)["tokens"])
    some = torch.tensor([[0, 5, 10, 15], [1, 2, 3, 4]])
    assert not torch.allclose(
        official(x, keep_ids=some)["tokens"], plain(x, keep_ids=some)["tokens"]
    )


def test_itpn_clip_mlp_stages_carry_layerscale_01_and_aux_blocks_follow_the_code():

    from mimar.methods.itpn_clip import ITPNCLIP, ITPNCLIPConfig

    kw = dict(TINY, mlp_depth=2, depth=4, use_mask_token=True, init_values=0.1)
    trunk = HiViT(HiViTConfig(**kw, mlp_init_values=0.1, drop_path_rate=0.1))
    for block in [*trunk.stage1, *trunk.stage2]:
        assert torch.equal(block.ls.gamma, torch.full_like(block.ls.gamma, 0.1))
    plain = HiViT(HiViTConfig(**kw))
    assert not any("ls" in n for n, _ in plain.stage1.named_parameters())  # switch off: none
    cfg = ITPNCLIPConfig(num_mask_patches=4, min_num_patches=2, fpn_dim=16)
    method = ITPNCLIP(cfg, trunk, patch_teacher(grid=(4, 4)))
    # 8 blocks in all (2 + 2 MLP, 4 attention); the branch reads block 2*2 + int(0.75*4) = 7
    assert method.aux_layer == 7
    rates = [b.drop_path1.drop_prob for b in method.aux_blocks]
    assert rates == pytest.approx([0.1 * 7 / 7, 0.1 * 7 / 7])  # capped at the last position
    assert all(b.norm1.eps == 1e-5 and b.norm2.eps == 1e-5 for b in method.aux_blocks)


def test_aux_drop_path_at_base_depth_is_the_official_0083_0086():
    from mimar.methods.itpn_clip import ITPNCLIP, ITPNCLIPConfig

    # iTPN-B's depths (3 + 3 MLP blocks, 24 attention blocks, drop path 0.1) at a tiny width
    kw = dict(TINY, mlp_depth=3, depth=24, use_mask_token=True, drop_path_rate=0.1)
    cfg = ITPNCLIPConfig(num_mask_patches=4, min_num_patches=2, fpn_dim=16)
    method = ITPNCLIP(cfg, HiViT(HiViTConfig(**kw)), patch_teacher(grid=(4, 4)))
    assert method.aux_layer == 24  # after stage-3 block int(0.75 * 24) = 18 (0-based)
    rates = [b.drop_path1.drop_prob for b in method.aux_blocks]
    assert rates == pytest.approx([0.0828, 0.0862], abs=1e-4)
