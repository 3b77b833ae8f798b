"""Shared test settings: a tiny SimMIM recipe on synthetic data (seconds per run)."""

import json
from pathlib import Path

DEMO = "configs/simmim/vit_tiny_fmnist.yaml"
TINY = [
    "data.name=synthetic",
    "data.synthetic_size=128",
    "data.batch_size=16",
    "data.img_size=16",
    "backbone.img_size=16",
    "backbone.embed_dim=32",
    "backbone.depth=2",
    "backbone.num_heads=2",
    "method.mask_patch_size=8",
    "train.precision=fp32",
    "train.progress=false",
    "train.checkpoint_every=5",
    "train.threads=1",
]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}


def images(b=2, seed=1, size=16, chans=1):
    """A fixed batch of standard-normal images ``(b, chans, size, size)``."""
    import torch

    return torch.randn(b, chans, size, size, generator=torch.Generator().manual_seed(seed))


def perturb_patch(images, patch_id, patch=4, grid=4):
    """A copy of ``images`` with +1 added to every pixel of row-major patch ``patch_id``."""
    out = images.clone()
    r, c = divmod(patch_id, grid)
    out[:, :, r * patch : (r + 1) * patch, c * patch : (c + 1) * patch] += 1.0
    return out
