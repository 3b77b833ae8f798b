"""train.loggers: TensorBoard and W&B sinks beside metrics.jsonl, pictures every
train.picture_every steps, one-line errors for unknown or missing loggers."""

import glob
import importlib.util
import json
import time

import pytest
from helpers import DEMO, TINY

import mimar
from mimar.cli import main
from mimar.config import ConfigError


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_events_hold_every_logged_scalar_and_the_pictures(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    args = ["train.steps=4", "train.loggers=[jsonl,tensorboard]", "train.picture_every=2"]
    started = time.time()
    assert main(["pretrain", DEMO, *TINY, *args, "--run-dir", str(run)]) == 0
    ended = time.time()
    (events,) = glob.glob(str(run / "tensorboard" / "events.out.tfevents.*"))
    acc = EventAccumulator(events, size_guidance={"images": 0})
    acc.Reload()
    rows = _rows(run)
    stamps = [r["time"] for r in rows]  # metrics.jsonl's own wall-clock stamp, not a scalar
    assert started - 1e-3 <= stamps[0] and stamps == sorted(stamps) and stamps[-1] <= ended
    # perf/* (the monitor's efficiency figures) keep their own group
    scalars = {k if "/" in k else f"train/{k}" for k in rows[0] if k not in ("step", "time")}
    assert scalars == set(acc.Tags()["scalars"])
    for key in ("loss", "lr", "grad_norm", "images_per_s"):
        logged = [(e.step, e.value) for e in acc.Scalars(f"train/{key}")]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in rows]
    assert [e.step for e in acc.Images("picture")] == [2, 4]
    assert sorted(p.name for p in (run / "pictures").iterdir()) == [
        "step_0000002.png",
        "step_0000004.png",
    ]


def test_wandb_runs_offline_into_the_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    args = ["train.steps=2", "train.loggers=[jsonl,wandb]"]
    assert main(["pretrain", DEMO, *TINY, *args, "--run-dir", str(run)]) == 0
    (offline,) = glob.glob(str(run / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(_rows(run)) == 2 and (run / "checkpoints" / "last.pt").is_file()
    assert offline.endswith(".wandb")


def test_loggers_are_checked_in_one_line():
    with pytest.raises(ConfigError, match=r"train.loggers: unknown \['mlflow'\]"):
        mimar.load_config(DEMO, ["train.loggers=[jsonl,mlflow]"])
    with pytest.raises(ConfigError, match="must include jsonl"):
        mimar.load_config(DEMO, ["train.loggers=[tensorboard]"])
    with pytest.raises(ConfigError, match="picture_every must be >= 0"):
        mimar.load_config(DEMO, ["train.picture_every=-1"])


def test_a_named_logger_that_is_not_installed_is_one_line(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name)
    )
    args = ["train.steps=1", "train.loggers=[jsonl,tensorboard]", "--run-dir", str(tmp_path / "r")]
    assert main(["pretrain", DEMO, *TINY, *args]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("tensorboard is not installed: pip install 'mimar[tensorboard]'")


def test_finetune_recipes_take_loggers():
    from mimar.data import DataConfig
    from mimar.finetune.config import load_finetune_config

    both = ["finetune.train.loggers=[jsonl, tensorboard]"]
    ft, _ = load_finetune_config(DataConfig(), None, both)
    assert ft.train.loggers == ("jsonl", "tensorboard")
    with pytest.raises(ConfigError, match="finetune.train.loggers must include jsonl"):
        load_finetune_config(DataConfig(), None, ["finetune.train.loggers=[wandb]"])
    with pytest.raises(ConfigError, match="finetune.train.loggers must include jsonl"):
        load_finetune_config(DataConfig(), None, ["finetune.loggers=[wandb]"])  # the old key
