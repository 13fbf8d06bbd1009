"""Per-step conditioning: which labels a step trains on and their guidance strengths alpha = w + 1."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


def sample_alpha(n: int, alpha_max: float, power: float, one_fraction: float, generator: torch.Generator,
                 device=None) -> Tensor:
    """[n] float32 alpha on [1, alpha_max] with density proportional to alpha^-power ([WF] Sec. 4), a fraction
    ``one_fraction`` forced to 1 (no guidance); inverse-CDF sampling."""
    u = torch.rand(n, generator=generator, device=device)
    if alpha_max <= 1.0:
        return torch.ones(n, device=device)
    if abs(power - 1.0) < 1e-8:
        alpha = alpha_max**u  # density 1/alpha
    else:
        e = 1.0 - power  # CDF(a) = (a^e - 1) / (alpha_max^e - 1)
        alpha = (1.0 + u * (alpha_max**e - 1.0)) ** (1.0 / e)
    forced = torch.rand(n, generator=generator, device=device) < one_fraction
    return torch.where(forced, torch.ones_like(alpha), alpha)


@dataclass(frozen=True)
class ConditioningSampler:
    """``num_classes = 0``: one unconditional problem per step. Otherwise ``labels_per_update`` distinct labels
    (all classes when it equals num_classes), each with its own alpha when ``alpha_max > 1``."""

    num_classes: int
    labels_per_update: int = 1
    alpha_max: float = 1.0
    alpha_power: float = 3.0
    alpha_one_fraction: float = 0.1

    def __post_init__(self):
        if self.num_classes > 0 and not 1 <= self.labels_per_update <= self.num_classes:
            raise ValueError(f"batch.labels_per_update must be in [1, num_classes={self.num_classes}], "
                             f"got {self.labels_per_update}")

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0

    @property
    def guided(self) -> bool:
        return self.alpha_max > 1.0

    def sample(self, generator: torch.Generator, device=None) -> tuple[Tensor | None, Tensor | None]:
        if not self.conditional:
            return None, None
        labels = torch.randperm(self.num_classes, generator=generator, device=device)[: self.labels_per_update]
        alpha = None
        if self.guided:
            alpha = sample_alpha(len(labels), self.alpha_max, self.alpha_power, self.alpha_one_fraction, generator,
                                 device)
        return labels, alpha
