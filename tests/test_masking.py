import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mimar.masking import SimMIMMasking, avg_dist


@settings(max_examples=40, deadline=None)
@given(
    cells=st.integers(2, 7),
    scale=st.integers(1, 4),
    ratio=st.floats(0.05, 0.95),
    batch=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_simmim_mask_count_alignment_and_determinism(cells, scale, ratio, batch, seed):
    model_patch = 2
    masking = SimMIMMasking(cells * scale * model_patch, scale * model_patch, model_patch, ratio)
    mask = masking(batch, torch.Generator().manual_seed(seed))
    g = cells * scale
    assert mask.shape == (batch, g * g) and mask.dtype == torch.bool
    n_cells = math.ceil(cells * cells * ratio)
    # exactly ceil(cells^2 * ratio) hidden cells, each covering scale x scale patches
    assert (mask.sum(1) == n_cells * scale * scale).all()
    grid = mask.reshape(batch, cells, scale, cells, scale)
    assert (grid.all(dim=(2, 4)) == grid.any(dim=(2, 4))).all()  # cells are all-or-nothing
    again = masking(batch, torch.Generator().manual_seed(seed))
    assert torch.equal(mask, again)


def test_simmim_paper_counts():
    assert SimMIMMasking(224, 32, 16, 0.6).num_mask == 30  # 30 of 49 cells (ViT-B)
    assert SimMIMMasking(192, 32, 4, 0.6).num_mask == 22  # 22 of 36 cells (Swin-B)
    m = SimMIMMasking(192, 32, 4, 0.6)(2)
    assert m.shape == (2, 48 * 48)
    with pytest.raises(ValueError, match="multiple"):
        SimMIMMasking(36, 6, 4, 0.5)


def test_avg_dist_hand_case():
    # 1 x 3 strip, middle hidden: distance 1.
    assert avg_dist(torch.tensor([[False, True, False]])) == pytest.approx(1.0)
    # 3 x 3 with only the top-left corner visible:
    # hidden cells' nearest visible distances: (0,1)=1 (0,2)=2 (1,0)=1 (1,1)=sqrt2 (1,2)=sqrt5
    # (2,0)=2 (2,1)=sqrt5 (2,2)=sqrt8
    m = torch.ones(3, 3, dtype=torch.bool)
    m[0, 0] = False
    expected = (1 + 2 + 1 + math.sqrt(2) + math.sqrt(5) + 2 + math.sqrt(5) + math.sqrt(8)) / 8
    assert avg_dist(m).item() == pytest.approx(expected, rel=1e-6)
    # batched: mean over images; nothing hidden -> 0
    batch = torch.stack([m, torch.zeros(3, 3, dtype=torch.bool)])
    assert avg_dist(batch).item() == pytest.approx(expected / 2, rel=1e-6)
    with pytest.raises(ValueError):
        avg_dist(torch.ones(2, 2, dtype=torch.bool))


def test_coarser_masks_have_larger_avg_dist():
    # The paper's point: larger mask patches -> larger AvgDist at the same ratio.
    gen = torch.Generator().manual_seed(0)
    small = SimMIMMasking(64, 4, 1, 0.6)(8, gen).reshape(8, 64, 64)
    large = SimMIMMasking(64, 16, 1, 0.6)(8, gen).reshape(8, 64, 64)
    assert avg_dist(large) > 2 * avg_dist(small)
