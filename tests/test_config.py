import pytest

from mimar.backbones.swin import SwinConfig
from mimar.config import ConfigError, load_config, save_config
from mimar.methods.simmim import SimMIMConfig

DEMO = "configs/simmim/vit_tiny_fmnist.yaml"


def test_demo_recipe_loads_with_typed_overrides():
    cfg = load_config(
        DEMO,
        [
            "train.steps=200",
            "optim.lr=2e-4",
            "data.root=/x",
            "data.scale=[0.5, 1]",
            "optim.clip_grad=null",
        ],
    )
    assert cfg.train.steps == 200 and cfg.optim.lr == 2e-4 and cfg.data.root == "/x"
    assert cfg.data.scale == (0.5, 1.0) and isinstance(cfg.data.scale[1], float)
    assert cfg.optim.clip_grad is None
    assert isinstance(cfg.method, SimMIMConfig) and cfg.method.mask_patch_size == 8
    # keys not overridden keep the recipe's values (a key absent there, its default)
    assert (cfg.train.log_every, cfg.train.checkpoint_every, cfg.train.precision) == (
        1,
        500,
        "bf16",
    )
    assert cfg.optim.betas == (0.9, 0.999) and cfg.optim.warmup_fraction == 0.05
    assert (cfg.data.batch_size, cfg.backbone.embed_dim, cfg.method.mask_ratio) == (64, 128, 0.6)
    assert cfg.train.accum_steps == 1  # not in the recipe: the dataclass default


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.stepz=3", "unknown config key 'train.stepz'; did you mean steps"),
        ("trian.steps=3", "unknown config key 'trian'; did you mean train"),
        ("train.steps=abc", "train.steps: expected int, got 'abc' (str)"),
        ("train.steps=1.5", "train.steps: expected int, got 1.5 (float)"),
        ("train.precision=fp8", "train.precision: expected one of ['fp32', 'bf16'], got 'fp8'"),
        ("data.scale=[0.5]", "data.scale: expected 2 values"),
        ("method.name=mae", "method.name: unknown method 'mae'"),
        ("train.steps", "is not of the form dotted.key=value"),
        ("backbone.in_chans=3", "backbone.in_chans=3 but data.in_chans=1"),
    ],
)
def test_errors_name_the_key_type_and_close_matches(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [override])
    assert message in str(err.value)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(DEMO, ["train.steps=7"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_base_recipe_and_section_switch(tmp_path):
    (tmp_path / "child.yaml").write_text(f"base: {DEMO_ABS()}\ntrain:\n  steps: 3\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.train.steps == 3 and cfg.backbone.embed_dim == 128
    (tmp_path / "swin.yaml").write_text(
        f"base: {DEMO_ABS()}\nbackbone:\n  name: swin\n  img_size: 32\n  patch_size: 2\n"
        "  in_chans: 1\n  embed_dim: 16\n  depths: [2]\n  num_heads: [2]\n  window_size: 4\n"
    )
    cfg = load_config(tmp_path / "swin.yaml")
    assert isinstance(cfg.backbone, SwinConfig) and cfg.backbone.depths == (2,)


def DEMO_ABS():
    from pathlib import Path

    return str(Path(DEMO).resolve())


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
