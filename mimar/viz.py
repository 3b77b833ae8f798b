"""Pictures: reconstruction grids (rows of original / masked / predicted images)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402


def denormalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Undo mean/std normalisation and clamp to [0, 1]: ``(B, C, H, W)``."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)


@torch.no_grad()
def save_reconstruction(
    method,
    images: torch.Tensor,
    path: str | Path,
    *,
    mean,
    std,
    generator: torch.Generator | None = None,
    caption: str | None = None,
) -> Path:
    """Ask ``method.visualize(images, generator)`` for rows and draw them as one grid.

    ``visualize`` returns ``{row title: (B, C, H, W) normalised images}`` (and may add a
    ``"caption"`` string); each row is denormalised with the data's mean/std for display.
    """
    was_training = method.training
    method.eval()
    rows = method.visualize(images, generator)
    method.train(was_training)
    caption = rows.pop("caption", caption)
    titles, grids = list(rows), [denormalize(r.float().cpu(), mean, std) for r in rows.values()]
    n = grids[0].shape[0]
    fig, axes = plt.subplots(len(grids), n, figsize=(1.4 * n, 1.5 * len(grids)), squeeze=False)
    for r, (title, grid) in enumerate(zip(titles, grids)):
        for c in range(n):
            ax = axes[r][c]
            img = grid[c].permute(1, 2, 0).numpy()
            ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[r][0].set_ylabel(title, fontsize=9)
    if caption:
        fig.suptitle(textwrap.fill(caption, width=max(60, 16 * n)), fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
