"""The official GWF ``--divergence chi2_tight`` ([GWF] losses.py, networks/__init__.py ``CriticWithPos``): the
Hammersley-Chapman-Robbins bound chi2(q||p) = sup_d (E_q[d] - E_p[d])^2 / Var_p(d), tight at d proportional to
q/p, over a positive critic d = softplus(critic). Critic loss -(E_q d - E_p d)^2 / (max(Var_p d, 1e-4) + 1e-8);
generator loss (E_q d - E_p d)^2 / (max(Var_p d, 1e-4) + 1e-8) with the reals' mean and variance held fixed, so
B grad_x of it is 2 (E_q d - E_p d) / Var_p(d) grad d: the chi2 field 2 grad(q/p) at the optimal critic.
``reverse``: chi2(p||q), the roles of p and q swapped (losses.py ``loss_D_sym`` / ``loss_G_sym``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gwf.objectives.base import GenBatch, Objective, RealBatch
from gwf.objectives.penalties import check_penalty_name, penalty, scored_inputs

_VAR_FLOOR, _VAR_EPS = 1e-4, 1e-8  # official clamp and epsilon


class PositiveCritic(nn.Module):
    """softplus(critic(x, labels)): the official chi2_tight critic (penalties see this output, as there)."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        return F.softplus(self.base(x, labels))


def tight_ratio(d_num: Tensor, d_den: Tensor, fixed_den: bool, fixed_num_var: bool = False) -> Tensor:
    """(E d_num - E d_den)^2 / (max(Var, 1e-4) + 1e-8) per problem, averaged: d_num [L, N], d_den [L, M]; Var is
    d_den's, or d_num's detached with ``fixed_num_var`` (the official reverse generator loss); ``fixed_den``: d_den's
    statistics detached."""
    mean_den = d_den.mean(1)
    var = (d_num.detach() if fixed_num_var else d_den).var(1, unbiased=False).clamp_min(_VAR_FLOOR)
    if fixed_den:
        mean_den, var = mean_den.detach(), var.detach()
    return ((d_num.mean(1) - mean_den).square() / (var + _VAR_EPS)).mean()


class Chi2Tight(Objective):
    """critic: a network x [B, *shape] (, labels) -> [B], made positive by softplus; penalty as the critic rows
    (official 2D: R1, weight 0.2)."""

    def __init__(self, critic: nn.Module, penalty: str | None = "r1", penalty_weight: float = 0.2,
                 reverse: bool = False):
        super().__init__()
        if not isinstance(critic, nn.Module):
            raise ValueError(f"chi2_tight needs a critic nn.Module (method.critic), got {type(critic)}")
        check_penalty_name(penalty)
        self.critic = critic if isinstance(critic, PositiveCritic) else PositiveCritic(critic)
        self.penalty, self.penalty_weight, self.reverse = penalty, float(penalty_weight), bool(reverse)

    def scores(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """d on grouped samples x [L, K, *shape] -> [L, K] (at least fp32), labels [L] broadcast per sample: the
        bound's means and variances are each problem's (label's)."""
        n_prob, k = x.shape[:2]
        d = self.critic(x.flatten(0, 1), None if labels is None else labels.repeat_interleave(k)).reshape(n_prob, k)
        return d.to(torch.promote_types(d.dtype, torch.float32))

    def critic_loss(self, x_gen: Tensor, real: RealBatch, rng: torch.Generator,
                    z: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        x_real, x_gen = scored_inputs(self.penalty, self.penalty_weight, real.pos, x_gen)
        d_real, d_fake = self.scores(x_real, real.labels), self.scores(x_gen, real.labels)
        bound = tight_ratio(d_real, d_fake, False) if self.reverse else tight_ratio(d_fake, d_real, False)
        pen = penalty(self.penalty, self.penalty_weight, self.critic, x_real, x_gen, real.labels, rng,
                      scores=(d_real.flatten(), d_fake.flatten()))
        logs = {"d_real": d_real.mean(), "d_fake": d_fake.mean(), "fdiv": bound, "penalty": pen}
        return -bound + pen, {k: v.detach() for k, v in logs.items()}

    def generator_loss(self, gen: GenBatch, real: RealBatch, rng: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        d_fake = self.scores(gen.x, gen.labels)
        with torch.no_grad():
            d_real = self.scores(real.pos, gen.labels)
        # forward: the reals' statistics fixed; reverse: the fakes' variance fixed, their mean moving (official)
        loss = tight_ratio(d_fake, d_real, True, fixed_num_var=self.reverse)
        return loss, {"d_fake_gen": d_fake.mean().detach()}
