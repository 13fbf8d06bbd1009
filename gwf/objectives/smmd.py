"""Scaled MMD GAN, the official GWF ``--divergence sMMD`` ([GWF] mmd.py ``scale_MMD``, after Arbel et al. 2018): the
MMD GAN with both losses multiplied by 1 / (1 + c ||J||^2), J the Jacobian of the critic's embedding at the reals
(``grad``), or 1 / (1 + c (||J||^2 + mean phi^2)) (``value_and_grad``); c = 10. ||J||^2 = mean over reals of
||d phi(x) / dx||_F^2, exact for embeddings of at most 16 coordinates, else Hutchinson's estimate
E_v ||J^T v||^2, v ~ N(0, I) (``n_hutch`` draws from the update's rng)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gwf.objectives.base import RealBatch
from gwf.objectives.mmd_gan import MMDGAN

SCALINGS = ("grad", "value_and_grad")
EXACT_MAX_DIM = 16  # official: exact Jacobian for embed_dim <= 16, Hutchinson above


def squared_jacobian_norm(e: Tensor, x: Tensor, create_graph: bool, n_hutch: int = 1,
                          rng: torch.Generator | None = None) -> Tensor:
    """Per-sample ||d e_b / d x_b||_F^2 [B] for embeddings e [B, E] of inputs x [B, *shape] (x requires grad; each
    e_b depends on x_b only): exact (one backward per coordinate) for E <= 16, else Hutchinson with n_hutch
    probes."""
    if e.shape[1] <= EXACT_MAX_DIM:
        rows = [torch.autograd.grad(e[:, i].sum(), x, create_graph=create_graph, retain_graph=True)[0]
                for i in range(e.shape[1])]
        return sum(g.flatten(1).square().sum(1) for g in rows)
    total = e.new_zeros(e.shape[0])
    for _ in range(n_hutch):
        v = torch.randn(e.shape, generator=rng, device=e.device, dtype=e.dtype)
        (jtv,) = torch.autograd.grad((e * v).sum(), x, create_graph=create_graph, retain_graph=True)
        total = total + jtv.flatten(1).square().sum(1)
    return total / n_hutch


class ScaledMMD(MMDGAN):
    """MMDGAN (same arguments) with the scale 1 / (1 + scaling_coeff * ...) per problem; ``scaling``: grad or
    value_and_grad; ``n_hutch``: Hutchinson probes for embeddings wider than 16."""

    def __init__(self, critic: nn.Module, scaling: str = "grad", scaling_coeff: float = 10.0, n_hutch: int = 1,
                 **kwargs):
        super().__init__(critic, **kwargs)
        if scaling not in SCALINGS:
            raise ValueError(f"method.scaling must be one of {list(SCALINGS)}, got '{scaling}'")
        if scaling_coeff < 0 or n_hutch < 1:
            raise ValueError(f"method.scaling_coeff must be >= 0 and method.n_hutch >= 1, got {scaling_coeff}, "
                             f"{n_hutch}")
        self.scaling, self.scaling_coeff, self.n_hutch = scaling, float(scaling_coeff), int(n_hutch)

    def scale(self, e: Tensor, x: Tensor, create_graph: bool, rng: torch.Generator | None) -> Tensor:
        """The factor per problem [L] from the reals' embeddings e [L, M, E] of the leaf x [L*M, *shape]."""
        n_prob, m = e.shape[:2]
        with torch.enable_grad():
            norm2 = squared_jacobian_norm(e.flatten(0, 1), x, create_graph, self.n_hutch, rng)
        penalty = norm2.view(n_prob, m).mean(1)
        if self.scaling == "value_and_grad":
            penalty = penalty + e.square().mean((1, 2))
        return 1.0 / (1.0 + self.scaling_coeff * penalty)

    def real_side(self, real: RealBatch, rng: torch.Generator, create_graph: bool) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            x = real.pos.detach().flatten(0, 1).requires_grad_(True)
            e = self.critic(x.view_as(real.pos), real.labels)
            scale = self.scale(e, x, create_graph, rng)
        return e, scale if create_graph else scale.detach()
