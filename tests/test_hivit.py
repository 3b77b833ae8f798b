"""HiViT and the iTPN pyramid neck: token dropping, merge/split orders, pyramid shapes,
layer ids, paper model sizes."""

import pytest
import torch
from helpers import images, perturb_patch
from hypothesis import given, settings
from hypothesis import strategies as st

import mimar
from mimar.backbones.hivit import (
    HiViT,
    HiViTConfig,
    merge_subtokens,
    split_subtokens,
)
from mimar.backbones.pyramid import PyramidBackbone, PyramidNeck, patches_to_map
from mimar.engine.optim import param_groups, scaled_lr

# 16 px, main patch 4 -> 4x4 = 16 main patches of 4x4 1-px sub-tokens; stages 8 / 16 / 32
TINY = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, mlp_depth=1, depth=2, num_heads=2)
N = 16


def _hivit(**kw) -> HiViT:
    torch.manual_seed(0)
    return HiViT(HiViTConfig(**{**TINY, **kw})).eval()


def _pyramid(fpn_dim=16) -> PyramidBackbone:
    trunk = _hivit()
    torch.manual_seed(1)
    return PyramidBackbone(trunk, PyramidNeck(trunk.stage_dims, fpn_dim, 1)).eval()


# --- dropped patches are never computed ------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    kept=st.lists(st.integers(0, N - 1), min_size=1, max_size=N - 1, unique=True),
    seed=st.integers(0, 1000),
)
def test_dropped_patches_never_reach_a_kept_output(kept, seed):
    """Stage outputs hold only the kept patches, and changing a dropped patch's pixels changes
    no output at all: not the stages, not the final tokens, not the pyramid."""
    model = _pyramid()
    keep = torch.tensor(sorted(kept)).expand(2, -1)  # (B, n)
    n = keep.shape[1]
    dropped = sorted(set(range(N)) - set(kept))
    x = images(seed=seed)
    with torch.no_grad():
        base = model(x, keep_ids=keep, return_pyramid=True)
        f4, f8 = base["stages"]
        assert f4.shape == (2, n, 4, 4, 8) and f8.shape == (2, n, 2, 2, 16)
        assert base["tokens"].shape == (2, n, 32)
        assert [p.shape[1:4] for p in base["pyramid"]] == [(n, 4, 4), (n, 2, 2), (n, 1, 1)]
        other = model(
            perturb_patch(x, dropped[seed % len(dropped)]), keep_ids=keep, return_pyramid=True
        )
    for a, b in zip(
        [base["tokens"], *base["stages"], *base["pyramid"]],
        [other["tokens"], *other["stages"], *other["pyramid"]],
    ):
        assert torch.equal(a, b)
    # a kept patch's pixels do reach the outputs
    with torch.no_grad():
        moved = model(perturb_patch(x, kept[0]), keep_ids=keep)["tokens"]
    assert not torch.equal(moved, base["tokens"])


def test_stage_outputs_are_per_patch_until_stage_3():
    """Stages 1-2 never mix main patches: a kept patch's f4/f8 do not depend on which other
    patches are kept (stage 3 attention does mix them)."""
    model = _hivit()
    x = images()
    with torch.no_grad():
        full = model(x)
        sub = model(x, keep_ids=torch.tensor([[3, 7, 12]]).expand(2, -1))
    for f_full, f_sub in zip(full["stages"], sub["stages"]):
        torch.testing.assert_close(f_full[:, [3, 7, 12]], f_sub, rtol=0, atol=1e-6)
    assert not torch.allclose(full["tokens"][:, [3, 7, 12]], sub["tokens"])


def test_keep_everything_equals_no_dropping_and_the_stem_equals_a_whole_image_conv():
    model = _hivit()
    x = images()
    with torch.no_grad():
        full = model(x)
        kept = model(x, keep_ids=torch.arange(N).expand(2, -1))
        # the stem cuts patches before its conv: same as convolving the whole image
        conv = model.patch_embed.proj(x)  # (B, C1, 16, 16): kernel 1 at main patch 4
        f = conv.reshape(2, 8, 4, 4, 4, 4).permute(0, 2, 4, 3, 5, 1).reshape(2, N, 4, 4, 8)
        stem = model.embed(x)
    torch.testing.assert_close(full["tokens"], kept["tokens"], rtol=0, atol=1e-6)
    torch.testing.assert_close(stem, model.patch_embed.norm(f), rtol=0, atol=1e-6)


# --- merge / split orders on a hand-built 4x4 sub-token grid ---------------------------------


def _grid():
    """A 4x4 grid whose value at (r, c) is 10 r + c, one channel: (1, 4, 4, 1)."""
    rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    return (10 * rows + cols).float().reshape(1, 4, 4, 1)


def test_merge_gathers_children_in_hivit_order():
    merged = merge_subtokens(_grid())  # (1, 2, 2, 4)
    assert merged.shape == (1, 2, 2, 4)
    # cell (0, 0): children (0,0), (1,0), (0,1), (1,1) = 0, 10, 1, 11; cell (1, 1): 22 32 23 33
    assert merged[0, 0, 0].tolist() == [0, 10, 1, 11]
    assert merged[0, 0, 1].tolist() == [2, 12, 3, 13]
    assert merged[0, 1, 0].tolist() == [20, 30, 21, 31]
    assert merged[0, 1, 1].tolist() == [22, 32, 23, 33]
    # merging twice: one cell holding all 16 sub-tokens
    assert merge_subtokens(merged).shape == (1, 1, 1, 16)


def test_split_lays_chunks_out_row_major_and_round_trips_with_the_matching_order():
    cell = torch.tensor([[[[0.0, 1.0, 2.0, 3.0]]]])  # (1, 1, 1, 4): chunk k has value k
    assert split_subtokens(cell)[0, :, :, 0].tolist() == [[0, 1], [2, 3]]  # row-major
    grid = _grid()
    merged = merge_subtokens(grid)
    # merge is column-first, split row-major: split(merge(x)) transposes every 2x2 cell ...
    back = split_subtokens(merged)[0, :, :, 0]
    assert back[:2, :2].tolist() == [[0, 10], [1, 11]]
    # ... and swapping chunks 1 and 2 (the two orders differ only there) restores the grid
    swapped = merged[..., [0, 2, 1, 3]]
    assert torch.equal(split_subtokens(swapped), grid)
    # with channels: chunks are whole channel groups
    x = torch.randn(2, 3, 4, 4, 5)
    m = merge_subtokens(x)
    assert torch.equal(
        split_subtokens(m.reshape(2, 3, 2, 2, 4, 5)[..., [0, 2, 1, 3], :].flatten(-2)), x
    )


# --- the pyramid ---------------------------------------------------------------------------


def test_pyramid_maps_of_fullimages():
    model = _pyramid(fpn_dim=16)
    with torch.no_grad():
        maps = model.feature_maps(images(3))
    assert list(maps) == ["p1", "p2", "p4"]  # strides p/4, p/2, p at main patch 4
    assert maps["p1"].shape == (3, 16, 16, 16)
    assert maps["p2"].shape == (3, 16, 8, 8)
    assert maps["p4"].shape == (3, 16, 4, 4)
    assert model.strides == (1, 2, 4)


def test_patches_to_map_places_sub_tokens_where_they_belong():
    grid, s = 3, 2
    level = torch.zeros(1, grid * grid, s, s, 3)
    for patch in range(grid * grid):
        for i in range(s):
            for j in range(s):
                level[0, patch, i, j] = torch.tensor([patch, i, j])
    m = patches_to_map(level, grid)  # (1, 3, 6, 6)
    for y in range(grid * s):
        for x in range(grid * s):
            patch = (y // s) * grid + x // s
            assert m[0, :, y, x].tolist() == [patch, y % s, x % s]


@settings(max_examples=15, deadline=None)
@given(kept=st.lists(st.integers(0, N - 1), min_size=1, max_size=N, unique=True))
def test_neck_works_on_any_subset_of_patches(kept):
    """The neck is per main patch: on a subset it gives the full-set outputs of that subset."""
    torch.manual_seed(0)
    neck = PyramidNeck((8, 16, 32), fpn_dim=16, fpn_depth=2).eval()
    f4, f8, s = torch.randn(2, N, 4, 4, 8), torch.randn(2, N, 2, 2, 16), torch.randn(2, N, 32)
    ids = torch.tensor(kept)
    with torch.no_grad():
        full = neck(f4, f8, s)
        sub = neck(f4[:, ids], f8[:, ids], s[:, ids])
    for a, b, side in zip(full, sub, (4, 2, 1)):
        assert b.shape == (2, len(kept), side, side, 16)
        torch.testing.assert_close(a[:, ids], b, rtol=0, atol=1e-6)


# --- contract: layers, layer ids, masks ----------------------------------------------------


def test_return_layers_indexes_every_block_and_mask_token_path():
    model = _hivit(use_mask_token=True)
    x = images()
    assert model.num_layers == 2 * 1 + 2
    with torch.no_grad():
        out = model(x, return_layers=(0, 1, 2, -1))
    shapes = [t.shape for t in out["layers"]]
    assert shapes == [(2, N * 16, 8), (2, N * 4, 16), (2, N, 32), (2, N, 32)]
    mask = torch.zeros(2, N, dtype=torch.bool)
    mask[:, :5] = True
    with torch.no_grad():
        masked = model(x, mask=mask)
    assert masked["tokens"].shape == (2, N, 32)
    with pytest.raises(ValueError, match="not both"):
        model(x, mask=mask, keep_ids=torch.arange(3).expand(2, -1))
    with pytest.raises(ValueError, match="no mask token"):
        _hivit()(x, mask=mask)
    with pytest.raises(ValueError, match="multiples of the main patch 4"):
        model(torch.randn(2, 1, 18, 18))


def test_layer_ids_follow_the_official_fine_tuning_code():
    model = _hivit(mlp_depth=2, depth=3)  # blocks: 2 MLP, merge, 2 MLP, merge, 3 attention
    L = model.num_layers
    assert L == 7
    expected = {
        "patch_embed.proj.weight": 0,
        "pos_embed": 0,
        "stage1.0.mlp.fc1.weight": 1,
        "stage1.1.norm.weight": 2,
        "merge1.reduction.weight": 2,  # a merge takes the id of the block before it
        "stage2.0.mlp.fc2.bias": 3,
        "merge2.norm.weight": 4,
        "blocks.0.attn.qkv.weight": 5,
        "blocks.2.mlp.fc1.weight": 7,
        "norm.weight": 8,
    }
    for name, layer in expected.items():
        assert model.layer_id(name) == layer, name
    names = {n for n, _ in model.named_parameters()}
    assert set(expected) - {"pos_embed"} <= names
    # through the pyramid wrapper: trunk ids unchanged, the neck on top, decay exemptions kept
    wrapper = PyramidBackbone(model, PyramidNeck(model.stage_dims, 16, 1))
    assert wrapper.layer_id("trunk.blocks.0.attn.qkv.weight") == 5
    assert wrapper.layer_id("neck.split8.reduction.weight") == L + 1
    holder = torch.nn.Module()
    holder.backbone = wrapper
    groups = param_groups(holder, 0.05, layer_decay=0.5)
    pos = next(g for g in groups if "backbone.trunk.pos_embed" in g["names"])
    assert pos["weight_decay"] == 0 and pos["lr_scale"] == 0.5 ** (L + 1)


def test_position_resample_switch_shifts_positions_slightly():
    plain, official = _hivit(), _hivit(pos_embed_resample=True)
    table = plain.position_table()
    resampled = official.position_table(all_kept=False)  # tokens dropped: resampled
    assert torch.equal(official.position_table(all_kept=True), official.pos_embed)  # early return
    assert resampled.shape == table.shape
    assert torch.equal(table, plain.pos_embed)
    diff = (resampled - table).abs().max().item()
    assert 0 < diff < 0.5 * table.abs().max().item()


def test_bad_configs_are_rejected():
    with pytest.raises(ValueError, match="multiple of 4"):
        HiViTConfig(img_size=18, patch_size=6)
    with pytest.raises(ValueError, match="divisible by 4"):
        HiViTConfig(embed_dim=30, num_heads=3)


# --- paper sizes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe, paper_m, trunk_m",
    [
        ("configs/itpn/hivit_base_in1k.yaml", 79, 77.9),
        ("configs/itpn/hivit_large_in1k.yaml", 288, 287.4),
    ],
)
def test_paper_model_shapes_build_on_meta_and_match_the_paper_sizes(recipe, paper_m, trunk_m):
    """Counted: the HiViT trunk (stem, stages 1-3, position table, final norm) -- neither the
    pyramid neck, the decoder, the heads nor the EMA copy. The paper's 79M / 288M are the
    classification backbones, which add only a relative-position table and a linear head."""
    cfg = mimar.load_config(recipe)
    with torch.device("meta"):
        model = mimar.build_method(cfg)
    trunk = sum(p.numel() for p in model.backbone.trunk.parameters()) / 1e6
    assert model.backbone.trunk.pos_embed.is_meta
    assert trunk == pytest.approx(paper_m, rel=0.05)
    assert trunk == pytest.approx(trunk_m, abs=0.1)
    neck = sum(p.numel() for p in model.backbone.neck.parameters()) / 1e6
    assert 4 < neck < 5.5  # fpn_dim 256: 4.7M (B, fpn_depth 2), 5.1M (L)
    # PRETRAIN.md: blr 1.5e-4 per 256 at batch 4096 -> 2.4e-3; 49 of 196 main patches kept
    assert scaled_lr(cfg.optim, cfg.data.batch_size) == pytest.approx(2.4e-3)
    assert model.num_keep == 49 and model.backbone.trunk.grid_size == 14


# --- downstream: other input sizes, a detection head ----------------------------------------


def test_other_input_sizes_resample_positions_and_give_matching_maps():
    model = _pyramid(fpn_dim=16)
    assert torch.equal(model.trunk.position_table(4, 4), model.trunk.pos_embed)
    with torch.no_grad():
        maps = model.feature_maps(torch.randn(2, 1, 24, 32))  # 6 x 8 main patches
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "p1": (2, 16, 24, 32),
        "p2": (2, 16, 12, 16),
        "p4": (2, 16, 6, 8),
    }
    table = model.trunk.position_table(6, 8)
    assert table.shape == (1, 48, 32) and torch.isfinite(table).all()


class PyramidForDetection(torch.nn.Module):
    """The adapter of docs/downstream.md: torchvision's detection-backbone protocol (an
    ``out_channels`` attribute; images -> OrderedDict of maps)."""

    def __init__(self, backbone: PyramidBackbone) -> None:
        super().__init__()
        self.backbone, self.out_channels = backbone, backbone.fpn_dim

    def forward(self, images):
        from collections import OrderedDict

        maps = self.backbone.feature_maps(images)
        maps["pool"] = torch.nn.functional.max_pool2d(maps[list(maps)[-1]], 2)
        return OrderedDict(maps)


def test_the_pyramid_feeds_a_torchvision_detector():
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    torch.manual_seed(0)
    trunk = HiViT(HiViTConfig(**{**TINY, "img_size": 32, "in_chans": 3}))
    backbone = PyramidBackbone(trunk, PyramidNeck(trunk.stage_dims, 16, 1))
    model = FasterRCNN(
        PyramidForDetection(backbone),
        num_classes=3,
        rpn_anchor_generator=AnchorGenerator(((4,), (8,), (16,), (32,)), ((0.5, 1.0, 2.0),) * 4),
        box_roi_pool=MultiScaleRoIAlign(["p1", "p2", "p4"], output_size=4, sampling_ratio=2),
        min_size=32,
        max_size=48,
    ).train()
    images = [torch.rand(3, 30, 44), torch.rand(3, 32, 32)]  # resized, padded to x32
    targets = [{"boxes": torch.tensor([[2.0, 3.0, 20.0, 25.0]]), "labels": torch.tensor([1])}] * 2
    loss = sum(model(images, targets).values())
    loss.backward()
    assert torch.isfinite(loss)
    assert backbone.neck.split8.reduction.weight.grad is not None
