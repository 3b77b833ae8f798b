"""AIM: orders, prefix-causal attention, next-patch loss, head, export, a short run."""

import json
import math

import pytest
import timm
import torch
from helpers import images, loss_ends, losses, perturb_patch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import mimar
from mimar.backbones.vit import ViT, ViTConfig
from mimar.cli import main
from mimar.export import export_timm
from mimar.masking import ORDERS, patch_order, prefix_causal_mask
from mimar.methods.aim import AIM, AIMConfig
from mimar.targets import normalize_patches, patchify

AIM_RECIPE = "configs/aim/vit_tiny_fmnist.yaml"
# 16 px, patch 4 -> 4x4 = 16 tokens; AIM trunk switches on the shared ViT
TRUNK = dict(
    img_size=16,
    patch_size=4,
    in_chans=1,
    embed_dim=32,
    depth=2,
    num_heads=2,
    qkv_bias=False,
    proj_bias=False,
    class_token=False,
    pos_embed="sincos",
    patch_norm=True,
    weight_init="xavier",
)


def _aim(order="raster", **kw) -> AIM:
    torch.manual_seed(0)
    cfg = AIMConfig(order=order, head_width=32, head_depth=2, **kw)
    return AIM(cfg, ViT(ViTConfig(**TRUNK))).eval()


# --- orders ---------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(kind=st.sampled_from(ORDERS), grid=st.integers(1, 12), seed=st.integers(0, 99))
def test_orders_are_permutations(kind, grid, seed):
    order = patch_order(kind, grid, seed)
    assert order.shape == (grid * grid,) and order.dtype == torch.long
    assert torch.equal(order.sort().values, torch.arange(grid * grid))
    assert torch.equal(order, patch_order(kind, grid, seed))  # deterministic


@settings(max_examples=20, deadline=None)
@given(grid=st.integers(2, 12))
def test_spiral_walks_between_neighbours_and_checkerboard_splits_colours(grid):
    order = patch_order("spiral", grid)
    rows, cols = order // grid, order % grid
    steps = (rows.diff().abs() + cols.diff().abs()).tolist()
    assert set(steps) == {1}  # every move goes to an edge-adjacent cell
    assert order[:grid].tolist() == list(range(grid))  # starts along the top row
    board = patch_order("checkerboard", grid)
    colour = (board // grid + board % grid) % 2
    half = (grid * grid + 1) // 2
    assert colour[:half].sum() == 0 and colour[half:].min() == 1


def test_raster_is_identity_and_unknown_order_is_rejected():
    assert torch.equal(patch_order("raster", 3), torch.arange(9))
    with pytest.raises(ValueError, match="unknown patch order"):
        patch_order("zigzag", 3)


# --- prefix-causal attention ----------------------------------------------------------------


def test_prefix_causal_mask_hand_case():
    mask = prefix_causal_mask(torch.tensor([2, 0]), 4).int()
    assert mask[0].tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    assert mask[1].tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]


@pytest.mark.parametrize("order", ORDERS)
def test_later_patches_never_reach_earlier_outputs(order):
    model, x = _aim(order), images()
    S = 5
    prefix = torch.full((2,), S)
    base = model.predict(x, prefix)
    seq = model.order.tolist()
    for j in (S, 9, 15):  # change the patch at sequence position j (non-prefix)
        out = model.predict(perturb_patch(x, seq[j]), prefix)
        diff = (out - base).abs().amax(dim=(0, 2))  # (N,)
        assert diff[:j].max() == 0, f"position < {j} changed"
        assert diff[j] > 0
    # prefix positions see each other: the last prefix patch changes the first output
    out = model.predict(perturb_patch(x, seq[S - 1]), prefix)
    assert (out - base)[:, 0].abs().max() > 0


def test_prefix_zero_is_strictly_causal():
    model, x = _aim(), images()
    zero = torch.zeros(2, dtype=torch.long)
    base = model.predict(x, zero)
    for j in (1, 7, 15):
        diff = (model.predict(perturb_patch(x, j), zero) - base).abs().amax(dim=(0, 2))
        assert diff[:j].max() == 0 and diff[j] > 0


def test_bidirectional_eval_differs_from_causal():
    model, x = _aim(), images()
    n = model.num_patches
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    with torch.no_grad():
        bi = model.backbone(x)["tokens"]
        ca = model.backbone(x, attn_mask=causal)["tokens"]
    assert (bi - ca).abs().amax(dim=(0, 2)).min() > 1e-4  # every position changes


# --- targets and loss -----------------------------------------------------------------------


def test_per_patch_normalisation_hand_case():
    patch = torch.tensor([[[1.0, 2.0, 3.0, 4.0]]])
    std = (5 / 3 + 1e-6) ** 0.5  # unbiased variance of 1..4 is 5/3
    expected = (torch.tensor([1.0, 2.0, 3.0, 4.0]) - 2.5) / std
    torch.testing.assert_close(normalize_patches(patch)[0, 0], expected)


def test_loss_is_next_patch_mse_on_non_prefix_targets_only():
    model, x = _aim(), images()
    prefix = torch.tensor([3, 12])
    with torch.no_grad():
        loss = model(x, prefix_len=prefix)["loss"]
        pred = model.predict(x, prefix)
    target = normalize_patches(patchify(x, 4))  # raster order
    total, count = 0.0, 0
    for b in range(2):
        for t in range(1, 16):
            if t >= prefix[b]:  # the output at t - 1 predicts patch t; only non-prefix targets
                total += ((pred[b, t - 1] - target[b, t]) ** 2).mean().item()
                count += 1
    assert count == 13 + 4
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_head_residual_norm_flag_changes_only_the_head():
    quirk, paper = _aim(head_residual_norm=True), _aim(head_residual_norm=False)
    assert quirk.head.blocks[0].norm1 is not None and paper.head.blocks[0].norm1 is None
    n_q = sum(p.numel() for p in quirk.head.parameters())
    n_p = sum(p.numel() for p in paper.head.parameters())
    assert n_q - n_p == 2 * 2 * 32  # one extra LayerNorm (weight + bias) per block


def test_aim_rejects_a_class_token_and_bad_prefix_range():
    with pytest.raises(ValueError, match="class_token=false"):
        AIM(AIMConfig(), ViT(ViTConfig(**{**TRUNK, "class_token": True})))
    with pytest.raises(ValueError, match="prefix_max"):
        AIM(AIMConfig(prefix_max=16), ViT(ViTConfig(**TRUNK)))


def test_prefix_lengths_are_drawn_in_range_and_reproducibly():
    model = _aim()
    draw = model.sample_corruption(4000, torch.Generator().manual_seed(0))["prefix_len"]
    assert draw.min() == 1 and draw.max() == 15  # U{1, ..., N - 1}
    again = model.sample_corruption(4000, torch.Generator().manual_seed(0))["prefix_len"]
    assert torch.equal(draw, again)


# --- trunk init (docs/METHODS.md §5.1, §10.3-4) --------------------------------------------------


def test_recipe_trunk_inits_q_k_v_apart_keeps_the_conv_bias_and_uses_eps_1e5():
    cfg = mimar.load_config(AIM_RECIPE)
    torch.manual_seed(0)
    trunk = mimar.build_method(cfg).backbone
    D = cfg.backbone.embed_dim
    w = trunk.blocks[0].attn.qkv.weight.detach()  # (3D, D): q, k, v stacked
    assert abs(w.std() / math.sqrt(2 / (D + D)) - 1) < 0.08  # each a D x D xavier matrix
    for block in trunk.blocks:
        for part in block.attn.qkv.weight.detach().chunk(3):  # q, k, v
            assert abs(part.std() / math.sqrt(2 / (D + D)) - 1) < 0.08
            assert part.abs().max() <= math.sqrt(6 / (D + D))
    bias = trunk.patch_embed.proj.bias.detach()  # PyTorch's U(+-1/sqrt(C p p)), not zeros
    bound = 1 / math.sqrt(cfg.backbone.in_chans * cfg.backbone.patch_size**2)
    assert bias.abs().max() <= bound and bias.abs().min() > 0 and bias.std() > bound / 4
    norms = [m for m in trunk.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert norms and all(m.eps == 1e-5 for m in norms)
    for recipe in ("aim_600m", "aim_1b", "aim_3b", "aim_7b"):
        big = mimar.load_config(f"configs/aim/{recipe}.yaml").backbone
        assert (big.norm_eps, big.qkv_init, big.patch_bias_init) == (1e-5, "split", "default")


def test_fused_xavier_qkv_is_the_smaller_bound_and_split_needs_xavier():
    torch.manual_seed(0)
    fused = ViT(ViTConfig(**{**TRUNK, "embed_dim": 64})).blocks[0].attn.qkv.weight.detach()
    assert abs(fused.std() / math.sqrt(2 / (64 + 3 * 64)) - 1) < 0.08
    with pytest.raises(ValueError, match="qkv_init=split"):
        ViTConfig(**{**TRUNK, "weight_init": "trunc_normal", "qkv_init": "split"})


# --- the trunk exports to timm --------------------------------------------------------------


def test_aim_trunk_exports_to_timm(tmp_path):
    vit = ViT(ViTConfig(**TRUNK)).eval()
    path, meta_path = export_timm(vit, tmp_path / "aim.safetensors")
    meta = json.loads(meta_path.read_text())
    model = timm.create_model(meta["timm_model"], pretrained=False, num_classes=0, **meta["kwargs"])
    model.load_state_dict(load_file(path), strict=True)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(
            model.eval().forward_features(x), vit(x)["tokens"], atol=1e-5, rtol=1e-5
        )


# --- end to end -----------------------------------------------------------------------------


@pytest.mark.slow
def test_thirty_steps_on_synthetic_data_lower_the_loss(tmp_path):
    run = tmp_path / "aim"
    argv = [
        "pretrain",
        AIM_RECIPE,
        "data.name=synthetic",
        "data.synthetic_size=256",
        "data.batch_size=32",
        "data.img_size=16",
        "backbone.img_size=16",
        "backbone.embed_dim=32",
        "backbone.depth=2",
        "backbone.num_heads=2",
        "method.head_width=64",
        "method.head_depth=2",
        "train.precision=fp32",
        "train.progress=false",
        "train.threads=1",
        "train.steps=30",
        "optim.lr=2e-3",
        "--run-dir",
        str(run),
    ]
    assert main(argv) == 0
    assert sorted(losses(run)) == list(range(1, 31))
    first, last = loss_ends(run, 5)
    assert last < 0.8 * first
    assert (run / "reconstruction.png").exists()


@pytest.mark.parametrize("name, paper_b", [("600m", 0.6), ("1b", 1.2), ("3b", 2.7), ("7b", 6.5)])
def test_paper_model_shapes_build_on_meta_and_match_the_paper_sizes(name, paper_b):
    import mimar

    cfg = mimar.load_config(f"configs/aim/aim_{name}.yaml")
    with torch.device("meta"):  # no memory: 7B parameters would need 26 GB
        model = mimar.build_method(cfg)
    trunk = sum(p.numel() for p in model.backbone.parameters()) / 1e9
    assert model.backbone.pos_embed.is_meta
    if name == "600m":
        # The public AIM-0.6B shape (1536 x 24, ml-aim's aim_600M) counts 0.68B; the paper's
        # "0.6B" label is 12 % below it. We keep the released shape.
        assert trunk == pytest.approx(0.681, abs=0.001)
    else:
        assert trunk == pytest.approx(paper_b, rel=0.05)
    head = sum(p.numel() for p in model.head.parameters()) / 1e9
    assert head == pytest.approx(0.41, abs=0.01)  # 12 blocks x 2 x 2048 x 8192 + in/out
