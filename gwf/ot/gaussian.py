"""Closed forms of (entropic) OT between Gaussians, as test references (gwf.ot conventions; float64).

Entropic case: Janati, Muzellec, Peyre, Cuturi 2020, Thm. 1 (balanced), rescaled to gwf's cost and eps; the
derivation is in docs/conventions.md. Inputs: means [d], symmetric positive (semi-)definite covariances [d, d].
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sqrtm_psd(s: Tensor) -> Tensor:
    """Symmetric square root of a symmetric positive semi-definite matrix [d, d] (float64)."""
    s = 0.5 * (s + s.T).double()
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def _as64(*ts: Tensor) -> list[Tensor]:
    return [torch.as_tensor(t, dtype=torch.float64) for t in ts]


def bures_w2_squared(m1: Tensor, s1: Tensor, m2: Tensor, s2: Tensor) -> Tensor:
    """W2^2 between N(m1, s1) and N(m2, s2) for the cost ||x - y||^2 (gwf's OT_0 is half of it). 0-d float64."""
    m1, s1, m2, s2 = _as64(m1, s1, m2, s2)
    r1 = sqrtm_psd(s1)
    cross = sqrtm_psd(r1 @ s2 @ r1)
    return (m1 - m2).square().sum() + torch.trace(s1) + torch.trace(s2) - 2.0 * torch.trace(cross)


def _janati_d(s1: Tensor, s2: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    r1 = sqrtm_psd(s1)
    eye = torch.eye(s1.shape[0], dtype=torch.float64)
    return sqrtm_psd(4.0 * r1 @ s2 @ r1 + eps**2 * eye), r1


def entropic_ot_gaussians(m1: Tensor, s1: Tensor, m2: Tensor, s2: Tensor, eps: float) -> Tensor:
    """OT_eps(N(m1, s1), N(m2, s2)), 0-d float64:

    1/2 [||m1 - m2||^2 + tr S1 + tr S2 - tr D + d eps (1 - log(2 eps)) + eps log det(D + eps I)],
    D = (4 S1^1/2 S2 S1^1/2 + eps^2 I)^1/2.
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    m1, s1, m2, s2 = _as64(m1, s1, m2, s2)
    d = s1.shape[0]
    big_d, _ = _janati_d(s1, s2, eps)
    eye = torch.eye(d, dtype=torch.float64)
    janati = (
        (m1 - m2).square().sum()
        + torch.trace(s1)
        + torch.trace(s2)
        - torch.trace(big_d)
        + d * eps * (1.0 - math.log(2.0 * eps))
        + eps * torch.logdet(big_d + eps * eye)
    )
    return 0.5 * janati


def entropic_cross_covariance(s1: Tensor, s2: Tensor, eps: float) -> Tensor:
    """Cov(X, Y) = 1/2 S1^1/2 D S1^-1/2 - eps/2 I [d, d] under the entropic plan (s1 invertible)."""
    s1, s2 = _as64(s1, s2)
    big_d, r1 = _janati_d(s1, s2, eps)
    eye = torch.eye(s1.shape[0], dtype=torch.float64)
    return 0.5 * r1 @ big_d @ torch.linalg.inv(r1) - 0.5 * eps * eye


def entropic_barycentric_map_gaussians(
    m1: Tensor, s1: Tensor, m2: Tensor, s2: Tensor, eps: float
) -> tuple[Tensor, Tensor]:
    """(L [d, d], c [d]): T_{1->2}(x) = E[Y | X = x] = L x + c, L = Cov(X, Y)^T S1^-1, c = m2 - L m1."""
    m1, s1, m2, s2 = _as64(m1, s1, m2, s2)
    cov_xy = entropic_cross_covariance(s1, s2, eps)
    slope = cov_xy.T @ torch.linalg.inv(s1)
    return slope, m2 - slope @ m1
