"""The interface every objective implements. Objectives see tensors and (for critic-based ones) their critic,
never the trainer, the config or the logger."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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
    """Base class. ``critic`` is None for critic-free objectives (W-Flow, MMD-JKO with a fixed kernel)."""

    critic: nn.Module | None = None

    def generator_loss(self, gen: GenBatch, real: RealBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar loss whose gradient w.r.t. gen.x moves particles along the flow, and detached logs."""
        raise NotImplementedError

    def critic_loss(self, x_gen: Tensor, real: RealBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar critic loss (minimized) on detached generated samples ``x_gen`` [L, N, *shape]."""
        raise NotImplementedError(f"{type(self).__name__} has no critic")
