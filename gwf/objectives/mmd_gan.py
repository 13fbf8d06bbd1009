"""JKO MMD GAN ([GWF] official code, DESIGN 2.2): MMD^2 with a learned kernel k(a, b) = k_mix(phi(a), phi(b)).

The critic maximizes MMD^2 (critic loss -MMD^2), the generator minimizes it; with the trainer's transport term each
generator update is a parametric JKO step on the learned-kernel MMD.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from gwf.objectives.base import GenBatch, Objective, RealBatch
from gwf.objectives.kernels import squared_distances
from gwf.objectives.mmd import mmd2_unbiased

# Bandwidths of the Gaussian mixture, in units of the embedding (Li et al. 2017 use a fixed set of this kind).
DEFAULT_BANDWIDTHS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


class MixtureKernelCritic(nn.Module):
    """The learned kernel: an embedding phi and softmax-weighted Gaussian bandwidths, in ONE module so that the
    trainer's critic optimizer (objective.critic.parameters()) updates both.

        k(a, b) = sum_s w_s exp(-||phi(a) - phi(b)||^2 / (2 s^2)),   w = softmax(logits)   (sum w = 1)
    """

    def __init__(self, phi: nn.Module, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS):
        super().__init__()
        if len(bandwidths) == 0 or min(bandwidths) <= 0:
            raise ValueError(f"MMD GAN bandwidths must be a non-empty list of positive numbers, got {list(bandwidths)}")
        self.phi = phi
        self.register_buffer("bandwidths", torch.tensor([float(s) for s in bandwidths]))
        self.logits = nn.Parameter(torch.zeros(len(bandwidths)))  # uniform mixture at init

    @property
    def weights(self) -> Tensor:
        """Mixture weights [S], on the simplex."""
        return self.logits.softmax(0)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Embeddings per problem: x [L, N, *shape] -> [L, N, E]; labels [L] (one per problem) for a
        class-conditional phi."""
        n_prob, n = x.shape[:2]
        if getattr(self.phi, "class_emb", None) is not None:
            if labels is None:
                raise ValueError("the MMD GAN embedding is class-conditional: pass labels")
            e = self.phi(x.flatten(0, 1), labels.repeat_interleave(n))
        else:
            e = self.phi(x.flatten(0, 1))
        if e.dim() != 2:
            raise ValueError(f"the MMD GAN critic must return embeddings [B, E] (MLPCritic with out_dim > 1), got "
                             f"{tuple(e.shape)}")
        return e.reshape(n_prob, n, -1)

    def kernel(self, a: Tensor, b: Tensor) -> Tensor:
        """Mixture kernel on embeddings: a [L, N, E], b [L, M, E] -> [L, N, M]."""
        with torch.autocast(device_type=a.device.type, enabled=False):
            d2 = squared_distances(a.float(), b.float())  # [L, N, M]
            scales = 2.0 * self.bandwidths.square()  # [S]
            return torch.einsum("s,lnms->lnm", self.weights, torch.exp(-d2[..., None] / scales))


class MMDGAN(Objective):
    """JKO MMD GAN. critic loss = -MMD_u^2 + penalty_weight * GP, generator loss = +MMD_u^2, with the learned
    kernel of MixtureKernelCritic and the unbiased estimator, per problem, averaged over the L problems.

    ``critic``: the embedding phi, [B, *shape] -> [B, E] (MLPCritic with out_dim > 1); the objective wraps it with
    the mixture logits, so ``self.critic`` is a MixtureKernelCritic. ``penalty_weight``: interpolated squared
    gradient norm of the MMD witness, E ||grad_z f(z)||^2 at z = t x_real + (1 - t) x_gen (0 disables it).
    """

    def __init__(self, critic: nn.Module, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
                 penalty_weight: float = 0.0):
        super().__init__()
        if penalty_weight < 0:
            raise ValueError(f"method.penalty_weight must be >= 0, got {penalty_weight}")
        self.critic = critic if isinstance(critic, MixtureKernelCritic) else MixtureKernelCritic(critic, bandwidths)
        self.penalty_weight = penalty_weight

    def mmd2(self, x_gen: Tensor, x_real: Tensor, labels: Tensor | None) -> Tensor:
        """MMD_u^2 per problem [L] between the embedded samples x_gen [L, N, *shape] and x_real [L, M, *shape]."""
        return mmd2_unbiased(self.critic(x_real, labels), self.critic(x_gen, labels), self.critic.kernel)

    def witness_penalty(self, x_gen: Tensor, x_real: Tensor, labels: Tensor | None,
                        generator: torch.Generator | None = None) -> Tensor:
        """E_z ||grad_z f(z)||^2 (scalar), f(z) = mean_j k(z, real_j) - mean_j k(z, gen_j), the empirical MMD witness,
        at random interpolates of paired real and generated samples (the first min(N, M) of each); t ~ U[0, 1] per
        pair, drawn from ``generator``."""
        n = min(x_gen.shape[1], x_real.shape[1])
        a, b = x_real[:, :n].detach(), x_gen[:, :n].detach()
        t = torch.rand(a.shape[:2] + (1,) * (a.dim() - 2), generator=generator, device=a.device, dtype=a.dtype)
        z = (t * a + (1 - t) * b).requires_grad_(True)
        ez, er, eg = self.critic(z, labels), self.critic(x_real, labels), self.critic(x_gen, labels)
        f = self.critic.kernel(ez, er).mean(2) - self.critic.kernel(ez, eg).mean(2)  # [L, n]
        (grad,) = torch.autograd.grad(f.sum(), z, create_graph=True)
        return grad.flatten(2).square().sum(-1).mean()

    def critic_loss(self, x_gen: Tensor, real: RealBatch,
                    generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        mmd2 = self.mmd2(x_gen.detach(), real.pos, real.labels).mean()
        loss = -mmd2
        logs = {"mmd2": mmd2.detach()}
        if self.penalty_weight > 0:
            gp = self.witness_penalty(x_gen.detach(), real.pos, real.labels, generator)
            loss = loss + self.penalty_weight * gp
            logs["gp"] = gp.detach()
        return loss, logs

    def generator_loss(self, gen: GenBatch, real: RealBatch) -> tuple[Tensor, dict[str, Tensor]]:
        mmd2 = self.mmd2(gen.x, real.pos, real.labels).mean()
        return mmd2, {"mmd2": mmd2.detach()}
