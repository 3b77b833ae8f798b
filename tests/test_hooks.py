"""Periodic work as hooks (engine/hooks.py): when they run, what they log, and that they leave
the training's randomness and numbers alone; the loop's timing columns."""

import json
import time
from pathlib import Path

import torch
from helpers import DEMO, TINY

from mimar.config import load_config, to_dict
from mimar.data import build_train_loader
from mimar.engine import checkpoint
from mimar.engine.loop import Hook, Run, Session, StepView, fit
from mimar.factory import build_method


def _fit(run_dir: Path, steps: int, hooks=(), *extra: str, slow_inputs: float = 0.0):
    """A tiny SimMIM run of ``steps`` through ``fit`` with ``hooks``; the loader's ``inputs``
    sleep ``slow_inputs`` seconds first. Returns the rows of metrics.jsonl."""
    cfg = load_config(DEMO, [*TINY, f"train.steps={steps}", "train.checkpoint_every=0", *extra])
    with Session(cfg.train) as session:
        torch.manual_seed(cfg.train.seed)
        method = build_method(cfg)
        loader = build_train_loader(cfg.data, seed=cfg.train.seed)
        if slow_inputs:
            inputs = loader.inputs

            def slow(step, *args):
                time.sleep(slow_inputs)
                return inputs(step, *args)

            loader.inputs = slow
        run = Run(run_dir, to_dict(cfg))
        fit(session, method, loader, train=cfg.train, optim=cfg.optim, run=run, hooks=hooks)
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_hooks_run_every_n_steps_and_at_the_end_and_their_numbers_are_logged(tmp_path):
    seen: dict[str, list[int]] = {"every": [], "row": [], "end": []}

    def every(view: StepView) -> dict:
        assert view.total == 10 and view.model.training and view.row["step"] == view.step
        seen["every"].append(view.step)
        return {"probe": float(view.step)}

    def row(view: StepView) -> dict:
        seen["row"].append(view.step)
        return {"row_value": 2.0 * view.step}

    def end(view: StepView) -> None:
        seen["end"].append(view.step)

    hooks = [Hook(4, every, at_end=True), Hook(0, row, needs_model=False), Hook(20, end)]
    rows = _fit(tmp_path / "run", 10, hooks, "train.log_every=5")
    assert seen["every"] == [4, 8, 10]  # every 4 steps, and the last one (at_end)
    assert seen["end"] == []  # every=20 never comes in a 10-step run and at_end is off
    # every=0: with every logged row (log_every=5, plus the reads the other hook forced)
    assert seen["row"] == [4, 5, 8, 10]
    train = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train] == [4, 5, 8, 10]
    assert all(r["row_value"] == 2.0 * r["step"] for r in train)  # joins the step's row
    probes = [(r["step"], r["probe"]) for r in rows if "probe" in r]
    assert probes == [(4, 4.0), (8, 8.0), (10, 10.0)]  # a row of its own, at that step
    assert all("loss" not in r and "epoch" in r for r in rows if "probe" in r)


def test_a_hook_drawing_random_numbers_changes_neither_losses_nor_the_saved_rng(tmp_path):
    def noisy(view: StepView) -> dict:
        return {"noise": float(torch.rand(1)) + float(torch.randn(3).sum())}

    plain = _fit(tmp_path / "plain", 9)
    hooked = _fit(tmp_path / "hooked", 9, [Hook(2, noisy), Hook(0, noisy, needs_model=False)])
    losses = {r["step"]: r["loss"] for r in plain if "loss" in r}
    assert {r["step"]: r["loss"] for r in hooked if "loss" in r} == losses
    # the checkpoint carries the global RNG state for exact resume: the hooks' draws are not in it
    rng = [checkpoint.load(tmp_path / run / "checkpoints" / "last.pt")["rng"]["torch"]
           for run in ("plain", "hooked")]  # fmt: skip
    assert torch.equal(rng[0], rng[1])


def test_data_wait_rises_when_the_loader_is_slow(tmp_path):
    fast = [r for r in _fit(tmp_path / "fast", 4) if "loss" in r]
    slow = [r for r in _fit(tmp_path / "slow", 4, slow_inputs=0.1) if "loss" in r]
    for row in fast + slow:
        assert 0 <= row["data_wait_s"] <= row["step_s"]
    assert all(r["data_wait_s"] >= 0.1 for r in slow)
    assert sum(r["data_wait_s"] for r in slow) / 4 > sum(r["data_wait_s"] for r in fast) / 4 + 0.08
    # images_per_s and step_s describe the same window
    for row in fast + slow:
        assert abs(row["images_per_s"] * row["step_s"] - 16) < 1e-3 * 16
