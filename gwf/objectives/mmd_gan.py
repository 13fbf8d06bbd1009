"""JKO MMD GAN, the official GWF ``--divergence MMD`` ([GWF] losses.py, mmd.py, kernels.py, train.py): MMD^2 between
the critic's embeddings phi(x) [B, E] (E = 128 by default) under a learned kernel, maximized by the critic and
minimized by the generator, with the interpolated gradient penalty (weight 10) of the sum of the embedding's
coordinates. The kernel's mixture weights are trained by both players (in both optimizers, as train.py's
``params_T`` and ``params_D``). The variants smmd, immd and ckmmd subclass it."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gwf.objectives.base import GenBatch, Objective, RealBatch
from gwf.objectives.kernels import make_kernel
from gwf.objectives.mmd import _off_diagonal_mean
from gwf.objectives.learned_kernel import LearnedKernel
from gwf.objectives.penalties import check_penalty_name, penalty


class EmbeddingCritic(nn.Module):
    """The critic of the MMD rows: the embedding network phi and, for ``kernel: learned``, the kernel's logits, in
    ONE module so that the critic optimizer updates both."""

    def __init__(self, phi: nn.Module, kernel: str = "learned", kernel_params: dict | None = None,
                 embedding_dim: int | None = None):
        super().__init__()
        self.phi, self.embedding_dim = phi, embedding_dim
        self.learned = kernel == "learned"
        if self.learned:
            if kernel_params:
                raise ValueError(f"kernel 'learned' takes no kernel_params (its families are the official fixed "
                                 f"ones), got {kernel_params}")
            self.mixture = LearnedKernel()
        else:
            self.fixed = make_kernel(kernel, **(kernel_params or {}))

    def embed(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """phi on flat samples: x [B, *shape] (, labels [B]) -> [B, E]."""
        e = self.phi(x, labels)
        if e.dim() != 2 or e.shape[1] != (self.embedding_dim or e.shape[1]):
            raise ValueError(f"the MMD critic must return embeddings [B, {self.embedding_dim or 'E'}] (a critic "
                             f"network with out_dim = method.embedding_dim), got {tuple(e.shape)}")
        return e

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        """Embeddings per problem: x [L, N, *shape], labels [L] (one per problem) or None -> [L, N, E]."""
        n_prob, n = x.shape[:2]
        return self.embed(x.flatten(0, 1), None if labels is None else labels.repeat_interleave(n)).reshape(
            n_prob, n, -1)

    def kernel(self, a: Tensor, b: Tensor) -> Tensor:
        """Gram matrices on embeddings: a [L, N, E], b [L, M, E] -> [L, N, M]."""
        return self.mixture.gram(a, b) if self.learned else self.fixed(a, b)


def mmd2(kxx: Tensor, kyy: Tensor, kxy: Tensor | None, unbiased: bool, l: float = 1.0) -> Tensor:
    """l * mean k(x, x') + mean k(y, y') - (l + 1) * mean k(x, y) per problem [L] from Gram blocks [L, ., .] (the
    official ``MMD2``: l = 1 the MMD^2, l = -1 drops the cross term). ``unbiased``: the same-sample means leave out
    the diagonal (U-statistic); otherwise every entry counts (V-statistic)."""
    def same(k: Tensor) -> Tensor:
        return _off_diagonal_mean(k) if unbiased else k.mean((1, 2))

    out = l * same(kxx) + same(kyy)
    return out if kxy is None else out - (l + 1) * kxy.mean((1, 2))


class MMDGAN(Objective):
    """critic loss = -MMD^2(phi(p), phi(q)) + penalty, generator loss = +MMD^2, averaged over the L problems.

    critic: the embedding network phi [B, *shape] (, labels) -> [B, E]. kernel: ``learned`` (official) or a key of
    gwf.objectives.kernels.KERNELS with ``kernel_params`` (the official ``--kernel rbf|riesz|imq|...``).
    unbiased: the U-statistic (official default ``--mmd_unbiased``). penalty: on the scalar sum of the embedding's
    coordinates (the mean for ``r3gan``), as losses.py ``gradient_penalty`` on ``netD``. kernel_players: ``both``
    (official) puts the kernel's logits in the generator's optimizer too; ``critic`` only in the critic's.
    """

    estimate = "mmd2"  # log key of the critic's objective (penalty aside)

    def __init__(self, critic: nn.Module, embedding_dim: int | None = 128, kernel: str = "learned",
                 kernel_params: dict | None = None, unbiased: bool = True, penalty: str | None = "interpolated",
                 penalty_weight: float = 10.0, kernel_players: str = "both"):
        super().__init__()
        if penalty_weight < 0:
            raise ValueError(f"method.penalty_weight must be >= 0, got {penalty_weight}")
        if kernel_players not in ("both", "critic"):
            raise ValueError(f"method.kernel_players must be 'both' (official) or 'critic', got '{kernel_players}'")
        check_penalty_name(penalty)
        self.critic = (critic if isinstance(critic, EmbeddingCritic)
                       else EmbeddingCritic(critic, kernel, kernel_params, embedding_dim))
        self.unbiased, self.penalty, self.penalty_weight = bool(unbiased), penalty, float(penalty_weight)
        self.kernel_players = kernel_players

    def generator_parameters(self) -> list[nn.Parameter]:
        if self.kernel_players == "both" and self.critic.learned:
            return list(self.critic.mixture.parameters())
        return []

    def divergence(self, e_real: Tensor, e_gen: Tensor, l: float = 1.0) -> Tensor:
        """The official MMD2(d_real, d_fake, l) per problem [L] on embeddings [L, M, E], [L, N, E]."""
        k = self.critic.kernel
        return mmd2(k(e_real, e_real), k(e_gen, e_gen), k(e_real, e_gen) if l > -1 else None, self.unbiased, l)

    def scalar_critic(self, name: str | None):
        """The critic a gradient penalty differentiates: x [B, *shape] (, labels) -> [B], the sum of phi's
        coordinates (``netD(x).sum()`` in losses.py), their mean for r3gan (``d_real.mean(dim=1)`` there)."""
        reduce = torch.mean if name == "r3gan" else torch.sum
        return lambda x, labels=None: reduce(self.critic.embed(x, labels), 1)

    def critic_penalty(self, x_gen: Tensor, real: RealBatch, rng: torch.Generator) -> Tensor:
        return penalty(self.penalty, self.penalty_weight, self.scalar_critic(self.penalty), real.pos, x_gen,
                       real.labels, rng)

    def real_side(self, real: RealBatch, rng: torch.Generator, create_graph: bool) -> tuple[Tensor, Tensor]:
        """The reals' embeddings [L, M, E] and the factor [L] (or a scalar) the critic's objective is scaled by: 1
        here, smmd's Jacobian scale there (``create_graph``: differentiable for the critic's update; False: the
        generator's step, which needs no gradient through the critic on the reals)."""
        with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
            e_real = self.critic(real.pos, real.labels)
        return e_real, torch.ones((), device=real.pos.device)

    def critic_value(self, e_real: Tensor, e_gen: Tensor, z: Tensor | None) -> Tensor:
        """The critic's objective (maximized) per problem [L], before the scale; immd and ckmmd change it."""
        return self.divergence(e_real, e_gen)

    def critic_loss(self, x_gen: Tensor, real: RealBatch, rng: torch.Generator,
                    z: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        x_gen = x_gen.detach()
        e_real, scale = self.real_side(real, rng, create_graph=True)
        value = (scale * self.critic_value(e_real, self.critic(x_gen, real.labels), z)).mean()
        pen = self.critic_penalty(x_gen, real, rng)
        logs = {self.estimate: value, "penalty": pen}
        return -value + pen, {k: v.detach() for k, v in logs.items()}

    def generator_value(self, e_real: Tensor, e_gen: Tensor, gen: GenBatch) -> Tensor:
        """The generator's loss per problem [L], before the scale; ckmmd changes it."""
        return self.divergence(e_real, e_gen)

    def generator_loss(self, gen: GenBatch, real: RealBatch, rng: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        e_real, scale = self.real_side(real, rng, create_graph=False)
        loss = (scale.detach() * self.generator_value(e_real, self.critic(gen.x, gen.labels), gen)).mean()
        return loss, {"mmd2": loss.detach()}
