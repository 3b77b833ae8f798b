"""Frozen teachers: open_clip, Hugging Face CLIP, timm and mimar kinds loaded from local files;
output shapes, grid alignment, parity with each library's own forward, frozen-ness, errors."""

import json
import sys

import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
import transformers
from helpers import TINY

from mimar.cli import main
from mimar.config import ConfigError, load_config
from mimar.data import DataConfig, load_images, normalization_stats
from mimar.engine.optim import build_optimizer
from mimar.export import export_timm
from mimar.factory import build_method
from mimar.loading import load_backbone, teacher_backbone
from mimar.teachers import (
    CLIP_MEAN,
    CLIP_STD,
    FrozenTeacher,
    TeacherConfig,
    build_teacher,
    convert_channels,
)

GRAY = dict(student_in_chans=1, data_mean=(0.5,), data_std=(0.25,))
TINY_CLIP = {  # 28 px, patch 7 -> a 4x4 grid (a "/14-like" teacher at 2x2 fewer pixels)
    "embed_dim": 24,
    "vision_cfg": {"image_size": 28, "layers": 2, "width": 32, "patch_size": 7, "head_width": 16},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("open_clip")
    (folder / "mimar-tiny-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(folder / "mimar-tiny-clip.json")
    torch.manual_seed(0)
    model = open_clip.create_model("mimar-tiny-clip")
    torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
    return folder / "open_clip_pytorch_model.bin"


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    cfg = transformers.CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=7,
        projection_dim=24,
    )
    torch.manual_seed(0)
    dirs = {}
    for name, cls in (
        ("plain", transformers.CLIPVisionModel),
        ("proj", transformers.CLIPVisionModelWithProjection),
    ):
        dirs[name] = tmp_path_factory.mktemp(f"hf_{name}")
        cls(cfg).save_pretrained(dirs[name])
    return dirs


def _open_clip_teacher(clip_file, grid=4, **kw):
    cfg = TeacherConfig(kind="open_clip", model="mimar-tiny-clip", checkpoint=str(clip_file), **kw)
    return build_teacher(cfg, student_grid=grid, **GRAY)


def _images(b=2, c=1, size=16, seed=0):
    return torch.randn(b, c, size, size, generator=torch.Generator().manual_seed(seed))


# --- open_clip ------------------------------------------------------------------------


def test_open_clip_final_features_are_ln_post_and_proj_of_every_token(clip_file):
    teacher = _open_clip_teacher(clip_file)
    assert (teacher.dim, teacher.grid, teacher.has_cls) == (24, (4, 4), True)
    x = _images()
    out = teacher(x)
    assert out["tokens"].shape == (2, 16, 24) and out["cls"].shape == (2, 24)
    assert out["ms"] > 0
    # parity with open_clip's own forward: its image embedding is ln_post(cls) @ proj
    prepared = teacher.prepare(x)
    assert prepared.shape == (2, 3, 28, 28)
    with torch.no_grad():
        embedding = teacher.module(prepared)
    torch.testing.assert_close(out["cls"], embedding, rtol=1e-4, atol=1e-5)


def test_open_clip_layer_is_the_raw_block_output(clip_file):
    teacher = _open_clip_teacher(clip_file, layer=0)
    assert teacher.dim == 32  # the width, before ln_post and the projection
    x = _images()
    raw = teacher.module.forward_intermediates(
        teacher.prepare(x), indices=[0], intermediates_only=True, output_fmt="NLC"
    )["image_intermediates"][0]
    torch.testing.assert_close(teacher(x)["tokens"], raw, rtol=1e-4, atol=1e-5)


def test_teacher_grid_is_resampled_bilinearly_to_the_student_grid(clip_file):
    same, other = _open_clip_teacher(clip_file, grid=4), _open_clip_teacher(clip_file, grid=3)
    x = _images()
    native = same(x)["tokens"].transpose(1, 2).reshape(2, 24, 4, 4)
    expected = F.interpolate(native, size=(3, 3), mode="bilinear", align_corners=False)
    out = other(x)["tokens"]  # like a 16x16 grid of a /14 teacher read on a 14x14 student
    assert out.shape == (2, 9, 24)
    torch.testing.assert_close(out, expected.flatten(2).transpose(1, 2))
    assert "resampled" in other.describe() and "resampled" not in same.describe()


def test_open_clip_img_size_resizes_input_and_position_embedding(clip_file):
    teacher = _open_clip_teacher(clip_file, grid=5, img_size=35)  # 5x5 of 7 px
    assert teacher.grid == (5, 5) and teacher.prepare(_images()).shape[-1] == 35
    assert teacher(_images())["tokens"].shape == (2, 25, 24)


def test_open_clip_missing_or_mismatched_file_is_one_clear_error(clip_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.bin.*open_clip weights for mimar-tiny"):
        build_teacher(
            TeacherConfig(kind="open_clip", model="mimar-tiny-clip", checkpoint="/x/nothere.bin"),
            student_grid=4,
            **GRAY,
        )
    with pytest.raises(ValueError, match="'ViT-Q-99' is not an open_clip model name"):
        build_teacher(
            TeacherConfig(kind="open_clip", model="ViT-Q-99", checkpoint=str(clip_file)),
            student_grid=4,
            **GRAY,
        )
    wrong = tmp_path / "wrong.bin"
    torch.save({"visual.proj": torch.zeros(3, 3)}, wrong)
    with pytest.raises(ValueError, match=f"{wrong}.*open_clip model 'mimar-tiny-clip'"):
        build_teacher(
            TeacherConfig(kind="open_clip", model="mimar-tiny-clip", checkpoint=str(wrong)),
            student_grid=4,
            **GRAY,
        )


def test_missing_extra_names_the_clip_extra(monkeypatch, clip_file):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    with pytest.raises(ValueError, match=r"mimar\[clip\]"):
        _open_clip_teacher(clip_file)


# --- Hugging Face CLIP ----------------------------------------------------------------


def test_hf_clip_with_projection_matches_image_embeds(hf_dirs):
    teacher = build_teacher(
        TeacherConfig(kind="hf_clip", path=str(hf_dirs["proj"])), student_grid=4, **GRAY
    )
    assert (teacher.dim, teacher.grid) == (24, (4, 4))
    assert (teacher.source.mean, teacher.source.std) == (CLIP_MEAN, CLIP_STD)
    x = _images()
    out = teacher(x)
    assert out["tokens"].shape == (2, 16, 24)
    with torch.no_grad():
        ref = teacher.module(pixel_values=teacher.prepare(x))
    # image_embeds = visual_projection(post_layernorm(cls)): the same maps as on patch tokens
    torch.testing.assert_close(out["cls"], ref.image_embeds, rtol=1e-4, atol=1e-5)


def test_hf_clip_plain_model_and_layer(hf_dirs):
    cfg = TeacherConfig(kind="hf_clip", path=str(hf_dirs["plain"]))
    teacher = build_teacher(cfg, student_grid=4, **GRAY)
    assert teacher.dim == 32  # no projection: post_layernorm features
    x = _images()
    with torch.no_grad():
        ref = teacher.module(pixel_values=teacher.prepare(x), output_hidden_states=True)
    torch.testing.assert_close(teacher(x)["cls"], ref.pooler_output, rtol=1e-4, atol=1e-5)
    layer0 = build_teacher(
        TeacherConfig(kind="hf_clip", path=str(hf_dirs["plain"]), layer=0), student_grid=4, **GRAY
    )
    torch.testing.assert_close(
        layer0(x)["tokens"], ref.hidden_states[1][:, 1:], rtol=1e-4, atol=1e-5
    )


def test_hf_clip_reads_the_saved_processor_statistics(hf_dirs, tmp_path):
    folder = tmp_path / "with_processor"
    folder.mkdir()
    for f in hf_dirs["proj"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]})
    )
    teacher = build_teacher(TeacherConfig(kind="hf_clip", path=str(folder)), student_grid=4, **GRAY)
    assert teacher.source.mean == (0.5, 0.5, 0.5)


def test_hf_clip_missing_or_mismatched_folder(hf_dirs, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.*hf_clip.*save_pretrained"):
        build_teacher(TeacherConfig(kind="hf_clip", path="/nowhere"), student_grid=4, **GRAY)
    folder = tmp_path / "mismatch"
    folder.mkdir()
    for f in hf_dirs["plain"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    meta = json.loads((folder / "config.json").read_text())
    meta["hidden_size"], meta["num_attention_heads"] = 48, 2
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"{folder}: the weights do not fit its config.json"):
        build_teacher(TeacherConfig(kind="hf_clip", path=str(folder)), student_grid=4, **GRAY)


# --- timm -----------------------------------------------------------------------------


def test_timm_teacher_drops_the_classifier_and_prefix_tokens(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=10)  # 160 px, /16
    ckpt = tmp_path / "test_vit.pth"
    torch.save(model.state_dict(), ckpt)
    cfg = TeacherConfig(kind="timm", model="test_vit", checkpoint=str(ckpt))
    teacher = build_teacher(cfg, student_grid=4, **GRAY)
    assert (teacher.dim, teacher.grid, teacher.source.img_size) == (64, (10, 10), 160)
    assert teacher.source.mean == (0.5, 0.5, 0.5)  # timm's pretrained_cfg statistics
    x = _images()
    with torch.no_grad():
        feats = model.forward_features(teacher.prepare(x))  # (B, 1 + 100, 64)
    native = feats[:, 1:].transpose(1, 2).reshape(2, 64, 10, 10)
    expected = F.interpolate(native, size=(4, 4), mode="bilinear", align_corners=False)
    out = teacher(x)
    torch.testing.assert_close(out["tokens"], expected.flatten(2).transpose(1, 2))
    torch.testing.assert_close(out["cls"], feats[:, 0])
    layer = build_teacher(
        TeacherConfig(kind="timm", model="test_vit", checkpoint=str(ckpt), layer=-1),
        student_grid=10,
        **GRAY,
    )
    assert layer(x)["tokens"].shape == (2, 100, 64)
    with pytest.raises(ValueError, match="does not fit timm model 'test_vit2'"):
        build_teacher(
            TeacherConfig(kind="timm", model="test_vit2", checkpoint=str(ckpt)),
            student_grid=4,
            **GRAY,
        )


# --- mimar ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mimar_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("mimar") / "run"
    argv = ["pretrain", "configs/simmim/vit_tiny_fmnist.yaml", *TINY, "train.steps=1"]
    assert main([*argv, "--run-dir", str(run)]) == 0
    return run


def test_mimar_teacher_from_run_folder_and_export(mimar_run, tmp_path):
    data = DataConfig(name="synthetic", img_size=16, in_chans=1)
    mean, std = normalization_stats(data)
    teacher = build_teacher(
        TeacherConfig(kind="mimar", path=str(mimar_run)),
        student_grid=4,
        student_in_chans=1,
        data_mean=mean,
        data_std=std,
        load_mimar=teacher_backbone,
    )
    assert (teacher.dim, teacher.grid, teacher.has_cls) == (32, (4, 4), True)
    x = _images()
    # same data statistics and size: the teacher sees exactly the student's input
    torch.testing.assert_close(teacher.prepare(x), x)
    backbone = load_backbone(mimar_run)
    with torch.no_grad():
        tokens = backbone(x)["tokens"]
    out = teacher(x)
    torch.testing.assert_close(out["tokens"], tokens[:, 1:])
    torch.testing.assert_close(out["cls"], tokens[:, 0])
    file, _ = export_timm(backbone, tmp_path / "teacher.safetensors")
    exported = build_teacher(
        TeacherConfig(kind="mimar", path=str(file)),
        student_grid=4,
        student_in_chans=1,
        data_mean=mean,
        data_std=std,
        load_mimar=teacher_backbone,
    )
    torch.testing.assert_close(exported(x)["tokens"], out["tokens"])
    missing = TeacherConfig(kind="mimar", path=str(tmp_path / "no_run"))
    with pytest.raises(FileNotFoundError, match="no_run.*kind mimar expects"):
        build_teacher(missing, student_grid=4, **GRAY, load_mimar=teacher_backbone)
    resized = TeacherConfig(kind="mimar", path=str(mimar_run), img_size=32)
    with pytest.raises(ValueError, match="training size"):
        build_teacher(resized, student_grid=4, **GRAY, load_mimar=teacher_backbone)


def test_teacher_is_frozen_not_trained_and_not_checkpointed(mimar_run):
    cfg = load_config(
        "configs/eva/vit_tiny_fmnist.yaml",
        [*[o for o in TINY if not o.startswith("method.")], f"teacher.path={mimar_run}"],
    )
    method = build_method(cfg)
    teacher = method.teacher
    assert isinstance(teacher, FrozenTeacher) and not teacher.module.training
    teacher_params = {id(p) for p in teacher.module.parameters()}
    assert teacher_params and not any(p.requires_grad for p in teacher.module.parameters())
    assert not teacher_params & {id(p) for p in method.parameters()}
    optimizer = build_optimizer(method, cfg.optim, 1e-3)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not teacher_params & in_optimizer
    keys = method.state_dict().keys()
    assert all(k.startswith(("backbone.", "lm_head.")) for k in keys)
    method.train()
    out = method(torch.randn(4, 1, 16, 16), **method.sample_corruption(4))
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.module.parameters())
    assert not teacher.module.training  # method.train() does not reach the teacher


def test_eva_without_teacher_and_bad_teacher_keys_are_clear_errors(capsys):
    cfg = load_config("configs/eva/vit_tiny_fmnist.yaml", ["teacher.kind=none"])
    with pytest.raises(ValueError, match="needs a frozen teacher.*teacher.kind"):
        build_method(cfg)
    with pytest.raises(ConfigError, match="did you mean path"):
        load_config("configs/eva/vit_tiny_fmnist.yaml", ["teacher.paht=/x"])
    cfg = load_config("configs/eva/vit_tiny_fmnist.yaml", ["teacher.layer=-2", "teacher.path=R"])
    assert (cfg.teacher.kind, cfg.teacher.layer, cfg.teacher.path) == ("mimar", -2, "R")
    argv = [
        "pretrain",
        "configs/eva/vit_tiny_fmnist.yaml",
        "teacher.kind=open_clip",
        "teacher.model=ViT-B-16",
        "teacher.checkpoint=/nowhere/clip.bin",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "/nowhere/clip.bin" in err[0] and "open_clip" in err[0]


# --- plumbing -------------------------------------------------------------------------


def test_channel_conversion_and_normalisation_round_trip():
    gray = torch.rand(2, 1, 4, 4)
    assert torch.equal(convert_channels(gray, 3), gray.expand(-1, 3, -1, -1))
    rgb = torch.rand(2, 3, 4, 4)
    luma = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    torch.testing.assert_close(convert_channels(rgb, 1)[:, 0], luma)
    with pytest.raises(ValueError, match="2-channel"):
        convert_channels(torch.rand(1, 2, 4, 4), 3)


def test_normalization_stats_match_the_loaded_images():
    for cfg in (
        DataConfig(name="synthetic", in_chans=3, synthetic_size=4),
        DataConfig(name="synthetic", in_chans=1, synthetic_size=4, mean=(0.1,), std=(0.2,)),
    ):
        images = load_images(cfg, "train")
        assert normalization_stats(cfg) == (images.mean, images.std)


def test_an_openai_checkpoint_under_a_plain_gelu_name_is_refused(tmp_path):
    """OpenAI's CLIP uses QuickGELU: open_clip's plain name would silently change the targets."""
    import zipfile

    from mimar.config import ConfigError

    named = tmp_path / "ViT-B-16-openai.pt"
    named.write_bytes(b"not really weights")
    scripted = tmp_path / "weights.pt"  # OpenAI released TorchScript archives
    with zipfile.ZipFile(scripted, "w") as archive:
        archive.writestr("ViT-B-16/constants.pkl", b"")
    for path in (named, scripted):
        cfg = TeacherConfig(kind="open_clip", model="ViT-B-16", checkpoint=str(path))
        with pytest.raises(
            ConfigError, match="needs QuickGELU: use teacher.model=ViT-B-16-quickgelu"
        ):
            build_teacher(cfg, student_grid=4, **GRAY)
    ok = TeacherConfig(kind="open_clip", model="ViT-B-16-quickgelu", checkpoint=str(named))
    with pytest.raises(ConfigError, match="does not load as open_clip model"):  # passes the check
        build_teacher(ok, student_grid=4, **GRAY)
