"""Representation health from a feature matrix: RankMe and the spread of normalised features.

RankMe (Garrido, Balestriero, Najman, LeCun, "RankMe: Assessing the downstream performance of
pretrained self-supervised representations by their rank", ICML 2023, arXiv:2210.02885, eq. 1):
with ``s`` the singular values of the ``(N, D)`` feature matrix,
``p_k = s_k / sum(s) + eps`` and ``RankMe = exp(-sum_k p_k log p_k)``: the exponential of the
entropy of the normalised spectrum, a smooth effective rank between 1 and ``min(N, D)``. A
collapsed encoder (every image mapped near one vector) scores ~1.

``feature_std``: the mean over dimensions of the per-dimension standard deviation of the
L2-normalised features (SimSiam, Chen & He 2021, §4.1 uses it as a collapse detector): 0 for
a constant output, ~``1 / sqrt(D)`` for features spread over the sphere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-7  # RankMe's epsilon (the paper's eq. 1 and its reference code)

# A warning when RankMe falls below this. Measured on the AIM tiny recipe (bank of 2000-5000
# Fashion-MNIST train images, docs/monitor.md): collapsed runs (optim.lr=0.3 and 3) score
# 1.15-1.29 from step 30 on; the healthy run 7.4 at initialisation, 6.7 at step 100 and 10.6
# at step 200 (its lowest point is the early dip). 3 sits between, near their geometric mean.
COLLAPSE_RANKME = 3.0


def rankme(features: torch.Tensor, eps: float = EPS) -> float:
    """RankMe of ``(N, D)`` ``features`` (float64 singular values, so that a rank-k matrix
    scores k to within ~1e-6 relative; see the module docstring)."""
    s = torch.linalg.svdvals(features.double())  # (min(N, D),)
    p = s / s.sum().clamp(min=torch.finfo(torch.float64).tiny) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def feature_std(features: torch.Tensor) -> float:
    """Mean per-dimension standard deviation of the L2-normalised ``(N, D)`` features."""
    return float(F.normalize(features.float(), dim=1).std(dim=0).mean())


def collapse_warning(value: float, step: int, threshold: float = COLLAPSE_RANKME) -> str | None:
    """The one-line warning for a RankMe below ``threshold`` (None when healthy)."""
    if value >= threshold:
        return None
    return (
        f"monitor: RankMe {value:.2f} < {threshold:g} at step {step}: the features look "
        "collapsed (every image near one vector); lower optim.lr or check the method's targets"
    )
