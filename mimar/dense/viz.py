"""``segment.png`` / ``detect.png``: test images, their ground truth, and the prediction."""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from mimar import writes
from mimar.dense.heads import IGNORE

SCORE_SHOWN = 0.5  # predicted boxes drawn from this score up


def _palette(num_classes: int) -> ListedColormap:
    """Background black, then matplotlib's tab20 colours; index 255 (ignore) white."""
    from matplotlib import colormaps

    tab = colormaps["tab20"].colors
    return ListedColormap([(0, 0, 0), *[tab[i % 20] for i in range(num_classes - 1)]])


def save_dense_picture(data, rows: torch.Tensor, pred, task: str, path: str | Path) -> Path:
    """Three rows per picture: input, ground truth, prediction (``pred``: ``(n, H, W)`` class
    maps for ``segment``, torchvision detections for ``detect``)."""
    n, names = len(rows), data.class_names
    fig = Figure(figsize=(1.6 * n, 5.0))
    FigureCanvasAgg(fig)
    cmap = _palette(data.num_classes)
    for j, i in enumerate(rows.tolist()):
        image = data.images[i].float().mean(0)  # (H, W) gray
        for r, title in enumerate(("input", "ground truth", "prediction")):
            ax = fig.add_subplot(3, n, r * n + j + 1)
            ax.set_axis_off()
            if j == 0:
                ax.set_title(title, fontsize=7, loc="left")
            if task == "segment" and r > 0:
                labels = data.semantic[i] if r == 1 else pred[j].cpu()
                shown = torch.where(labels == IGNORE, 0, labels)
                ax.imshow(
                    shown.numpy(),
                    cmap=cmap,
                    vmin=0,
                    vmax=data.num_classes - 1,
                    interpolation="nearest",
                )
                continue
            ax.imshow(image.numpy(), cmap="gray", vmin=0, vmax=255)
            if task == "detect" and r > 0:
                if r == 1:
                    boxes, labels, scores = data.boxes[i], data.classes[i], None
                else:
                    keep = pred[j]["scores"] >= SCORE_SHOWN
                    boxes, labels = pred[j]["boxes"][keep].cpu(), pred[j]["labels"][keep].cpu()
                    scores = pred[j]["scores"][keep].cpu()
                for k, (box, label) in enumerate(zip(boxes.tolist(), labels.tolist())):
                    colour = cmap(label)
                    x1, y1, x2, y2 = box
                    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, lw=1, ec=colour))
                    text = names[label - 1] + ("" if scores is None else f" {scores[k]:.2f}")
                    ax.text(x1, y1, text, fontsize=4, color=colour, va="bottom")
    fig.tight_layout()
    path = Path(path)
    writes.save_with(path, lambda name: fig.savefig(name, dpi=120), "picture")
    return path
