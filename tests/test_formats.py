"""Released checkpoints in and out (mimar.formats): every format's official key names and
shapes at a tiny size -> ``mimar import`` -> the run holds exactly those tensors; export
gives them back; ``--format auto`` names the layout; foreign pickles are read safely."""

import json
import os
import pickle
import signal
import sys
import types

import pytest
import torch
from helpers import DEMO, TINY, losses
from safetensors.torch import load_file, save_file

import mimar
from mimar.cli import main
from mimar.engine import checkpoint
from mimar.engine.logger import MetricsLog
from mimar.errors import CheckpointError
from mimar.formats.importing import import_release
from mimar.formats.reading import read_release
from mimar.loading import load_run

D, HEADS, DEPTH, PATCH, GRID, CHANS = 32, 2, 2, 4, 4, 3
IMG = PATCH * GRID


def beit_index(grid: int) -> torch.Tensor:
    """BEiT's / SimMIM's relative_position_index, transcribed from the official
    ``RelativePositionBias.__init__`` (models/vision_transformer.py @ d3e29bca)."""
    coords = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij"))
    flat = coords.flatten(1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0)
    rel[:, :, 0] += grid - 1
    rel[:, :, 1] += grid - 1
    rel[:, :, 0] *= 2 * grid - 1
    n = (2 * grid - 1) ** 2 + 3
    index = torch.zeros(grid * grid + 1, grid * grid + 1, dtype=torch.long)
    index[1:, 1:] = rel.sum(-1)
    index[0, 0:], index[0:, 0], index[0, 0] = n - 3, n - 2, n - 1
    return index


def official_simmim_vit(shared: bool = True, ape: bool = False, ls: bool = True) -> dict:
    """``SimMIM(VisionTransformerForSimMIM)``'s state dict at a tiny size, random values."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    table = ((2 * GRID - 1) ** 2 + 3, HEADS)
    sd = {
        "encoder.cls_token": r(1, 1, D),
        "encoder.mask_token": r(1, 1, D),
        "encoder.patch_embed.proj.weight": r(D, CHANS, PATCH, PATCH),
        "encoder.patch_embed.proj.bias": r(D),
    }
    if ape:
        sd["encoder.pos_embed"] = r(1, GRID * GRID + 1, D)
    if shared:
        sd["encoder.rel_pos_bias.relative_position_bias_table"] = r(*table)
        sd["encoder.rel_pos_bias.relative_position_index"] = beit_index(GRID)
    for i in range(DEPTH):
        b = f"encoder.blocks.{i}."
        if ls:
            sd[b + "gamma_1"], sd[b + "gamma_2"] = r(D), r(D)
        sd |= {b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D)}
        sd |= {b + "attn.q_bias": r(D), b + "attn.v_bias": r(D), b + "attn.qkv.weight": r(3 * D, D)}
        if not shared:
            sd[b + "attn.relative_position_bias_table"] = r(*table)
            sd[b + "attn.relative_position_index"] = beit_index(GRID)
        sd |= {b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D)}
        sd |= {b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D)}
        sd |= {b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc1.bias": r(4 * D)}
        sd |= {b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D)}
    sd |= {"encoder.norm.weight": 1 + r(D), "encoder.norm.bias": r(D)}
    sd |= {"decoder.0.weight": r(PATCH**2 * 3, D, 1, 1), "decoder.0.bias": r(PATCH**2 * 3)}
    return sd


def save_like_simmim(sd: dict, path) -> None:
    """As ``utils.save_checkpoint``: the model beside optimizer state and a yacs CfgNode."""
    cfg_node = type("CfgNode", (dict,), {"__module__": "yacs.config"})
    yacs, yacs_config = types.ModuleType("yacs"), types.ModuleType("yacs.config")
    yacs.config, yacs_config.CfgNode = yacs_config, cfg_node
    sys.modules |= {"yacs": yacs, "yacs.config": yacs_config}  # yacs is not installed here
    try:
        config = cfg_node(MODEL=cfg_node(TYPE="vit"), DATA=cfg_node(MASK_PATCH_SIZE=32))
        optimizer = {"state": {0: {"exp_avg": torch.zeros(3)}}, "param_groups": []}
        torch.save(
            {"model": sd, "optimizer": optimizer, "lr_scheduler": {}, "max_accuracy": 0.0,
             "epoch": 799, "config": config},
            path,
        )  # fmt: skip
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]


def run_weights(run) -> dict:
    return checkpoint.load(run / "checkpoints" / "last.pt")["model"]


@pytest.mark.parametrize(
    "kind", [dict(shared=True, ls=True), dict(shared=False, ape=True, ls=False)]
)
def test_simmim_vit_release_imports_exactly_and_exports_back(tmp_path, kind, capsys):
    sd = official_simmim_vit(**kind)
    release = tmp_path / "simmim_pretrain__vit_base__img224__800ep.pth"
    save_like_simmim(sd, release)
    run = tmp_path / "run"
    assert main(["import", str(release), "--out", str(run), "backbone.num_heads=2"]) == 0
    report = json.loads((run / "import.json").read_text())
    assert report["format"] == "simmim-vit" and report["detected"]
    assert report["imported_parts"] == ["backbone", "head"] and report["fresh"] == []
    assert "optimizer" in report["ignored"] and "config" in report["ignored"]
    got = run_weights(run)
    for key, value in sd.items():
        if key.endswith("relative_position_index"):
            continue
        name = report["keys"][key]
        if name.endswith("[q]"):
            assert torch.equal(got[name[:-3]][:D], value), key
        elif name.endswith("[v]"):
            assert torch.equal(got[name[:-3]][2 * D :], value), key
        else:
            assert torch.equal(got[name], value), key
    assert isinstance(load_run(run)[0], mimar.PretrainConfig)  # a full config of the method
    back = tmp_path / "back.pth"
    assert (
        main(["export", "--checkpoint", str(run), "--format", "simmim-vit", "--out", str(back)])
        == 0
    )
    exported = read_release(back)[0]["model"]
    assert exported.keys() == sd.keys()
    for key, value in sd.items():
        assert torch.equal(exported[key], value), key


def test_simmim_vit_tokens_equal_timm_beit(tmp_path):
    """SimMIM's ViT is BEiT's code: the same weights in timm's Beit give the same tokens."""
    import timm

    sd = official_simmim_vit(shared=True, ls=True)
    release = tmp_path / "r.pth"
    torch.save({"model": sd}, release)
    import_release(release, tmp_path / "run", overrides=["backbone.num_heads=2"])
    beit = timm.create_model(
        "beit_base_patch16_224", pretrained=False, num_classes=0, img_size=IMG, patch_size=PATCH,
        embed_dim=D, depth=DEPTH, num_heads=HEADS, use_abs_pos_emb=False, use_rel_pos_bias=False,
        use_shared_rel_pos_bias=True, init_values=0.1, global_pool="token", use_fc_norm=False,
    ).eval()  # fmt: skip
    encoder = {k.removeprefix("encoder."): v for k, v in sd.items() if k.startswith("encoder.")}
    encoder.pop("mask_token")
    encoder.pop("rel_pos_bias.relative_position_index")  # timm's buffer is not saved
    beit.load_state_dict(encoder, strict=True)
    x = torch.randn(2, CHANS, IMG, IMG)
    with torch.no_grad():
        want = beit.forward_features(x)
        got = mimar.load_backbone(tmp_path / "run")(x)["tokens"]
    assert (got - want).abs().max() < 1e-5


def test_demo_run_round_trips_through_simmim_vit_and_auto_detects(tmp_path, caplog):
    run = tmp_path / "run"
    assert main(["pretrain", DEMO, *TINY, "train.steps=2", "--run-dir", str(run)]) == 0
    out = tmp_path / "official.pth"
    assert (
        main(["export", "--checkpoint", str(run), "--format", "simmim-vit", "--out", str(out)]) == 0
    )
    with caplog.at_level("INFO", logger="mimar"):
        assert (
            main(["import", str(out), "--out", str(tmp_path / "imp"), "backbone.num_heads=2"]) == 0
        )
    assert "format: simmim-vit (detected)" in caplog.text
    a, b = run_weights(run), run_weights(tmp_path / "imp")
    assert a.keys() == b.keys()
    for key in a:
        if not key.endswith("qkv.bias"):
            assert torch.equal(a[key], b[key]), key
        else:  # the k bias is not in SimMIM's layout (softmax-invariant): zero after import
            assert torch.equal(a[key][:32], b[key][:32]) and not b[key][32:64].any()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        want = mimar.load_backbone(run)(x)["tokens"]
        got = mimar.load_backbone(tmp_path / "imp")(x)["tokens"]
    assert (got - want).abs().max() < 1e-5


def _timm_models():
    small = dict(img_size=IMG, patch_size=PATCH, embed_dim=D, depth=DEPTH, num_heads=HEADS)
    return {
        "vit-cls": ("vit_base_patch16_224", small),
        "vit-avg": ("vit_base_patch16_224", small | dict(class_token=False, global_pool="avg")),
        "vit-ls": ("vit_base_patch16_224", small | dict(init_values=0.1, qkv_bias=False)),
        "beit": ("beit_base_patch16_224", small | dict(init_values=0.1)),
        "eva01": ("eva_giant_patch14_224", small | dict(mlp_ratio=4.0)),
    }


@pytest.mark.parametrize("kind", list(_timm_models()))
def test_timm_models_import_with_equal_tokens(tmp_path, kind):
    import timm

    name, kwargs = _timm_models()[kind]
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5, **kwargs).eval()
    with torch.no_grad():  # non-trivial values everywhere (biases, LayerScale, tables)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / f"{kind}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    report = import_release(path, tmp_path / "run", overrides=[f"backbone.num_heads={HEADS}"])
    assert report["format"] == "timm"
    assert "head.weight" in report["ignored"]
    x = torch.randn(2, CHANS, IMG, IMG)
    with torch.no_grad():
        want = model.forward_features(x)
        got = mimar.load_backbone(tmp_path / "run")(x)["tokens"]
    assert (got - want).abs().max() < 1e-5


@pytest.mark.parametrize(
    "name,why,kwargs",
    [
        ("eva02_tiny_patch14_224", "rotary", {}),
        ("swin_tiny_patch4_window7_224", "absolute position", {}),  # timm < 0.9's ape=True
    ],
)
def test_timm_variants_mimar_cannot_hold_are_refused_in_one_line(tmp_path, name, why, kwargs):
    import timm

    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if "swin" in name:  # timm 1.0 cannot build it any more: the key old timm saved
        sd["absolute_pos_embed"] = torch.zeros(1, 56 * 56, 96)
    path = tmp_path / "m.safetensors"
    save_file(sd, str(path))
    with pytest.raises(CheckpointError, match=why):
        import_release(path, tmp_path / "run", fmt="timm")


def _old_timm_swin(model) -> dict:
    """timm < 0.9's (and Microsoft's) layout of a timm 1.0 Swin's weights: the patch merging
    closing stage s (not opening s + 1), ``head.*`` for ``head.fc.*``, and the index buffers
    saved (they were persistent there)."""
    import re

    merging = re.compile(r"^layers\.(\d+)\.downsample\.")
    sd = {
        merging.sub(lambda m: f"layers.{int(m[1]) - 1}.downsample.", k): v
        for k, v in model.state_dict().items()
    }
    sd = {k.replace("head.fc.", "head."): v for k, v in sd.items()}
    buffers = {k: v for k, v in model.named_buffers() if k.endswith(("index", "attn_mask"))}
    assert any(k.endswith("attn_mask") for k in buffers)  # the test holds a shifted window
    return sd | buffers


# timm: 56 px, patch 4, window 7 -> grids 14, 7 (one window at the end); old: 32 px, patch 2,
# window 8 -> grids 16, 8, 4 (shifted windows in stage 0; the last stage's window shrunk to 4)
SWINS = {
    "timm": dict(img_size=56, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4),
                 window_size=7),
    "old": dict(img_size=32, patch_size=2, embed_dim=8, depths=(2, 1, 1), num_heads=(2, 2, 4),
                window_size=8),
}  # fmt: skip


@pytest.mark.parametrize("layout", list(SWINS))
def test_timm_swin_imports_with_equal_tokens_and_exports_back(tmp_path, layout):
    """timm >= 0.9's Swin as ``.safetensors`` (--format timm) and timm < 0.9's layout as a
    ``.pth`` (--format auto); neither says the image size, which the windows imply."""
    import timm

    from mimar.export import create_timm_model

    torch.manual_seed(0)
    shape = SWINS[layout]
    model = timm.create_model(
        "swin_tiny_patch4_window7_224", pretrained=False, num_classes=5, **shape
    ).eval()
    with torch.no_grad():  # non-trivial values everywhere (norms, biases, tables)
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if layout == "timm":
        path, fmt = tmp_path / "swin.safetensors", "timm"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        path, fmt = tmp_path / "swin_tiny_patch4_window7_224.pth", "auto"
        torch.save({"model": _old_timm_swin(model)}, path)
    report = import_release(path, tmp_path / "run", fmt=fmt)
    assert report["format"] == "timm" and report["detected"] == (fmt == "auto")
    assert report["fresh"] == ["backbone.mask_token", "head.conv.bias", "head.conv.weight"]
    assert {"head.fc.weight", "head.weight"} & set(report["ignored"])
    cfg = load_run(tmp_path / "run")[0].backbone
    assert {k: getattr(cfg, k) for k in shape} == shape  # img_size: from the windows
    size = shape["img_size"]
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = model.forward_features(x).flatten(1, 2)  # (B, H, W, C) -> (B, N, C)
        got = mimar.load_backbone(tmp_path / "run")(x)["tokens"]
    assert (got - want).abs().max() < 1e-5
    back = tmp_path / "back" / "swin.safetensors"
    args = ["export", "--checkpoint", str(tmp_path / "run"), "--format", "timm"]
    assert main([*args, "--out", str(back)]) == 0
    exported = load_file(str(back))
    kept = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    assert exported.keys() == kept.keys()
    assert all(torch.equal(exported[k], v) for k, v in kept.items())
    again = create_timm_model(back)  # strict=True, built from the written kwargs
    with torch.no_grad():
        assert (again.forward_features(x).flatten(1, 2) - got).abs().max() < 1e-5
        assert (mimar.load_backbone(back)(x)["tokens"] - got).abs().max() < 1e-5
    import_release(back, tmp_path / "again")
    a, b = run_weights(tmp_path / "run"), run_weights(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("backbone.model."))
    from mimar.formats.init import release_weights  # train.init=FILE reads it alike

    initial = release_weights(path)
    assert initial.keys() == {k for k in a if k.startswith("backbone.model.")}
    assert all(torch.equal(v, a[k]) for k, v in initial.items())


def test_timm_swin_classifier_exports_with_its_head(tmp_path):
    """A fine-tuned Swin (mean of the normed tokens -> head) is timm's avg ClassifierHead."""
    from mimar.backbones.swin import Swin, SwinConfig
    from mimar.export import create_timm_model, export_timm
    from mimar.finetune.classifier import Classifier

    torch.manual_seed(0)
    cfg = SwinConfig(img_size=32, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4)
    classifier = Classifier(Swin(cfg), 3).eval()
    with torch.no_grad():
        classifier.head.weight.normal_()
    out, _ = export_timm(classifier, tmp_path / "ft.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (create_timm_model(out)(x) - classifier.logits(x)).abs().max() < 1e-5


def _evil_pickles(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    plain = tmp_path / "plain.pth"
    with plain.open("wb") as f:
        pickle.dump({"model": Evil()}, f)
    zipped = tmp_path / "zipped.pth"
    torch.save({"model": Evil()}, zipped)
    return marker, [plain, zipped]


def test_a_code_executing_pickle_is_refused_and_never_runs(tmp_path, capsys):
    marker, files = _evil_pickles(tmp_path)
    for path in files:
        assert (
            main(["import", str(path), "--format", "simmim-vit", "--out", str(tmp_path / "r")]) == 2
        )
        err = capsys.readouterr().err
        assert "refused" in err and "system" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
        with pytest.raises(CheckpointError, match="refused"):  # train.init reads alike
            from mimar.formats.init import release_weights

            release_weights(path)
    assert not marker.exists()


def test_foreign_objects_load_as_inert_placeholders(tmp_path):
    import argparse

    import numpy as np

    path = tmp_path / "r.pth"
    save_like_simmim(official_simmim_vit(), path)
    obj = read_release(path)[0]
    assert obj["config"].__dict__["placeholder_for"] == "yacs.config.CfgNode"
    assert obj["config"]["MODEL"]["TYPE"] == "vit"  # its items stay readable
    torch.save(
        {"args": argparse.Namespace(lr=1), "acc": np.float64(80.1), "w": torch.ones(1)}, path
    )
    obj = read_release(path)[0]
    assert obj["args"].lr == 1 and float(obj["acc"]) == 80.1


def test_bad_files_are_one_line_each(tmp_path, capsys):
    good = tmp_path / "good.pth"
    save_like_simmim(official_simmim_vit(), good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:2000])
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    cases = {
        truncated: ([], "truncated"),
        text: ([], "not a torch file"),
        good: (["backbone.num_heads=2", "backbone.mlp_ratio=2"], "mlp.fc1.weight: the release"),
    }
    for path, (extra, words) in cases.items():
        out = str(tmp_path / f"run-{path.stem}")
        assert main(["import", str(path), "--out", out, *extra]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1, err


def test_unknown_keys_are_an_error_naming_them(tmp_path):
    sd = official_simmim_vit() | {"encoder.blocks.0.attn.lora_A": torch.zeros(2)}
    path = tmp_path / "r.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match="lora_A"):
        import_release(path, tmp_path / "run", overrides=["backbone.num_heads=2"])


def test_img_size_resamples_the_position_tables(tmp_path):
    path = tmp_path / "r.pth"
    torch.save({"model": official_simmim_vit(shared=True, ape=True)}, path)
    report = import_release(
        path, tmp_path / "run", img_size=2 * IMG, overrides=["backbone.num_heads=2"]
    )
    keys = {row["key"] for row in report["resampled"]}
    assert keys == {"backbone.pos_embed", "backbone.rel_pos_bias.relative_position_bias_table"}
    assert mimar.load_backbone(tmp_path / "run").img_size == 2 * IMG


def test_train_init_starts_from_the_imported_weights_and_resumes_exactly(tmp_path, monkeypatch):
    from mimar.config import load_config
    from mimar.data import build_train_loader
    from mimar.factory import build_method

    src = tmp_path / "src"
    assert main(["pretrain", DEMO, *TINY, "train.steps=2", "--run-dir", str(src)]) == 0
    release = tmp_path / "official.pth"
    assert (
        main(["export", "--checkpoint", str(src), "--format", "simmim-vit", "--out", str(release)])
        == 0
    )
    imported = tmp_path / "imp"
    import_release(release, imported, overrides=["backbone.num_heads=2"])
    init = [*TINY, "train.seed=1", f"train.init={imported}"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(["pretrain", DEMO, *init, "train.steps=4", "--run-dir", str(full)]) == 0
    # the first loss is the imported model's loss on the first batch
    cfg = load_config(DEMO, [*TINY, "train.seed=1"])
    method = build_method(cfg)
    method.load_state_dict(run_weights(imported))
    loader = build_train_loader(cfg.data, seed=1, rank=0, world_size=1)
    corruption = method.sample_corruption(cfg.data.batch_size, loader.generator_for(0))
    method.train()
    with torch.no_grad():
        first = method(**loader.inputs(0), **corruption)["loss"].item()
    assert losses(full)[1] == pytest.approx(first, abs=1e-6)
    assert checkpoint.load(full / "checkpoints" / "last.pt")["step"] == 4
    # --resume: the run's own checkpoint wins over train.init, and the losses are the same
    write = MetricsLog.write

    def write_then_signal(self, row):
        write(self, row)
        if row["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(MetricsLog, "write", write_then_signal)
    args = ["pretrain", DEMO, *init, "train.steps=4", "--run-dir", str(cut)]
    assert main(args) == 128 + signal.SIGTERM
    monkeypatch.setattr(MetricsLog, "write", write)
    assert main([*args, "--resume"]) == 0
    assert losses(cut) == losses(full)


@pytest.mark.parametrize("kind", ["vit", "vit_mae"])
def test_transformers_folders_import_with_equal_tokens_and_export_back(tmp_path, kind):
    import transformers as hf

    shape = dict(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS)
    shape |= dict(intermediate_size=4 * D, image_size=IMG, patch_size=PATCH, num_channels=CHANS)
    torch.manual_seed(0)
    if kind == "vit":
        model = hf.ViTModel(hf.ViTConfig(**shape))
    else:
        model = hf.ViTMAEModel(hf.ViTMAEConfig(**shape, mask_ratio=0.0))
    with torch.no_grad():  # non-trivial values everywhere (HF initialises biases to zero)
        for name, p in model.named_parameters():
            if "position" not in name:  # ViTMAE's table is fixed sin-cos
                p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    report = import_release(folder, tmp_path / "run")  # heads and eps from config.json
    assert report["format"] == "transformers" and report["detected"]
    x = torch.randn(2, CHANS, IMG, IMG)
    keep_order = {"noise": torch.arange(GRID * GRID).float().expand(2, -1)} if kind != "vit" else {}
    backbone = mimar.load_backbone(tmp_path / "run")
    with torch.no_grad():
        want = model.eval()(pixel_values=x, **keep_order).last_hidden_state
        got = backbone(x)["tokens"]
    assert (got - want).abs().max() < 1e-5
    back = tmp_path / "back"
    args = ["export", "--checkpoint", str(tmp_path / "run"), "--format", "transformers"]
    assert main([*args, "--out", str(back)]) == 0
    again = hf.ViTModel.from_pretrained(back, add_pooling_layer=False).eval()
    with torch.no_grad():
        assert (again(pixel_values=x).last_hidden_state - got).abs().max() < 1e-5
    import_release(back, tmp_path / "again")
    a, b = run_weights(tmp_path / "run"), run_weights(tmp_path / "again")
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("backbone."))


def test_simmim_swin_release_imports_with_equal_tokens_and_exports_back(tmp_path):
    """Microsoft's Swin names (patch merging at the end of a stage) at a tiny size, written
    from timm's SwinTransformer (the same weights, merging at the start of the next stage)."""
    import re

    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    shape = dict(img_size=32, patch_size=4, embed_dim=16, depths=(2, 2), num_heads=(2, 4))
    swin = SwinTransformer(**shape, window_size=4, num_classes=0).eval()
    with torch.no_grad():
        for p in swin.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    merging = re.compile(r"layers\.(\d+)\.downsample")
    official = {
        "encoder." + merging.sub(lambda m: f"layers.{int(m[1]) - 1}.downsample", k): v
        for k, v in swin.state_dict().items()
    }
    official["encoder.mask_token"] = torch.randn(1, 1, 16)
    stride = 8  # patch 4 x one merging
    official["decoder.0.weight"] = torch.randn(stride**2 * 3, 32, 1, 1)
    official["decoder.0.bias"] = torch.randn(stride**2 * 3)
    release = tmp_path / "simmim_pretrain__swin_base__img192_window6__800ep.pth"
    torch.save({"model": official, "epoch": 99}, release)
    report = import_release(release, tmp_path / "run", overrides=["backbone.img_size=32"])
    assert report["format"] == "simmim-swin" and report["fresh"] == []
    cfg = load_run(tmp_path / "run")[0].backbone
    assert (cfg.depths, cfg.num_heads, cfg.window_size) == ((2, 2), (2, 4), 4)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = swin.forward_features(x).flatten(1, 2)  # (B, H, W, C) -> (B, N, C)
        got = mimar.load_backbone(tmp_path / "run")(x)["tokens"]
    assert (got - want).abs().max() < 1e-5
    back = tmp_path / "back.pth"
    args = ["export", "--checkpoint", str(tmp_path / "run"), "--format", "simmim-swin"]
    assert main([*args, "--out", str(back)]) == 0
    exported = read_release(back)[0]["model"]
    kept = {
        k: v
        for k, v in official.items()
        if not k.endswith(("relative_position_index", "attn_mask"))
    }
    assert exported.keys() == kept.keys()
    assert all(torch.equal(exported[k], v) for k, v in kept.items())
    # the encoder alone (unwrap removes its common encoder. prefix): its mask token tells it
    # from a timm / Microsoft Swin under --format auto
    encoder = tmp_path / "encoder.pth"
    torch.save({"model": {k: v for k, v in official.items() if k.startswith("encoder.")}}, encoder)
    report = import_release(encoder, tmp_path / "enc", overrides=["backbone.img_size=32"])
    assert report["format"] == "simmim-swin"
    assert report["fresh"] == ["head.conv.bias", "head.conv.weight"]


def test_aim_release_imports_exactly_and_exports_back(tmp_path):
    """apple/ml-aim's layout (preprocessor / trunk / attentive-probe head), tiny, saved as the
    Hugging Face pytorch_model.bin is (a plain state dict)."""
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    sd = {
        "preprocessor.patchifier.proj.weight": r(D, CHANS, PATCH, PATCH),
        "preprocessor.patchifier.proj.bias": r(D),
        "preprocessor.patchifier.norm.weight": 1 + r(D),
        "preprocessor.patchifier.norm.bias": r(D),
        "trunk.post_trunk_norm.weight": 1 + r(D),
        "trunk.post_trunk_norm.bias": r(D),
        "head.cls_token": r(1, 1, D),
        "head.k.weight": r(D, D),
        "head.v.weight": r(D, D),
        "head.linear.weight": r(10, D),
        "head.linear.bias": r(10),
    }
    for i in range(DEPTH):
        b = f"trunk.blocks.{i}."
        sd |= {b + "norm_1.weight": 1 + r(D), b + "norm_1.bias": r(D)}
        sd |= {b + "attn.qkv.weight": r(3 * D, D), b + "attn.proj.weight": r(D, D)}
        sd |= {b + "norm_2.weight": 1 + r(D), b + "norm_2.bias": r(D)}
        sd |= {b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc2.weight": r(D, 4 * D)}
    release = tmp_path / "pytorch_model.bin"
    torch.save(sd, release)
    overrides = [f"backbone.num_heads={HEADS}", f"backbone.img_size={IMG}", "method.head_width=16"]
    report = import_release(release, tmp_path / "run", overrides=overrides)
    assert report["format"] == "aim" and report["method"] == "aim"
    # fresh: AIM's pretraining head, and the sin-cos table (fixed, computed, never stored)
    assert {k for k in report["fresh"] if not k.startswith("head.")} == {"backbone.pos_embed"}
    assert set(report["ignored"]) == {k for k in sd if k.startswith("head.")}
    cfg = load_run(tmp_path / "run")[0].backbone
    assert (cfg.norm_eps, cfg.pos_embed, cfg.proj_bias, cfg.qkv_bias) == (
        1e-6,
        "sincos",
        False,
        False,
    )
    got = run_weights(tmp_path / "run")
    for key, value in sd.items():
        if not key.startswith("head."):
            assert torch.equal(got[report["keys"][key]], value), key
    back = tmp_path / "back.bin"
    args = ["export", "--checkpoint", str(tmp_path / "run"), "--format", "aim", "--out", str(back)]
    assert main(args) == 0
    exported = read_release(back)[0]
    trunk = {k: v for k, v in sd.items() if not k.startswith("head.")}
    assert exported.keys() == trunk.keys()
    assert all(torch.equal(exported[k], v) for k, v in trunk.items())


def test_aim_l3m_checkpoint_imports_trunk_and_head_and_exports_back(tmp_path):
    """apple/ml-l3m's MetaModel names: separate q/k/v projections, the MLP head
    (SimpleDecoder with identity attention: norm_1 is the h += LN(h) residual)."""
    g = torch.Generator().manual_seed(0)
    W, N = 24, GRID * GRID

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    pre, head = "preprocessor.blocks.0.", "head."
    sd = {
        pre + "patchifier.proj.weight": r(D, CHANS, PATCH, PATCH),
        pre + "patchifier.proj.bias": r(D),
        pre + "patchifier.norm.weight": 1 + r(D),
        pre + "patchifier.norm.bias": r(D),
        pre + "pos_embed": r(1, N, D),
        "trunk.post_trunk_norm.weight": 1 + r(D),
        "trunk.post_trunk_norm.bias": r(D),
        head + "decoder_projection.weight": r(W, D),
        head + "decoder_projection.bias": r(W),
        head + "decoder_pos_embed": r(1, N, W),
        head + "decoder_norm.weight": 1 + r(W),
        head + "decoder_norm.bias": r(W),
        head + "decoder_pred.weight": r(PATCH * PATCH * CHANS, W),
        head + "decoder_pred.bias": r(PATCH * PATCH * CHANS),
    }
    for i in range(DEPTH):
        b = f"trunk.blocks.{i}."
        sd |= {b + "norm_1.weight": 1 + r(D), b + "norm_1.bias": r(D)}
        sd |= {b + f"attn.{n}.weight": r(D, D) for n in ("q_proj", "k_proj", "v_proj")}
        sd |= {b + "attn.proj.weight": r(D, D)}
        sd |= {b + "norm_2.weight": 1 + r(D), b + "norm_2.bias": r(D)}
        sd |= {b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc2.weight": r(D, 4 * D)}
    for i in range(3):
        b = f"head.decoder_blocks.{i}."
        sd |= {b + "norm_1.weight": 1 + r(W), b + "norm_1.bias": r(W)}
        sd |= {b + "norm_2.weight": 1 + r(W), b + "norm_2.bias": r(W)}
        sd |= {b + "mlp.fc1.weight": r(2 * W, W), b + "mlp.fc2.weight": r(W, 2 * W)}
    release = tmp_path / "model.pt"
    torch.save({"model": sd, "optimizer": {}, "iteration": 10}, release)
    overrides = [f"backbone.num_heads={HEADS}", f"backbone.img_size={IMG}"]
    report = import_release(release, tmp_path / "run", overrides=overrides)
    assert report["format"] == "aim-l3m" and report["fresh"] == []
    method = load_run(tmp_path / "run")[0].method
    assert (method.head_width, method.head_depth, method.head_mlp_ratio) == (W, 3, 2.0)
    got = run_weights(tmp_path / "run")
    qkv = got["backbone.blocks.1.attn.qkv.weight"]
    assert torch.equal(qkv[D : 2 * D], sd["trunk.blocks.1.attn.k_proj.weight"])
    for key, value in sd.items():
        name = report["keys"].get(key)
        if name and "[" not in name:
            assert torch.equal(got[name], value), key
    back = tmp_path / "back.pt"
    args = ["export", "--checkpoint", str(tmp_path / "run"), "--format", "aim-l3m"]
    assert main([*args, "--out", str(back)]) == 0
    exported = read_release(back)[0]["model"]
    assert exported.keys() == sd.keys()
    table = "head.decoder_pos_embed"  # fixed sin-cos: mimar writes its own
    assert all(torch.equal(exported[k], v) for k, v in sd.items() if k != table)
    assert exported[table].shape == sd[table].shape


def test_eva_release_imports_student_and_head_and_exports_back(tmp_path):
    """EVA-01's VisionTransformerForMaskedImageModeling names (BEiT-style blocks, lm_head),
    saved as its save_model does (with an argparse.Namespace); no teacher is needed."""
    import argparse

    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    T = 20  # the teacher's width: lm_head's output
    sd = {
        "cls_token": r(1, 1, D),
        "mask_token": r(1, 1, D),
        "pos_embed": r(1, GRID * GRID + 1, D),
        "patch_embed.proj.weight": r(D, CHANS, PATCH, PATCH),
        "patch_embed.proj.bias": r(D),
        "norm.weight": 1 + r(D),
        "norm.bias": r(D),
        "lm_head.weight": r(T, D),
        "lm_head.bias": r(T),
    }
    for i in range(DEPTH):
        b = f"blocks.{i}."
        sd |= {b + "norm1.weight": 1 + r(D), b + "norm1.bias": r(D)}
        sd |= {b + "attn.q_bias": r(D), b + "attn.v_bias": r(D), b + "attn.qkv.weight": r(3 * D, D)}
        sd |= {b + "attn.proj.weight": r(D, D), b + "attn.proj.bias": r(D)}
        sd |= {b + "norm2.weight": 1 + r(D), b + "norm2.bias": r(D)}
        sd |= {b + "mlp.fc1.weight": r(4 * D, D), b + "mlp.fc1.bias": r(4 * D)}
        sd |= {b + "mlp.fc2.weight": r(D, 4 * D), b + "mlp.fc2.bias": r(D)}
    release = tmp_path / "eva_psz14.pt"
    torch.save({"model": sd, "epoch": 149, "args": argparse.Namespace(model="eva_g")}, release)
    overrides = [f"backbone.num_heads={HEADS}", "method.num_mask_patches=6"]
    overrides += ["method.min_num_patches=2"]
    report = import_release(release, tmp_path / "run", overrides=overrides)
    assert report["format"] == "eva" and report["method"] == "eva" and report["fresh"] == []
    got = run_weights(tmp_path / "run")
    assert torch.equal(got["lm_head.weight"], sd["lm_head.weight"])
    assert torch.equal(got["backbone.blocks.1.attn.qkv.bias"][2 * D :], sd["blocks.1.attn.v_bias"])
    for key, value in sd.items():
        name = report["keys"][key]
        if "[" not in name:
            assert torch.equal(got[name], value), key
    back = tmp_path / "back.pt"
    args = ["export", "--checkpoint", str(tmp_path / "run"), "--format", "eva", "--out", str(back)]
    assert main(args) == 0
    exported = read_release(back)[0]["model"]
    assert exported.keys() == sd.keys()
    assert all(torch.equal(exported[k], v) for k, v in sd.items())


def test_train_init_takes_a_release_file_as_well_as_its_import(tmp_path, caplog):
    from mimar.config import load_config
    from mimar.factory import build_method
    from mimar.formats.init import init_from

    release = tmp_path / "official.pth"
    save_like_simmim(official_simmim_vit(shared=True, ls=True), release)
    import_release(release, tmp_path / "imp", overrides=["backbone.num_heads=2"])
    tiny = [
        "backbone.pos_embed=none",
        "backbone.rel_pos_bias=per_block",
        "backbone.init_values=0.1",
    ]
    cfg = load_config(DEMO, [*TINY, "data.in_chans=3", "backbone.in_chans=3", *tiny])
    states = []
    for source in (release, tmp_path / "imp"):
        method = build_method(cfg)
        with caplog.at_level("INFO", logger="mimar"):
            report = init_from(method, str(source))
        # the shared table is copied into every block of this per-block recipe
        assert (
            "backbone.blocks.1.attn.rel_pos_bias.relative_position_bias_table" in report["loaded"]
        )
        states.append(method.state_dict())
    assert "is a simmim-vit release" in caplog.text
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert init_from(build_method(cfg), str(release), resume=True) is None  # --resume wins
