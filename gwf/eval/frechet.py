"""Frechet distance between Gaussians fitted to feature sets (FID when the features are Inception's), in float64:

    FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})            (Dowson & Landau 1982; Heusel et al. 2017)

Tr((S1 S2)^{1/2}) = Tr((S1^{1/2} S2 S1^{1/2})^{1/2}), a symmetric PSD matrix's: real eigenvalues, no scipy sqrtm
(nor its complex round-off, nor the eps * I offset the reference FID code adds on near-singular covariances).
"""

from __future__ import annotations

import numpy as np
import torch


def feature_statistics(feats: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """feats [N, F] (N >= 2) -> mean mu float64 [F] and unbiased covariance sigma float64 [F, F]."""
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().numpy()
    feats = np.asarray(feats, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[0] < 2:
        raise ValueError(f"feats must be [N, F] with N >= 2, got shape {list(feats.shape)}")
    return feats.mean(axis=0), np.cov(feats, rowvar=False).reshape(feats.shape[1], feats.shape[1])


def _sqrtm_psd(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr((S1 S2)^{1/2}) for symmetric PSD S1, S2."""
    root1 = _sqrtm_psd(sigma1)
    m = root1 @ sigma2 @ root1
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0.0, None)).sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """FD (module docstring) of mu [F], sigma [F, F] symmetric PSD."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    F = mu1.shape[0]
    if mu2.shape != (F,) or sigma1.shape != (F, F) or sigma2.shape != (F, F):
        raise ValueError(f"shapes mu1 {list(mu1.shape)}, sigma1 {list(sigma1.shape)}, mu2 {list(mu2.shape)}, "
                         f"sigma2 {list(sigma2.shape)} do not match [F], [F, F]")
    for name, a in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} has non-finite entries")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return max(float(fd), 0.0)  # >= 0 exactly; round-off can give -1e-14 for equal statistics
