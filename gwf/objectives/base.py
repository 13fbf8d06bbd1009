"""The interface every objective implements. Objectives see tensors, their critic (if any) and a random generator,
never the trainer, the config or the logger (docs/objectives.md, "Adding an objective")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass
class RealBatch:
    """Real samples of one update, grouped into L problems (one per conditioning label).

    pos:    [L, M, *shape]  data of each problem's class (L = 1 and labels = None when unconditional)
    uncond: [U, *shape]     unconditional reals for velocity guidance shared by the problems, or [L, U, *shape] one
                            draw per problem, or None
    labels: [L] int64 or None
    """

    pos: Tensor
    uncond: Tensor | None = None
    labels: Tensor | None = None


@dataclass
class GenBatch:
    """Generated samples of one update.

    x:      [L, N, *shape]  G_theta(z) with gradient
    labels: [L] or None;  alpha: [L] guidance strength alpha = w + 1 (>= 1) or None
    sample: draws a fresh, independent [L, N, *shape] batch from the current generator without gradient
            (W-Flow's second batch q'); same labels and alpha.
    z:      the generator's inputs [L*N, *noise_shape] that gave x, or None (ckmmd reads them)
    """

    x: Tensor
    labels: Tensor | None
    alpha: Tensor | None
    sample: Callable[[], Tensor]
    z: Tensor | None = None


class Objective(nn.Module):
    """Base class. Critic-based objectives assign their network to ``self.critic`` (optimized by the trainer's
    critic optimizer; None for critic-free ones). Random draws come from the ``rng`` argument, never the global RNG
    (docs/conventions.md, Randomness)."""

    @property
    def critic(self) -> nn.Module | None:
        # A property, not a class attribute: nn.Module looks in _modules only when normal lookup fails, so a
        # class-level `critic = None` would hide the critic a subclass assigns.
        return self._modules.get("critic")

    uses_noise = False  # True: critic_loss also takes the generator's inputs z of x_gen (ckmmd)

    def generator_parameters(self) -> list[nn.Parameter]:
        """The objective's own parameters that the generator's optimizer updates too (the official MMD GAN's kernel
        weights, trained by both players); none by default."""
        return []

    def generator_loss(self, gen: GenBatch, real: RealBatch, rng: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss whose gradient w.r.t. gen.x moves the particles along the flow, and detached logs."""
        raise NotImplementedError

    def critic_loss(self, x_gen: Tensor, real: RealBatch, rng: torch.Generator,
                    z: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar critic loss (minimized) on detached generated samples ``x_gen`` [L, N, *shape] (``z``: their
        inputs [L*N, *noise_shape], passed when ``uses_noise``)."""
        raise NotImplementedError(f"{type(self).__name__} has no critic")
