"""The learned kernel of the official GWF MMD rows ([GWF] kernels.py ``LearnedKernelGram`` / ``LearnedKernelDiag``,
after CKGAN): k = sum_f w_f k_f over seven fixed kernel families, w = softmax(7 logits, zero at init), on the
critic's embeddings. Every family's parameters are the official ones:

    gaussian      exp(-r^2 / (2 * 10^2))
    rbf_mixture   sum_{s in 1, 2, 4, 8, 16} exp(-r^2 / (2 s^2))          (a sum, not a mean)
    laplacian     exp(-||a - b||_1 / 100)
    exponential   exp(-r / 10)
    matern_3_2    (1 + sqrt3 r / 10) exp(-sqrt3 r / 10)
    matern_5_2    (1 + sqrt5 r / 10 + 5/3 (r / 10)^2) exp(-sqrt5 r / 10)
    riesz_psd     -r_6 + ||a||_6 + ||b||_6     (r_6 = sqrt(r^2 + 1e-6), ||a||_6 = sqrt(||a||^2 + 1e-6))

r = sqrt(||a - b||^2 + 1e-12) in the exponential and Matern families, as the official ``pairwise_l2``. Computed in
fp32 (fp64 kept) with autocast off.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gwf.objectives.kernels import squared_distances

FAMILIES = ("gaussian", "rbf_mixture", "laplacian", "exponential", "matern_3_2", "matern_5_2", "riesz_psd")
_RBF_SIGMAS = (1.0, 2.0, 4.0, 8.0, 16.0)  # official rbf_mixture_kernel(K=5): sigma 0.5, doubled before each use
_L2_EPS, _RIESZ_EPS = 1e-12, 1e-6


def family_values(d2: Tensor, d1: Tensor, norm_a: Tensor, norm_b: Tensor) -> Tensor:
    """The seven families [..., 7] from squared L2 distances d2, L1 distances d1 (same shape) and the squared norms
    of each pair's two points (broadcastable to d2)."""
    r = (d2 + _L2_EPS).sqrt()
    s3, s5 = math.sqrt(3.0) * r / 10.0, math.sqrt(5.0) * r / 10.0
    riesz = -(d2 + _RIESZ_EPS).sqrt() + (norm_a + _RIESZ_EPS).sqrt() + (norm_b + _RIESZ_EPS).sqrt()
    return torch.stack([
        torch.exp(-d2 / 200.0),
        sum(torch.exp(-d2 / (2.0 * s * s)) for s in _RBF_SIGMAS),
        torch.exp(-d1 / 100.0),
        torch.exp(-r / 10.0),
        (1.0 + s3) * torch.exp(-s3),
        (1.0 + s5 + s5.square() / 3.0) * torch.exp(-s5),
        riesz.expand_as(d2),
    ], dim=-1)


class LearnedKernel(nn.Module):
    """k(a, b) = sum_f softmax(logits)_f k_f(a, b); ``gram`` for MMD (all pairs), ``aligned`` for ckMMD (pairs
    a_i, b_i). The logits are the module's only parameters."""

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(len(FAMILIES)))  # uniform mixture at init (official)

    @property
    def weights(self) -> Tensor:
        """Mixture weights [7], on the simplex."""
        return self.logits.softmax(0)

    def _mix(self, values: Tensor) -> Tensor:
        return values @ self.weights.to(values.dtype)

    def gram(self, a: Tensor, b: Tensor) -> Tensor:
        """a [L, N, E], b [L, M, E] -> [L, N, M]."""
        with torch.autocast(device_type=a.device.type, enabled=False):
            dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
            a, b = a.to(dtype), b.to(dtype)
            d2 = squared_distances(a, b)
            d1 = torch.cdist(a, b, p=1.0)
            sq_a, sq_b = a.square().sum(-1)[:, :, None], b.square().sum(-1)[:, None, :]
            return self._mix(family_values(d2, d1, sq_a, sq_b))

    def aligned(self, a: Tensor, b: Tensor) -> Tensor:
        """a [..., E], b [..., E] -> [...]: k(a_i, b_i)."""
        if a.shape != b.shape:
            raise ValueError(f"aligned kernel pairs a {tuple(a.shape)} with b {tuple(b.shape)}: shapes must agree")
        with torch.autocast(device_type=a.device.type, enabled=False):
            dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
            a, b = a.to(dtype), b.to(dtype)
            diff = a - b
            values = family_values(diff.square().sum(-1), diff.abs().sum(-1), a.square().sum(-1), b.square().sum(-1))
            return self._mix(values)
