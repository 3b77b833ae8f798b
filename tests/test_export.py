"""``mimar export --format timm`` of ViTs that timm's VisionTransformer cannot hold: a
relative position bias (-> timm's Beit), no final norm, a LayerNorm eps other than timm's."""

import json

import pytest
import timm
import torch
from helpers import images, tiny_vit
from safetensors.torch import load_file

import mimar
from mimar.export import create_timm_model, export_timm


def _randomised(**cfg):
    """A tiny ViT with every weight away from its init (k bias, tables, LayerScale too)."""
    torch.manual_seed(0)
    vit = tiny_vit(**cfg).eval()
    with torch.no_grad():
        for p in vit.parameters():
            p.normal_(0.0, 0.3)
    return vit


def _timm(path):
    meta = json.loads(path.with_suffix(".json").read_text())
    model = timm.create_model(meta["timm_model"], pretrained=False, num_classes=0, **meta["kwargs"])
    model.load_state_dict(load_file(path), strict=True)
    return model.eval(), meta


@pytest.mark.parametrize(
    "cfg",
    [
        # SimMIM's pretraining ViT: one shared table, no absolute positions, LayerScale
        dict(rel_pos_bias="shared", pos_embed="none", init_values=0.1, use_mask_token=True),
        # its fine-tuning ViT: one table per block; here also with absolute positions and
        # without the biases Beit always has
        dict(rel_pos_bias="per_block", pos_embed="learn", proj_bias=False),
    ],
    ids=["shared", "per_block"],
)
def test_rel_pos_bias_vit_exports_to_timm_beit_and_back(cfg, tmp_path):
    vit = _randomised(**cfg)
    assert vit.blocks[0].attn.qkv.bias[32:64].abs().min() > 0  # a k bias, dropped on export
    path, _ = export_timm(vit, tmp_path / "beit.safetensors")
    model, meta = _timm(path)
    assert meta["timm_model"] == "beit_base_patch16_224" and "mimar_backbone" in meta
    assert type(model).__name__ == "Beit"
    x = images(3)
    with torch.no_grad():
        tokens = vit(x)["tokens"]
        torch.testing.assert_close(model.forward_features(x), tokens, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(x), tokens[:, 0], atol=1e-5, rtol=1e-5)
        # and the file loads back into mimar (k bias zero: the same tokens)
        again = mimar.load_backbone(path)
        torch.testing.assert_close(again(x)["tokens"], tokens, atol=1e-5, rtol=1e-5)
    assert not again.blocks[0].attn.qkv.bias[32:64].any()


def test_beit_export_refuses_what_beit_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match="class_token=false"):
        export_timm(tiny_vit(rel_pos_bias="shared", class_token=False), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="final_norm=false"):
        export_timm(tiny_vit(rel_pos_bias="shared", final_norm=False), tmp_path / "b.safetensors")


def test_vit_without_final_norm_exports_to_vision_transformer(tmp_path):
    vit = _randomised(final_norm=False, init_values=0.1)
    path, _ = export_timm(vit, tmp_path / "vit.safetensors")
    model, meta = _timm(path)
    assert meta["kwargs"]["final_norm"] is False
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images(2)), vit(images(2))["tokens"])


def test_layer_norm_eps_other_than_timms_is_recorded_and_set(tmp_path):
    # AIM's trunk (LayerNorm eps 1e-5, docs/METHODS.md §10.4), activations large enough that the
    # eps shows: timm's default 1e-6 would not reproduce the tokens
    vit = tiny_vit(
        class_token=False, pos_embed="sincos", patch_norm=True, norm_eps=1e-5, qkv_bias=False
    ).eval()
    path, meta_path = export_timm(vit, tmp_path / "aim.safetensors")
    meta = json.loads(meta_path.read_text())
    assert meta["norm_eps"] == 1e-5 and "create_timm_model" in meta["note"]
    model = create_timm_model(path)
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-5}
    x = images(2) * 1e-3  # small inputs: the patch LayerNorm's eps matters
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), vit(x)["tokens"])
