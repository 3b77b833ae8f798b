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
    "train.monitor_every=0",  # the tiny recipes probe at mid-run and at the end; tests not
]

# 16 px, main patch 4 -> 16 main patches (4 kept); stages 8 / 16 / 32; neck 16; decoder 32
ITPN_TINY = [
    "data.name=synthetic",
    "data.synthetic_size=128",
    "data.batch_size=16",
    "data.img_size=16",
    "backbone.img_size=16",
    "backbone.embed_dim=32",
    "backbone.mlp_depth=1",
    "backbone.depth=2",
    "backbone.num_heads=2",
    "method.fpn_dim=16",
    "method.decoder_dim=32",
    "method.decoder_depth=1",
    "method.decoder_num_heads=2",
    "train.precision=fp32",
    "train.progress=false",
    "train.threads=1",
    "train.checkpoint_every=5",
    "train.monitor_every=0",
]


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}  # not the monitor's rows


def loss_ends(run_dir: Path, k: int) -> tuple[float, float]:
    """Mean loss of the first ``k`` and of the last ``k`` logged steps of a run."""
    curve = losses(run_dir)
    steps = sorted(curve)
    return sum(curve[s] for s in steps[:k]) / k, sum(curve[s] for s in steps[-k:]) / k


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


def tiny_vit(**overrides):
    """A 16 px, patch 4 (4x4 grid), 1-channel ViT of width 32, depth 2, 2 heads."""
    from mimar.backbones.vit import ViT, ViTConfig

    kwargs = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2)
    return ViT(ViTConfig(**{**kwargs, **overrides}))


def patch_teacher(patch=4, grid=None, mean=0.0, std=1.0):
    """A toy frozen teacher on 16 px, 1-channel images: a fixed linear map of each
    ``patch x patch`` patch (D_t = 8), with the mean feature as class token. ``grid`` is the
    output grid (None: the teacher's own); ``mean`` / ``std`` the data statistics."""
    import torch
    from torch import nn

    from mimar.teachers import FrozenTeacher, TeacherModel

    class PatchMap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Conv2d(1, 8, patch, stride=patch)

        def forward(self, x: torch.Tensor):
            feature_map = self.proj(x)  # (B, 8, h, w)
            return feature_map, feature_map.mean((2, 3))

    net = PatchMap()
    source = TeacherModel(net, net, 16, 1, (mean,), (std,), "toy")
    return FrozenTeacher(source, student_grid=grid, data_mean=(mean,), data_std=(std,))


def tiny_teacher_run(run_dir: Path) -> Path:
    """A 1-step tiny SimMIM run on synthetic data (16 px, width 32): a frozen mimar teacher
    for the recipes that need one (``teacher.kind=mimar teacher.path=RUN_DIR``)."""
    from mimar.cli import main

    argv = ["pretrain", DEMO, *TINY, "train.steps=1", "--run-dir", str(run_dir)]
    assert main(argv) == 0
    return Path(run_dir)


def default_signals() -> None:
    """``preexec_fn`` of a child that a user's shell would start: SIGINT, SIGTERM and SIGHUP at
    their defaults. A suite run under ``nohup`` or as a background job (``&``) hands its
    children SIGHUP / SIGINT ignored, and mimar leaves an ignored signal ignored by design
    (docs/reliability.md), so a signal test would otherwise test the launcher."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)

