"""Sliced-Wasserstein flow (Bonneel et al. 2015; Liutkus et al. 2019; JKO in SW space: Bonet et al. 2022):

    SW_2^2(q, p) = E_theta W_2^2(theta # q, theta # p),   theta uniform on the unit sphere S^{D-1}

with exact 1-D W_2^2 (quantile functions) and projections drawn from the update's ``rng``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from gwf.objectives.base import GenBatch, Objective, RealBatch


def random_directions(num: int, dim: int, rng: torch.Generator, device=None) -> Tensor:
    """[num, dim] directions uniform on the unit sphere (normalized Gaussians)."""
    theta = torch.randn(num, dim, generator=rng, device=device)
    return theta / torch.linalg.vector_norm(theta, dim=1, keepdim=True)


def w2_1d(u: Tensor, v: Tensor) -> Tensor:
    """Exact W_2^2 between uniform empirical measures on the line, per problem and column.

    u: [B, N, P], v: [B, M, P] (any order along dim 1) -> [B, P]. The quantile functions are steps at k/N and k/M;
    on each piece of the merged grid both are constant, so the integral is a sum over at most N + M pieces.
    """
    n, m = u.shape[1], v.shape[1]
    u, v = u.sort(dim=1).values, v.sort(dim=1).values
    steps = [torch.arange(1, k + 1, device=u.device, dtype=u.dtype) / k for k in (n, m)]
    grid = torch.cat(steps).sort().values  # [N + M] right ends of the pieces
    width = torch.diff(grid, prepend=grid.new_zeros(1))
    mid = grid - width / 2
    iu = (mid * n).long().clamp_(max=n - 1)  # the quantile piece of u containing each midpoint
    iv = (mid * m).long().clamp_(max=m - 1)
    return ((u[:, iu] - v[:, iv]).square() * width[:, None]).sum(1)


def sliced_w2(x: Tensor, y: Tensor, directions: Tensor) -> Tensor:
    """Monte-Carlo SW_2^2 per problem: x [B, N, D], y [B, M, D], directions [P, D] unit rows -> [B]."""
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2] != directions.shape[1]:
        raise ValueError(f"sliced_w2 takes x [B, N, D], y [B, M, D], directions [P, D]; got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}, {tuple(directions.shape)}")
    return w2_1d(x @ directions.T, y @ directions.T).mean(1)


class SlicedWasserstein(Objective):
    """Generator loss: mean over the L problems of the SW_2^2 estimate between G(z) and the data, with
    ``num_projections`` fresh directions per update (shared by the problems), computed in fp32."""

    def __init__(self, num_projections: int = 64):
        super().__init__()
        if num_projections < 1:
            raise ValueError(f"method.num_projections must be >= 1, got {num_projections}")
        self.num_projections = int(num_projections)

    def generator_loss(self, gen: GenBatch, real: RealBatch, rng: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        x, y = gen.x.flatten(2).float(), real.pos.flatten(2).float()
        directions = random_directions(self.num_projections, x.shape[2], rng, x.device)
        loss = sliced_w2(x, y, directions).mean()
        return loss, {"sw2": loss.detach()}
