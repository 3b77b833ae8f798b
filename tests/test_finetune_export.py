"""A fine-tuned ViT exports to timm *with its classifier* and gives the same logits there."""

import json

import pytest
import timm
import torch
from helpers import images, tiny_vit
from safetensors.torch import load_file

from mimar.export import create_timm_model, export_timm
from mimar.finetune.classifier import Classifier


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial weights everywhere (a fresh head is ~0 and would hide a wrong layout)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize(
    "pool, vit_kw",
    [
        ("avg", {"final_norm": False}),  # the papers' default: mean of patches + fc_norm
        ("cls", {}),  # class token after the final norm
        ("avg", {"final_norm": False, "rel_pos_bias": "per_block", "pos_embed": "none"}),  # Beit
    ],
    ids=["avg", "cls", "beit-avg"],
)
def test_exported_classifier_gives_the_same_logits_in_timm(tmp_path, pool, vit_kw):
    torch.manual_seed(0)
    model = _trained_like(Classifier(tiny_vit(**vit_kw), num_classes=5, pool=pool))
    path, meta_path = export_timm(model, tmp_path / "ft.safetensors")
    meta = json.loads(meta_path.read_text())
    assert meta["kwargs"]["num_classes"] == 5
    timm_model = timm.create_model(meta["timm_model"], pretrained=False, **meta["kwargs"]).eval()
    timm_model.load_state_dict(load_file(path), strict=True)
    x = images(3, size=16)
    with torch.no_grad():
        ours, theirs = model.logits(x), timm_model(x)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(create_timm_model(path)(x), ours, rtol=1e-4, atol=1e-5)
