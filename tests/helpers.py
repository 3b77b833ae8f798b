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
