"""Pictures of robustness results: top-1 against severity, and one image under every
corruption and severity."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from mimar import writes
from mimar.evaluation.corruptions import CORRUPTIONS, SEVERITIES, corrupt


def plot_robustness(results: dict | Sequence[tuple[str, dict]], path: str | Path) -> Path:
    """Top-1 against severity (0 = clean), one line per corruption and one panel per result.

    Args:
        results: one :func:`evaluate_robustness` dict, or ``(label, dict)`` pairs (e.g.
            pretrained and from scratch) drawn side by side on a shared y axis.
        path: the PNG to write.
    """
    runs = [("", results)] if isinstance(results, dict) else list(results)
    if not runs:
        raise ValueError("plot_robustness needs at least one result")
    fig = Figure(figsize=(4.2 * len(runs) + 2.2, 4.2))
    FigureCanvasAgg(fig)  # attaches itself to the figure: renders to files, no backend needed
    axes = fig.subplots(1, len(runs), sharey=True, squeeze=False)[0]
    colours = matplotlib.colormaps["tab10"]
    for ax, (label, run) in zip(axes, runs):
        levels = [0, *run["severities"]]
        for k, (name, row) in enumerate(run["per_corruption"].items()):
            values = [run["clean_top1"], *(row[str(s)] for s in run["severities"])]
            style = {
                "color": colours(k % 10),
                "ls": "-" if k < 10 else "--",
                "marker": "os^D"[k % 4],
            }
            ax.plot(levels, values, ms=3, lw=1.2, label=name, **style)
        mean = [run["clean_top1"], *_mean_per_severity(run)]
        ax.plot(levels, mean, color="black", lw=2.5, label="mean")
        title = f"{label}: " if label else ""
        ax.set_title(
            f"{title}clean {run['clean_top1']:.1f}, corrupted {run['mean_corruption_top1']:.1f}",
            fontsize=9,
        )
        ax.set_xlabel("severity (0 = clean)")
        ax.set_xticks(levels)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("top-1 (%)")
    axes[-1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    return _save(fig, path)


def plot_corruptions(
    image: torch.Tensor,
    path: str | Path,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = (0, *SEVERITIES),
    seed: int = 0,
) -> Path:
    """One uint8 ``(C, H, W)`` image under every corruption (rows) and severity (columns)."""
    if image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(f"need one uint8 (C, H, W) image, got {image.dtype} {tuple(image.shape)}")
    fig = Figure(figsize=(1.1 * len(severities) + 1.2, 1.1 * len(corruptions) + 0.3))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(corruptions), len(severities), squeeze=False)
    for r, name in enumerate(corruptions):
        for c, severity in enumerate(severities):
            pixels = corrupt(image[None].cpu(), name, severity, seed)[0].permute(1, 2, 0).numpy()
            ax = axes[r][c]
            ax.imshow(
                pixels[..., 0] if pixels.shape[-1] == 1 else pixels, cmap="gray", vmin=0, vmax=255
            )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"severity {severity}", fontsize=8)
        axes[r][0].set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.tight_layout()
    return _save(fig, path)


def _mean_per_severity(run: dict) -> list[float]:
    rows = run["per_corruption"].values()
    return [sum(row[str(s)] for row in rows) / len(rows) for s in run["severities"]]


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    writes.save_with(path, lambda name: fig.savefig(name, dpi=100), "picture")
    return path
