"""The interface every objective implements. Objectives see tensors and (for critic-based ones) their critic,
never the trainer, the config or the logger."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn


@dataclass
class RealBatch:
    """Real samples of one training step, grouped into L problems (one per conditioning label).

    pos:    [L, M, *shape]  data of each problem's class (L = 1 and labels = None when unconditional)
    uncond: [U, *shape]     unconditional reals for velocity guidance, or None
    labels: [L] int64 or None
    """

    pos: Tensor
    uncond: Tensor | None = None
    labels: Tensor | None = None


@dataclass
class GenBatch:
    """Generated samples of one training step.

    x:      [L, N, *shape]  G_theta(z) with gradient
    labels: [L] or None;  alpha: [L] guidance strength alpha = w + 1 (>= 1) or None
    sample: draws a fresh, independent [L, N, *shape] batch from the current generator without gradient
            (W-Flow's second batch q'); same labels and alpha.
    """

    x: Tensor
    labels: Tensor | None
    alpha: Tensor | None
    sample: Callable[[], Tensor]


class Objective(nn.Module):
    """Base class. Critic-based objectives assign their network to ``self.critic`` (the trainer optimizes its
    parameters with the critic optimizer); ``critic`` is None for critic-free ones (W-Flow, MMD-JKO)."""

    @property
    def critic(self) -> nn.Module | None:
        # A property, not a class attribute: nn.Module keeps submodules in _modules and only looks there when normal
        # lookup fails, so a class-level `critic = None` would hide the critic a subclass assigns.
        return self._modules.get("critic")

    def generator_loss(self, gen: GenBatch, real: RealBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss whose gradient w.r.t. gen.x moves particles along the flow, and detached logs."""
        raise NotImplementedError

    def critic_loss(
        self, x_gen: Tensor, real: RealBatch, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar critic loss (minimized) on detached generated samples ``x_gen`` [L, N, *shape]; ``generator``
        drives any randomness (e.g. interpolation weights of a gradient penalty)."""
        raise NotImplementedError(f"{type(self).__name__} has no critic")


class CriticObjective(Objective):
    """An objective with a scalar critic d: x [B, *shape] (+ labels) -> [B]. Holds the critic and scores grouped
    samples; subclasses define the losses."""

    def __init__(self, critic: nn.Module):
        super().__init__()
        if not isinstance(critic, nn.Module):
            raise ValueError(f"{type(self).__name__} needs a critic nn.Module (method.critic), got {type(critic)}")
        self.critic = critic

    def scores(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """critic on grouped samples x [L, K, *shape] -> [L*K] (at least fp32), labels [L] broadcast per sample."""
        num_problems, k = x.shape[:2]
        d = self.critic(x.flatten(0, 1), None if labels is None else labels.repeat_interleave(k))
        return d.reshape(num_problems * k).to(torch.promote_types(d.dtype, torch.float32))  # >= fp32 island

    @staticmethod
    def check_pair(x_gen: Tensor, real: RealBatch) -> None:
        if x_gen.shape[0] != real.pos.shape[0] or x_gen.shape[2:] != real.pos.shape[2:]:
            raise ValueError(f"x_gen [L, N, *shape] {tuple(x_gen.shape)} does not match real.pos [L, M, *shape] "
                             f"{tuple(real.pos.shape)}")
