"""``--format itpn`` / ``--format digpt``: the official pretraining state dicts (key names and
shapes of sunsmarterjie/iTPN @ 638eff48 ``itpn_pixel`` and OliverRensu/D-iGPT @ 765e8f52
``DiGPT_torch``, written here from those files at a tiny size) saved as their ``save_model``
saves them -> ``mimar import`` -> the run holds exactly those tensors; export gives back the
same content; ``--format auto`` names the layout."""

import argparse
import math

import torch
import torch.nn.functional as F

from mimar.cli import main
from mimar.engine import checkpoint
from mimar.errors import CheckpointError
from mimar.formats.importing import import_release
from mimar.formats.reading import read_release


def rand(g: torch.Generator):
    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    return r


def mae_sincos(dim: int, grid: int, cls_token: bool) -> torch.Tensor:
    """MAE's ``get_2d_sincos_pos_embed`` (``util/pos_embed.py``), transcribed: the first half
    of the channels encodes the column (``meshgrid(grid_w, grid_h)``), the second the row; per
    half ``[sin(pos * w), cos(pos * w)]`` with ``w_k = 1 / 10000^(k / (dim / 4))``."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")

    def half(pos):
        out = pos.flatten().double()[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    table = torch.cat([half(cols), half(rows)], dim=1).float()
    if cls_token:
        table = torch.cat([torch.zeros(1, dim), table])
    return table[None]


def mlp(r, prefix: str, dim: int, ratio: float, norm: str = "norm2") -> dict:
    hidden = int(dim * ratio)
    return {
        f"{prefix}{norm}.weight": 1 + r(dim),
        f"{prefix}{norm}.bias": r(dim),
        f"{prefix}mlp.fc1.weight": r(hidden, dim),
        f"{prefix}mlp.fc1.bias": r(hidden),
        f"{prefix}mlp.fc2.weight": r(dim, hidden),
        f"{prefix}mlp.fc2.bias": r(dim),
    }


def attention_block(r, prefix: str, dim: int) -> dict:
    return {
        f"{prefix}norm1.weight": 1 + r(dim),
        f"{prefix}norm1.bias": r(dim),
        f"{prefix}attn.qkv.weight": r(3 * dim, dim),
        f"{prefix}attn.qkv.bias": r(3 * dim),
        f"{prefix}attn.proj.weight": r(dim, dim),
        f"{prefix}attn.proj.bias": r(dim),
    } | mlp(r, prefix, dim, 4.0)


# iTPN: HiViT width 32 (stages 8 / 16 / 32), 1 MLP block per early stage, 2 attention blocks,
# main patch 16 at 32 px (2 x 2 patches), FPN width 16 and depth 1, decoder 32 x 1
IT_D, IT_M, IT_DEPTH, IT_F, IT_DEC, IT_IMG = 32, 1, 2, 16, 32, 32
IT_N = (IT_IMG // 16) ** 2


def official_itpn() -> dict:
    """``iTPNMaskedAutoencoder(num_outs=3, rpe=False)``'s state dict (models_itpn_mim.py)."""
    r = rand(torch.Generator().manual_seed(0))
    c1, c2, D, F_ = IT_D // 4, IT_D // 2, IT_D, IT_F
    sd = {
        "patch_embed.proj.weight": r(c1, 3, 4, 4),
        "patch_embed.proj.bias": r(c1),
        "patch_embed.norm.weight": 1 + r(c1),
        "patch_embed.norm.bias": r(c1),
        "absolute_pos_embed": r(1, IT_N, D),
    }
    k = 0
    for dim in (c1, c2):  # flat blocks list: MLP blocks, PatchMerge, MLP blocks, PatchMerge
        for _ in range(IT_M):
            sd |= mlp(r, f"blocks.{k}.", dim, 3.0)
            k += 1
        sd |= {
            f"blocks.{k}.norm.weight": 1 + r(4 * dim),
            f"blocks.{k}.norm.bias": r(4 * dim),
            f"blocks.{k}.reduction.weight": r(2 * dim, 4 * dim),
        }
        k += 1
    for _ in range(IT_DEPTH):
        sd |= attention_block(r, f"blocks.{k}.", D)
        k += 1
    sd |= {"align_dim_16tofpn.weight": r(F_, D), "align_dim_16tofpn.bias": r(F_)}
    for level in range(3):
        sd |= mlp(r, f"fpn_modules.{level}.", F_, 4.0)
    sd |= {"align_dim_16to8.weight": r(F_, c2)}
    sd |= {"split_16to8.norm.weight": 1 + r(D), "split_16to8.norm.bias": r(D)}
    sd |= {"split_16to8.reduction.weight": r(4 * F_, D)}
    sd |= mlp(r, "block_16to8.0.", F_, 4.0)
    sd |= {"align_dim_8to4.weight": r(F_, c1)}
    sd |= {"split_8to4.norm.weight": 1 + r(F_), "split_8to4.norm.bias": r(F_)}
    sd |= {"split_8to4.reduction.weight": r(4 * F_, F_)}
    sd |= mlp(r, "block_8to4.0.", F_, 4.0)
    for level, width in enumerate((IT_DEC, IT_DEC // 4, IT_DEC // 16)):  # P16, P8, P4
        p = f"decoder_embed.{level}."
        sd |= {p + "0.weight": 1 + r(F_), p + "0.bias": r(F_)}
        sd |= {p + "1.weight": r(width, F_), p + "1.bias": r(width)}
    sd |= {"mask_token": r(1, 1, IT_DEC), "decoder_pos_embed": mae_sincos(IT_DEC, 2, False)}
    sd |= attention_block(r, "decoder_blocks.0.", IT_DEC)
    sd |= {"decoder_norm.weight": 1 + r(IT_DEC), "decoder_norm.bias": r(IT_DEC)}
    sd |= {"decoder_pred.weight": r(16 * 16 * 3, IT_DEC), "decoder_pred.bias": r(16 * 16 * 3)}
    return sd


def save_like_official(sd: dict, path) -> None:
    """``util/misc.py save_model`` of both repositories."""
    args = argparse.Namespace(model="tiny", mask_ratio=0.75)
    torch.save({"model": sd, "optimizer": {}, "epoch": 1599, "args": args}, path)


def run_weights(run) -> dict:
    return checkpoint.load(run / "checkpoints" / "last.pt")["model"]


def assert_exact(report: dict, got: dict, sd: dict) -> None:
    for key, value in sd.items():
        if key in report["ignored"]:
            continue
        assert torch.equal(got[report["keys"][key]], value), key


def test_itpn_release_imports_backbone_neck_decoder_and_exports_back(tmp_path, capsys):
    sd = official_itpn()
    release = tmp_path / "itpn_base_1600e.pt"
    save_like_official(sd, release)
    overrides = ["backbone.num_heads=2", "method.decoder_num_heads=2"]
    report = import_release(release, tmp_path / "run", overrides=overrides)  # --format auto
    assert report["format"] == "itpn" and report["detected"] and report["method"] == "itpn"
    assert report["imported_parts"] == ["backbone", "decoder", "pixel_head"]
    assert set(report["ignored"]) == {"decoder_pos_embed", "optimizer", "epoch", "args"}
    # MFM was never released: its heads start fresh, its EMA teacher is the imported student
    assert report["fresh"] and all(k.startswith("mfm_heads.") for k in report["fresh"])
    got = run_weights(tmp_path / "run")
    assert_exact(report, got, sd)
    assert report["keys"]["blocks.4.attn.qkv.weight"] == "backbone.trunk.blocks.0.attn.qkv.weight"
    assert report["keys"]["blocks.3.reduction.weight"] == "backbone.trunk.merge2.reduction.weight"
    assert report["keys"]["decoder_embed.2.1.weight"] == "decoder.embed.levels.0.1.weight"
    for key in [k for k in got if k.startswith("ema.")]:
        assert torch.equal(got[key], got["backbone." + key[4:]]), key
    # the architecture came from the weights: no final norm, FPN and decoder shapes
    from mimar.loading import load_run

    cfg, _ = load_run(tmp_path / "run")
    assert (cfg.backbone.embed_dim, cfg.backbone.mlp_depth, cfg.backbone.depth) == (32, 1, 2)
    assert not cfg.backbone.final_norm and cfg.backbone.img_size == IT_IMG
    assert (cfg.method.fpn_dim, cfg.method.fpn_depth, cfg.method.decoder_dim) == (16, 1, 32)
    back = tmp_path / "back.pt"
    args = ["export", "--checkpoint", str(tmp_path / "run"), "--format", "itpn", "--out", str(back)]
    assert main(args) == 0
    exported = read_release(back)[0]["model"]
    assert exported.keys() == sd.keys()
    for key, value in sd.items():
        assert torch.allclose(exported[key], value, atol=1e-6), key  # pos table: recomputed
        if key != "decoder_pos_embed":
            assert torch.equal(exported[key], value), key
    assert_same_run(back, tmp_path, overrides)


def assert_same_run(back, tmp_path, overrides) -> None:
    """import(export(run)) holds the run's weights (``--format auto`` again)."""
    import_release(back, tmp_path / "again", overrides=overrides)
    first, again = run_weights(tmp_path / "run"), run_weights(tmp_path / "again")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_itpn_import_keeps_the_official_level_order(tmp_path):
    """P16 of the imported neck is the official ``fpn_modules[0](align_dim_16tofpn(s))`` on the
    raw stage-3 tokens (the official lists levels coarsest first, mimar finest first)."""
    from mimar.factory import build_method
    from mimar.loading import load_run

    sd = official_itpn()
    release = tmp_path / "itpn.pth"
    save_like_official(sd, release)
    overrides = ["backbone.num_heads=2", "method.decoder_num_heads=2"]
    import_release(release, tmp_path / "run", fmt="itpn", overrides=overrides)
    cfg, state = load_run(tmp_path / "run")
    method = build_method(cfg)
    method.load_state_dict(state["model"])
    images = torch.randn(2, 3, IT_IMG, IT_IMG, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = method.backbone(images, return_pyramid=True)
    s = out["tokens"]  # (B, N, D): no final norm, as the official pixel encoder
    h = F.linear(s, sd["align_dim_16tofpn.weight"], sd["align_dim_16tofpn.bias"])
    p = "fpn_modules.0."
    x = F.layer_norm(h, (IT_F,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
    x = F.linear(F.gelu(F.linear(x, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                 sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])  # fmt: skip
    assert torch.allclose(out["pyramid"][2][:, :, 0, 0], h + x, atol=1e-5)


def test_itpn_clip_checkpoint_is_refused_naming_its_keys(tmp_path):
    sd = official_itpn() | {"lm_head.weight": torch.zeros(4, IT_D)}
    release = tmp_path / "itpn_clip.pt"
    save_like_official(sd, release)
    try:
        import_release(release, tmp_path / "run", overrides=["backbone.num_heads=2"])
    except CheckpointError as err:
        assert "lm_head.weight" in str(err) and "itpn" in str(err)
    else:
        raise AssertionError("an unknown key was imported silently")


# D-iGPT: ViT width 32, depth 4 (memory after blocks 2, 3, 4: the code's 6/8/10/12 spread),
# patch 4 at 16 px (4 x 4 patches, 2 x 2 clusters), decoders 32 x 1, teacher width 20
DG_D, DG_DEPTH, DG_PATCH, DG_IMG, DG_DEC, DG_T, DG_MEM = 32, 4, 4, 16, 32, 20, 3
DG_N = (DG_IMG // DG_PATCH) ** 2


def official_digpt() -> dict:
    """``DiGPT``'s state dict (models_digpt.py, vit.py), ``mask`` buffer included."""
    r = rand(torch.Generator().manual_seed(2))
    D, Dd = DG_D, DG_DEC
    sd = {
        "pos_embed": mae_sincos(D, DG_IMG // DG_PATCH, True),
        "patch_embed.proj.weight": r(D, 3, DG_PATCH, DG_PATCH),
        "patch_embed.proj.bias": r(D),
    }
    for i in range(DG_DEPTH):
        sd |= attention_block(r, f"blocks.{i}.", D)
    sd |= {"cls_token": r(1, 1, D)}
    for x in ("ar", "kd"):
        norm_w, norm_b = 1 + r(D), r(D)
        for layer in range(DG_MEM):  # [nn.LayerNorm(D)] * 4: one module, saved per index
            sd |= {f"{x}_enc_norm.{layer}.weight": norm_w, f"{x}_enc_norm.{layer}.bias": norm_b}
        sd |= {f"{x}_enc2dec.weight": r(Dd, DG_MEM * D), f"{x}_enc2dec.bias": r(Dd)}
    sd |= {"decoder_pos_embed": mae_sincos(Dd, DG_IMG // DG_PATCH, True)}
    sd |= {"mask": torch.zeros(3 * (DG_N // 4) + 1, 3 * (DG_N // 4) + 1)}
    for x in ("kd", "ar"):
        b = f"{x}_blocks.0."
        sd |= {b + "norm1.weight": 1 + r(Dd), b + "norm1.bias": r(Dd)}
        sd |= {b + "attn1.qkv.weight": r(3 * Dd, Dd), b + "attn1.qkv.bias": r(3 * Dd)}
        sd |= {b + "attn1.proj.weight": r(Dd, Dd), b + "attn1.proj.bias": r(Dd)}
        sd |= {b + "attn2.q.weight": r(Dd, Dd), b + "attn2.q.bias": r(Dd)}
        sd |= {b + "attn2.kv.weight": r(2 * Dd, Dd), b + "attn2.kv.bias": r(2 * Dd)}
        sd |= {b + "attn2.proj.weight": r(Dd, Dd), b + "attn2.proj.bias": r(Dd)}
        sd |= {b + "norm2_1.weight": 1 + r(Dd), b + "norm2_1.bias": r(Dd)}
        sd |= {b + "norm2_2.weight": 1 + r(Dd), b + "norm2_2.bias": r(Dd)}
        sd |= mlp(r, b, Dd, 4.0)
    for x in ("ar", "kd"):
        sd |= {f"{x}_token": r(1, 1, Dd)}
        sd |= {f"{x}_norm.weight": 1 + r(Dd), f"{x}_norm.bias": r(Dd)}
        sd |= {f"{x}_pred.weight": r(DG_T, Dd), f"{x}_pred.bias": r(DG_T)}
    return sd


def test_digpt_release_imports_encoder_and_both_decoders_and_exports_back(tmp_path):
    sd = official_digpt()
    release = tmp_path / "digpt_base.pth"
    save_like_official(sd, release)
    overrides = ["backbone.num_heads=2", "method.decoder_heads=2"]
    report = import_release(release, tmp_path / "run", overrides=overrides)  # --format auto
    assert report["format"] == "digpt" and report["detected"] and report["method"] == "digpt"
    assert report["imported_parts"] == ["backbone", "dis_decoder", "gen_decoder"]
    assert report["fresh"] == []
    assert report["ignored"]["ar_enc_norm.2.weight"] == "the same module as ar_enc_norm.0"
    got = run_weights(tmp_path / "run")
    assert_exact(report, got, sd)
    assert report["keys"]["ar_token"] == "gen_decoder.query_token"
    assert report["keys"]["kd_blocks.0.norm2_2.weight"] == "dis_decoder.blocks.0.norm2_kv.weight"
    from mimar.loading import load_run

    cfg, _ = load_run(tmp_path / "run")
    assert not cfg.backbone.final_norm and cfg.backbone.class_token
    assert tuple(cfg.method.memory_layers) == (2, 3, 4) and cfg.method.decoder_dim == DG_DEC
    back = tmp_path / "back.pth"
    args = ["export", "--checkpoint", str(tmp_path / "run"), "--format", "digpt"]
    assert main([*args, "--out", str(back)]) == 0
    exported = read_release(back)[0]["model"]
    assert exported.keys() == sd.keys() - {"mask"}  # the geometry-bound mask buffer: no
    for key in exported:
        assert torch.allclose(exported[key], sd[key], atol=1e-6), key
        if key != "decoder_pos_embed":
            assert torch.equal(exported[key], sd[key]), key
    assert_same_run(back, tmp_path, overrides)


def test_digpt_repeated_memory_norms_must_be_one_module(tmp_path):
    sd = official_digpt()
    sd["kd_enc_norm.1.bias"] = sd["kd_enc_norm.1.bias"] + 1
    release = tmp_path / "digpt.pth"
    save_like_official(sd, release)
    try:
        import_release(release, tmp_path / "run", fmt="digpt", overrides=["backbone.num_heads=2"])
    except CheckpointError as err:
        assert "kd_enc_norm.1.bias" in str(err)
    else:
        raise AssertionError("differing copies of the repeated LayerNorm were accepted")


def test_the_cli_names_itpn_and_digpt(tmp_path, capsys):
    sd = official_digpt()
    release = tmp_path / "digpt_base.pth"
    save_like_official(sd, release)
    args = ["import", str(release), "--format", "digpt", "--out", str(tmp_path / "run")]
    assert main([*args, "backbone.num_heads=2", "method.decoder_heads=2"]) == 0
    assert math.isfinite(run_weights(tmp_path / "run")["gen_decoder.head.weight"].sum().item())


def test_resume_of_an_imported_run_says_it_is_a_starting_point(tmp_path, capsys):
    from helpers import DEMO, TINY

    src = tmp_path / "src"
    assert main(["pretrain", DEMO, *TINY, "train.steps=1", "--run-dir", str(src)]) == 0
    release = tmp_path / "official.pth"
    args = ["export", "--checkpoint", str(src), "--format", "simmim-vit", "--out", str(release)]
    assert main(args) == 0
    imported = tmp_path / "imp"
    data = [o for o in TINY if o.startswith("data.") and "img_size" not in o]
    import_release(release, imported, overrides=["backbone.num_heads=2", *data])
    capsys.readouterr()
    args = ["pretrain", str(imported / "config.yaml"), "--run-dir", str(imported), "--resume"]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "imported release" in err and f"train.init={imported}" in err
    assert "missing keys" not in err


def test_a_trained_decoder_pos_embed_is_refused_not_dropped(tmp_path):
    """The fixed sin-cos decoder table is recomputed, not imported: one that is not that
    table (trained, or another layout) would be lost silently, so it is refused."""
    for fmt, sd in (("itpn", official_itpn()), ("digpt", official_digpt())):
        sd["decoder_pos_embed"] = sd["decoder_pos_embed"] + 0.01
        release = tmp_path / f"{fmt}.pth"
        save_like_official(sd, release)
        try:
            import_release(release, tmp_path / fmt, fmt=fmt, overrides=["backbone.num_heads=2"])
        except CheckpointError as err:
            assert "decoder_pos_embed" in str(err) and "sin-cos" in str(err)
        else:
            raise AssertionError(f"{fmt}: a changed decoder_pos_embed was dropped silently")


# train.init from an imported release (as the SimMIM test in test_formats.py): a tiny run
# continued from it starts from exactly its weights, so its first logged loss is the imported
# model's loss on the first batch, with the run's own draws (kept patches or cluster order
# from the "method" stream, network draws under step_draws of the "network" seed)
RUN = [
    "data.name=synthetic",
    "data.synthetic_size=8",
    "data.batch_size=4",
    "data.num_workers=0",
    "train.precision=fp32",
    "train.progress=false",
    "train.threads=1",
    "train.monitor_every=0",
    "train.log_every=1",
    "train.checkpoint_every=5",
    "train.steps=1",
    "optim.warmup_steps=1",
    "train.seed=3",
]


def first_loss_of_imported(imported, overrides: list[str]) -> float:
    from mimar.config import load_config
    from mimar.data import build_train_loader
    from mimar.factory import build_method
    from mimar.nn.layers import step_draws

    cfg = load_config(str(imported / "config.yaml"), overrides)
    torch.manual_seed(0)  # fresh parts (none after the import) must not matter: all loaded
    method = build_method(cfg)
    method.load_state_dict(run_weights(imported))  # strict: every weight is the import's
    loader = build_train_loader(cfg.data, seed=cfg.train.seed, rank=0, world_size=1)
    corruption = method.sample_corruption(cfg.data.batch_size, loader.generator_for(0))
    method.train()
    with torch.no_grad(), step_draws(loader.generator_for(0, "network").initial_seed()):
        return method(**loader.inputs(0), **corruption)["loss"].item()


def continue_from(imported, tmp_path, overrides: list[str]) -> float:
    from helpers import losses

    out = tmp_path / "continued"
    args = ["pretrain", str(imported / "config.yaml"), *overrides, f"train.init={imported}"]
    assert main([*args, "--run-dir", str(out)]) == 0
    return losses(out)[1]


def test_itpn_train_init_starts_from_the_imported_release(tmp_path):
    """Pixel loss and MFM (its heads fresh at import, its EMA teacher the imported student):
    the continued run's first loss is the imported method's."""
    release = tmp_path / "itpn_base_1600e.pt"
    save_like_official(official_itpn(), release)
    shape = ["backbone.num_heads=2", "method.decoder_num_heads=2"]
    import_release(release, tmp_path / "imp", overrides=shape)
    overrides = [*RUN, "data.img_size=32", "data.in_chans=3"]
    want = first_loss_of_imported(tmp_path / "imp", overrides)
    assert abs(continue_from(tmp_path / "imp", tmp_path, overrides) - want) < 1e-6


def tiny_teacher(path) -> str:
    """A frozen mimar ViT of D-iGPT's target width (``DG_T``), exported as a file: the
    ``teacher.*`` of the continued run (a release never holds the teacher)."""
    from mimar.backbones import build_backbone
    from mimar.config import section_from_dict
    from mimar.export import export_timm

    torch.manual_seed(5)
    shape = dict(img_size=DG_IMG, patch_size=DG_PATCH, embed_dim=DG_T, depth=1, num_heads=2)
    backbone = build_backbone(section_from_dict("backbone", {"name": "vit", **shape}))
    return str(export_timm(backbone, path)[0])


def test_digpt_train_init_starts_from_the_imported_release(tmp_path):
    """Both decoders imported; the teacher is what teacher.* says (a fixed tiny mimar ViT)."""
    release = tmp_path / "digpt_base.pth"
    save_like_official(official_digpt(), release)
    shape = ["backbone.num_heads=2", "method.decoder_heads=2"]
    import_release(release, tmp_path / "imp", overrides=shape)
    teacher = tiny_teacher(tmp_path / "teacher.safetensors")
    overrides = [*RUN, f"data.img_size={DG_IMG}", "data.in_chans=3", "teacher.kind=mimar"]
    overrides += [f"teacher.path={teacher}", "teacher.precision=inherit", "teacher.img_size=0"]
    want = first_loss_of_imported(tmp_path / "imp", overrides)
    assert abs(continue_from(tmp_path / "imp", tmp_path, overrides) - want) < 1e-6


def test_itpn_export_of_a_run_with_a_final_norm_says_what_to_do(tmp_path):
    """The official pretraining HiViT has no final norm: a run that has one cannot be written
    as an official file; the one line names the override that makes an exportable run."""
    from mimar.formats import get_format

    release = tmp_path / "itpn.pt"
    save_like_official(official_itpn(), release)
    import_release(release, tmp_path / "run", overrides=["backbone.num_heads=2"])
    weights = run_weights(tmp_path / "run")
    weights |= {"backbone.trunk.norm.weight": torch.ones(IT_D)}
    fields = {"final_norm": True, "mlp_depth": IT_M, "img_size": IT_IMG, "patch_size": 16}
    try:
        get_format("itpn").export(weights, fields)
    except CheckpointError as err:
        assert "backbone.final_norm=false" in str(err) and "\n" not in str(err)
    else:
        raise AssertionError("a run with a final norm was exported as the official model")
