"""iTPN: main-patch masking, pixel loss, MFM with its EMA teacher, resume, short runs, and the
pretrained backbone + neck downstream."""

import json

import pytest
import torch
from helpers import ITPN_TINY, loss_ends, losses

import mimar
from mimar.backbones.hivit import HiViT, HiViTConfig
from mimar.backbones.pyramid import PyramidBackbone
from mimar.backbones.vit import ViT, ViTConfig
from mimar.cli import main
from mimar.engine import checkpoint
from mimar.engine.optim import build_optimizer, param_groups
from mimar.methods.itpn import ITPN, ITPNConfig

RECIPE = "configs/itpn/hivit_tiny_fmnist.yaml"
TINY = ITPN_TINY  # helpers.py: 16 px, 16 main patches (4 kept), neck 16, decoder 32
BACKBONE = dict(
    img_size=16, patch_size=4, in_chans=1, embed_dim=32, mlp_depth=1, depth=2, num_heads=2
)
METHOD = dict(fpn_dim=16, decoder_dim=32, decoder_depth=1, decoder_num_heads=2)


def _itpn(**kw) -> ITPN:
    torch.manual_seed(0)
    return ITPN(ITPNConfig(**{**METHOD, **kw}), HiViT(HiViTConfig(**BACKBONE)))


def _images(b=4, seed=1):
    return torch.randn(b, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


def pretrain(run_dir, *extra, resume=False):
    argv = ["pretrain", RECIPE, *TINY, *extra, "--run-dir", str(run_dir)]
    return main(argv + (["--resume"] if resume else []))


# --- masking ---------------------------------------------------------------------------------


def test_corruption_keeps_a_quarter_of_the_main_patches_reproducibly():
    model = _itpn()
    keep = model.sample_corruption(500, torch.Generator().manual_seed(0))["keep_ids"]
    assert keep.shape == (500, 4) and keep.dtype == torch.long  # int(16 * 0.25)
    assert (keep.diff(dim=1) > 0).all()  # distinct ids, sorted
    counts = torch.bincount(keep.flatten(), minlength=16).float()
    assert counts.min() > 0.6 * counts.mean()  # every patch gets kept, roughly uniformly
    again = model.sample_corruption(500, torch.Generator().manual_seed(0))["keep_ids"]
    assert torch.equal(keep, again)
    big = ITPN(ITPNConfig(mfm=False), HiViT(HiViTConfig(depth=1, mlp_depth=0)))
    assert big.num_keep == 49  # int(196 * 0.25), docs/METHODS.md §4.1


# --- the pixel loss --------------------------------------------------------------------------


def test_pixel_loss_is_normalised_pixel_mse_over_dropped_patches():
    model = _itpn(mfm=False).eval()
    x = _images()
    keep = model.sample_corruption(4, torch.Generator().manual_seed(3))["keep_ids"]
    with torch.no_grad():
        out = model(x, keep_ids=keep)
        pred = model.pixel_head(model.decode(x, keep))  # (B, N, 16)
    total, count = 0.0, 0
    for b in range(4):
        for patch in range(16):
            if patch in keep[b].tolist():
                continue  # visible patches are not in the loss
            r, c = divmod(patch, 4)
            pixels = x[b, 0, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4].flatten()  # (row, col) order
            target = (pixels - pixels.mean()) / (pixels.var(unbiased=True) + 1e-6).sqrt()
            total += ((pred[b, patch] - target) ** 2).mean().item()
            count += 1
    assert count == 4 * 12
    assert out["loss"].item() == pytest.approx(total / count, rel=1e-5)
    assert set(out) == {"loss", "loss_pixel", "mask_ratio"}
    assert out["mask_ratio"].item() == 0.75


def test_mfm_adds_lambda_times_the_feature_loss_of_the_ema_pyramid():
    model = _itpn().eval()
    x = _images()
    keep = model.sample_corruption(4, torch.Generator().manual_seed(3))["keep_ids"]
    with torch.no_grad():
        out = model(x, keep_ids=keep)
        z = model.decode(x, keep)
        teacher = model.ema(x, return_pyramid=True)["pyramid"]  # full image: all 16 patches
    hidden = torch.ones(4, 16, dtype=torch.bool).scatter(1, keep, False)
    per_level = []
    for head, level, side in zip(model.mfm_heads, teacher, (4, 2, 1)):
        assert level.shape == (4, 16, side, side, 16)
        mean = level.mean(-1, keepdim=True)
        std = (level.var(-1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        target = ((level - mean) / std).flatten(2)  # LayerNorm without affine, per sub-token
        err = ((head(z) - target) ** 2).mean(-1)  # (B, N): mean over the s*s*F values
        per_level.append(err[hidden].mean())
    mfm = torch.stack(per_level).mean()
    torch.testing.assert_close(out["loss_mfm"], mfm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], out["loss_pixel"] + 0.3 * mfm, rtol=1e-5, atol=1e-6)


# --- the EMA teacher -------------------------------------------------------------------------


def test_ema_teacher_update_no_gradients_not_in_the_optimizer():
    model = _itpn(ema_momentum=0.9).train()
    assert all(not p.requires_grad for p in model.ema.parameters())
    assert not model.ema.training  # the teacher stays in eval mode
    for a, b in zip(model.ema.parameters(), model.backbone.parameters()):
        assert torch.equal(a, b)  # starts as a copy of backbone + neck
    names = [n for g in param_groups(model, 0.05) for n in g["names"]]
    assert names and not any(n.startswith("ema.") for n in names)
    assert any(n.startswith("backbone.neck.") for n in names)
    optimizer = build_optimizer(model, mimar.load_config(RECIPE).optim, lr=1e-2)
    old = [p.detach().clone() for p in model.ema.parameters()]
    model(_images(), **model.sample_corruption(4))["loss"].backward()
    assert all(p.grad is None for p in model.ema.parameters())
    optimizer.step()
    model.after_step(1)
    m = 0.9
    moved = 0
    for teacher, before, student in zip(model.ema.parameters(), old, model.backbone.parameters()):
        torch.testing.assert_close(teacher, m * before + (1 - m) * student, rtol=1e-6, atol=1e-7)
        moved += not torch.equal(teacher, before)
    assert moved > 0
    assert "ema.trunk.pos_embed" in model.state_dict()  # saved with every checkpoint


def test_mfm_off_has_no_teacher_and_starts_from_the_same_weights():
    with_mfm, without = _itpn(), _itpn(mfm=False)
    assert without.ema is None and without.mfm_heads is None
    without.after_step(1)  # a no-op
    state = with_mfm.state_dict()
    for name, value in without.state_dict().items():
        assert torch.equal(state[name], value), name


def test_itpn_needs_a_hivit():
    with pytest.raises(ValueError, match="backbone.name=hivit"):
        ITPN(
            ITPNConfig(**METHOD),
            ViT(ViTConfig(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)),
        )
    with pytest.raises(ValueError, match="decoder_dim"):
        ITPNConfig(decoder_dim=40)


# --- runs through the CLI --------------------------------------------------------------------


@pytest.mark.slow
def test_resume_restores_the_ema_teacher_exactly(tmp_path):
    # constant lr, so that a 4-step run resumed to 8 steps follows the 8-step run's schedule
    const = ["optim.warmup_steps=0", "optim.min_lr_ratio=1.0"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert pretrain(full, "train.steps=8", *const) == 0
    assert pretrain(cut, "train.steps=4", *const) == 0
    assert pretrain(cut, "train.steps=8", *const, resume=True) == 0
    assert losses(cut) == losses(full)  # exact equality on CPU, MFM loss included
    a = checkpoint.load(full / "checkpoints" / "last.pt")["model"]
    b = checkpoint.load(cut / "checkpoints" / "last.pt")["model"]
    ema = [k for k in a if k.startswith("ema.")]
    assert ema and all(torch.equal(a[k], b[k]) for k in a)
    # the teacher really moved away from its initial copy and lags behind the student
    first = checkpoint.load(cut / "checkpoints" / "step_0000005.pt")["model"]
    assert not torch.equal(
        first["ema.trunk.blocks.0.attn.qkv.weight"], a["ema.trunk.blocks.0.attn.qkv.weight"]
    )
    assert not torch.equal(
        a["ema.trunk.blocks.0.attn.qkv.weight"], a["backbone.trunk.blocks.0.attn.qkv.weight"]
    )


@pytest.mark.slow
@pytest.mark.parametrize("mfm", [True, False])
def test_thirty_steps_on_synthetic_data_lower_the_loss(tmp_path, mfm):
    # Whole images (no crop jitter), so that 30 tiny steps see a learnable pixel task: the
    # per-patch normalised pixel loss starts near 15/16 (= predicting 0) and falls ~4 %; the
    # MFM part falls much faster (measured over seeds 0-2: total x0.80-0.82 with MFM).
    run = tmp_path / "run"
    flags = ["data.batch_size=32", "optim.lr=3e-3", "data.scale=[1.0,1.0]", "data.hflip=0"]
    assert pretrain(run, "train.steps=30", f"method.mfm={str(mfm).lower()}", *flags) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for key, factor in (("loss", 0.9 if mfm else 0.98), ("loss_pixel", 0.98)):
        first = sum(r[key] for r in rows[:5]) / 5
        last = sum(r[key] for r in rows[-5:]) / 5
        assert last < factor * first, (key, first, last)
    assert ("loss_mfm" in rows[0]) == mfm
    assert (run / "reconstruction.png").exists()


@pytest.fixture(scope="module")
def itpn_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("itpn") / "run"
    assert pretrain(run, "train.steps=3") == 0
    return run


@pytest.mark.slow
def test_load_backbone_gives_the_backbone_with_its_pretrained_neck(itpn_run):
    backbone = mimar.load_backbone(itpn_run)
    assert isinstance(backbone, PyramidBackbone) and not backbone.training
    state = checkpoint.load(itpn_run / "checkpoints" / "last.pt")["model"]
    for name, value in backbone.state_dict().items():
        assert torch.equal(value, state[f"backbone.{name}"]), name
    assert any(k.startswith("neck.") for k in backbone.state_dict())
    x = _images(2)
    with torch.no_grad():
        tokens = backbone(x)["tokens"]
        maps = backbone.feature_maps(x)
    assert tokens.shape == (2, 16, 32) and backbone.num_prefix_tokens == 0
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "p1": (2, 16, 16, 16),
        "p2": (2, 16, 8, 8),
        "p4": (2, 16, 4, 4),
    }


@pytest.mark.parametrize("which", ["itpn", "simmim"])
def test_random_init_control_is_the_runs_initial_backbone(which):
    """``mimar eval --baselines`` builds only the backbone (iTPN: with its neck), no teacher;
    it must still be exactly the network the run started from."""
    import helpers

    from mimar.loading import random_init_backbone

    recipe, tiny = (RECIPE, TINY) if which == "itpn" else (helpers.DEMO, helpers.TINY)
    cfg = mimar.load_config(recipe, tiny)
    control = random_init_backbone(cfg)
    torch.manual_seed(cfg.train.seed)
    initial = mimar.build_method(cfg).backbone.state_dict()
    assert isinstance(control, PyramidBackbone) == (which == "itpn")
    assert control.state_dict().keys() == initial.keys()
    assert all(torch.equal(v, initial[k]) for k, v in control.state_dict().items())


@pytest.mark.slow
def test_eval_protocols_run_on_an_itpn_run(itpn_run):
    common = [
        "--checkpoint",
        str(itpn_run),
        "--max-train",
        "64",
        "--max-test",
        "32",
        "--epochs",
        "1",
    ]
    assert main(["eval", "knn", "linear", "--layer", "all", "--baselines", *common]) == 0
    # blocks 2 and 3 = the two attention blocks after 2 MLP blocks (return_layers indexes all)
    assert main(["eval", "attentive", "--blocks", "2,3", *common]) == 0
    for protocol in ("knn", "linear", "attentive"):
        assert (itpn_run / "eval" / f"{protocol}.json").exists()


# --- the CLIP variant ------------------------------------------------------------------------


class _FakeTeacher:
    """A fixed random projection of 4x4 pixel patches: (B, 16, 8) features per image."""

    dim, data_mean, data_std = 8, (0.5,), (0.25,)

    def __init__(self) -> None:
        self.proj = torch.randn(16, 8, generator=torch.Generator().manual_seed(5))

    def __call__(self, images):
        from mimar.targets import patchify

        return {"tokens": patchify(images, 4) @ self.proj, "ms": 0.0}


def _itpn_clip(**kw):
    from mimar.methods.itpn_clip import ITPNCLIP, ITPNCLIPConfig

    torch.manual_seed(0)
    backbone = HiViT(HiViTConfig(**BACKBONE, use_mask_token=True, init_values=0.1))
    cfg = ITPNCLIPConfig(fpn_dim=16, num_mask_patches=6, min_num_patches=4, **kw)
    return ITPNCLIP(cfg, backbone, _FakeTeacher())


def test_clip_variant_regresses_normalised_teacher_features_on_every_token():
    model = _itpn_clip().eval()
    x = _images()
    mask = model.sample_corruption(4, torch.Generator().manual_seed(0))["mask"]
    assert mask.shape == (4, 16) and 1 <= mask.sum(1).min() and mask.sum(1).max() <= 6
    assert model.aux_layer == 2 * 1 + int(0.75 * 2)  # HiViT counts its 2 MLP blocks first
    with torch.no_grad():
        out = model(x, mask=mask)
        pred, aux = model.predict(x, mask)
    feats = model.teacher(x)["tokens"]
    target = (feats - feats.mean(-1, keepdim=True)) / (
        feats.var(-1, unbiased=False, keepdim=True) + 1e-5
    ).sqrt()

    def smooth_l1(a, b):
        d = (a - b).abs()
        return torch.where(d < 1, 0.5 * d**2, d - 0.5).mean()  # beta 1, over B * N * D_t

    assert pred.shape == aux.shape == (4, 16, 8)
    torch.testing.assert_close(out["loss_main"], smooth_l1(pred, target), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], smooth_l1(pred, target) + smooth_l1(aux, target))
    # the teacher is not a submodule: not saved, not trained
    assert not any("teacher" in k for k in model.state_dict())
    # A hidden patch's pixels never reach stage 3 (the mask token replaces it there) but do
    # reach the pyramid through the neck's lateral links, as in the official code (§4.6).
    b, patch = 0, int(mask[0].nonzero()[0])
    moved = x.clone()
    r, c = divmod(patch, 4)
    moved[b, :, 4 * r : 4 * r + 4, 4 * c : 4 * c + 4] += 1.0
    with torch.no_grad():
        before = model.backbone(x, mask=mask, return_pyramid=True)
        after = model.backbone(moved, mask=mask, return_pyramid=True)
    assert torch.equal(before["tokens"], after["tokens"])
    assert not torch.equal(before["pyramid"][0][b, patch], after["pyramid"][0][b, patch])


def test_clip_variant_needs_a_mask_token():
    from mimar.methods.itpn_clip import ITPNCLIP, ITPNCLIPConfig

    with pytest.raises(ValueError, match="use_mask_token=true"):
        ITPNCLIP(ITPNCLIPConfig(fpn_dim=16), HiViT(HiViTConfig(**BACKBONE)), _FakeTeacher())


@pytest.mark.slow
def test_clip_variant_trains_with_a_mimar_teacher(itpn_run, tmp_path):
    run = tmp_path / "clip"
    argv = [
        "pretrain",
        "configs/itpn/hivit_tiny_clip_fmnist.yaml",
        *[o for o in TINY if not o.startswith("method.")],
        "method.fpn_dim=16",
        "method.num_mask_patches=6",
        "teacher.kind=mimar",
        f"teacher.path={itpn_run}",  # the pixel iTPN run: backbone + neck, final tokens
        "train.steps=20",
        "optim.lr=3e-3",
        "--run-dir",
        str(run),
    ]
    assert main(argv) == 0
    assert sorted(losses(run)) == list(range(1, 21))
    first, last = loss_ends(run, 5)
    assert last < first
    assert isinstance(mimar.load_backbone(run), PyramidBackbone)
    assert (run / "reconstruction.png").exists()
