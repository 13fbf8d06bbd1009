"""JKO MMD GAN ([GWF]): MMD^2 with a learned kernel k(a, b) = k_mix(phi(a), phi(b)), maximized by the critic and
minimized by the generator (a parametric JKO step on the learned-kernel MMD)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from gwf.objectives.base import GenBatch, Objective, RealBatch
from gwf.objectives.kernels import squared_distances
from gwf.objectives.mmd import mmd2_unbiased
from gwf.objectives.penalties import interpolated_penalty

# Bandwidths of the Gaussian mixture, in units of the embedding (Li et al. 2017 use a fixed set of this kind).
DEFAULT_BANDWIDTHS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


class MixtureKernelCritic(nn.Module):
    """The learned kernel k(a, b) = sum_s w_s exp(-||phi(a) - phi(b)||^2 / (2 s^2)), w = softmax(logits), in ONE
    module so that the trainer's critic optimizer updates phi and w."""

    def __init__(self, phi: nn.Module, bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS,
                 embedding_dim: int | None = None):
        super().__init__()
        self.embedding_dim = embedding_dim
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
        if e.dim() != 2 or e.shape[1] != (self.embedding_dim or e.shape[1]):
            raise ValueError(f"the MMD GAN critic must return embeddings [B, {self.embedding_dim or 'E'}] (a critic "
                             f"network with out_dim = method.embedding_dim), got {tuple(e.shape)}")
        return e.reshape(n_prob, n, -1)

    def kernel(self, a: Tensor, b: Tensor) -> Tensor:
        """Mixture kernel on embeddings: a [L, N, E], b [L, M, E] -> [L, N, M]."""
        with torch.autocast(device_type=a.device.type, enabled=False):
            d2 = squared_distances(a.float(), b.float())  # [L, N, M]
            scales = 2.0 * self.bandwidths.square()  # [S]
            return torch.einsum("s,lnms->lnm", self.weights, torch.exp(-d2[..., None] / scales))


class MMDGAN(Objective):
    """critic loss = -MMD_u^2 + penalty_weight * GP (interpolated penalty of the MMD witness; 0: none), generator
    loss = +MMD_u^2, averaged over the L problems. ``critic``: the embedding phi [B, *shape] -> [B, E]
    (E = ``embedding_dim``, None: any), wrapped into a MixtureKernelCritic."""

    def __init__(self, critic: nn.Module, embedding_dim: int | None = None,
                 bandwidths: Sequence[float] = DEFAULT_BANDWIDTHS, penalty_weight: float = 0.0):
        super().__init__()
        if penalty_weight < 0:
            raise ValueError(f"method.penalty_weight must be >= 0, got {penalty_weight}")
        self.critic = (critic if isinstance(critic, MixtureKernelCritic)
                       else MixtureKernelCritic(critic, bandwidths, embedding_dim))
        self.penalty_weight = penalty_weight

    def mmd2(self, x_gen: Tensor, x_real: Tensor, labels: Tensor | None) -> Tensor:
        """MMD_u^2 per problem [L] between the embedded samples x_gen [L, N, *shape] and x_real [L, M, *shape]."""
        return mmd2_unbiased(self.critic(x_real, labels), self.critic(x_gen, labels), self.critic.kernel)

    def witness_penalty(self, x_gen: Tensor, x_real: Tensor, labels: Tensor | None,
                        rng: torch.Generator | None = None) -> Tensor:
        """E_z ||grad_z f(z)||^2 (the interpolated penalty) of the empirical MMD witness
        f(z) = mean_j k(z, real_j) - mean_j k(z, gen_j), at interpolates of the first min(N, M) real and generated
        samples of each problem."""
        n_prob, n = x_real.shape[0], min(x_gen.shape[1], x_real.shape[1])

        def witness(z: Tensor, _labels=None) -> Tensor:  # z [L*n, *shape] -> [L*n]
            ez = self.critic(z.reshape(n_prob, n, *z.shape[1:]), labels)
            er, eg = self.critic(x_real, labels), self.critic(x_gen, labels)
            return (self.critic.kernel(ez, er).mean(2) - self.critic.kernel(ez, eg).mean(2)).flatten()

        return interpolated_penalty(witness, x_real[:, :n].flatten(0, 1), x_gen[:, :n].flatten(0, 1), rng=rng)

    def critic_loss(self, x_gen: Tensor, real: RealBatch, rng: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        mmd2 = self.mmd2(x_gen.detach(), real.pos, real.labels).mean()
        loss = -mmd2
        logs = {"mmd2": mmd2.detach()}
        if self.penalty_weight > 0:
            gp = self.witness_penalty(x_gen.detach(), real.pos, real.labels, rng)
            loss = loss + self.penalty_weight * gp
            logs["gp"] = gp.detach()
        return loss, logs

    def generator_loss(self, gen: GenBatch, real: RealBatch, rng: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        mmd2 = self.mmd2(gen.x, real.pos, real.labels).mean()
        return mmd2, {"mmd2": mmd2.detach()}
