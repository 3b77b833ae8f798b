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

RandAugment's fifteen ops live in ``mimar.data.randaugment``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from timm.data.mixup import one_hot
from timm.loss import SoftTargetCrossEntropy

from mimar.data.augment import normalize
from mimar.data.randaugment import BatchRandAugment, brightness, color, contrast
from mimar.errors import check_range

_ERASE_TRIES = 10  # timm RandomErasing: attempts per image
_ERASE_AREA = (0.02, 1 / 3)  # timm RandomErasing: min_area, max_area (fractions of H W)
_ERASE_LOG_ASPECT = (math.log(0.3), math.log(1 / 0.3))  # min_aspect 0.3, max 1 / min


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
        # keys without a section: a recipe's section (finetune) prefixes its own name
        for field in ("reprob", "mixup_switch_prob", "mixup_prob"):
            value = getattr(self, field)
            check_range(field, value, 0 <= value <= 1, "a probability in [0, 1]")
        for field in ("color_jitter", "mixup", "cutmix"):
            check_range(field, getattr(self, field), getattr(self, field) >= 0, ">= 0")
        smoothing = self.label_smoothing
        check_range("label_smoothing", smoothing, 0 <= smoothing < 1, "in [0, 1)")
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
        for k, enhance in enumerate((brightness, contrast, color)):  # ColorJitter's fn ids
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
