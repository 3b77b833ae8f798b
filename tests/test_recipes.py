"""Every shipped recipe loads; the paper recipes build at full size and train one tiny step."""

import dataclasses
from pathlib import Path

import pytest
import yaml
from helpers import losses

import mimar
from mimar.cli import main
from mimar.engine.optim import scaled_lr

ROOT = Path(__file__).resolve().parents[1]
# pretraining recipes (fine-tune and dense recipes have their own sections and tests)
DOWNSTREAM = ("finetune", "dense")
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name not in DOWNSTREAM)
# the keys every recipe must honour, each with an override value no recipe uses
CONTRACT = {
    "train.steps": 3,
    "train.log_every": 2,
    "train.checkpoint_every": 7,
    "data.root": "/elsewhere",
    "data.batch_size": 2,
}


def _get(cfg, key: str):
    section, field = key.split(".")
    return getattr(getattr(cfg, section), field)


def _written(path: Path) -> dict:
    """The recipe's YAML as written, with its ``base:`` recipe's values underneath."""
    raw = yaml.safe_load(path.read_text())
    base = raw.pop("base", None)
    if base is None:
        return raw
    merged = _written(path.parent / base)
    for section, values in raw.items():
        merged[section] = {**merged.get(section, {}), **values}
    return merged


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_recipe_loads_and_has_the_contract_keys(path):
    cfg = mimar.load_config(path)
    written = _written(path)
    for key in CONTRACT:
        section, field = key.split(".")
        if field in written.get(section, {}):
            assert _get(cfg, key) == written[section][field], key  # the value the recipe gives
        else:
            defaults = {f.name: f.default for f in dataclasses.fields(getattr(cfg, section))}
            assert _get(cfg, key) == defaults[field], key
    # the contract keys are overridable from the command line under exactly these names
    cfg = mimar.load_config(path, [f"{k}={v}" for k, v in CONTRACT.items()])
    assert {k: _get(cfg, k) for k in CONTRACT} == CONTRACT


@pytest.mark.parametrize(
    "recipe, params_m, peak_lr, stride",
    [
        # ViT-B/16 + mask token + one shared 732 x 12 relative position table, no pos_embed
        ("configs/simmim/vit_base_in1k.yaml", 85.68, 4e-4, 16),
        ("configs/simmim/swin_base_in1k.yaml", 86.7, 8e-4, 32),  # Swin-B, window 6
    ],
)
def test_paper_recipe_builds_at_full_size(recipe, params_m, peak_lr, stride):
    cfg = mimar.load_config(ROOT / recipe)
    method = mimar.build_method(cfg)
    n = sum(p.numel() for p in method.backbone.parameters()) / 1e6
    assert n == pytest.approx(params_m, abs=0.3)
    assert scaled_lr(cfg.optim, cfg.data.batch_size) == pytest.approx(peak_lr)
    # SimMIM masks 32x32 cells on both; the head upsamples by the encoder stride
    assert (method.backbone.out_stride, cfg.method.mask_patch_size) == (stride, 32)


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe", ["configs/simmim/vit_base_in1k.yaml", "configs/simmim/swin_base_in1k.yaml"]
)
def test_paper_recipe_trains_one_step_at_tiny_batch(recipe, tmp_path):
    run = tmp_path / "run"
    argv = [
        "pretrain",
        str(ROOT / recipe),
        "data.name=synthetic",
        "data.synthetic_size=2",
        "data.batch_size=2",
        "data.num_workers=0",
        "train.steps=1",
        "train.progress=false",
        "train.precision=fp32",
        "train.threads=2",
        "--run-dir",
        str(run),
    ]
    assert main(argv) == 0
    (loss,) = losses(run).values()
    assert 0 < loss < 10
    assert (run / "checkpoints" / "last.pt").exists()
