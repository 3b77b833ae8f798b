"""The official mask generators, transcribed for parity tests (tests/test_masking.py).

Written from docs/METHODS.md §1.3 and §2.1, which describe the official code:

* BEiT's block-wise ``MaskingGenerator`` (microsoft/unilm ``beit/masking_generator.py``,
  copied unchanged into baaivision/EVA ``EVA-01/eva/masking_generator.py`` and used by iTPN's
  CLIP variant). It draws from Python's ``random`` module (``random.uniform``,
  ``random.randint``) and ``math``; here the module is a parameter ``rng``, so a test can pass
  either ``random`` itself or a ``random.Random`` instance (the module functions are the
  bound methods of one hidden ``random.Random``, so both consume the same stream).
* SimMIM's ``MaskGenerator`` (microsoft/SimMIM ``data/data_simmim.py``). It draws its cells
  with ``np.random.permutation(token_count)[:mask_count]``; here the permutation is a
  parameter, so a test can plug in numpy's or another source of uniform permutations.

Kept deliberately close to the official control flow (loops, int masks, the same names),
not to mimar's: the point is an independent second implementation.
"""

from __future__ import annotations

import math
import random

import numpy as np


class BEiTMaskingGenerator:
    """BEiT / EVA ``MaskingGenerator`` (docs/METHODS.md §1.3). ``__call__`` gives an int
    ``(height, width)`` mask, 1 = masked."""

    def __init__(
        self,
        input_size,
        num_masking_patches,
        min_num_patches=4,
        max_num_patches=None,
        min_aspect=0.3,
        max_aspect=None,
        rng=random,
    ):
        if not isinstance(input_size, tuple):
            input_size = (input_size,) * 2
        self.height, self.width = input_size
        self.num_patches = self.height * self.width
        self.num_masking_patches = num_masking_patches
        self.min_num_patches = min_num_patches
        self.max_num_patches = num_masking_patches if max_num_patches is None else max_num_patches
        max_aspect = max_aspect or 1 / min_aspect
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))
        self.rng = rng

    def _mask(self, mask, max_mask_patches):
        delta = 0
        for _attempt in range(10):
            target_area = self.rng.uniform(self.min_num_patches, max_mask_patches)
            aspect_ratio = math.exp(self.rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = self.rng.randint(0, self.height - h)
                left = self.rng.randint(0, self.width - w)
                num_masked = mask[top : top + h, left : left + w].sum()
                # overlap: only the newly covered patches count
                if 0 < h * w - num_masked <= max_mask_patches:
                    for i in range(top, top + h):
                        for j in range(left, left + w):
                            if mask[i, j] == 0:
                                mask[i, j] = 1
                                delta += 1
            if delta > 0:
                break
        return delta

    def __call__(self):
        mask = np.zeros(shape=(self.height, self.width), dtype=int)
        mask_count = 0
        while mask_count < self.num_masking_patches:
            max_mask_patches = self.num_masking_patches - mask_count
            max_mask_patches = min(max_mask_patches, self.max_num_patches)
            delta = self._mask(mask, max_mask_patches)
            if delta == 0:
                break
            mask_count += delta
        return mask


class SimMIMMaskGenerator:
    """SimMIM ``MaskGenerator`` (docs/METHODS.md §2.1). ``__call__`` gives an int
    ``(rand_size * scale, rand_size * scale)`` mask on the model-patch grid, 1 = masked.

    ``permutation(n)`` returns a uniform random permutation of ``range(n)``; the official
    code uses ``np.random.permutation`` (numpy's global RandomState).
    """

    def __init__(
        self,
        input_size=192,
        mask_patch_size=32,
        model_patch_size=4,
        mask_ratio=0.6,
        permutation=np.random.permutation,
    ):
        self.input_size = input_size
        self.mask_patch_size = mask_patch_size
        self.model_patch_size = model_patch_size
        self.mask_ratio = mask_ratio
        assert self.input_size % self.mask_patch_size == 0
        assert self.mask_patch_size % self.model_patch_size == 0
        self.rand_size = self.input_size // self.mask_patch_size
        self.scale = self.mask_patch_size // self.model_patch_size
        self.token_count = self.rand_size**2
        self.mask_count = int(np.ceil(self.token_count * self.mask_ratio))
        self.permutation = permutation

    def __call__(self):
        mask_idx = self.permutation(self.token_count)[: self.mask_count]
        mask = np.zeros(self.token_count, dtype=int)
        mask[mask_idx] = 1
        mask = mask.reshape((self.rand_size, self.rand_size))
        mask = mask.repeat(self.scale, axis=0).repeat(self.scale, axis=1)
        return mask
