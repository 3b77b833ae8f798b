import pytest
import torch

from mimar.backbones.vit import ViT, ViTConfig
from mimar.losses import masked_l1
from mimar.methods.simmim import SimMIM, SimMIMConfig
from mimar.targets import patchify, unpatchify, upsample_mask


def tiny_simmim(in_chans=1):
    vit = ViT(
        ViTConfig(
            img_size=16,
            patch_size=4,
            in_chans=in_chans,
            embed_dim=32,
            depth=2,
            num_heads=2,
            use_mask_token=True,
        )
    )
    return SimMIM(SimMIMConfig(mask_patch_size=8, mask_ratio=0.5), vit)


def test_masked_l1_hand_computed_two_images():
    # 2 images, 2 channels, 2x2 pixels; predictions 0 so |pred - target| = |target|
    target = torch.tensor(
        [
            [[[1.0, -2.0], [3.0, 4.0]], [[0.5, 0.5], [-1.0, 2.0]]],
            [[[0.0, 1.0], [1.0, 0.0]], [[2.0, -3.0], [0.0, 1.0]]],
        ]
    )
    pred = torch.zeros_like(target)
    pixel_mask = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]], [[[0.0, 1.0], [0.0, 0.0]]]])
    # hidden pixel-channels: img0 (0,0): 1, 0.5; (1,1): 4, 2; img1 (0,1): 1, 3 -> sum 11.5
    # hidden positions 3, channels 2 -> mean over 6 pixel-channels
    expected = 11.5 / (3 + 1e-5) / 2
    assert masked_l1(pred, target, pixel_mask).item() == pytest.approx(expected, rel=1e-6)


def test_simmim_loss_is_l1_on_hidden_pixels_of_the_input():
    method = tiny_simmim()
    x = torch.randn(2, 1, 16, 16)
    mask = method.sample_corruption(2, torch.Generator().manual_seed(1))["mask"]
    assert mask.shape == (2, 16) and (mask.sum(1) == 8).all()  # 2 of 4 cells x 4 patches
    out = method(x, mask=mask)
    rec = method.reconstruct(x, mask)
    assert rec.shape == x.shape
    pix = upsample_mask(mask, 4, 4)  # (2, 1, 16, 16)
    expected = ((rec - x).abs() * pix).sum() / pix.sum() / 1
    torch.testing.assert_close(out["loss"], expected, rtol=1e-4, atol=1e-6)
    # visible pixels do not matter for the loss
    rec_visible_only = x * (1 - pix) + rec * pix
    torch.testing.assert_close(
        masked_l1(rec_visible_only, x, pix), out["loss"], rtol=1e-4, atol=1e-6
    )


def test_head_is_pixel_shuffle_of_a_1x1_conv():
    method = tiny_simmim(in_chans=3)
    fmap = torch.randn(1, 32, 4, 4)
    out = method.head(fmap)
    assert out.shape == (1, 3, 16, 16)
    # token (0, 0) writes the 4x4 pixel block at the top-left, channel by channel
    direct = method.head.conv(fmap)[0, :, 0, 0].reshape(3, 4, 4)
    torch.testing.assert_close(out[0, :, :4, :4], direct)


def test_patchify_round_trip_and_order():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float).reshape(2, 3, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 4, 12)
    # first patch, element order (row, col, channel)
    assert p[0, 0, :3].tolist() == [x[0, 0, 0, 0], x[0, 1, 0, 0], x[0, 2, 0, 0]]
    assert p[0, 1, 0] == x[0, 0, 0, 2]  # second patch starts at column 2
    torch.testing.assert_close(unpatchify(p, 2, 3), x)


def test_gradients_reach_every_trainable_parameter():
    method = tiny_simmim()
    method(torch.randn(2, 1, 16, 16), **method.sample_corruption(2))["loss"].backward()
    missing = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_simmim_needs_mask_token():
    vit = ViT(ViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2))
    with pytest.raises(ValueError, match="use_mask_token"):
        SimMIM(SimMIMConfig(mask_patch_size=8), vit)


def test_few_steps_on_one_batch_lower_the_loss():
    method = tiny_simmim()
    x = torch.randn(4, 1, 16, 16)
    mask = method.sample_corruption(4, torch.Generator().manual_seed(0))["mask"]
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        loss = method(x, mask=mask)["loss"]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.7 * first
