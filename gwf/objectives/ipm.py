"""Integral probability metrics with a critic: W1 (WGAN-like, [GWF] official code, DESIGN 2.2)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gwf.objectives.base import CriticObjective, GenBatch, RealBatch
from gwf.objectives.penalties import check_penalty_name, penalty


class W1(CriticObjective):
    """Kantorovich-Rubinstein dual  W1(q, p) = sup_{Lip(d) <= 1} E_p[d] - E_q[d], the Lipschitz constraint relaxed to a
    gradient penalty (WGAN-GP, weight 10). p = data, q = generated; critic d: x [B, *shape] (, labels [B]) -> [B].

    critic loss = E_q[d] - E_p[d] + penalty_weight * penalty      (so -critic loss, penalty aside, estimates W1)
    generator loss = -E_q[d]                                       (particles climb d, towards the data)

    Surprise worth knowing: (||grad d|| - 1)^2 makes grad d = 0 a barrier. A freshly initialized critic (tiny input
    gradient) is first pushed to unit slope in whatever direction it starts with; if that is the wrong sign it can lock
    into -W1 (seen on a 1-D toy, seed-dependent). The squared-norm penalties (penalty="interpolated", "r1") have no
    such barrier but estimate W1 only up to a scale.
    """

    def __init__(self, critic: nn.Module, penalty: str | None = "wgan_gp", penalty_weight: float = 10.0):
        check_penalty_name(penalty)
        super().__init__(critic)
        self.penalty, self.penalty_weight = penalty, float(penalty_weight)

    def critic_loss(self, x_gen: Tensor, real: RealBatch,
                    generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        x_gen = x_gen.detach()
        self.check_pair(x_gen, real)
        d_real, d_fake = self.scores(real.pos, real.labels), self.scores(x_gen, real.labels)
        w1 = d_real.mean() - d_fake.mean()
        pen = penalty(self.penalty, self.penalty_weight, self.critic, real.pos, x_gen, real.labels, generator)
        logs = {"d_real": d_real.mean(), "d_fake": d_fake.mean(), "w1": w1, "penalty": pen}
        return -w1 + pen, {k: v.detach() for k, v in logs.items()}

    def generator_loss(self, gen: GenBatch, real: RealBatch) -> tuple[Tensor, dict[str, Tensor]]:
        d_fake = self.scores(gen.x, gen.labels)
        return -d_fake.mean(), {"d_fake_gen": d_fake.mean().detach()}
