"""Pictures: one grid of image rows (input / corrupted input / prediction) per method.

One function per method kind, ``<kind>_rows(method, images, generator) -> dict``, draws the
method's corruption from ``generator`` and returns ``{row title: (B, C, H, W) images in the
data's normalisation}`` and a ``"caption"``. They call the methods' public steps only
(``sample_corruption``, ``reconstruct``, ``predict``, ``target``, ...), so that the method files
hold the paper's steps and nothing else. Each method's entry in :data:`mimar.names.METHODS`
names its function (``picture=``), so this module imports no method; ``picture_for(method)``
finds it and ``save_reconstruction`` draws the rows of any of them as one PNG.

Figures are built from ``matplotlib.figure.Figure`` on the Agg canvas, without pyplot: importing
this module selects no matplotlib backend and nothing here needs a display.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import nn

from mimar import names, writes
from mimar.masking import hidden_from_keep
from mimar.targets import patchify, unpatchify, upsample_mask

Rows = Callable[[nn.Module, torch.Tensor, torch.Generator | None], dict]


# --- one picture per method ------------------------------------------------------------------


@torch.no_grad()
def simmim_rows(method: nn.Module, images: torch.Tensor, generator=None) -> dict:
    """Input, input with the hidden cells blanked, and the prediction pasted into the hidden
    cells (visible pixels are shown as given)."""
    mask = method.sample_corruption(images.shape[0], generator)["mask"].to(images.device)
    pixel_mask = upsample_mask(mask, method.masking.grid, method.backbone.patch_size)
    prediction = method.reconstruct(images, mask).float()  # (B, C, H, W)
    return {
        "original": images,
        "masked": _blank(images, pixel_mask),
        "reconstruction": images * (1 - pixel_mask) + prediction * pixel_mask,
    }


def _cosine_rows(method, images: torch.Tensor, mask: torch.Tensor, cos: torch.Tensor) -> dict:
    """Input, input with the hidden patches blanked, and a per-patch cosine map ``cos (B, N)``
    as brightness (black -1, white +1), encoded like normalised images."""
    g, p = method.backbone.grid_size, method.backbone.patch_size
    pixel_mask = upsample_mask(mask, g, p)  # (B, 1, H, W)
    brightness = upsample_mask((cos + 1) / 2, g, p)  # (B, 1, H, W) in [0, 1]
    return {
        "original": images,
        "masked": _blank(images, pixel_mask),
        "cosine to teacher": _normalised(brightness, method.teacher),
    }


@torch.no_grad()
def eva_rows(method: nn.Module, images: torch.Tensor, generator=None) -> dict:
    """Input, input with the hidden patches blanked, and the per-patch cosine similarity of the
    student's prediction to the teacher feature (black -1, white +1)."""
    mask = method.sample_corruption(images.shape[0], generator)["mask"].to(images.device)
    pred, target = method.predict(images, mask).float(), method.teacher(images)["tokens"]
    cos = F.cosine_similarity(pred, target, dim=-1)  # (B, N)
    g = method.backbone.grid_size
    return _cosine_rows(method, images, mask, cos) | {
        "caption": f"EVA: cosine(student, teacher) per patch, black -1 / white +1; "
        f"{mask.sum(1).float().mean():.0f} of {g * g} patches hidden, "
        f"mean cosine on hidden patches {cos[mask].mean().item():.2f}",
    }


@torch.no_grad()
def itpn_rows(method: nn.Module, images: torch.Tensor, generator=None) -> dict:
    """Input, input with the dropped patches blanked, and the kept patches with the dropped
    ones replaced by the prediction, de-normalised with each target patch's own mean and std
    (the model predicts normalised pixels)."""
    keep_ids = method.sample_corruption(images.shape[0], generator)["keep_ids"]
    keep_ids = keep_ids.to(images.device)  # (B, n)
    hidden = hidden_from_keep(keep_ids, method.num_patches)[..., None]  # (B, N, 1)
    pred = method.pixel_head(method.decode(images, keep_ids)).float()  # (B, N, T)
    p, C = method.backbone.patch_size, method.backbone.in_chans
    patches = patchify(images.float(), p)  # (B, N, T)
    mean, std = _patch_stats(patches, method.cfg.norm_pix_eps)
    masked = torch.where(hidden, images.amin().float(), patches)
    recon = torch.where(hidden, pred * std + mean, patches)
    return {
        "original": images,
        "masked": unpatchify(masked, p, C),
        "reconstruction": unpatchify(recon, p, C),
        "caption": f"iTPN: {method.num_keep} of {method.num_patches} main patches kept; the "
        "dropped ones predicted as normalised pixels, shown with the true patch mean/std",
    }


@torch.no_grad()
def itpn_clip_rows(method: nn.Module, images: torch.Tensor, generator=None) -> dict:
    """Input, input with the hidden patches blanked, and the per-patch cosine similarity of
    the main prediction to the teacher target (black -1, white +1)."""
    mask = method.sample_corruption(images.shape[0], generator)["mask"].to(images.device)
    pred = method.predict(images, mask)[0].float()  # (B, N, D_t), main branch
    cos = F.cosine_similarity(pred, method.target(method.teacher(images)["tokens"]), dim=-1)
    return _cosine_rows(method, images, mask, cos) | {
        "caption": f"iTPN-CLIP: cosine(prediction, teacher) per patch, black -1 / white +1; "
        f"mean on hidden patches {cos[mask].mean():.2f}, on visible {cos[~mask].mean():.2f}",
    }


@torch.no_grad()
def aim_rows(method: nn.Module, images: torch.Tensor, generator=None) -> dict:
    """Input, the prefix (first half of the order), and the image with every later patch
    replaced by its one-step-ahead prediction (teacher forcing), de-normalised with the
    *target* patch's own mean and std, as the model predicts normalised pixels. The prefix
    length is fixed, so ``generator`` is not used."""
    B, n, p = images.shape[0], method.num_patches, method.backbone.patch_size
    S = n // 2
    pred = method.predict(images, torch.full((B,), S, device=images.device)).float()
    seq = patchify(images.float(), p)[:, method.order]  # (B, N, T) raw pixels, sequence order
    mean, std = _patch_stats(seq, method.cfg.norm_pix_eps)
    guess = pred[:, :-1] * std[:, 1:] + mean[:, 1:]  # predictions of patches 1..N-1
    prefix, recon = seq.clone(), seq.clone()
    prefix[:, S:] = images.amin()
    recon[:, S:] = guess[:, S - 1 :]
    rows = {}
    for title, x in (("original", seq), ("prefix", prefix), ("next-patch prediction", recon)):
        raster = torch.empty_like(x)
        raster[:, method.order] = x  # back from sequence order to row-major patches
        rows[title] = unpatchify(raster, p, method.backbone.in_chans)
    rows["caption"] = (
        f"AIM: prefix = first {S} of {n} patches ({method.cfg.order} order); every later patch "
        "is predicted from the true patches before it, de-normalised with the target "
        "patch's own mean and variance"
    )
    return rows


@torch.no_grad()
def digpt_rows(method: nn.Module, images: torch.Tensor, generator=None) -> dict:
    """Input; what the encoder sees (its clusters, the last one blacked out) with the reading
    order drawn as brightness (first cluster darkest); and the per-token cosine similarity of
    the generative prediction to the teacher feature (black -1, white +1) on the teacher's
    grid; the first cluster read has no generative prediction."""
    B, size = images.shape[0], images.shape[-2:]
    order = method.sample_corruption(B, generator)["order"].to(images.device)  # (B, K)
    pred = method.predict(images, order)["gen"].float()
    target = method.teacher_tokens(method.teacher(images)["tokens"], order)  # (B, K, s_t, D_t)
    cos = F.cosine_similarity(method.to_teacher_grid(pred[:, 1:]), target[:, 1:], dim=-1)
    K, g, gt = method.num_clusters, method.backbone.grid_size, method.teacher.grid[0]
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(K, device=order.device).expand(B, -1))  # slot of c
    cluster_of = method.clusters.flatten().argsort() // method.cluster_size  # (N,) per patch
    per_patch = rank[:, cluster_of]  # (B, N) reading slot of each student patch
    shade = torch.where(per_patch < K - 1, 0.4 + 0.6 * per_patch / max(K - 2, 1), 0.0)
    per_token = torch.zeros(B, gt * gt, device=images.device)  # slot 0: no prediction
    ids = method.teacher_clusters[order[:, 1:]].flatten(1)  # (B, slots * s_t) token ids
    per_token.scatter_(1, ids, (cos.flatten(1) + 1) / 2)
    mean, std = _stats(method.teacher.data_mean, images), _stats(method.teacher.data_std, images)
    pixels = images * std + mean  # [0, 1]
    return {
        "original": images,
        "encoder input": (pixels * _cells_to_image(shade, g, size) - mean) / std,
        "cosine to teacher": _normalised(_cells_to_image(per_token, gt, size), method.teacher),
        "caption": f"D-iGPT: {K} clusters read in a random order per image (middle row: "
        "darker = read earlier, black = never shown to the encoder); bottom: "
        "cosine(generative prediction, teacher) per teacher token, black -1 / white +1 "
        f"(mean {cos.mean():.2f}); the first cluster read is not predicted (black)",
    }


def picture_for(method: nn.Module) -> Rows | None:
    """The picture function that ``method``'s entry in ``names.METHODS`` names, or ``None``
    (not a method of the table, or one without a picture)."""
    entry = names.method_entry_of(method)
    return entry.picture_function() if entry is not None else None


def has_picture(method: nn.Module) -> bool:
    return picture_for(method) is not None


def reconstruction_rows(
    method: nn.Module, images: torch.Tensor, generator: torch.Generator | None = None
) -> dict:
    """The rows of ``method``'s picture: ``{title: (B, C, H, W) normalised images}`` (and a
    ``"caption"``), its corruption drawn from ``generator``."""
    rows = picture_for(method)
    if rows is None:
        raise ValueError(f"{type(method).__name__} has no reconstruction picture")
    return rows(method, images, generator)


# --- drawing ---------------------------------------------------------------------------------


def denormalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Undo mean/std normalisation and clamp to [0, 1]: ``(B, C, H, W)``."""
    return (images * _stats(std, images) + _stats(mean, images)).clamp(0, 1)


@torch.no_grad()
def save_reconstruction(
    method: nn.Module,
    images: torch.Tensor,
    path: str | Path,
    *,
    mean,
    std,
    generator: torch.Generator | None = None,
    caption: str | None = None,
) -> Path:
    """Draw ``reconstruction_rows(method, images, generator)`` (in eval mode) as one grid,
    each row de-normalised with the data's ``mean`` / ``std``; returns the PNG's path."""
    was_training = method.training
    method.eval()
    rows = reconstruction_rows(method, images, generator)
    method.train(was_training)
    caption = rows.pop("caption", caption)
    titles, grids = list(rows), [denormalize(r.float().cpu(), mean, std) for r in rows.values()]
    n = grids[0].shape[0]
    fig = Figure(figsize=(1.4 * n, 1.5 * len(grids)))
    FigureCanvasAgg(fig)  # attaches itself to the figure: renders to files, no backend needed
    axes = fig.subplots(len(grids), n, squeeze=False)
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
    writes.save_with(path, lambda name: fig.savefig(name, dpi=100), "picture")
    return path


# --- pixel helpers ---------------------------------------------------------------------------


def _stats(values, like: torch.Tensor) -> torch.Tensor:
    """Per-channel statistics as a ``(1, C, 1, 1)`` tensor of ``like``'s dtype and device."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)


def _blank(images: torch.Tensor, pixel_mask: torch.Tensor) -> torch.Tensor:
    """Hidden pixels (``pixel_mask`` 1) set to the darkest normalised value of the batch."""
    return images * (1 - pixel_mask) + images.amin() * pixel_mask


def _normalised(brightness: torch.Tensor, teacher) -> torch.Tensor:
    """A ``[0, 1]`` map encoded as a normalised image, so that ``denormalize`` shows it as is."""
    mean, std = _stats(teacher.data_mean, brightness), _stats(teacher.data_std, brightness)
    return (brightness - mean) / std


def _patch_stats(patches: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Each patch's mean and std as ``targets.normalize_patches`` computes them: ``(B, N, 1)``."""
    return patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + eps).sqrt()


def _cells_to_image(values: torch.Tensor, grid: int, size) -> torch.Tensor:
    """``(B, grid * grid)`` per-cell values -> ``(B, 1, H, W)``, constant over each cell."""
    cells = values.float().reshape(-1, 1, grid, grid)
    return F.interpolate(cells, size=tuple(size), mode="nearest")
