"""One training section for every run that trains: fine-tune and dense recipes nest
pretraining's ``train`` / ``optim`` sections plus an epoch schedule; the old flat keys keep
working with a deprecation note; the keys the schedule derives are refused."""

import logging
import re
from pathlib import Path

import pytest
import yaml

from mimar.config import OptimConfig, TrainConfig, to_dict
from mimar.data import DataConfig
from mimar.dense.config import DenseConfig, load_dense_config
from mimar.downstream.config import LEGACY, engine_sections, record
from mimar.errors import ConfigError
from mimar.finetune.config import load_finetune_config

ROOT = Path(__file__).resolve().parents[1]
FINETUNE = sorted((ROOT / "configs" / "finetune").glob("*.yaml"))
DENSE = sorted((ROOT / "configs" / "dense").glob("*.yaml"))


def _load(section: str, recipe, overrides=()):
    if section == "finetune":
        return load_finetune_config(DataConfig(), recipe, list(overrides))[0]
    return load_dense_config("segment", recipe, list(overrides))


def _flatten(path: Path, section: str, out: Path) -> Path:
    """The recipe at ``path`` written the old way: its nested keys back at the section's top."""
    raw = yaml.safe_load(path.read_text())
    old_of = {new: old for old, new in LEGACY.items()}
    flat = {}
    for key, value in raw[section].items():
        if key in ("schedule", "train", "optim"):
            flat.update({old_of[f"{key}.{k}"]: v for k, v in value.items()})
        else:
            flat[key] = value
    out.write_text(yaml.safe_dump({**raw, section: flat}))
    return out


@pytest.mark.parametrize(
    "section, path", [("finetune", p) for p in FINETUNE] + [("dense", p) for p in DENSE]
)
def test_every_recipe_is_nested_and_loads_as_its_flat_form(section, path, tmp_path, caplog):
    raw = yaml.safe_load(path.read_text())[section]
    assert not set(raw) & set(LEGACY), "a shipped recipe uses the nested keys"
    with caplog.at_level(logging.WARNING, logger="mimar"):
        new = _load(section, path)
    assert not [r for r in caplog.records if "deprecated" in r.message]
    old = _load(section, _flatten(path, section, tmp_path / "flat.yaml"))
    assert old == new
    assert any("deprecated" in r.message for r in caplog.records)


@pytest.mark.parametrize("section", ["finetune", "dense"])
def test_old_flat_overrides_equal_the_nested_ones_with_one_note_each(section, caplog):
    old = [f"{section}.epochs=1", f"{section}.lr=0.01", f"{section}.precision=fp32"]
    old += [f"{section}.optimizer_implementation=foreach"]
    new = [f"{section}.schedule.epochs=1", f"{section}.optim.lr=0.01"]
    new += [f"{section}.train.precision=fp32", f"{section}.optim.implementation=foreach"]
    with caplog.at_level(logging.WARNING, logger="mimar"):
        flat = _load(section, None, old)
    notes = [r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()]
    assert notes == [
        f"{o.split('=')[0]} is deprecated, use {n.split('=')[0]}" for o, n in zip(old, new)
    ]
    assert flat == _load(section, None, new)
    assert flat.schedule.epochs == 1 and flat.optim.lr == 0.01
    assert flat.train.precision == "fp32" and flat.optim.implementation == "foreach"


def test_a_nested_section_starts_from_the_task_defaults_not_pretrainings():
    dense = load_dense_config("segment", None, ["dense.train.seed=3"])
    assert dense.train.seed == 3 and dense.train.precision == "bf16"  # TrainConfig: fp32
    assert DenseConfig().optim.clip_grad is None and OptimConfig().clip_grad == 5.0
    bare = DenseConfig()
    assert (bare.train.precision, bare.optim.base_batch_size) == ("bf16", 16)
    assert TrainConfig().precision == "fp32"


@pytest.mark.parametrize(
    "override, message",
    [
        ("finetune.train.steps=5", "finetune.train.steps is derived from finetune.schedule.epochs"),
        ("finetune.optim.warmup_steps=5", "derived from finetune.schedule.warmup_epochs"),
        ("finetune.optim.min_lr_ratio=0.1", "derived from finetune.schedule.min_lr"),
        ("finetune.train.strategy=fsdp", "finetune.train.strategy is a pretraining key"),
        ("finetune.epochs=0", "finetune.schedule.epochs must be >= 1, got 0"),
        ("finetune.schedule.warmup_epochs=-1", "finetune.schedule.warmup_epochs must be >= 0"),
        ("finetune.lr=-1", "finetune.optim.lr must be > 0"),
        ("finetune.layer_decay=1.5", re.escape("finetune.optim.layer_decay must be in (0, 1]")),
        ("finetune.reprob=2", re.escape("finetune.reprob must be a probability in [0, 1]")),
        ("finetune.epoch=2", "did you mean finetune.schedule.epochs"),
    ],
)
def test_bad_finetune_keys_are_one_clear_line(override, message):
    with pytest.raises(ConfigError, match=message):
        _load("finetune", None, [override])


def test_the_copies_no_longer_drift():
    """clip_grad 0 (= off) was accepted by fine-tuning and refused by dense; layer decay above
    1 was refused by fine-tuning and dense and accepted by pretraining."""
    for section in ("finetune", "dense"):
        assert _load(section, None, [f"{section}.optim.clip_grad=0"]).optim.clip_grad == 0
        with pytest.raises(ConfigError, match=re.escape(f"{section}.optim.layer_decay")):
            _load(section, None, [f"{section}.optim.layer_decay=1.1"])
    with pytest.raises(ConfigError, match="optim.layer_decay"):
        OptimConfig(layer_decay=1.1)


def test_engine_sections_turn_epochs_into_steps():
    ft = _load("finetune", ROOT / "configs/finetune/simmim_vit_base_in1k.yaml")
    train, optim = engine_sections(ft, steps_per_epoch=10)
    assert (train.steps, train.checkpoint_every, optim.warmup_steps) == (1000, 10, 200)
    assert optim.lr == pytest.approx(1.25e-3 * 2048 / 512)  # SimMIM §2.6: per 512 images
    assert optim.min_lr_ratio == pytest.approx(1e-6 / optim.lr)
    assert (train.precision, train.log_every) == (ft.train.precision, ft.train.log_every)
    accum = _load("finetune", None, ["finetune.train.accum_steps=2", "finetune.optim.lr=null"])
    _, optim = engine_sections(accum, steps_per_epoch=10)
    assert optim.lr == pytest.approx(accum.optim.base_lr * 64 * 2 / accum.optim.base_batch_size)


def test_the_run_folder_records_no_derived_key():
    tree = record(_load("dense", None))
    assert "steps" not in tree["train"] and "warmup_steps" not in tree["optim"]
    assert tree["schedule"] == to_dict(_load("dense", None).schedule)


def test_peak_lr_is_defined_once():
    defs = [
        f"{p}:{i}"
        for p in (ROOT / "mimar").rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines())
        if re.match(r"^\s*def peak_lr\b", line)
    ]
    assert len(defs) == 1 and "engine/optim.py" in defs[0], defs
