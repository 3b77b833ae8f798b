"""EVA: BEiT block masking, the negative-cosine loss on hidden tokens only, frozen-teacher
gradients, a short run that lowers the loss, the paper recipes."""

import math
import random
from pathlib import Path

import pytest
import torch
from helpers import TINY, loss_ends, losses, patch_teacher, tiny_vit
from hypothesis import given, settings
from hypothesis import strategies as st

import mimar
from mimar import viz
from mimar.cli import main
from mimar.factory import build_backbone
from mimar.losses import neg_cosine
from mimar.masking import BlockMasking
from mimar.methods.eva import EVA, EVAConfig

ROOT = Path(__file__).resolve().parents[1]
EVA_TINY = [o for o in TINY if not o.startswith("method.")]  # TINY's method keys are SimMIM's


# --- block masking (docs/METHODS.md §1.3) --------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    grid=st.integers(6, 16),
    fraction=st.floats(0.1, 0.5),
    min_share=st.floats(0.0, 0.25),
    min_aspect=st.floats(0.2, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_block_mask_count_bounds_and_determinism(grid, fraction, min_share, min_aspect, seed):
    target = max(4, int(fraction * grid * grid))
    min_patches = max(1, int(min_share * target))  # the documented regime: min <= target / 4
    masking = BlockMasking(grid, target, min_patches, None, min_aspect)
    mask = masking(32, torch.Generator().manual_seed(seed))
    assert mask.shape == (32, grid * grid) and mask.dtype == torch.bool
    counts = mask.sum(1)
    assert counts.max() <= target  # never overshoots
    assert counts.float().mean() >= 0.9 * target  # the documented tolerance
    assert torch.equal(mask, masking(32, torch.Generator().manual_seed(seed)))


@settings(max_examples=60, deadline=None)
@given(
    grid=st.integers(4, 16),
    target=st.integers(1, 120),
    min_patches=st.integers(1, 20),
    min_aspect=st.floats(0.2, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_blocks_fit_the_grid_respect_the_aspect_range_and_make_the_mask(
    grid, target, min_patches, min_aspect, seed
):
    target = min(target, grid * grid - 1)
    masking = BlockMasking(grid, target, min_patches, None, min_aspect)
    lo, hi = min_aspect, 1 / min_aspect
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    for top, left, h, w in masking.sample_blocks(random.Random(seed)):
        assert 1 <= h < grid and 1 <= w < grid  # strictly smaller than the grid, as BEiT
        assert 0 <= top <= grid - h and 0 <= left <= grid - w
        # sides are round(sqrt(area * a)) and round(sqrt(area / a)) with a in [lo, hi]: the
        # ratio h / w is that a up to the rounding of each side by half a patch
        assert (h - 0.5) / (w + 0.5) <= hi + 1e-9 and (h + 0.5) / (w - 0.5) >= lo - 1e-9
        mask[top : top + h, left : left + w] = True
    assert mask.sum() <= target
    gen = torch.Generator().manual_seed(seed)
    drawn = masking(1, gen).reshape(grid, grid)
    assert drawn.sum() <= target


def test_block_mask_eva_settings_reach_the_target_on_average():
    # EVA-g/14: 105 of 256, min 16; tiny recipe: 26 of 64, min 4 (numbers in BlockMasking)
    for grid, target, min_patches, mean_at_least in ((16, 105, 16, 103.5), (8, 26, 4, 25.8)):
        mask = BlockMasking(grid, target, min_patches)(512, torch.Generator().manual_seed(0))
        counts = mask.sum(1).float()
        assert counts.max() <= target and counts.mean() >= mean_at_least
    assert EVAConfig().mask_ratio == 0.4 and EVAConfig().min_num_patches == 16


# --- loss -----------------------------------------------------------------------------


def test_neg_cosine_hand_computed():
    pred = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    target = torch.tensor([[2.0, 0.0], [-1.0, 0.0], [0.0, 1.0]])
    # cosines: 1, -1/sqrt(2), 1 -> mean (2 - 0.70711) / 3, negated
    expected = -(2 - 1 / math.sqrt(2)) / 3
    assert neg_cosine(pred, target).item() == pytest.approx(expected, rel=1e-6)


def _eva(min_num_patches=2):
    torch.manual_seed(0)
    vit = tiny_vit(use_mask_token=True, fix_init=True)
    teacher = patch_teacher(grid=(4, 4), mean=0.5, std=0.5)
    return EVA(EVAConfig(min_num_patches=min_num_patches), vit, teacher)


def test_eva_loss_is_negative_cosine_over_hidden_tokens_only():
    method = _eva()
    assert method.num_mask == 6  # round(0.4 * 16)
    x = torch.randn(2, 1, 16, 16)
    mask = method.sample_corruption(2, torch.Generator().manual_seed(3))["mask"]
    out = method(x, mask=mask)
    pred = method.predict(x, mask)  # (2, 16, 8)
    with torch.no_grad():  # the toy teacher by hand: same statistics, so its input is x
        target = method.teacher.module.proj(x).flatten(2).transpose(1, 2)  # (2, 16, 8)
    cosines = []
    for b in range(2):
        for n in range(16):
            if mask[b, n]:
                p, t = pred[b, n], target[b, n]
                cosines.append((p @ t / (p.norm() * t.norm())).item())
    assert len(cosines) == int(mask.sum())
    assert out["loss"].item() == pytest.approx(-sum(cosines) / len(cosines), rel=1e-5)
    assert out["mask_ratio"].item() == pytest.approx(mask.float().mean().item())
    assert out["teacher_ms"].item() > 0


def test_eva_gradients_reach_every_trainable_parameter_and_never_the_teacher():
    method = _eva()
    method.train()
    method(torch.randn(4, 1, 16, 16), **method.sample_corruption(4))["loss"].backward()
    for name, p in method.named_parameters():
        assert p.grad is not None, name
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.module.parameters())
    w = method.lm_head.weight
    assert w.shape == (8, 32)
    assert set(method.state_dict()) == {k for k, _ in method.named_parameters()}


def test_eva_visualize_gives_rows_of_image_shape():
    method = _eva().eval()
    x, gen = torch.randn(3, 1, 16, 16), torch.Generator().manual_seed(0)
    rows = viz.reconstruction_rows(method, x, gen)
    assert "cosine" in rows.pop("caption")
    assert list(rows) == ["original", "masked", "cosine to teacher"]
    assert all(r.shape == (3, 1, 16, 16) for r in rows.values())


# --- runs -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("eva") / "teacher"
    argv = ["pretrain", "configs/simmim/vit_tiny_fmnist.yaml", *TINY, "train.steps=2"]
    assert main([*argv, "--run-dir", str(run)]) == 0
    return run


def test_thirty_eva_steps_with_a_tiny_teacher_lower_the_loss(teacher_run, tmp_path):
    run = tmp_path / "eva"
    argv = [
        "pretrain",
        "configs/eva/vit_tiny_fmnist.yaml",
        *EVA_TINY,
        "method.min_num_patches=2",
        "train.steps=30",
        f"teacher.path={teacher_run}",
        "--run-dir",
        str(run),
    ]
    assert main(argv) == 0
    curve = losses(run)
    assert len(curve) == 30
    first, last = loss_ends(run, 3)
    assert last < first - 0.1, curve
    assert (run / "reconstruction.png").exists()
    # the checkpoint holds the student only, and its backbone loads without the teacher
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert all(k.startswith(("backbone.", "lm_head.")) for k in state["model"])
    assert mimar.load_backbone(run)(torch.randn(1, 1, 16, 16))["tokens"].shape == (1, 17, 32)


@pytest.mark.parametrize(
    "recipe, params_m, num_mask, teacher_grid",
    [
        ("configs/eva/vit_base_clip_l14_in1k.yaml", 85.8, 78, 196 // 14),  # 14x14 both
        ("configs/eva/vit_giant_clip_l14_merged30m.yaml", 1011.2, 105, 224 // 14),  # 16x16
    ],
)
def test_paper_recipes_build_the_paper_student(recipe, params_m, num_mask, teacher_grid):
    cfg = mimar.load_config(ROOT / recipe)
    with torch.device("meta"):
        backbone = build_backbone(cfg.backbone)
    assert sum(p.numel() for p in backbone.parameters()) / 1e6 == pytest.approx(params_m, abs=0.1)
    n = backbone.num_patches
    assert (cfg.method.num_mask_patches or round(cfg.method.mask_ratio * n)) == num_mask
    assert backbone.grid_size == teacher_grid  # the teacher's input size aligns the grids
    assert cfg.teacher.kind == "open_clip" and cfg.teacher.model == "ViT-L-14-quickgelu"
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.clip_grad) == (1e-3, (0.9, 0.98), 3.0)
