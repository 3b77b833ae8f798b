"""Generic layers of ``mimar.nn``: timm-compatible names and numbers, masks, init."""

import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block as TimmBlock
from torch import nn

from mimar.nn import (
    Block,
    CrossAttention,
    DropPath,
    MLPBlock,
    additive_mask,
    attend,
    init_linears,
    set_attention_kernel,
    step_draws,
    trunc_normal_,
)
from mimar.nn.attention import kernel_for


def test_block_has_timm_weight_names_and_gives_timm_numbers():
    torch.manual_seed(0)
    ours = Block(16, 2, mlp_ratio=2.0, init_values=0.5).eval()
    timm = TimmBlock(16, 2, mlp_ratio=2.0, qkv_bias=True, init_values=0.5).eval()
    assert set(ours.state_dict()) == set(timm.state_dict())
    for p in ours.parameters():
        nn.init.normal_(p)  # LayerScale and norms away from their init too
    timm.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), timm(x))


def test_block_without_biases_has_no_bias_weights():
    block = Block(8, 2, qkv_bias=False, proj_bias=False)
    assert not [k for k in block.state_dict() if k.startswith(("attn", "mlp")) and "bias" in k]
    assert isinstance(block.ls1, nn.Identity)  # no LayerScale without init_values


def test_additive_mask_matches_the_boolean_mask_and_adds_the_bias():
    q, k, v = torch.randn(3, 1, 2, 4, 8).unbind(0)  # (B, heads, N, D/heads)
    allowed = torch.ones(4, 4, dtype=torch.bool).tril()
    mask = additive_mask(allowed, torch.zeros(2, 4, 4))  # (heads, N, N)
    assert mask.dtype == torch.float32 and torch.isinf(mask[0, 0, 1])
    torch.testing.assert_close(
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
        F.scaled_dot_product_attention(q, k, v, attn_mask=allowed),
    )
    bias = torch.randn(2, 4, 4)
    torch.testing.assert_close(additive_mask(None, bias), bias)
    torch.testing.assert_close(additive_mask(allowed, bias)[:, allowed], bias[:, allowed])


def test_cross_attention_is_softmax_attention_over_the_memory():
    torch.manual_seed(0)
    attn = CrossAttention(8, 2)
    x, memory = torch.randn(1, 3, 8), torch.randn(1, 5, 8)
    q = attn.q(x).reshape(1, 3, 2, 4).transpose(1, 2)
    k, v = attn.kv(memory).reshape(1, 5, 2, 2, 4).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-1, -2) / math.sqrt(4)).softmax(-1)  # (1, 2, 3, 5)
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(1, 3, 8))
    torch.testing.assert_close(attn(x, memory), expected)


def test_mlp_block_is_a_residual_per_token_mlp():
    block = MLPBlock(8, 2.0)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(block(x), x + block.mlp(block.norm(x)))
    torch.testing.assert_close(block(x)[:, :1], block(x[:, :1]))  # tokens never mix


def test_init_linears_trunc_normal_cutoff_xavier_bound_and_layer_norms():
    model = nn.Sequential(nn.Linear(64, 256), nn.LayerNorm(256), nn.Conv2d(3, 64, 4))
    with torch.no_grad():
        model[1].weight.fill_(3.0)
        model[2].bias.fill_(1.0)
    init_linears(model, std=0.02, cutoff=0.02)  # Linear only; LayerNorm untouched
    w = model[0].weight.detach()
    assert w.abs().max() <= 0.02 and w.std() > 0.01 and not model[0].bias.any()
    assert model[1].weight.eq(3.0).all() and model[2].bias.eq(1.0).all()
    init_linears(model, "xavier", conv=True, layer_norm=True)
    bound = math.sqrt(6 / (64 + 256))
    assert w.abs().max() <= bound and w.std() == pytest.approx(bound / math.sqrt(3), rel=0.05)
    conv_bound = math.sqrt(6 / (64 + 3 * 4 * 4))  # the conv as a (64, C*p*p) linear layer
    assert model[2].weight.abs().max() <= conv_bound and not model[2].bias.any()
    assert model[1].weight.eq(1.0).all()
    with pytest.raises(ValueError, match="xavier"):
        init_linears(model, "kaiming")


@pytest.mark.parametrize(
    ("shape", "mean", "std", "a", "b"),
    [
        ((128, 384), 0.0, 0.02, -2.0, 2.0),
        ((1, 1, 128), 0.0, 0.02, -0.02, 0.02),
        ((7,), 0.5, 1.0, 0.0, 1.0),
    ],
)
def test_trunc_normal_draws_what_timms_draws(shape, mean, std, a, b):
    from timm.layers import trunc_normal_ as timm_trunc_normal_

    ours, theirs = torch.empty(shape), torch.empty(shape)
    torch.manual_seed(3)
    trunc_normal_(ours, mean=mean, std=std, a=a, b=b)
    torch.manual_seed(3)
    timm_trunc_normal_(theirs, mean=mean, std=std, a=a, b=b)
    assert torch.equal(ours, theirs)
    assert ours.min() >= a and ours.max() <= b and ours.std() > 0


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_matmul_attention_equals_sdpa_for_every_mask_form(mask_kind):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    mask = {
        "none": None,
        "bool": (torch.rand(5, 5, generator=g) > 0.3) | torch.eye(5, dtype=torch.bool),
        "float": torch.randn(2, 1, 5, 5, generator=g),  # e.g. a relative position bias
    }[mask_kind]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    previous = set_attention_kernel("matmul")
    try:
        torch.testing.assert_close(attend(q, k, v, mask), expected, rtol=1e-5, atol=1e-6)
    finally:
        set_attention_kernel(previous)


def test_auto_kernel_is_matmul_only_for_low_precision_cpu_training():
    q32 = torch.randn(1, 1, 2, 4, requires_grad=True)
    q16 = q32.detach().bfloat16().requires_grad_()
    assert set_attention_kernel("auto") == "auto"  # the default
    assert kernel_for(q16) == "matmul" and kernel_for(q32) == "sdpa"
    with torch.no_grad():
        assert kernel_for(q16) == "sdpa"  # inference: SDPA's flash forward is faster
    assert kernel_for(q16.detach()) == "sdpa"  # a frozen network's forward
    set_attention_kernel("sdpa")
    assert kernel_for(q16) == "sdpa"
    set_attention_kernel("auto")
    with pytest.raises(ValueError, match="auto, sdpa or matmul"):
        set_attention_kernel("flash")


def test_drop_path_masks_follow_the_step_generator_for_any_number_of_processes():
    layer = DropPath(0.5).train()
    x = torch.randn(8, 3, 4) + 5  # no row is zero by chance
    with step_draws(7):
        whole = layer(x)  # one process, global batch of 8
    halves = []
    for rank in (0, 1):  # two processes, 4 rows each, same step seed
        with step_draws(7, rank=rank, world_size=2):
            halves.append(layer(x[rank * 4 : (rank + 1) * 4]))
    torch.testing.assert_close(torch.cat(halves), whole)
    u = torch.rand(8, generator=torch.Generator().manual_seed(7))
    want = x * ((u < 0.5).float() / 0.5)[:, None, None]  # timm's x * bernoulli(keep) / keep
    torch.testing.assert_close(whole, want)
    assert 0 < (whole == 0).all(-1).all(-1).sum() < 8  # some samples dropped, not all
    assert torch.equal(layer.eval()(x), x)


def test_swin_uses_the_step_drop_path():
    from timm.layers import DropPath as TimmDropPath

    from mimar.backbones.swin import Swin, SwinConfig

    swin = Swin(
        SwinConfig(img_size=16, patch_size=2, in_chans=1, embed_dim=16, depths=(2, 1, 1),
                   num_heads=(2, 2, 4), window_size=4, drop_path_rate=0.2)
    )  # fmt: skip
    kinds = {type(m) for m in swin.modules()}
    assert DropPath in kinds and TimmDropPath not in kinds


def _checkpoint_backbones():
    from helpers import tiny_vit

    from mimar.backbones.hivit import HiViT, HiViTConfig
    from mimar.backbones.swin import Swin, SwinConfig

    hivit = HiViTConfig(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2,
                        num_heads=2, mlp_depth=1, drop_path_rate=0.3)  # fmt: skip
    swin = SwinConfig(img_size=16, patch_size=2, in_chans=1, embed_dim=16, depths=(2, 1, 1),
                      num_heads=(2, 2, 4), window_size=4, drop_path_rate=0.3)  # fmt: skip
    return {
        "vit": lambda: tiny_vit(drop_path_rate=0.3),
        "hivit": lambda: HiViT(hivit),
        "swin": lambda: Swin(swin),
    }


@pytest.mark.parametrize("name", ["vit", "hivit", "swin"])
def test_grad_checkpointing_gives_the_same_loss_and_gradients_with_drop_path(name):
    """Recomputed blocks redraw the same drop-path masks: equal to float rounding."""
    from helpers import images

    torch.manual_seed(0)
    net = _checkpoint_backbones()[name]().train()
    x = images(4, size=16)
    w = torch.randn(net(x)["tokens"].shape)  # a fixed readout: the loss sees every token

    def loss_of(seed):
        with step_draws(seed):
            return (net(x)["tokens"] * w).mean()

    results = []
    for enable in (False, True):
        net.set_grad_checkpointing(enable)
        net.zero_grad(set_to_none=True)
        loss = loss_of(11)
        loss.backward()
        grads = [p.grad for p in net.parameters()]  # None: unused (Swin's absent mask token)
        results.append((loss.item(), [None if g is None else g.clone() for g in grads]))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    assert sum(a is not None for a in grads_a) > len(grads_a) // 2
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    # another step draws other masks: the check above is not vacuous
    assert loss_of(12).item() != pytest.approx(loss_a, rel=1e-3)


@pytest.mark.parametrize("name", ["vit", "hivit", "swin"])
def test_every_backbone_declares_grad_checkpointing_to_the_engine(name):
    """train.grad_checkpointing finds backbones by this base class (engine/loop.py)."""
    from mimar.nn.layers import GradCheckpointing

    assert isinstance(_checkpoint_backbones()[name](), GradCheckpointing)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cpu_linear_matches_linear_then_gelu_and_only_in_inference(dtype):
    """mimar.nn.fused.linear: inside fused_inference with autograd off, oneDNN's fused
    bias (+ GELU) gives linear-then-GELU to fp32 / one-bf16-step accuracy; anywhere else it
    is exactly the module call (training and pretraining teachers keep their numbers)."""
    from mimar.nn.fused import fused_inference, linear

    torch.manual_seed(0)
    layer, x = nn.Linear(16, 24), torch.randn(3, 5, 16)
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16)
    with autocast:
        want = torch.nn.functional.gelu(layer(x).float())
        plain = linear(x, layer, gelu=True)  # fused_inference off: the module call
        assert torch.equal(plain, torch.nn.functional.gelu(layer(x)))
        with fused_inference(), torch.no_grad():
            got = linear(x, layer, gelu=True)
            assert got.dtype == dtype and got.shape == (3, 5, 24)
            no_act = linear(x, layer)
        with fused_inference():  # autograd on: not fused, gradients flow
            assert linear(x, layer).requires_grad
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), want, **tol)
    torch.testing.assert_close(no_act.float(), layer(x).float(), **tol)


def test_channel_dropout_is_dropout2d_and_slices_the_global_draws_by_rank():
    from mimar.nn.layers import ChannelDropout, step_draws

    drop = ChannelDropout(0.5).train()
    x = torch.ones(4, 6, 3, 3)
    with step_draws(7):
        full = drop(x)
    kept = full[:, :, 0, 0]
    assert set(kept.unique().tolist()) <= {0.0, 2.0}  # whole channels dropped, the rest x2
    assert torch.equal(full, kept[:, :, None, None].expand_as(x))
    with step_draws(7, rank=1, world_size=2):
        second = drop(x[:2])
    assert torch.equal(second, full[2:])  # rank 1 of 2 draws rows 2-3 of the global batch
    assert torch.equal(drop.eval()(x), x)
