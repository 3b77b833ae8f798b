"""Which special parameters (tokens, position tables) get weight decay: each recipe says what
its official code does (docs/METHODS.md §2.5, §4.5, §6.7; issue 11)."""

import pytest
from torch import nn

import mimar
from mimar.config import ConfigError
from mimar.engine.optim import param_groups

SPECIAL = ("token", "pos_embed", "relative_position")


def decayed_special(recipe: str, *overrides: str) -> set[str]:
    cfg = mimar.load_config(recipe, ["teacher.kind=none", *overrides])
    holder = nn.Module()  # the optimizer rules read model.backbone only
    holder.backbone = mimar.build_backbone(cfg.backbone)
    groups = param_groups(holder, 0.05, decay_on=cfg.optim.weight_decay_on)
    return {
        name.removeprefix("backbone.")
        for g in groups
        if g["weight_decay"]
        for name in g["names"]
        if any(s in name for s in SPECIAL)
    }


@pytest.mark.parametrize(
    "recipe, expected",
    [
        ("configs/simmim/vit_tiny_fmnist.yaml", {"mask_token"}),  # cls/pos exempt, mask decayed
        ("configs/simmim/vit_base_in1k.yaml", {"mask_token"}),
        ("configs/eva/vit_tiny_fmnist.yaml", {"mask_token"}),
        ("configs/digpt/vit_tiny_fmnist.yaml", {"cls_token"}),  # pos is a frozen sin-cos table
        ("configs/aim/vit_tiny_fmnist.yaml", set()),
    ],
)
def test_vit_recipes_decay_what_the_official_code_decays(recipe, expected):
    assert decayed_special(recipe) == expected


def test_swin_decays_its_relative_position_tables_but_not_the_mask_token():
    names = decayed_special("configs/simmim/swin_tiny_fmnist.yaml")
    assert names and all(n.endswith("attn.relative_position_bias_table") for n in names)
    assert len(names) == sum(
        mimar.load_config("configs/simmim/swin_tiny_fmnist.yaml").backbone.depths
    )
    no_switch = decayed_special("configs/simmim/swin_tiny_fmnist.yaml", "optim.weight_decay_on=[]")
    assert no_switch == set()


def test_itpn_pixel_decays_its_position_table():
    cfg = mimar.load_config("configs/itpn/hivit_tiny_fmnist.yaml")
    method = mimar.build_method(cfg)
    groups = param_groups(method, 0.05, decay_on=cfg.optim.weight_decay_on)
    decayed = {n for g in groups if g["weight_decay"] for n in g["names"]}
    assert "backbone.trunk.pos_embed" in decayed and "decoder.mask_token" in decayed


def test_a_pattern_that_names_nothing_is_refused():
    with pytest.raises(ConfigError, match="weight_decay_on: 'mask_tokn' names none"):
        decayed_special("configs/simmim/vit_tiny_fmnist.yaml", "optim.weight_decay_on=[mask_tokn]")
