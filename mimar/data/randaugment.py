"""RandAugment on whole batches: timm's op set as tensor code, bit-exact to timm's PIL ops.

timm parses the spec (``rand_augment_transform``: op list, probability, magnitude and its
noise); every op is redone here on float images holding uint8 values ``(B, C, H, W)``, after
PIL's arithmetic (uint8 after every op, PIL's rounding), each image at its own magnitude and
sign. ``BatchRandAugment.sample`` makes the draws of a global batch from one generator;
``__call__`` applies any subset of its rows. Why batched rather than timm's PIL transform per
image, the measured speeds, and where we differ from timm: ``mimar.data.supervised``'s
docstring. ``brightness``, ``contrast`` and ``color`` are also colour jitter's enhances.
"""

from __future__ import annotations

import torch
from timm.data.auto_augment import rand_augment_transform

_DENOM = 10.0  # timm auto_augment._LEVEL_DENOM: magnitude M is level M / 10


class BatchRandAugment:
    """timm's RandAugment on a batch of uint8-valued float images ``(B, C, H, W)`` in [0, 255].

    timm parses the spec (``rand_augment_transform``), so the op list, per-op probability,
    magnitude, its noise (``mstd``) and bound (``mmax``) are timm's; each op is redone below
    on tensors, after PIL's arithmetic (uint8 after every op, PIL's rounding).

    Args:
        spec: timm RandAugment string, e.g. "rand-m9-mstd0.5-inc1".
        fill: per-channel value in [0, 255] for pixels the geometric ops bring in (timm:
            the dataset mean).
        interpolation: PIL resampling of the geometric ops.
    """

    def __init__(self, spec: str, fill: tuple[float, ...], interpolation: str = "bicubic"):
        try:
            transform = rand_augment_transform(spec, None)
        except (AssertionError, ValueError, KeyError) as err:
            raise ValueError(f"rand_augment={spec!r} is not a timm RandAugment spec") from err
        unknown = sorted({op.name for op in transform.ops} - set(_PIXEL_OPS) - set(_WARPS))
        if unknown or transform.choice_weights is not None:
            raise ValueError(f"rand_augment={spec!r}: ops {unknown} / weighted choice unsupported")
        if interpolation not in ("bilinear", "bicubic"):
            raise ValueError(f"interpolation must be bilinear or bicubic, got {interpolation!r}")
        first = transform.ops[0]  # rand_augment_transform gives every op the same settings
        self.names = [op.name for op in transform.ops]
        self.num_layers, self.prob = transform.num_layers, first.prob
        self.magnitude, self.magnitude_std = float(first.magnitude), first.magnitude_std
        self.magnitude_max = float(first.magnitude_max or _DENOM)
        self.translate_pct = first.hparams.get("translate_pct", 0.45)
        self.fill, self.cubic = tuple(float(v) for v in fill), interpolation == "bicubic"

    def sample(self, batch_size: int, generator: torch.Generator) -> dict:
        """Per image and layer: op id, applied or not, magnitude, sign; (B, num_layers) each.

        The op id is uniform with replacement (timm's ``np.random.choice``).
        """
        draw = {"generator": generator, "device": generator.device, "dtype": torch.float64}
        u = torch.rand((batch_size, self.num_layers, 4), **draw)
        z = torch.randn((batch_size, self.num_layers), **draw)
        if self.magnitude_std == float("inf"):  # timm: uniform in [0, M]
            magnitude = self.magnitude * u[..., 3]
        else:  # timm: random.gauss(M, mstd); mstd 0 gives M
            magnitude = self.magnitude + self.magnitude_std * z
        return {
            "ra_op": (u[..., 0] * len(self.names)).long().clamp(max=len(self.names) - 1),
            "ra_apply": u[..., 1] <= self.prob,  # timm skips an op when random() > prob
            "ra_magnitude": magnitude.clamp(0, self.magnitude_max),
            "ra_sign": torch.where(u[..., 2] > 0.5, -1.0, 1.0).double(),  # _randomly_negate
        }

    def __call__(self, x: torch.Tensor, rows: dict) -> torch.Tensor:
        """Apply the ops drawn in ``rows`` (``sample``'s keys, rows aligned with ``x``)."""
        for layer in range(self.num_layers):
            for k, name in enumerate(self.names):
                chosen = (rows["ra_op"][:, layer] == k) & rows["ra_apply"][:, layer]
                sel = chosen.nonzero().squeeze(1)
                if len(sel):
                    m, sign = rows["ra_magnitude"][sel, layer], rows["ra_sign"][sel, layer]
                    sel_x = sel.to(x.device)
                    x[sel_x] = self.apply_op(x[sel_x], name, m, sign)
        return x

    def apply_op(
        self, x: torch.Tensor, name: str, magnitude: torch.Tensor, sign: torch.Tensor
    ) -> torch.Tensor:
        """One timm op on every image of ``x``, at per-image magnitudes and signs (float64)."""
        level = _LEVELS.get(name)
        arg = None if level is None else level(magnitude, sign, self.translate_pct)
        if name in _PIXEL_OPS:
            return _PIXEL_OPS[name](x, arg)
        return _warp(x, _WARPS[name](arg, *x.shape[-2:]), self.fill, self.cubic)


def _per_image(arg: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return arg.to(x.device, x.dtype).view(-1, 1, 1, 1)


# timm's *_level_to_arg, kept in its operation order (m: magnitude, s: +-1 from _randomly_negate)
def _enhance(m, s, _):
    return (m / _DENOM) * 1.8 + 0.1


def _enhance_increasing(m, s, _):
    return (1.0 + s * ((m / _DENOM) * 0.9)).clamp(min=0.1)


_LEVELS = {
    "Rotate": lambda m, s, _: s * ((m / _DENOM) * 30.0),
    "Posterize": lambda m, s, _: ((m / _DENOM) * 4).trunc(),
    "PosterizeIncreasing": lambda m, s, _: 4 - ((m / _DENOM) * 4).trunc(),
    "PosterizeOriginal": lambda m, s, _: ((m / _DENOM) * 4).trunc() + 4,
    "Solarize": lambda m, s, _: ((m / _DENOM) * 256).trunc().clamp(max=256),
    "SolarizeIncreasing": lambda m, s, _: 256 - ((m / _DENOM) * 256).trunc().clamp(max=256),
    "SolarizeAdd": lambda m, s, _: ((m / _DENOM) * 110).trunc().clamp(max=128),
    **{op: _enhance for op in ("Color", "Contrast", "Brightness", "Sharpness")},
    **{f"{op}Increasing": _enhance_increasing for op in ("Color", "Contrast", "Brightness")},
    "SharpnessIncreasing": _enhance_increasing,
    "ShearX": lambda m, s, _: s * ((m / _DENOM) * 0.3),
    "ShearY": lambda m, s, _: s * ((m / _DENOM) * 0.3),
    "TranslateXRel": lambda m, s, pct: s * ((m / _DENOM) * pct),
    "TranslateYRel": lambda m, s, pct: s * ((m / _DENOM) * pct),
}


# ---- pixel ops (PIL ImageOps / ImageEnhance on uint8 values) ----------------------------------


def _auto_contrast(x, _):
    xd = x.double()
    lo, hi = xd.amin((2, 3), keepdim=True), xd.amax((2, 3), keepdim=True)  # per channel
    scale = xd.new_tensor(255.0) / (hi - lo).clamp(min=1)  # not 255 / t: torch takes 1 / t
    out = (xd * scale + (-lo * scale)).trunc().clamp(0, 255)  # int(ix * scale + offset)
    return torch.where(hi > lo, out, xd).float()


def _equalize(x, _):
    n, c, h, w = x.shape
    flat = x.long().flatten(2)  # (n, C, HW)
    hist = torch.zeros(n, c, 256, dtype=torch.long, device=x.device)
    hist.scatter_add_(2, flat, torch.ones_like(flat))  # (n, C, 256)
    top = 255 - (hist.flip(-1) > 0).long().argmax(-1, keepdim=True)  # highest used level
    step = (h * w - hist.gather(2, top)) // 255  # (n, C, 1)
    lut = (step // 2 + hist.cumsum(-1) - hist) // step.clamp(min=1)
    lut = torch.where(step > 0, lut.clamp(max=255), torch.arange(256, device=x.device))
    return lut.gather(2, flat).view_as(x).float()


def _posterize(x, bits):
    shift = _per_image(8 - bits.clamp(0, 8), x).long()  # 0 bits: black, as Pillow < 10 did
    return ((x.long() >> shift) << shift).float()


def _solarize(x, threshold):
    return torch.where(x >= _per_image(threshold, x), 255 - x, x)


def _solarize_add(x, add):
    return torch.where(x < 128, (x + _per_image(add, x)).clamp(max=255), x)


def _blend(degenerate, x, factor):
    """PIL Image.blend(degenerate, x, factor) in float32, clipped and truncated to uint8."""
    return (degenerate + _per_image(factor, x) * (x - degenerate)).clamp(0, 255).trunc()


def _grayscale(x):
    """PIL's convert("L"): ITU-R 601-2 luma in 16-bit fixed point, rounded."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.long().unbind(1)
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).unsqueeze(1).float()


def color(x, factor):
    return _blend(_grayscale(x), x, factor)


def contrast(x, factor):
    mean = (_grayscale(x).double().mean((1, 2, 3), keepdim=True) + 0.5).floor()
    return _blend(mean.float(), x, factor)


def brightness(x, factor):
    return _blend(torch.zeros_like(x), x, factor)


def _sharpness(x, factor):
    """Blend with ImageFilter.SMOOTH ([[1,1,1],[1,5,1],[1,1,1]] / 13; borders kept)."""
    k1, k5 = torch.tensor([1 / 13, 5 / 13], dtype=x.dtype, device=x.device)
    line = lambda r, mid: r[..., :-2] * k1 + r[..., 1:-1] * mid + r[..., 2:] * k1
    acc = 0.5 + line(x[..., 2:, :], k1)  # PIL: offset + 0.5 for rounding, rows y+1, y, y-1
    acc = acc + line(x[..., 1:-1, :], k5)
    acc = acc + line(x[..., :-2, :], k1)
    smooth = x.clone()
    smooth[..., 1:-1, 1:-1] = acc.clamp(0, 255).trunc()
    return _blend(smooth, x, factor)


_PIXEL_OPS = {
    "AutoContrast": _auto_contrast,
    "Equalize": _equalize,
    "Invert": lambda x, _: 255 - x,
    **{op: _posterize for op in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")},
    **{op: _solarize for op in ("Solarize", "SolarizeIncreasing")},
    "SolarizeAdd": _solarize_add,
    **{op: color for op in ("Color", "ColorIncreasing")},
    **{op: contrast for op in ("Contrast", "ContrastIncreasing")},
    **{op: brightness for op in ("Brightness", "BrightnessIncreasing")},
    **{op: _sharpness for op in ("Sharpness", "SharpnessIncreasing")},
}


# ---- geometric ops: PIL affine coefficients (output pixel centre -> input point) --------------


def _rotate(degrees, height, width):
    """PIL Image.rotate(degrees) about the centre (counter-clockwise)."""
    angle = -torch.deg2rad(degrees.remainder(360.0))
    cos, sin = torch.cos(angle).round(decimals=15), torch.sin(angle).round(decimals=15)
    cx, cy = width / 2, height / 2
    shift_x = cos * -cx + sin * -cy + 0.0 + cx
    shift_y = -sin * -cx + cos * -cy + 0.0 + cy
    return torch.stack([cos, sin, shift_x, -sin, cos, shift_y], 1)


def _affine(v, *, b=0.0, c=0.0, d=0.0, f=0.0):
    """Rows ``(1, b, c, d, 1, f)`` per image; ``v`` (n,) float64 fixes n, scalars broadcast."""
    one = torch.ones_like(v)
    return torch.stack([one, b * one, c * one, d * one, one, f * one], 1)


_WARPS = {
    "Rotate": _rotate,
    "ShearX": lambda v, h, w: _affine(v, b=v),  # PIL (1, v, 0, 0, 1, 0)
    "ShearY": lambda v, h, w: _affine(v, d=v),
    "TranslateXRel": lambda v, h, w: _affine(v, c=v * w),  # timm: pixels = pct * width
    "TranslateYRel": lambda v, h, w: _affine(v, f=v * h),
}


def _warp(x, coeffs, fill, cubic):
    """PIL Image.transform(AFFINE, fillcolor=fill): Geometry.c's filters, in float64.

    Output pixel (i, j) reads input point (a (j+.5) + b (i+.5) + c, d (j+.5) + e (i+.5) + f);
    points outside the image take ``fill``; inside, taps at floor(p - .5) + k are edge-clamped.
    """
    n, c, h, w = x.shape
    a, b, t0, d, e, t1 = (v.to(x.device).view(n, 1, 1) for v in coeffs.unbind(1))
    py = torch.arange(h, dtype=torch.float64, device=x.device).view(1, h, 1) + 0.5
    px = torch.arange(w, dtype=torch.float64, device=x.device).view(1, 1, w) + 0.5
    x_in, y_in = a * px + b * py + t0, d * px + e * py + t1  # (n, H, W)
    inside = (x_in >= 0) & (x_in < w) & (y_in >= 0) & (y_in < h)
    x0, y0 = (x_in - 0.5).floor(), (y_in - 0.5).floor()
    dx, dy = x_in - 0.5 - x0, y_in - 0.5 - y0
    # An axis the op leaves alone (shear / translate along the other one) has d = 0 at every
    # pixel, where PIL's filter returns its centre tap exactly: read that tap only.
    moves_x = bool((coeffs[:, :3] != coeffs.new_tensor([1.0, 0.0, 0.0])).any())
    moves_y = bool((coeffs[:, 3:] != coeffs.new_tensor([0.0, 1.0, 0.0])).any())
    num_taps = 4 if cubic else 2
    cols = _taps(x0, w, num_taps if moves_x else 1)  # (n, Tx, H, W)
    rows = _taps(y0, h, num_taps if moves_y else 1) * w  # (n, Ty, H, W)
    index = (rows.unsqueeze(2) + cols.unsqueeze(1)).long()  # (n, Ty, Tx, H, W)
    v = x.double().flatten(2).gather(2, index.view(n, 1, -1).expand(n, c, -1))
    v = v.view(n, c, rows.shape[1], cols.shape[1], h, w)  # (n, C, Ty, Tx, H, W)
    v = _interpolate(v.unbind(3), dx.view(n, 1, 1, h, w))  # along x: (n, C, Ty, H, W)
    value = _interpolate(v.unbind(2), dy.view(n, 1, h, w)).clamp(0, 255).trunc()  # PIL: clip, cast
    fill_t = torch.tensor(fill, dtype=torch.float64, device=x.device).view(1, -1, 1, 1)
    return torch.where(inside.unsqueeze(1), value, fill_t).float()


def _taps(start, size, num):
    """Edge-clamped positions (n, T, H, W) of T = 4 (cubic), 2 (linear) or 1 taps at floor."""
    first = -1 if num == 4 else 0
    offsets = torch.arange(first, first + num, dtype=start.dtype, device=start.device)
    return (start.unsqueeze(1) + offsets.view(1, num, 1, 1)).clamp(0, size - 1)


def _interpolate(v, d):
    """Geometry.c's BILINEAR, or its BICUBIC (a = -1 cubic convolution), along one axis."""
    if len(v) == 1:
        return v[0]
    if len(v) == 2:
        return v[0] + (v[1] - v[0]) * d
    # PIL: p2 = -v0 + v2, p3 = 2 (v0 - v1) + v2 - v3, p4 = -v0 + v1 - v2 + v3, then Horner;
    # b - a is b + (-a) in IEEE arithmetic, so these in-place forms give the same bits
    p2, p3 = v[2] - v[0], (v[0] - v[1]).mul_(2).add_(v[2]).sub_(v[3])
    p4 = (v[1] - v[0]).sub_(v[2]).add_(v[3])
    return p4.mul_(d).add_(p3).mul_(d).add_(p2).mul_(d).add_(v[1])
