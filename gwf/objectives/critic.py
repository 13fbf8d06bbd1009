"""Critic-based objectives as rows of one table (f-GAN, Nowozin et al. 2016): the f-divergences KL, KL_centered,
KL_DV, chi2, JS and the IPM W1; p = data, q = generated, critic d: x -> R (docs/objectives.md).

The critic minimizes -(variational bound); the generator loss is the first variation at that critic averaged over
fakes, so B * grad_x of it is the Wasserstein gradient. ``reverse=False`` minimizes D(q||p) with h = -d,
``reverse=True`` D(p||q). Losses are computed in at least fp32.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gwf.objectives.base import GenBatch, Objective, RealBatch
from gwf.objectives.penalties import check_penalty_name, penalty, scored_inputs


def _lse_mean(v: Tensor) -> Tensor:
    """log mean exp over the batch: log (1/B) sum_i exp(v_i)."""
    return torch.logsumexp(v, 0) - math.log(v.shape[0])


# ---- critic losses: (d_real [B_p], d_fake [B_q], reverse) -> scalar = -(variational bound) ----

# KL(q||p) = sup_h E_q[h] - E_p[exp(h-1)], h = -d;  reverse: KL(p||q) = sup_d E_p[d] - E_q[exp(d-1)]
def kl_critic_loss(d_real: Tensor, d_fake: Tensor, reverse: bool = False) -> Tensor:
    if reverse:
        return torch.exp(d_fake - 1).mean() - d_real.mean()
    return d_fake.mean() + torch.exp(-d_real - 1).mean()


# KL_centered ([GWF] losses.py): f*(h) = e^h - 1, KL(q||p) = sup_h E_q[h] - E_p[e^h - 1], h = -d;
# reverse: KL(p||q) = sup_d E_p[d] - E_q[e^d - 1]. The same divergence as kl, with d* shifted by 1.
def kl_centered_critic_loss(d_real: Tensor, d_fake: Tensor, reverse: bool = False) -> Tensor:
    if reverse:
        return torch.expm1(d_fake).mean() - d_real.mean()
    return d_fake.mean() + torch.expm1(-d_real).mean()


# Donsker-Varadhan: KL(q||p) = sup_h E_q[h] - log E_p[exp(h)], h = -d;  reverse: KL(p||q) = sup_d E_p[d] - log E_q[e^d]
def kl_dv_critic_loss(d_real: Tensor, d_fake: Tensor, reverse: bool = False) -> Tensor:
    if reverse:
        return _lse_mean(d_fake) - d_real.mean()
    return d_fake.mean() + _lse_mean(-d_real)


# Pearson chi2(q||p) = sup_h E_q[h] - E_p[h^2/4 + h], h = -d;  reverse: chi2(p||q) = sup_d E_p[d] - E_q[d^2/4 + d]
def chi2_critic_loss(d_real: Tensor, d_fake: Tensor, reverse: bool = False) -> Tensor:
    if reverse:
        return (d_fake.pow(2) / 4 + d_fake).mean() - d_real.mean()
    return d_fake.mean() + (d_real.pow(2) / 4 - d_real).mean()


# GAN f-divergence 2 JS(p,q) - log 4 = -min_d E_q[softplus(d)] + E_p[softplus(-d)]; symmetric: same in both directions
def js_critic_loss(d_real: Tensor, d_fake: Tensor, reverse: bool = False) -> Tensor:
    return F.softplus(d_fake).mean() + F.softplus(-d_real).mean()


# Kantorovich-Rubinstein: W1(q, p) = sup_{Lip(d) <= 1} E_p[d] - E_q[d], Lipschitz relaxed to a penalty; symmetric
def w1_critic_loss(d_real: Tensor, d_fake: Tensor, reverse: bool = False) -> Tensor:
    return d_fake.mean() - d_real.mean()


# ---- generator losses: (d_fake [B_q], reverse) -> scalar; B * grad_x is minus the velocity field ----

def kl_generator_loss(d_fake: Tensor, reverse: bool = False) -> Tensor:
    return -torch.exp(d_fake - 1).mean() if reverse else -d_fake.mean()


def kl_centered_generator_loss(d_fake: Tensor, reverse: bool = False) -> Tensor:
    return -torch.expm1(d_fake).mean() if reverse else -d_fake.mean()


def kl_dv_generator_loss(d_fake: Tensor, reverse: bool = False) -> Tensor:
    return -_lse_mean(d_fake) if reverse else -d_fake.mean()


def chi2_generator_loss(d_fake: Tensor, reverse: bool = False) -> Tensor:
    return -(d_fake.pow(2) / 4 + d_fake).mean() if reverse else -d_fake.mean()


def js_generator_loss(d_fake: Tensor, reverse: bool = False) -> Tensor:
    # forward: non-saturating (its flow is that of KL(q||p) - 2 JS, Arjovsky & Bottou 2017); reverse: the minimax
    # -E_q[f*(T)] with T = -softplus(-d), the JS flow itself
    return -F.softplus(d_fake).mean() if reverse else F.softplus(-d_fake).mean()


def w1_generator_loss(d_fake: Tensor, reverse: bool = False) -> Tensor:
    return -d_fake.mean()  # particles climb d, towards the data


class Divergence(NamedTuple):
    critic_loss: Callable[[Tensor, Tensor, bool], Tensor]
    generator_loss: Callable[[Tensor, bool], Tensor]
    estimate: str  # log key of -critic_loss (penalty aside): the divergence estimate


DIVERGENCES: dict[str, Divergence] = {
    "kl": Divergence(kl_critic_loss, kl_generator_loss, "fdiv"),
    "kl_centered": Divergence(kl_centered_critic_loss, kl_centered_generator_loss, "fdiv"),
    "kl_dv": Divergence(kl_dv_critic_loss, kl_dv_generator_loss, "fdiv"),
    "chi2": Divergence(chi2_critic_loss, chi2_generator_loss, "fdiv"),
    "js": Divergence(js_critic_loss, js_generator_loss, "fdiv"),  # fdiv = 2 JS - log 4
    # WARNING: with WGAN-GP a fresh critic can lock into -W1 (docs/objectives.md)
    "w1": Divergence(w1_critic_loss, w1_generator_loss, "w1"),
}


class CriticDivergence(Objective):
    """One row of DIVERGENCES with a critic d: x [B, *shape] (, labels [B]) -> [B]; critic_loss = -(bound) +
    penalty_weight * penalty (default R1, weight 0.2: the [GWF] 2D recipe)."""

    def __init__(self, divergence: str, critic: nn.Module, penalty: str | None = "r1", penalty_weight: float = 0.2,
                 reverse: bool = False):
        super().__init__()
        if divergence not in DIVERGENCES:
            raise ValueError(f"unknown critic divergence '{divergence}'; choose one of {sorted(DIVERGENCES)}")
        if not isinstance(critic, nn.Module):
            raise ValueError(f"{divergence} needs a critic nn.Module (method.critic), got {type(critic)}")
        check_penalty_name(penalty)
        self.critic = critic
        self.divergence, self.row = divergence, DIVERGENCES[divergence]
        self.penalty, self.penalty_weight, self.reverse = penalty, float(penalty_weight), bool(reverse)

    def scores(self, x: Tensor, labels: Tensor | None) -> Tensor:
        """critic on grouped samples x [L, K, *shape] -> [L*K] (at least fp32), labels [L] broadcast per sample."""
        num_problems, k = x.shape[:2]
        d = self.critic(x.flatten(0, 1), None if labels is None else labels.repeat_interleave(k))
        return d.reshape(num_problems * k).to(torch.promote_types(d.dtype, torch.float32))

    def critic_loss(self, x_gen: Tensor, real: RealBatch, rng: torch.Generator,
                    z: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        if x_gen.shape[0] != real.pos.shape[0] or x_gen.shape[2:] != real.pos.shape[2:]:
            raise ValueError(f"x_gen [L, N, *shape] {tuple(x_gen.shape)} does not match real.pos [L, M, *shape] "
                             f"{tuple(real.pos.shape)}")
        x_real, x_gen = scored_inputs(self.penalty, self.penalty_weight, real.pos, x_gen)
        d_real, d_fake = self.scores(x_real, real.labels), self.scores(x_gen, real.labels)
        bound = -self.row.critic_loss(d_real, d_fake, self.reverse)
        pen = penalty(self.penalty, self.penalty_weight, self.critic, x_real, x_gen, real.labels, rng,
                      scores=(d_real, d_fake))
        logs = {"d_real": d_real.mean(), "d_fake": d_fake.mean(), self.row.estimate: bound, "penalty": pen}
        return -bound + pen, {k: v.detach() for k, v in logs.items()}

    def generator_loss(self, gen: GenBatch, real: RealBatch, rng: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        d_fake = self.scores(gen.x, gen.labels)
        return self.row.generator_loss(d_fake, self.reverse), {"d_fake_gen": d_fake.mean().detach()}
