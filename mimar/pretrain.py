"""``mimar pretrain``: a recipe -> its method, data and schedule, trained by the engine.

The engine (``mimar.engine.loop.fit``) knows no method: this module builds the method from the
config (seeded first, so the initial weights are a function of ``train.seed``), the step
loader for this rank, and draws the run's picture at the end.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from mimar import machine, recipe_yaml, runs, writes
from mimar.config import ConfigError, PretrainConfig, config_diff, from_dict, to_dict
from mimar.data import build_train_loader
from mimar.engine import checkpoint, dist, fsdp
from mimar.engine.loop import Hook, Run, RunResult, Session, StepView, fit
from mimar.factory import build_method
from mimar.formats.init import init_from
from mimar.monitor import training_hooks

log = logging.getLogger("mimar")

# What a resume may change without a flag: none of these changes the run's numbers
# (train.steps extends the run; its schedule then ends at the new step count).
RESUME_SAFE = ("progress", "log_every", "checkpoint_every", "loggers", "picture_every")
RESUME_SAFE += ("monitor_every", "monitor", "monitor_bank", "monitor_queries")  # reads only
RESUME_SAFE = tuple(f"train.{key}" for key in (*RESUME_SAFE, "threads", "device", "steps", "init"))


def pretrain(
    cfg: PretrainConfig,
    run_dir: str | Path,
    resume: bool = False,
    allow_config_change: bool = False,
) -> RunResult:
    """Pretrain ``cfg``'s method into ``run_dir`` (``resume``: continue its last checkpoint;
    one whose config differs from ``RUN/config.yaml`` in a key that changes the run's numbers
    is refused unless ``allow_config_change``, which records each change in
    ``RUN/config_changes.jsonl``)."""
    with runs.locked_run(run_dir, take=runs.lock_rank()):
        return _pretrain(cfg, Path(run_dir), resume, allow_config_change)


def _pretrain(cfg: PretrainConfig, run_dir: Path, resume: bool, allow: bool) -> RunResult:
    t = cfg.train
    check_fits(cfg)
    changes = resume_changes(cfg, run_dir, allow) if resume else []
    with Session(t) as session:
        torch.manual_seed(t.seed)
        method = build_method(cfg)
        init_from(method, t.init, resume)  # train.init: weights only, not on --resume
        loader = build_train_loader(
            cfg.data,
            seed=t.seed,
            rank=session.rank,
            world_size=session.world,
            pin_memory=session.device.type == "cuda",
        )

        def picture(view: StepView) -> Path | None:  # every train.picture_every steps
            name = f"{runs.PICTURES}/step_{view.step:07d}.png"
            with writes.optional("picture"):  # a picture never stops training
                return _draw(view.model, loader, Path(run_dir), session.device, name)
            return None

        run = Run(Path(run_dir), to_dict(cfg), resume=resume, changes=changes)
        hooks = [Hook(t.picture_every, picture)] if t.picture_every else []
        hooks += training_hooks(cfg, method, loader, run_dir, session.device, session.rank)
        result = fit(session, method, loader, train=t, optim=cfg.optim, run=run, hooks=hooks)
        if result.stopped_by is None:
            if session.rank == 0:  # result.model: whole on rank 0, also under FSDP
                with writes.optional("the run's picture"):
                    _draw(result.model, loader, run_dir, session.device)
            dist.barrier()  # no rank leaves the group while rank 0 draws
        return result


def check_fits(cfg: PretrainConfig) -> None:
    """Refuse, before anything is allocated, a model whose weights, gradients and AdamW state
    (16 bytes a parameter) plus a lower bound of one micro-batch's activations exceed the
    memory of the device it would train on. The parameter count is the transformer blocks'
    alone (``(4 + 2 mlp_ratio) D^2`` a block); activations count a quarter of the tokens (the
    fewest any method encodes), ``D`` floats each, 4 tensors a block kept for backward (1 with
    ``train.grad_checkpointing``). Both are lower bounds: what is refused cannot fit."""
    b = cfg.backbone
    width = getattr(b, "embed_dim", None)
    depth = getattr(b, "depth", None) or sum(getattr(b, "depths", ()) or ())
    patch = getattr(b, "patch_size", None)
    if not (width and depth and patch):
        return
    ratio = float(getattr(b, "mlp_ratio", 4.0))
    params = depth * (4 + 2 * ratio) * width**2
    tokens = (cfg.data.img_size // patch) ** 2
    ranks = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    micro_batch = cfg.data.batch_size // ranks // max(1, cfg.train.accum_steps)
    kept = 1 if cfg.train.grad_checkpointing else 4
    activations = micro_batch * (tokens // 4) * width * depth * 4 * kept
    need = 16 * params + activations
    memory, where = machine.device_memory(cfg.train.device)
    if need > memory:
        raise ConfigError(
            f"this model cannot fit: at least {machine.gib(need)} ({params / 1e9:,.2f} G "
            f"parameters x 16 bytes with AdamW = {machine.gib(16 * params)}, plus "
            f"{machine.gib(activations)} of activations for data.batch_size={cfg.data.batch_size}"
            f" at {tokens} tokens) against {where}; check backbone.embed_dim / depth and "
            "data.img_size / batch_size"
        )


def resume_changes(cfg: PretrainConfig, run_dir: Path, allow: bool) -> list[dict]:
    """The changes of ``cfg`` against the config the run's checkpoint was trained with (the
    reference: ``RUN/config.yaml`` is a copy for humans, and a hand edit of it changes
    nothing) that a resume must not make silently, as ``{"key", "old", "new"}`` rows; a
    ConfigError lists them unless ``allow``. A ``config.yaml`` that disagrees with the
    checkpoint is reported as a warning."""
    last = runs.newest_checkpoint(run_dir)
    if last is None:  # fit says what is missing
        return []
    saved = _checkpoint_config(last)
    try:  # the saved config as today's code resolves it (keys added since get defaults)
        saved = to_dict(from_dict(saved))
    except ConfigError:
        pass
    _report_edited_copy(run_dir / runs.CONFIG, saved)
    changes = [
        {"key": key, "old": old, "new": new}
        for key, old, new in config_diff(saved, to_dict(cfg))
        if not _harmless(key, old, new)
    ]
    if changes and not allow:
        shown = ", ".join(f"{c['key']} {_show(c['old'])} -> {_show(c['new'])}" for c in changes)
        raise ConfigError(
            f"resume: the config differs from the one {last} was trained with: {shown}; "
            "pass --allow-config-change to force"
        )
    return changes


def _checkpoint_config(path: Path) -> dict:
    """The config a checkpoint carries, read without loading its tensors into memory (the
    content hash is checked when fit loads it)."""
    if path.is_dir():
        return fsdp.read_meta(path)["config"]
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # fit's checkpoint.load names the problem in one line
        return checkpoint.load(path, require=checkpoint.RESUME_KEYS)["config"]
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        return checkpoint.load(path, require=checkpoint.RESUME_KEYS)["config"]
    return state["config"]


def _report_edited_copy(path: Path, saved: dict) -> None:
    """Warn when ``RUN/config.yaml`` is gone or differs from the checkpoint's config."""
    try:
        copy = recipe_yaml.load(path.read_text(), str(path)) if path.is_file() else None
        copy = to_dict(from_dict(copy)) if isinstance(copy, dict) else copy
    except (ConfigError, OSError, UnicodeDecodeError):
        copy = "unreadable"
    if copy is None:
        log.warning("%s is missing: resuming with the checkpoint's config", path)
    elif copy != saved:
        keys = [key for key, _, _ in config_diff(saved, copy)] if isinstance(copy, dict) else []
        shown = ", ".join(keys[:5]) or "unreadable"
        log.warning(
            "%s differs from the checkpoint's config (%s): the checkpoint's is the reference; "
            "the file is rewritten from it",
            path,
            shown,
        )


def _harmless(key: str, old, new) -> bool:
    if key == "train.steps":  # more steps extend the run; fewer would change its schedule
        return isinstance(old, int) and isinstance(new, int) and new >= old
    return key in RESUME_SAFE


def _show(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _draw(
    method, loader, run_dir: Path, device: torch.device, name: str = runs.PICTURE
) -> Path | None:
    """The run's picture of the first batch's first 8 images as ``run_dir / name`` (None when
    the method draws none)."""
    from mimar import viz  # only here: drawing needs matplotlib and every method's picture

    if viz.has_picture(method):
        images = loader.images
        writes.make_dir((run_dir / name).parent, "pictures folder")
        return viz.save_reconstruction(
            method,
            loader.batch(0)[:8].to(device),
            run_dir / name,
            mean=images.mean,
            std=images.std,
            generator=loader.generator_for(0),
        )
    return None
