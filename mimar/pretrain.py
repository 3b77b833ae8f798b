"""``mimar pretrain``: a recipe -> its method, data and schedule, trained by the engine.

The engine (``mimar.engine.loop.fit``) knows no method: this module builds the method from the
config (seeded first, so the initial weights are a function of ``train.seed``), the step
loader for this rank, and draws the run's picture at the end.
"""

from __future__ import annotations

from pathlib import Path

import torch

from mimar import runs
from mimar.config import PretrainConfig, to_dict
from mimar.data import build_step_loader, load_images
from mimar.engine import dist
from mimar.engine.loop import RunResult, Session, fit
from mimar.factory import build_method


def pretrain(cfg: PretrainConfig, run_dir: str | Path, resume: bool = False) -> RunResult:
    """Pretrain ``cfg``'s method into ``run_dir`` (``resume``: continue its last checkpoint)."""
    t = cfg.train
    with Session(t) as session:
        torch.manual_seed(t.seed)
        method = build_method(cfg)
        images = load_images(cfg.data, "train")
        loader = build_step_loader(
            cfg.data, images, seed=t.seed, rank=session.rank, world_size=session.world
        )
        result = fit(
            session,
            method,
            loader,
            optim=cfg.optim,
            train=t,
            run_dir=run_dir,
            config=to_dict(cfg),
            resume=resume,
            picture=lambda model, step: _draw(
                method,
                loader,
                Path(run_dir),
                session.device,
                f"{runs.PICTURES}/step_{step:07d}.png",
            ),
        )
        if result.stopped_by is None:
            if session.rank == 0:
                _draw(method, loader, Path(run_dir), session.device)
            dist.barrier()  # no rank leaves the group while rank 0 draws
        return result


def _draw(
    method, loader, run_dir: Path, device: torch.device, name: str = runs.PICTURE
) -> Path | None:
    """The run's picture of the first batch's first 8 images as ``run_dir / name`` (None when
    the method draws none)."""
    from mimar import viz  # only here: drawing needs matplotlib and every method's picture

    if viz.has_picture(method):
        images = loader.images
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        return viz.save_reconstruction(
            method,
            loader.batch(0)[:8].to(device),
            run_dir / name,
            mean=images.mean,
            std=images.std,
            generator=loader.generator_for(0),
        )
    return None
