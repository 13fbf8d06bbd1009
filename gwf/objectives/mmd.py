"""MMD-JKO with a fixed kernel ([GWF] Algorithm 1): the generator descends the unbiased MMD^2 to the data; no
critic (the witness is closed form)."""

from __future__ import annotations

import torch
from torch import Tensor

from gwf.objectives.base import GenBatch, Objective, RealBatch
from gwf.objectives.kernels import Kernel, make_kernel


def _pooled_gram(x: Tensor, y: Tensor, kernel: Kernel) -> tuple[Tensor, Tensor, Tensor]:
    """Blocks K_xx [B, N, N], K_yy [B, M, M], K_xy [B, N, M] of one kernel call on the pooled sample, so a
    data-dependent bandwidth (median heuristic) is shared by the three terms, as an MMD requires."""
    if x.dim() != y.dim() or x.dim() not in (2, 3):
        raise ValueError(f"MMD takes x [B, N, D] and y [B, M, D] (or both 2-D), got {tuple(x.shape)}, {tuple(y.shape)}")
    if x.dim() == 2:
        x, y = x[None], y[None]
    n = x.shape[1]
    dtype = torch.promote_types(x.dtype, y.dtype)
    z = torch.cat([x.to(dtype), y.to(dtype)], dim=1)  # [B, N + M, D]
    k = kernel(z, z)
    return k[:, :n, :n], k[:, n:, n:], k[:, :n, n:]


def _off_diagonal_mean(k: Tensor) -> Tensor:
    """mean_{i != j} K_ij per problem: [B, N, N] -> [B]."""
    n = k.shape[1]
    if n < 2:
        raise ValueError(f"the unbiased MMD^2 needs at least 2 points per sample, got {n}")
    return (k.sum((1, 2)) - k.diagonal(dim1=1, dim2=2).sum(1)) / (n * (n - 1))


def mmd2_unbiased(x: Tensor, y: Tensor, kernel: Kernel) -> Tensor:
    """Unbiased MMD^2 (U-statistic, Gretton et al. 2012, Lemma 6) per problem: [B] (a scalar for 2-D inputs).

        MMD_u^2 = 1/(N(N-1)) sum_{i != j} k(x_i, x_j) + 1/(M(M-1)) sum_{i != j} k(y_i, y_j)
                  - 2/(NM) sum_{i,j} k(x_i, y_j)

    x: [B, N, D], y: [B, M, D]. Can be negative; E[MMD_u^2] = MMD^2 exactly.
    """
    kxx, kyy, kxy = _pooled_gram(x, y, kernel)
    out = _off_diagonal_mean(kxx) + _off_diagonal_mean(kyy) - 2.0 * kxy.mean((1, 2))
    return out[0] if x.dim() == 2 else out


def mmd2_biased(x: Tensor, y: Tensor, kernel: Kernel) -> Tensor:
    """Biased MMD^2 (V-statistic, diagonals included) per problem: [B]; >= 0 for a positive-definite kernel."""
    kxx, kyy, kxy = _pooled_gram(x, y, kernel)
    out = kxx.mean((1, 2)) + kyy.mean((1, 2)) - 2.0 * kxy.mean((1, 2))
    return out[0] if x.dim() == 2 else out


class MMD(Objective):
    """Generator loss = mean over the L problems of MMD_u^2(G(z), x_data). ``kernel``: a key of KERNELS, with
    parameters as ``kernel_params`` (the config's dict) or keywords, e.g. MMD("gaussian", sigma="median")."""

    def __init__(self, kernel: str = "gaussian", kernel_params: dict | None = None, **kernel_kwargs):
        super().__init__()
        params = {**(kernel_params or {}), **kernel_kwargs}
        self.kernel_name = kernel
        self.kernel = make_kernel(kernel, **params)

    def generator_loss(self, gen: GenBatch, real: RealBatch, rng: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x = gen.x.flatten(2)  # [L, N, D]
        mmd2 = mmd2_unbiased(x, real.pos.flatten(2).to(x.dtype), self.kernel)  # [L]
        loss = mmd2.mean()
        return loss.to(gen.x.dtype), {"mmd2": loss.detach()}
