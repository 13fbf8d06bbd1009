"""Evaluation of 2D toys against held-out target samples."""

from __future__ import annotations

import torch
from geomloss import SamplesLoss
from torch import Tensor

from gwf.data.toy2d import make_sampler
from gwf.seeding import make_generator


def sinkhorn_divergence(x: Tensor, y: Tensor, blur: float = 0.05) -> float:
    """Debiased Sinkhorn divergence S_eps(x, y), cost |x-y|^2/2, eps = blur^2 (geomloss, tensorized, fp32)."""
    loss = SamplesLoss("sinkhorn", p=2, blur=blur, scaling=0.9, debias=True, backend="tensorized")
    return float(loss(x.detach().float().cpu(), y.detach().float().cpu()))


class Toy2DEvaluator:
    """``evaluate(x [N, 2], labels) -> {"sinkhorn_div": ...}`` against held-out samples of the target."""

    def __init__(self, target: str, num_samples: int = 2000, blur: float = 0.05, seed: int = 0):
        self.reference = make_sampler(target)(num_samples, make_generator("cpu", "toy2d-eval", target, seed))
        self.blur = blur

    def evaluate(self, x: Tensor, labels: Tensor | None = None) -> dict[str, float]:
        return {"sinkhorn_div": sinkhorn_divergence(x, self.reference, self.blur)}
