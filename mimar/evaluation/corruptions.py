"""ImageNet-C-style corruptions and small geometric shifts of uint8 image batches.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019, arXiv:1903.12261. A test set is re-rendered under each corruption at
five severities and top-1 is measured on every copy; ``mean_corruption_top1`` averages over types
and severities (the paper's mCE further divides by AlexNet's errors, which we do not have).
We keep the twelve non-weather corruptions of ImageNet-C's common set, and add rotation and
translation, the spatial shifts of Engstrom et al. 2019 (arXiv:1712.02779: up to 30 degrees).

Implementation: batched torch, written here. We measured the reference code packaged on PyPI,
``imagecorruptions`` 1.1.2 (2020), under Python 3.11.7, numpy 2.4.6, scipy 1.17.1,
scikit-image 0.26.0, opencv-python-headless 5.0.0.93: it does not import without
``pkg_resources`` (gone from setuptools >= 81; this venv has 84.2.1); with it, glass_blur and
gaussian_blur raise TypeError (skimage dropped ``multichannel``) and fog raises AttributeError
(numpy 2 dropped ``np.float_``); ``corrupt()`` refuses images under 32 px; motion_blur fails on
2-D gray input; its tables are ImageNet's 224-px ones (defocus radius 3-10 px, motion radius
10-20 px); it draws from numpy's global RNG, and impulse_noise cannot be reseeded at all
(skimage draws from a fresh ``default_rng``). It would also add scipy, scikit-image and opencv.
Its speed, 1000 RGB 28-px images at severity 3 on one core (ms): gaussian 81, shot 252,
impulse 100, defocus 200, motion 890, zoom 1860, contrast 71, brightness 470, pixelate 37,
jpeg 154, elastic 480. Ours, same images (its 224-px tables, ours the 32-px ones, so only a
rough comparison; best of 3, ms RGB / gray): gaussian 63/23, shot 112/50, impulse 54/29, defocus
94/40, glass 135/81, motion 196/198, zoom 191/98, brightness 24/14, contrast 19/11, elastic
80/74, pixelate 51/16, jpeg 188/153, rotation 50/25, translation 53/32. They need no new
dependency, take any C and size, and draw every image's randomness from its own generator
seeded by (seed, corruption, severity, dataset index), so a batch or subset never changes an
image's corruption. torchvision 0.29's v2 transforms draw one parameter set per call, for
the whole batch, from torch's global RNG (e.g. ``RandomRotation.make_params``), and its JPEG
codec (``torchvision.io``) warns that it is deprecated; kornia was not tried.

Parameters are the authors' CIFAR-10-C tables (``ImageNet-C/create_c/make_cifar_c.py`` in
hendrycks/robustness), their own rescaling of ImageNet-C to 32 px; lengths in pixels (blur
radii and sigmas, motion length, glass shift) are further multiplied by S / 32 for side S, and
elastic / translation are fractions of S. Deviations, each for a continuous scaling or for
batching: the defocus disk is pixel-area coverage (not a disk thresholded on the integer grid),
motion blur samples its taps bilinearly (ImageMagick rounds them to whole pixels), Gaussian
smoothing reflects at the border (skimage repeats the edge), pixelate resamples by exact area
overlap both ways (PIL's BOX), and the result is rounded, not truncated, to uint8. Corruption
runs on the CPU, so the pixels do not depend on the device the classifier uses.

The tables are the authors'; under them elastic_transform moves pixels most at severity 1 (its
affine part shrinks as the elastic part grows) and motion_blur's severities 3 and 4 nearly agree.

This file is over 400 lines because the fourteen corruptions belong together, each one short
function beside its table and the pixel helpers they share; the evaluator is
:mod:`mimar.evaluation.robustness`, its pictures :mod:`mimar.evaluation.robustness_plots`.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mimar.data.loader import derive_seed
from mimar.errors import ConfigError

IMPLEMENTATION = "mimar.evaluation.robustness (torch; CIFAR-10-C tables, lengths x S/32)"
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# --- parameter tables, one value per severity 1..5 (CIFAR-10-C unless said otherwise) ----------
_GAUSSIAN_SIGMA = (0.04, 0.06, 0.08, 0.09, 0.10)  # std in [0, 1] pixel units
_SHOT_PHOTONS = (500, 250, 100, 75, 50)  # Poisson rate at a white pixel
_IMPULSE_AMOUNT = (0.01, 0.02, 0.03, 0.05, 0.07)  # fraction of values set to 0 or 1
_DEFOCUS = ((0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1.0, 0.2), (1.5, 0.1))  # (radius, alias) px
_GLASS = ((0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2))  # sigma, shift, its
_MOTION = ((6, 1.0), (6, 1.5), (6, 2.0), (8, 2.0), (9, 2.5))  # ImageMagick (radius, sigma) px
_ZOOM_STEPS = (7, 12, 16, 21, 26)  # zooms 1 + 0.01 k, k < steps (what make_cifar_c's arange gives)
_BRIGHTNESS = (0.05, 0.1, 0.15, 0.2, 0.3)  # added to HSV value
_CONTRAST = (0.75, 0.5, 0.4, 0.3, 0.15)  # factor on the deviation from the per-channel mean
_ELASTIC = (  # (alpha, sigma, affine shift) as fractions of the side: make_cifar_c's IMSIZE x
    (0.0, 0.0, 0.08),
    (0.05, 0.2, 0.07),
    (0.08, 0.06, 0.06),
    (0.1, 0.04, 0.05),
    (0.1, 0.03, 0.03),
)
_PIXELATE = (0.95, 0.9, 0.85, 0.75, 0.65)  # side of the coarse image / side
_JPEG_QUALITY = (80, 65, 58, 50, 40)  # libjpeg quality; the 8-px block is fixed, so no scaling
_ROTATION_DEG = (6.0, 12.0, 18.0, 24.0, 30.0)  # ours: up to Engstrom et al.'s 30 degrees
_TRANSLATION = (0.03, 0.06, 0.09, 0.12, 0.15)  # ours: shift length / side, random direction

# float (N, C, H, W) in [0, 1], severity 1-5, one generator per image -> float (N, C, H, W);
# ``corrupt`` converts from and to uint8, clamping and rounding.
Corruption = Callable[[torch.Tensor, int, list[torch.Generator]], torch.Tensor]


# --- noise -------------------------------------------------------------------------------------


def gaussian_noise(x: torch.Tensor, severity: int, gens: list[torch.Generator]) -> torch.Tensor:
    """Add zero-mean Gaussian noise to every value."""
    noise = _draw(gens, lambda g: torch.randn(x.shape[1:], generator=g))  # (N, C, H, W)
    return x + _GAUSSIAN_SIGMA[severity - 1] * noise


def shot_noise(x: torch.Tensor, severity: int, gens: list[torch.Generator]) -> torch.Tensor:
    """Photon counts: Poisson at the severity's rate times the pixel, rescaled."""
    photons = _SHOT_PHOTONS[severity - 1]
    counts = torch.stack([torch.poisson(xi * photons, generator=g) for xi, g in zip(x, gens)])
    return counts / photons


def impulse_noise(x: torch.Tensor, severity: int, gens: list[torch.Generator]) -> torch.Tensor:
    """Salt and pepper on every value independently, half each (skimage's ``s&p``)."""
    amount = _IMPULSE_AMOUNT[severity - 1]
    u = _draw(gens, lambda g: torch.rand(x.shape[1:], generator=g))  # (N, C, H, W)
    return torch.where(u < amount / 2, 0.0, torch.where(u < amount, 1.0, x))


# --- blur --------------------------------------------------------------------------------------


def defocus_blur(x: torch.Tensor, severity: int, gens: list[torch.Generator]) -> torch.Tensor:
    """Convolve with a lens-like disk (see ``_disk_kernel``)."""
    radius, alias = _DEFOCUS[severity - 1]
    scale = _scale(x)
    return _filter(x, _disk_kernel(radius * scale, alias * scale))


def glass_blur(x: torch.Tensor, severity: int, gens: list[torch.Generator]) -> torch.Tensor:
    """Blur, give pixels a random neighbour's value (bottom-right to top-left), blur again.

    ImageNet-C meant to swap the two pixels, but on an (H, W, 3) numpy array its tuple "swap"
    assigns through views, so the pixel takes its neighbour's value and the neighbour keeps
    its own. The released ImageNet-C and CIFAR-10-C (all RGB) were made that way; so are we.
    """
    sigma, shift, iterations = _GLASS[severity - 1]
    sigma, shift = sigma * _scale(x), max(1, round(shift * _scale(x)))
    x = _smooth(x, sigma).clone()
    n, _, h, w = x.shape
    places = [(i, j) for i in range(h - shift, shift, -1) for j in range(w - shift, shift, -1)]
    # numpy's randint(-shift, shift) excludes the upper end, so offsets lie in [-shift, shift)
    steps = (iterations, len(places), 2)
    offsets = _draw(gens, lambda g: torch.randint(-shift, shift, steps, generator=g))
    rows = torch.arange(n)
    for it in range(iterations):  # in order: with shift > 1 a pixel may read a changed one
        for p, (i, j) in enumerate(places):
            source = (rows, slice(None), i + offsets[:, it, p, 0], j + offsets[:, it, p, 1])
            x[rows, :, i, j] = x[source]  # (N, C)
    return _smooth(x, sigma)


def motion_blur(x: torch.Tensor, severity: int, gens: list[torch.Generator]) -> torch.Tensor:
    """ImageMagick's one-sided motion blur: half-Gaussian weights along a random angle."""
    radius, sigma = (v * _scale(x) for v in _MOTION[severity - 1])
    angle = _draw(gens, lambda g: torch.rand((), generator=g) * 90 - 45) * math.pi / 180  # (N,)
    taps = torch.arange(2 * round(radius) + 1, dtype=torch.float32)  # ImageMagick's 2 r + 1
    weights = torch.exp(-0.5 * (taps / sigma) ** 2)
    weights = weights / weights.sum()
    direction = torch.stack([angle.cos(), angle.sin()], dim=1)  # (N, 2) in (x, y) pixels
    base = _pixel_grid(x)  # (H, W, 2)
    out = torch.zeros_like(x)
    for t, weight in zip(taps, weights):
        where = base + t * direction.view(-1, 1, 1, 2)  # (N, H, W, 2)
        out = out + weight * _sample(x, where, "border")
    return out


def zoom_blur(x: torch.Tensor, severity: int, gens: list[torch.Generator]) -> torch.Tensor:
    """The mean of the image and its centre zooms by 1, 1.01, ... (no randomness)."""
    total = x.clone()
    for k in range(_ZOOM_STEPS[severity - 1]):
        zoom = 1 + 0.01 * k
        theta = torch.tensor([[1 / zoom, 0.0, 0.0], [0.0, 1 / zoom, 0.0]]).expand(len(x), 2, 3)
        total = total + _warp(x, theta, "border")
    return total / (_ZOOM_STEPS[severity - 1] + 1)


# --- digital -------------------------------------------------------------------------------------


def brightness(x: torch.Tensor, severity: int, gens: list[torch.Generator]) -> torch.Tensor:
    """Add to the HSV value with hue and saturation fixed: every channel scales by V' / V."""
    value = x.amax(dim=1, keepdim=True)  # (N, 1, H, W); for one channel V is the pixel
    lifted = (value + _BRIGHTNESS[severity - 1]).clamp(max=1)
    return torch.where(value > 0, x * lifted / value.clamp(min=1e-12), lifted)


def contrast(x: torch.Tensor, severity: int, gens: list[torch.Generator]) -> torch.Tensor:
    """Shrink each channel's deviation from its mean."""
    mean = x.mean(dim=(2, 3), keepdim=True)  # (N, C, 1, 1)
    return (x - mean) * _CONTRAST[severity - 1] + mean


def elastic_transform(x: torch.Tensor, severity: int, gens: list[torch.Generator]) -> torch.Tensor:
    """A random affine (three points moved), then a smooth random displacement field."""
    n, _, h, w = x.shape
    side = min(h, w)
    alpha, sigma, spread = (v * side for v in _ELASTIC[severity - 1])
    draws = _draw(gens, lambda g: torch.rand(6 + 2 * h * w, generator=g) * 2 - 1)  # U(-1, 1)
    centre, half = side // 2, side // 3
    corners = [[centre + half] * 2, [centre + half, centre - half], [centre - half] * 2]
    src = torch.tensor(corners, dtype=torch.float32)  # (3, 2), as make_cifar_c
    dst = src + spread * draws[:, :6].view(n, 3, 2)  # (N, 3, 2) points in (x, y) pixels
    ones = torch.ones(n, 3, 1)
    # solve [dst 1] A = [src 1]: the inverse map, from output pixels back to input pixels
    inverse = torch.linalg.solve(
        torch.cat([dst, ones], 2), torch.cat([src.expand(n, 3, 2), ones], 2)
    )
    field = draws[:, 6:].view(n, 2, h, w)
    field = alpha * _smooth(field, sigma, truncate=3.0)  # (N, 2, H, W) as (dx, dy)
    moved = _pixel_grid(x) + field.permute(0, 2, 3, 1)  # (N, H, W, 2)
    where = torch.cat([moved, torch.ones(n, h, w, 1)], 3) @ inverse[:, None]  # (N, H, W, 3)
    return _sample(x, where[..., :2], "reflection")


def pixelate(x: torch.Tensor, severity: int, gens: list[torch.Generator]) -> torch.Tensor:
    """Average down to a coarser grid and back up (area resampling both ways)."""
    h, w = x.shape[-2:]
    small_h, small_w = int(h * _PIXELATE[severity - 1]), int(w * _PIXELATE[severity - 1])
    small = _box_matrix(h, small_h) @ x @ _box_matrix(w, small_w).T  # (N, C, h', w')
    return _box_matrix(small_h, h) @ small @ _box_matrix(small_w, w).T


def jpeg_compression(x: torch.Tensor, severity: int, gens: list[torch.Generator]) -> torch.Tensor:
    """Encode and decode with Pillow at the severity's quality, as ImageNet-C does."""
    pixels = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # exact: from uint8
    decoded = [_jpeg_round_trip(p, _JPEG_QUALITY[severity - 1]) for p in pixels]  # (H, W, C)
    return torch.from_numpy(np.stack(decoded)).permute(0, 3, 1, 2).float() / 255


def _jpeg_round_trip(pixels: np.ndarray, quality: int) -> np.ndarray:
    gray = pixels.shape[-1] == 1
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if gray else pixels).save(buffer, "JPEG", quality=quality)
    decoded = np.asarray(Image.open(buffer))
    return decoded[..., None] if gray else decoded


# --- geometric -----------------------------------------------------------------------------------


def rotation(x: torch.Tensor, severity: int, gens: list[torch.Generator]) -> torch.Tensor:
    """Rotate about the centre by the severity's angle, clockwise or not at random; black fill."""
    h, w = x.shape[-2:]
    sign = _draw(gens, lambda g: torch.randint(0, 2, (), generator=g) * 2 - 1).float()  # (N,)
    angle = sign * _ROTATION_DEG[severity - 1] * math.pi / 180
    cos, sin = angle.cos(), angle.sin()
    zero = torch.zeros_like(cos)
    # the rotation acts on pixel offsets; affine_grid's [-1, 1] coordinates stretch them by H, W
    theta = torch.stack([cos, -sin * h / w, zero, sin * w / h, cos, zero], 1).view(-1, 2, 3)
    return _warp(x, theta, "zeros")


def translation(x: torch.Tensor, severity: int, gens: list[torch.Generator]) -> torch.Tensor:
    """Shift by a fixed fraction of the side in a random direction; black fill."""
    h, w = x.shape[-2:]
    angle = _draw(gens, lambda g: torch.rand((), generator=g) * 2 * math.pi)  # (N,)
    length = _TRANSLATION[severity - 1] * min(h, w)
    shift = length * torch.stack([angle.cos(), angle.sin()], 1)  # (N, 2) in (x, y) pixels
    return _sample(x, _pixel_grid(x) - shift.view(-1, 1, 1, 2), "zeros")


_CORRUPTIONS: dict[str, Corruption] = {
    fn.__name__: fn
    for fn in (
        gaussian_noise,
        shot_noise,
        impulse_noise,
        defocus_blur,
        glass_blur,
        motion_blur,
        zoom_blur,
        brightness,
        contrast,
        elastic_transform,
        pixelate,
        jpeg_compression,
        rotation,
        translation,
    )
}
CORRUPTIONS: tuple[str, ...] = tuple(_CORRUPTIONS)


def corrupt(
    images: torch.Tensor,
    name: str,
    severity: int,
    seed: int = 0,
    *,
    indices: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor:
    """Corrupt uint8 ``(N, C, H, W)`` images; severity 0 returns them unchanged.

    Args:
        images: uint8 ``(N, C, H, W)``, any C and size (the tables are meant for 28-32 px).
        name: one of :data:`CORRUPTIONS`.
        severity: 0 (identity) to 5.
        seed: with (name, severity, index) it fixes every random draw of an image.
        indices: the images' dataset indices (default ``0..N-1``); pass them when corrupting a
            batch so that each image gets the same pixels as in the whole set.

    Returns:
        uint8 ``(N, C, H, W)`` on the device of ``images``.
    """
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"need uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
    if name not in _CORRUPTIONS:
        raise ConfigError(f"unknown corruption {name!r}; choose one of {list(CORRUPTIONS)}")
    if severity not in (0, *SEVERITIES):
        raise ConfigError(f"severity must be 0-5, got {severity}")
    if severity == 0 or len(images) == 0:
        return images.clone()
    indices = torch.arange(len(images)) if indices is None else torch.as_tensor(indices)
    if indices.shape != (len(images),):
        raise ValueError(f"need one index per image, got {tuple(indices.shape)}")
    key = _name_key(name)
    gens = [
        torch.Generator().manual_seed(derive_seed(seed, key, severity, int(i))) for i in indices
    ]
    x = images.cpu().float() / 255  # (N, C, H, W)
    with torch.no_grad():
        out = _CORRUPTIONS[name](x, severity, gens)
    return (out.clamp(0, 1) * 255).round().to(torch.uint8).to(images.device)


# --- pixel helpers -------------------------------------------------------------------------------


def _draw(gens: list[torch.Generator], draw: Callable[[torch.Generator], torch.Tensor]):
    """Stack one draw per image, each from that image's own generator: ``(N, ...)``."""
    return torch.stack([draw(g) for g in gens])


def _name_key(name: str) -> int:
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _scale(x: torch.Tensor) -> float:
    """Lengths in the 32-px tables, rescaled to this image side."""
    return min(x.shape[-2:]) / 32


def _smooth(x: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Separable Gaussian blur of the last two axes (scipy's truncation and 'reflect' border)."""
    return (
        _blur_matrix(x.shape[-2], sigma, truncate)
        @ x
        @ _blur_matrix(x.shape[-1], sigma, truncate).T
    )


def _blur_matrix(size: int, sigma: float, truncate: float) -> torch.Tensor:
    """``(size, size)`` matrix that smooths one axis; sample i reads the half-sample mirror."""
    radius = int(truncate * sigma + 0.5)
    taps = torch.arange(-radius, radius + 1)
    weights = torch.exp(-0.5 * (taps / sigma) ** 2) if sigma > 0 else torch.ones(1)
    source = (torch.arange(size)[:, None] + taps) % (2 * size)  # (size, 2r+1)
    source = torch.where(source >= size, 2 * size - 1 - source, source)  # d c b a | a b c d |
    matrix = torch.zeros(size, size).scatter_add_(1, source, weights.expand(size, -1) * 1.0)
    return matrix / matrix.sum(1, keepdim=True)


def _disk_kernel(radius: float, alias: float) -> torch.Tensor:
    """ImageNet-C's defocus kernel: a normalised disk, then a 3x3 Gaussian of std ``alias``.

    Each cell holds its area inside the disk (15 x 15 samples, one at the centre, so a tiny
    radius still gives a delta); ImageNet-C tests only cell centres, which jumps as r scales.
    """
    extent = math.ceil(radius + 0.5)
    sub = (torch.arange(15) - 7) / 15
    coords = (torch.arange(-extent, extent + 1)[:, None] + sub).reshape(-1)  # (K * 15,)
    inside = (coords[:, None] ** 2 + coords[None, :] ** 2 <= radius**2).float()
    size = 2 * extent + 1
    disk = inside.view(size, 15, size, 15).mean(dim=(1, 3))
    gauss = torch.exp(-0.5 * (torch.tensor([-1.0, 0.0, 1.0]) / max(alias, 1e-6)) ** 2)
    gauss = gauss / gauss.sum()
    kernel = F.conv2d(F.pad(disk, (1, 1, 1, 1))[None, None], torch.outer(gauss, gauss)[None, None])
    return kernel[0, 0] / kernel.sum()  # (2 extent + 1, 2 extent + 1); the outer ring gets blur


def _filter(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Per-channel 2-D filtering with OpenCV's default border (reflect without the edge)."""
    pad = kernel.shape[-1] // 2
    channels = x.shape[1]
    weight = kernel.expand(channels, 1, *kernel.shape)
    return F.conv2d(F.pad(x, (pad,) * 4, mode="reflect"), weight, groups=channels)


def _box_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)`` area resampling: each output cell averages the input it overlaps."""
    edges = torch.arange(n_out + 1) * (n_in / n_out)  # output cell borders in input pixels
    cells = torch.arange(n_in)
    overlap = torch.minimum(edges[1:, None], cells + 1.0) - torch.maximum(edges[:-1, None], cells)
    overlap = overlap.clamp(min=0)
    return overlap / overlap.sum(1, keepdim=True)


def _pixel_grid(x: torch.Tensor) -> torch.Tensor:
    """``(H, W, 2)`` pixel-centre coordinates (x, y) of the images ``x``."""
    h, w = x.shape[-2:]
    ys, xs = torch.meshgrid(torch.arange(h) * 1.0, torch.arange(w) * 1.0, indexing="ij")
    return torch.stack([xs, ys], dim=-1)


def _sample(x: torch.Tensor, where: torch.Tensor, padding: str) -> torch.Tensor:
    """Bilinear read of ``x`` at pixel coordinates ``where`` ``(N, H, W, 2)`` as (x, y)."""
    h, w = x.shape[-2:]
    size = torch.tensor([w, h], dtype=where.dtype)
    grid = (2 * where + 1) / size - 1  # pixel centres -> [-1, 1] with align_corners=False
    grid = grid.expand(len(x), -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)


def _warp(x: torch.Tensor, theta: torch.Tensor, padding: str) -> torch.Tensor:
    """Bilinear affine warp; ``theta`` ``(N, 2, 3)`` maps output to input in [-1, 1] units."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (N, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode=padding, align_corners=False)
