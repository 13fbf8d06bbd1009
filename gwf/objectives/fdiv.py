"""f-divergence objectives with a critic ([GWF] official code, DESIGN 2.2; f-GAN, Nowozin et al. 2016).

p = data (real), q = G#mu0 (generated, "fake"). Variational form  D_f(P||Q) = sup_T E_P[T] - E_Q[f*(T)],
attained at T* = f'(P/Q). The critic d: x -> R is trained to minimize ``critic_loss`` = -(the bound), so at the
optimal critic  -critic_loss = D_f. First variations at T* are known: delta D_f(q||p)/delta q = T* and
delta D_f(p||q)/delta q = -f*(T*); the generator loss is their expectation over fakes, so its gradient at each
particle is (1/B) times the Wasserstein gradient of D_f: a parametric WGF/JKO step (DESIGN 2.1).

Forward (reverse=False, the DESIGN 2.2 table, T = h = -d): minimizes D_f(q||p) (KL: "reverse KL", mode seeking).
field = B * grad_x(generator loss) at d*, the Wasserstein gradient; particles move along -field. sp = softplus.

| name  | f*(h)       | critic loss (minimized)            | d*            | generator loss | field                 |
|-------|-------------|------------------------------------|---------------|----------------|-----------------------|
| kl    | exp(h-1)    | E_q[d] + E_p[exp(-d-1)]            | -1 - log(q/p) | -E_q[d]        | grad log(q/p)         |
| kl_dv | (DV bound)  | E_q[d] + logsumexp_B(-d_p) - log B | -log(q/p) + c | -E_q[d]        | grad log(q/p)         |
| chi2  | h^2/4 + h   | E_q[d] + E_p[d^2/4 - d]            | -2(q/p - 1)   | -E_q[d]        | 2 grad(q/p)           |
| js    | -log(1-e^h) | E_q[sp(d)] + E_p[sp(-d)]           | log(p/q)      | E_q[sp(-d)]    | q/(p+q) grad log(q/p) |

  JS: the GAN f (f(u) = u log u - (u+1) log(u+1), D_f = 2 JS(p,q) - log 4, symmetric) with h = -softplus(d).
  Its generator loss is the NON-SATURATING one of the table, whose field is the Wasserstein gradient of
  KL(q||p) - 2 JS(p,q) (Arjovsky & Bottou 2017), not of JS; reverse=True gives the minimax one.

Reverse (reverse=True, f-GAN direction, T = d): minimizes D_f(p||q) (KL: "forward KL", mode covering).

| name  | critic loss (minimized)           | d*           | generator loss              | field                    |
|-------|-----------------------------------|--------------|-----------------------------|--------------------------|
| kl    | E_q[exp(d-1)] - E_p[d]            | 1 + log(p/q) | -E_q[exp(d-1)]              | -grad(p/q)               |
| kl_dv | logsumexp_B(d_q) - log B - E_p[d] | log(p/q) + c | -(logsumexp_B(d_q) - log B) | -grad(p/q) / mean_B(p/q) |
| chi2  | E_q[d^2/4 + d] - E_p[d]           | 2(p/q - 1)   | -E_q[d^2/4 + d]             | -grad (p/q)^2            |
| js    | E_q[sp(d)] + E_p[sp(-d)]          | log(p/q)     | -E_q[sp(d)] (minimax)       | grad log(q/(p+q))        |

  (js reverse: the field grad log(q/(p+q)) is twice the Wasserstein gradient of JS(p,q); it saturates when q << p.)

Losses are computed in at least fp32 (an explicit numerics island) whatever the critic's precision.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gwf.objectives.base import CriticObjective, GenBatch, RealBatch
from gwf.objectives.penalties import check_penalty_name, penalty


def _lse_mean(v: Tensor) -> Tensor:
    """log mean exp over the batch: log (1/B) sum_i exp(v_i)."""
    return torch.logsumexp(v, 0) - math.log(v.shape[0])


# ---- critic losses: d_real [B_p], d_fake [B_q] -> scalar = -(variational bound on D_f) ----

# KL(q||p) = sup_h E_q[h] - E_p[exp(h-1)], h = -d;  reverse: KL(p||q) = sup_d E_p[d] - E_q[exp(d-1)]
def kl_critic_loss(d_real: Tensor, d_fake: Tensor, reverse: bool = False) -> Tensor:
    if reverse:
        return torch.exp(d_fake - 1).mean() - d_real.mean()
    return d_fake.mean() + torch.exp(-d_real - 1).mean()


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


# ---- generator losses: d_fake [B_q] -> scalar; B * grad_x is the velocity field's negative (table above) ----

def kl_generator_loss(d_fake: Tensor, reverse: bool = False) -> Tensor:
    return -torch.exp(d_fake - 1).mean() if reverse else -d_fake.mean()


def kl_dv_generator_loss(d_fake: Tensor, reverse: bool = False) -> Tensor:
    return -_lse_mean(d_fake) if reverse else -d_fake.mean()


def chi2_generator_loss(d_fake: Tensor, reverse: bool = False) -> Tensor:
    return -(d_fake.pow(2) / 4 + d_fake).mean() if reverse else -d_fake.mean()


def js_generator_loss(d_fake: Tensor, reverse: bool = False) -> Tensor:
    # forward: non-saturating (DESIGN 2.2); reverse: f-GAN minimax -E_q[f*(T)] with T = -softplus(-d)
    return -F.softplus(d_fake).mean() if reverse else F.softplus(-d_fake).mean()


DIVERGENCES = {
    "kl": (kl_critic_loss, kl_generator_loss),
    "kl_dv": (kl_dv_critic_loss, kl_dv_generator_loss),
    "chi2": (chi2_critic_loss, chi2_generator_loss),
    "js": (js_critic_loss, js_generator_loss),
}


class FDivergence(CriticObjective):
    """Critic-based f-divergence flow. critic: x [B, *shape] (, labels [B]) -> [B].

    critic_loss = -(variational bound) + penalty_weight * penalty  (R1 on reals, weight 0.2: [GWF] 2D recipe)
    generator_loss: see the module table; ``reverse`` picks D_f(p||q) instead of D_f(q||p).
    Logs: d_real, d_fake (mean critic outputs), fdiv (the bound = D_f estimate; for js it is 2 JS - log 4), penalty.
    """

    def __init__(self, divergence: str, critic: nn.Module, penalty: str | None = "r1", penalty_weight: float = 0.2,
                 reverse: bool = False):
        if divergence not in DIVERGENCES:
            raise ValueError(f"unknown f-divergence '{divergence}'; choose one of {sorted(DIVERGENCES)}")
        check_penalty_name(penalty)
        super().__init__(critic)
        self.divergence = divergence
        self.penalty, self.penalty_weight, self.reverse = penalty, float(penalty_weight), bool(reverse)
        self._critic_loss_fn, self._generator_loss_fn = DIVERGENCES[divergence]

    def critic_loss(self, x_gen: Tensor, real: RealBatch,
                    generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        x_gen = x_gen.detach()
        self.check_pair(x_gen, real)
        d_real, d_fake = self.scores(real.pos, real.labels), self.scores(x_gen, real.labels)
        bound = -self._critic_loss_fn(d_real, d_fake, self.reverse)
        pen = penalty(self.penalty, self.penalty_weight, self.critic, real.pos, x_gen, real.labels, generator)
        logs = {"d_real": d_real.mean(), "d_fake": d_fake.mean(), "fdiv": bound, "penalty": pen}
        return -bound + pen, {k: v.detach() for k, v in logs.items()}

    def generator_loss(self, gen: GenBatch, real: RealBatch) -> tuple[Tensor, dict[str, Tensor]]:
        d_fake = self.scores(gen.x, gen.labels)
        loss = self._generator_loss_fn(d_fake, self.reverse)
        return loss, {"d_fake_gen": d_fake.mean().detach()}


class KL(FDivergence):
    """KL(q||p) with the f-GAN bound (reverse=True: KL(p||q))."""

    def __init__(self, critic: nn.Module, penalty: str | None = "r1", penalty_weight: float = 0.2,
                 reverse: bool = False):
        super().__init__("kl", critic, penalty, penalty_weight, reverse)


class KLDV(FDivergence):
    """KL(q||p) with the Donsker-Varadhan bound (reverse=True: KL(p||q))."""

    def __init__(self, critic: nn.Module, penalty: str | None = "r1", penalty_weight: float = 0.2,
                 reverse: bool = False):
        super().__init__("kl_dv", critic, penalty, penalty_weight, reverse)


class Chi2(FDivergence):
    """Pearson chi2(q||p) (reverse=True: chi2(p||q))."""

    def __init__(self, critic: nn.Module, penalty: str | None = "r1", penalty_weight: float = 0.2,
                 reverse: bool = False):
        super().__init__("chi2", critic, penalty, penalty_weight, reverse)


class JS(FDivergence):
    """Jensen-Shannon (GAN) critic; non-saturating generator (reverse=True: minimax generator, the JS flow)."""

    def __init__(self, critic: nn.Module, penalty: str | None = "r1", penalty_weight: float = 0.2,
                 reverse: bool = False):
        super().__init__("js", critic, penalty, penalty_weight, reverse)
