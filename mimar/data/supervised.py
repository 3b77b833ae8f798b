"""Fine-tuning augmentation: RandAugment, colour jitter, random erasing, Mixup/CutMix, soft targets.

End-to-end fine-tuning in SimMIM, BEiT and MAE (docs/METHODS.md §2.6, §4.5, §6.7) uses timm's
ImageNet recipe: crop + flip, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25 (pixel
mode), Mixup 0.8 / CutMix 1.0, label smoothing 0.1. The crop and flip stay ``BatchAugment``'s;
this module adds the rest, in timm's order, for whole batches:

    crop+flip (uint8) -> RandAugment -> colour jitter -> /255, normalise -> random erasing
    -> Mixup or CutMix of each row with its partner row -> smoothed soft targets

``sample`` makes every random choice of a *global* batch from one ``torch.Generator`` with a
fixed number of draws; ``apply`` runs any subset of its rows. An image's result depends only
on its pixels and its own draws, so resuming, or splitting a batch over ranks, changes nothing.

RandAugment is a batched tensor version of timm's op set, bit-exact to timm's PIL ops (tested
op by op), rather than timm's PIL transform run image by image with ``random`` and ``np.random``
reseeded per image. ``python benchmarks/randaugment.py`` (one thread, 256 images,
rand-m9-mstd0.5-inc1, shared 2-core machine): 28x28 gray, per-image PIL 9.2k images/s vs
batched 16.8k; 32x32 RGB 3.6k vs 7.3k (1.5-2x across runs). At 224x224 RGB on the CPU the PIL
route is faster (670 vs 190 images/s: PIL-exact bicubic gathers 16 float64 taps per pixel), but
there the batched route is meant to run on the accelerator with the crops. It also keeps every
op and magnitude in ``draws``, and the PIL route cannot run as is: Pillow 13 refuses the 0-bit
posterize that timm asks for whenever the magnitude noise reaches 10 (~2 % of
PosterizeIncreasing ops; old Pillow made the image black, as we do). Random erasing keeps
timm's box rules, drawn here; its noise comes from a per-image seed.

Where we differ from timm: RandAugment resamples with PIL's bicubic (the official recipes'
``interpolation='bicubic'``), never timm's random bilinear/bicubic; weighted op choice and the
absolute-translate / 3-Augment ops are not offered. Mixup pairs row i with row B-1-i of the
*global* batch and draws one lambda per global batch: timm's ``Mixup`` mixes with ``x.flip(0)``
of each rank's local batch (with a lambda per rank), so a 2-process run would mix other pairs
than a 1-process run. That is why mixing is written here; ``rand_bbox``,
``cutmix_bbox_and_lam`` and ``mixup_target`` are transcribed (they draw from ``np.random`` or
pair by local flip); timm's ``one_hot`` and ``SoftTargetCrossEntropy`` are used as they are.

The file passes 400 lines because RandAugment's fifteen ops live here; they would move to
``mimar/data/rand_augment.py`` if this grows further.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from timm.data.auto_augment import rand_augment_transform
from timm.data.mixup import one_hot
from timm.loss import SoftTargetCrossEntropy

from mimar.data.augment import normalize

_ERASE_TRIES = 10  # timm RandomErasing: attempts per image
_ERASE_AREA = (0.02, 1 / 3)  # timm RandomErasing: min_area, max_area (fractions of H W)
_ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))  # min_aspect 0.3, max 1 / min
_DENOM = 10.0  # timm auto_augment._LEVEL_DENOM: magnitude M is level M / 10


@dataclass(frozen=True, kw_only=True)
class SupervisedAugmentConfig:
    """What runs on top of the crop and flip; 0 / "" switches a part off (all off by default).

    The fine-tune recipes of SimMIM/BEiT/MAE set rand_augment "rand-m9-mstd0.5-inc1",
    reprob 0.25, mixup 0.8, cutmix 1.0, label_smoothing 0.1 (METHODS.md §2.6).
    """

    rand_augment: str = ""  # timm spec, e.g. "rand-m9-mstd0.5-inc1"; "" = off
    color_jitter: float = 0.0  # brightness/contrast/saturation strength; 0 = off
    reprob: float = 0.0  # random erasing probability (timm RandomErasing, mode "pixel")
    mixup: float = 0.0  # mixup alpha (0 = off)
    cutmix: float = 0.0  # cutmix alpha (0 = off)
    mixup_switch_prob: float = 0.5  # prob. of cutmix when both are on (timm's switch_prob)
    mixup_prob: float = 1.0  # prob. of mixing a batch at all
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        for field in ("reprob", "mixup_switch_prob", "mixup_prob"):
            if not 0 <= getattr(self, field) <= 1:
                raise ValueError(f"{field} is a probability in [0, 1], got {getattr(self, field)}")
        for field in ("color_jitter", "mixup", "cutmix"):
            if getattr(self, field) < 0:
                raise ValueError(f"{field} must be >= 0, got {getattr(self, field)}")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.rand_augment:
            BatchRandAugment(self.rand_augment, fill=(0,))  # parses the spec; raises if bad
            if self.color_jitter > 0:
                # timm's create_transform drops colour jitter whenever RandAugment is on, so the
                # official "color_jitter 0.4" never ran; refuse rather than silently differ.
                raise ValueError(
                    "color_jitter > 0 with rand_augment: timm (and so the official fine-tune "
                    "recipes) skips colour jitter when RandAugment is on; set color_jitter 0"
                )


class SupervisedAugment:
    """Per-image RandAugment, jitter and erasing, then Mixup/CutMix and soft targets.

    Args:
        cfg: which parts run.
        num_classes: K, the width of the soft targets.
        mean, std: per-channel statistics in [0, 1] pixel units (the normalisation).
    """

    def __init__(
        self,
        cfg: SupervisedAugmentConfig,
        num_classes: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
    ) -> None:
        self.cfg, self.num_classes = cfg, num_classes
        self.mean, self.std = tuple(mean), tuple(std)
        fill = tuple(min(255, round(255 * m)) for m in self.mean)  # timm's img_mean
        self.rand_augment = BatchRandAugment(cfg.rand_augment, fill) if cfg.rand_augment else None
        self._pixel_ops = self.rand_augment is not None or cfg.color_jitter > 0

    def sample(self, batch_size: int, generator: torch.Generator) -> dict:
        """Every random choice of one global batch; the same number of draws for any data.

        Returns a dict: ``mix``, ``cutmix`` (bools), ``lam`` (the Beta draw, 1.0 when not
        mixing), ``box_center`` (two uniforms: CutMix box centre as fractions of H and W),
        ``partner`` (int64 ``(B,)``, the row each row mixes with) and ``rows``: per-row
        tensors with first dim B (RandAugment ``ra_*``, jitter ``jitter_*``, erasing
        ``erase_*``). Size-dependent choices (boxes) stay uniforms until ``apply`` sees S.
        """
        cfg, b = self.cfg, batch_size
        draw = {"generator": generator, "device": generator.device, "dtype": torch.float64}
        u = torch.rand(4, **draw)  # mix gate, cutmix switch, box centre (y, x)
        beta_seeds = torch.randint(2**62, (2,), generator=generator, device=generator.device)
        active = cfg.mixup > 0 or cfg.cutmix > 0
        mix = active and bool(u[0] < cfg.mixup_prob)
        cutmix = cfg.cutmix > 0 and (cfg.mixup == 0 or bool(u[1] < cfg.mixup_switch_prob))
        alpha = cfg.cutmix if cutmix else cfg.mixup
        # Beta has no torch sampler that takes a generator: a local numpy one seeded from it
        lam = np.random.default_rng(int(beta_seeds[int(cutmix)])).beta(alpha, alpha) if mix else 1
        low = max(0.0, 1 - cfg.color_jitter)  # torchvision ColorJitter's factor range
        rows = {
            "jitter_factor": low + (1 + cfg.color_jitter - low) * torch.rand((b, 3), **draw),
            "jitter_order": torch.rand((b, 3), **draw).argsort(1),  # ColorJitter's randperm
            "erase": torch.rand(b, **draw) < cfg.reprob,
            "erase_area": _ERASE_AREA[0]
            + (_ERASE_AREA[1] - _ERASE_AREA[0]) * torch.rand((b, _ERASE_TRIES), **draw),
            "erase_log_aspect": _ERASE_LOG_ASPECT[0]
            + (_ERASE_LOG_ASPECT[1] - _ERASE_LOG_ASPECT[0]) * torch.rand((b, _ERASE_TRIES), **draw),
            "erase_offset": torch.rand((b, 2), **draw),  # top, left as randint fractions
            "erase_seed": torch.randint(2**62, (b,), generator=generator, device=generator.device),
        }
        if self.rand_augment is not None:  # last, so that it leaves the other draws alone
            rows.update(self.rand_augment.sample(b, generator))
        return {
            "mix": mix,
            "cutmix": mix and cutmix,
            "lam": float(lam),
            "box_center": (float(u[2]), float(u[3])),
            "partner": torch.arange(b - 1, -1, -1),  # timm's flip(0), over the global batch
            "rows": rows,
        }

    def partner_rows(self, draws: dict, rows: slice | torch.Tensor) -> torch.Tensor | None:
        """Global rows that ``rows`` mix with (int64), or None when this batch is not mixed."""
        if not draws["mix"]:
            return None
        return draws["partner"][_global_rows(draws, rows)]

    def apply(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        draws: dict,
        rows: slice | torch.Tensor,
        partner_images: torch.Tensor | None = None,
        partner_labels: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment rows ``rows`` of the global batch ``draws`` was sampled for.

        Args:
            images: those rows after crop + flip, *not* normalised: uint8 in [0, 255] or float
                in [0, 1], ``(b, C, S, S)``. RandAugment and jitter work on the uint8 grid, so
                float input is rounded to it when either is on (as PIL's crop would be).
            labels: int64 class indices ``(b,)``.
            draws: ``sample``'s output for the whole global batch.
            rows: which rows of the global batch ``images`` are (a slice, or int64 indices).
            partner_images, partner_labels: the same for rows ``partner_rows(draws, rows)``;
                needed when the batch is mixed and some partner lies outside ``rows``
                (another rank's row). Without them, partners are taken from ``images``.

        Returns:
            normalised float32 images ``(b, C, S, S)`` and float32 soft targets ``(b, K)``
            with label smoothing folded in (timm's ``mixup_target`` convention).
        """
        index = _global_rows(draws, rows)
        if len(images) != len(index) or len(labels) != len(index):
            raise ValueError(f"rows select {len(index)} rows, got {len(images)} images")
        x = self._augment(images, draws, index)  # (b, C, S, S)
        targets = self._smooth_one_hot(labels.to(x.device))  # (b, K)
        partners = self.partner_rows(draws, rows)
        if partners is None:
            return x, targets
        if partner_images is None:
            local = torch.full((len(draws["partner"]),), -1)
            local[index] = torch.arange(len(index))
            local = local[partners]
            if (local < 0).any():
                raise ValueError("partner rows lie outside rows: pass partner_images/labels")
            local = local.to(x.device)
            partner_x, partner_targets = x[local], targets[local]
        else:
            if partner_labels is None or len(partner_images) != len(partners):
                raise ValueError(f"need partner_images and partner_labels of {len(partners)} rows")
            partner_x = self._augment(partner_images, draws, partners)
            partner_targets = self._smooth_one_hot(partner_labels.to(x.device))
        return self._mix(x, partner_x, targets, partner_targets, draws)

    def cutmix_box(
        self, draws: dict, img_hw: tuple[int, int]
    ) -> tuple[tuple[int, int, int, int], float]:
        """CutMix box ``(yl, yh, xl, xh)`` and the lambda corrected for its clipped area.

        timm's ``rand_bbox`` + ``cutmix_bbox_and_lam(correct_lam=True)``, from our draws.
        """
        height, width = img_hw
        ratio = math.sqrt(1 - draws["lam"])
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = int(draws["box_center"][0] * height), int(draws["box_center"][1] * width)
        yl, yh = max(cy - cut_h // 2, 0), min(cy + (cut_h + 1) // 2, height)
        xl, xh = max(cx - cut_w // 2, 0), min(cx + (cut_w + 1) // 2, width)
        return (yl, yh, xl, xh), 1 - (yh - yl) * (xh - xl) / (height * width)

    def _augment(self, images: torch.Tensor, draws: dict, index: torch.Tensor) -> torch.Tensor:
        """Per-image part, in timm's order: pixel ops, normalise, erase."""
        if images.ndim != 4 or images.shape[1] != len(self.mean):
            raise ValueError(f"need (b, {len(self.mean)}, S, S) images, got {tuple(images.shape)}")
        rows = {key: value[index] for key, value in draws["rows"].items()}
        uint8 = images.dtype == torch.uint8
        if self._pixel_ops:
            x = images.float() if uint8 else (images.float() * 255).round()  # (b, C, S, S)
            if self.rand_augment is not None:
                x = self.rand_augment(x, rows)
            if self.cfg.color_jitter > 0:
                x = _color_jitter(x, rows)
            x = x / 255
        else:
            x = images.float() / 255 if uint8 else images.float()
        x = normalize(x, self.mean, self.std)
        return _erase(x, rows) if self.cfg.reprob > 0 else x

    def _smooth_one_hot(self, labels: torch.Tensor) -> torch.Tensor:
        off = self.cfg.label_smoothing / self.num_classes
        on = 1 - self.cfg.label_smoothing + off
        return one_hot(labels, self.num_classes, on_value=on, off_value=off)

    def _mix(self, x, partner_x, targets, partner_targets, draws):
        lam = draws["lam"]
        if draws["cutmix"]:
            (yl, yh, xl, xh), lam = self.cutmix_box(draws, tuple(x.shape[-2:]))
            x = x.clone()
            x[..., yl:yh, xl:xh] = partner_x[..., yl:yh, xl:xh]
        else:
            x = x * lam + partner_x * (1 - lam)
        return x, targets * lam + partner_targets * (1 - lam)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum_k t_k log softmax(logits)_k`` (timm SoftTargetCrossEntropy).

    With unmixed smoothed one-hot targets this is ``F.cross_entropy(label_smoothing=...)``.
    """
    return SoftTargetCrossEntropy()(logits, targets)


def _global_rows(draws: dict, rows: slice | torch.Tensor) -> torch.Tensor:
    return torch.arange(len(draws["partner"]))[rows]


# ---- colour jitter and random erasing --------------------------------------------------------


def _color_jitter(x: torch.Tensor, rows: dict) -> torch.Tensor:
    """torchvision ColorJitter(b, c, s) on PIL images: the three enhances in a random order."""
    for position in range(3):
        for k, enhance in enumerate((_brightness, _contrast, _color)):  # ColorJitter's fn ids
            sel = (rows["jitter_order"][:, position] == k).nonzero().squeeze(1)
            if len(sel):
                sel_x = sel.to(x.device)
                x[sel_x] = enhance(x[sel_x], rows["jitter_factor"][sel, k])
    return x


def _erase(x: torch.Tensor, rows: dict) -> torch.Tensor:
    """timm RandomErasing(mode="pixel", max_count=1) on normalised images: N(0, 1) boxes."""
    _, chans, height, width = x.shape
    area = rows["erase_area"] * (height * width)  # (b, T)
    aspect = rows["erase_log_aspect"].exp()
    box_h, box_w = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
    valid = (box_w < width) & (box_h < height)
    tries = torch.arange(_ERASE_TRIES)
    first = torch.where(valid, tries, _ERASE_TRIES).amin(1)  # (b,) first valid try
    pick = first.clamp(max=_ERASE_TRIES - 1).unsqueeze(1)
    box_h, box_w = box_h.gather(1, pick).squeeze(1), box_w.gather(1, pick).squeeze(1)
    top = (rows["erase_offset"][:, 0] * (height - box_h + 1)).floor()  # randint(0, H - h)
    left = (rows["erase_offset"][:, 1] * (width - box_w + 1)).floor()
    x = x.clone()
    for i in (rows["erase"] & (first < _ERASE_TRIES)).nonzero().squeeze(1).tolist():
        t, lf, h, w = int(top[i]), int(left[i]), int(box_h[i]), int(box_w[i])
        noise_gen = torch.Generator().manual_seed(int(rows["erase_seed"][i]))
        noise = torch.randn((chans, h, w), generator=noise_gen)
        x[i, :, t : t + h, lf : lf + w] = noise.to(x.device)
    return x


# ---- RandAugment -----------------------------------------------------------------------------


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


def _color(x, factor):
    return _blend(_grayscale(x), x, factor)


def _contrast(x, factor):
    mean = (_grayscale(x).double().mean((1, 2, 3), keepdim=True) + 0.5).floor()
    return _blend(mean.float(), x, factor)


def _brightness(x, factor):
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
    **{op: _color for op in ("Color", "ColorIncreasing")},
    **{op: _contrast for op in ("Contrast", "ContrastIncreasing")},
    **{op: _brightness for op in ("Brightness", "BrightnessIncreasing")},
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
