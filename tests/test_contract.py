"""The contract every method keeps, swept over every tiny recipe (STYLE.md §10): it builds;
the forward loss is finite; backward gives a finite, non-zero gradient to every trainable
parameter and none to frozen ones (teachers, EMA copies, fixed sin-cos tables); a few
AdamW steps on one batch and one corruption lower the loss.

Each recipe is shrunk to 16 px, width 32, depth 2 by overrides; the recipes that need a
teacher get a 1-step tiny SimMIM run (D-iGPT also with its pixel targets). Seconds per case.
"""

import math

import pytest
import torch
from helpers import TINY, images, tiny_teacher_run
from torch import nn

import mimar
from mimar import names
from mimar.nn import set_attention_kernel

DATA = [o for o in TINY if not o.startswith(("method.", "backbone."))]  # synthetic, 16 px, fp32
VIT = [o for o in TINY if o.startswith("backbone.")]  # 16 px, width 32, depth 2, 2 heads
HIVIT = [*VIT, "backbone.mlp_depth=1"]
TEACHER = "teacher.path={teacher}"  # filled in with the tiny teacher run

# bench name of names.tiny_recipes(): (overrides, uses a frozen network teacher)
SHRINK = {
    "simmim": (TINY, False),
    "simmim-swin": (
        # patch 2 -> 8x8 tokens, window 4 (shifted windows in stage 0), stride 8 = a mask cell
        [
            *DATA,
            "backbone.img_size=16",
            "backbone.embed_dim=16",
            "backbone.depths=[2,1,1]",
            "backbone.num_heads=[2,2,4]",
        ],
        False,
    ),
    "eva": ([*DATA, *VIT, TEACHER], True),
    "aim": (
        [*DATA, *VIT, "method.head_width=32", "method.head_depth=2"],
        False,
    ),
    "itpn": (  # MFM on: an EMA teacher inside the method
        [
            *DATA,
            *HIVIT,
            "method.fpn_dim=16",
            "method.decoder_dim=32",
            "method.decoder_depth=1",
            "method.decoder_num_heads=2",
        ],
        False,
    ),
    "itpn-clip": (
        [*DATA, *HIVIT, "method.fpn_dim=16", "method.num_mask_patches=6", TEACHER],
        True,
    ),
    "digpt": (
        [
            *DATA,
            *VIT,
            "method.decoder_dim=32",
            "method.decoder_heads=2",
            "method.memory_layers=[1,2]",
            TEACHER,
        ],
        True,
    ),
}

# one case per tiny recipe (a method added to names.METHODS with no row in SHRINK fails
# test_every_tiny_recipe_has_a_case), and D-iGPT once more with its pixel targets
TINY_RECIPES = names.tiny_recipes()
CASES = {name: (str(path), *SHRINK[name]) for name, path in TINY_RECIPES.items() if name in SHRINK}
CASES["digpt-pixels"] = (
    CASES["digpt"][0],
    [
        *DATA,
        *VIT,
        "method.decoder_dim=32",
        "method.decoder_heads=2",
        "method.memory_layers=[1,2]",
        "teacher.kind=pixels",
    ],
    False,
)


def test_every_tiny_recipe_has_a_case():
    assert set(TINY_RECIPES) <= set(SHRINK), "give the new tiny recipe its SHRINK row"


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    return tiny_teacher_run(tmp_path_factory.mktemp("contract") / "teacher")


def _build(case, request):
    """The case's method (seed 0, train mode), one fixed batch and one fixed corruption."""
    recipe, overrides, _ = CASES[case]
    if TEACHER in overrides:
        run = request.getfixturevalue("teacher_run")
        overrides = [o.format(teacher=run) if o == TEACHER else o for o in overrides]
    cfg = mimar.load_config(recipe, overrides)
    torch.manual_seed(0)
    method = mimar.build_method(cfg).train()
    x = images(4, seed=1, size=cfg.data.img_size, chans=cfg.data.in_chans)
    corruption = method.sample_corruption(4, torch.Generator().manual_seed(0))
    return method, x, corruption


def _teacher_parameters(method: nn.Module) -> list[nn.Parameter]:
    """Parameters of a teacher the method holds outside its registered submodules (a frozen
    teacher is not trained and not saved), or registered under ``teacher.``."""
    registered = [p for n, p in method.named_parameters() if n.startswith("teacher.")]
    teacher = getattr(method, "teacher", None)
    if teacher is None or isinstance(teacher, nn.Module):
        return registered
    nets = [v for v in vars(teacher).values() if isinstance(v, nn.Module)]
    return registered + [p for net in nets for p in net.parameters()]


@pytest.mark.parametrize("case", CASES)
def test_loss_is_finite_and_gradients_reach_exactly_the_trainable_parameters(case, request):
    method, x, corruption = _build(case, request)
    assert isinstance(method.backbone, nn.Module)
    out = method(x, **corruption)
    # the engine logs every output as a scalar: each must be a finite 0-d tensor
    for key, value in out.items():
        assert value.dim() == 0 and torch.isfinite(value), key
    assert out["loss"].requires_grad
    out["loss"].backward()

    trainable = [(n, p) for n, p in method.named_parameters() if p.requires_grad]
    assert trainable
    for name, p in trainable:
        assert p.grad is not None, f"{name} gets no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    frozen = [(n, p) for n, p in method.named_parameters() if not p.requires_grad]
    for name, p in frozen:
        assert p.grad is None, f"frozen {name} got a gradient"
    teacher = _teacher_parameters(method)
    assert bool(teacher) == CASES[case][2]  # the network teachers are found and checked
    assert all(not p.requires_grad and p.grad is None for p in teacher)


# Frozen parameters each case must have (so that the check above is not vacuous there).
FROZEN = {
    "aim": {"backbone.pos_embed"},  # fixed sin-cos table
    "itpn": {"ema.trunk.pos_embed", "ema.trunk.blocks.0.attn.qkv.weight"},  # the EMA teacher
    "digpt": {"backbone.pos_embed"},  # fixed sin-cos table (no final LN at all, §6.3)
}
FROZEN["digpt-pixels"] = FROZEN["digpt"]


@pytest.mark.parametrize("case", CASES)
def test_frozen_parameters_are_the_expected_ones(case, request):
    method, _, _ = _build(case, request)
    frozen = {n for n, p in method.named_parameters() if not p.requires_grad}
    assert FROZEN.get(case, set()) <= frozen
    if case == "itpn":  # all of the EMA copy is frozen, and nothing else
        assert frozen == {n for n, _ in method.named_parameters() if n.startswith("ema.")}
    elif case not in FROZEN:
        assert frozen == set()


@pytest.mark.parametrize("case", CASES)
def test_a_few_steps_on_one_batch_lower_the_loss(case, request):
    method, x, corruption = _build(case, request)
    optimizer = torch.optim.AdamW(method.parameters(), lr=1e-3)
    curve = []  # the loss before each of 7 optimizer steps
    for step in range(1, 8):
        loss = method(x, **corruption)["loss"]
        curve.append(loss.item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if hasattr(method, "after_step"):  # iTPN's EMA teacher follows the student
            method.after_step(step)
    assert all(math.isfinite(v) for v in curve), curve
    assert curve[-1] < curve[0] - 0.04 * abs(curve[0]), curve


@pytest.mark.parametrize("case", CASES)
def test_the_matmul_attention_kernel_gives_the_sdpa_loss_and_gradients(case, request):
    """fp32: loss and every gradient equal to 1e-5 (relative to the largest); bf16 autocast
    (where ``auto`` picks the matmul path on CPU): the loss within 2 %."""
    method, x, corruption = _build(case, request)
    results = {}
    for kernel in ("sdpa", "matmul"):
        previous = set_attention_kernel(kernel)
        try:
            method.zero_grad(set_to_none=True)
            torch.manual_seed(0)  # drop path draws from the global generator
            loss = method(x, **corruption)["loss"]
            loss.backward()
            grads = [p.grad.clone() for p in method.parameters() if p.grad is not None]
            torch.manual_seed(0)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = method(x, **corruption)["loss"].item()
        finally:
            set_attention_kernel(previous)
        results[kernel] = (loss.item(), grads, low)
    (loss_a, grads_a, low_a), (loss_b, grads_b, low_b) = results["sdpa"], results["matmul"]
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert len(grads_a) == len(grads_b)
    for a, b in zip(grads_a, grads_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5 * a.abs().max().item() + 1e-8)
    assert math.isfinite(low_b) and low_b == pytest.approx(low_a, rel=0.02)
