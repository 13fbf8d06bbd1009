"""Gradient penalties on a critic d: x [B, *shape] (, labels [B]) -> [B] ([GWF]). They differentiate the critic
w.r.t. detached copies of its input with ``create_graph=True`` (double backprop reaches the critic, never the
samples); interpolation weights come from ``rng``."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

# Avoids the infinite derivative of ||g|| at g = 0 (identical points, dead critic); shifts ||g|| by < 1e-6.
_NORM_EPS = 1e-12


def _input_grad(critic: nn.Module, x: Tensor, labels: Tensor | None) -> Tensor:
    """grad_x d(x) [B, D] (flattened), kept in the graph so a loss on it trains the critic."""
    x = x.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x, labels).sum(), x, create_graph=True)
    return grad.flatten(1).float()


def _interpolate(x_real: Tensor, x_fake: Tensor, rng: torch.Generator | None) -> Tensor:
    """x_hat = eps x_real + (1 - eps) x_fake with eps ~ U[0, 1] drawn as torch.rand(B, rng=rng)."""
    if x_real.shape != x_fake.shape:
        raise ValueError(f"interpolation pairs real and fake samples: shapes {tuple(x_real.shape)} and "
                         f"{tuple(x_fake.shape)} differ")
    eps = torch.rand(x_real.shape[0], generator=rng, device=x_real.device, dtype=x_real.dtype)
    eps = eps.view(-1, *[1] * (x_real.dim() - 1))
    return eps * x_real.detach() + (1 - eps) * x_fake.detach()


# R1 (Mescheder et al. 2018): E_real ||grad_x d(x)||^2
def r1_penalty(critic: nn.Module, x_real: Tensor, labels: Tensor | None = None) -> Tensor:
    return _input_grad(critic, x_real, labels).pow(2).sum(1).mean()


# R2: E_fake ||grad_x d(x)||^2
def r2_penalty(critic: nn.Module, x_fake: Tensor, labels: Tensor | None = None) -> Tensor:
    return _input_grad(critic, x_fake, labels).pow(2).sum(1).mean()


# Interpolated squared norm ([GWF] code, weight 10): E_{x_hat} ||grad d(x_hat)||^2, x_hat = eps x_real + (1-eps) x_fake
def interpolated_penalty(critic: nn.Module, x_real: Tensor, x_fake: Tensor, labels: Tensor | None = None,
                         rng: torch.Generator | None = None) -> Tensor:
    return _input_grad(critic, _interpolate(x_real, x_fake, rng), labels).pow(2).sum(1).mean()


# WGAN-GP (Gulrajani et al. 2017): E_{x_hat} (||grad d(x_hat)|| - 1)^2
def wgan_gp_penalty(critic: nn.Module, x_real: Tensor, x_fake: Tensor, labels: Tensor | None = None,
                    rng: torch.Generator | None = None) -> Tensor:
    grad = _input_grad(critic, _interpolate(x_real, x_fake, rng), labels)
    return ((grad.pow(2).sum(1) + _NORM_EPS).sqrt() - 1).pow(2).mean()


PenaltyFn = Callable[..., Tensor]
PENALTIES: dict[str, PenaltyFn] = {
    "r1": r1_penalty,
    "r2": r2_penalty,
    "interpolated": interpolated_penalty,
    "wgan_gp": wgan_gp_penalty,
}
# "r1+r2": weight (R1 + R2); "r3gan": weight (R1 + R2) / 2, the official GWF gp_type r3gan (losses.py
# gradient_penalty: 0.5 * (gp_real + gp_fake)).
PENALTY_NAMES = ("none", *PENALTIES, "r1+r2", "r3gan")


def check_penalty_name(name: str | None) -> None:
    if name is not None and name not in PENALTY_NAMES:
        raise ValueError(f"unknown gradient penalty '{name}'; choose one of {list(PENALTY_NAMES)} or None")


def scored_inputs(name: str | None, weight: float, x_real: Tensor, x_fake: Tensor) -> tuple[Tensor, Tensor]:
    """x_real and x_fake detached, made leaves that require grad where the penalty ``name`` differentiates the
    critic (R1: the reals, R2: the fakes). Score these with the critic and pass the scores to :func:`penalty`
    (``scores=``): the penalty then differentiates them instead of running the critic again, as the official
    GWF's ``sjko`` and ``r3gan`` penalties do (losses.py ``gradient_penalty``; train.py sets ``requires_grad`` on
    the batches before ``netD``): one critic forward fewer, the same value."""
    active = name not in (None, "none") and weight != 0
    real = x_real.detach().requires_grad_(True) if active and name in ("r1", "r1+r2", "r3gan") else x_real.detach()
    fake = x_fake.detach().requires_grad_(True) if active and name in ("r2", "r1+r2", "r3gan") else x_fake.detach()
    return real, fake


def _scored_grad_sq(x: Tensor, d: Tensor) -> Tensor:
    """E ||grad_x d(x)||^2 from scores d of the leaf x [L, K, *shape] (create_graph: a loss on it trains the
    critic)."""
    (grad,) = torch.autograd.grad(d.sum(), x, create_graph=True)
    return grad.flatten(0, 1).flatten(1).float().pow(2).sum(1).mean()


def penalty(name: str | None, weight: float, critic: nn.Module, x_real: Tensor, x_fake: Tensor,
            labels: Tensor | None = None, rng: torch.Generator | None = None,
            scores: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """weight * penalty on grouped samples: x_real [L, M, *shape], x_fake [L, N, *shape], labels [L] or None.
    Interpolation pairs the first min(M, N) samples of each problem (same class); "r1+r2" = R1 + R2, "r3gan" =
    (R1 + R2) / 2. ``scores``: the critic's scores (d_real, d_fake) of x_real and x_fake made by
    :func:`scored_inputs`; R1 and R2 then differentiate them (no critic forward of their own)."""
    check_penalty_name(name)
    if name in (None, "none") or weight == 0:
        return x_real.new_zeros((), dtype=torch.float32)
    (L, M), N = x_real.shape[:2], x_fake.shape[1]
    if x_fake.shape[0] != L or x_fake.shape[2:] != x_real.shape[2:]:
        raise ValueError(f"penalty expects x_real [L, M, *shape] and x_fake [L, N, *shape], got "
                         f"{tuple(x_real.shape)} and {tuple(x_fake.shape)}")

    def per_sample(k: int) -> Tensor | None:
        return None if labels is None else labels.repeat_interleave(k)

    if name not in ("r1", "r2", "r1+r2", "r3gan"):
        K = min(M, N)
        return weight * PENALTIES[name](critic, x_real[:, :K].flatten(0, 1), x_fake[:, :K].flatten(0, 1),
                                        per_sample(K), rng=rng)
    def grad_sq(fn: PenaltyFn, x: Tensor, d: Tensor | None, k: int) -> Tensor:
        if d is None:  # no scores of this leaf: the critic runs again on a detached copy
            return fn(critic, x.flatten(0, 1), per_sample(k))
        if not x.requires_grad:
            raise ValueError(f"penalty '{name}' got scores of inputs that do not require grad: make the inputs with "
                             "scored_inputs() before scoring them")
        return _scored_grad_sq(x, d)

    d_real, d_fake = scores if scores is not None else (None, None)
    value = x_real.new_zeros((), dtype=torch.float32)
    if name != "r2":
        value = value + grad_sq(r1_penalty, x_real, d_real, M)
    if name != "r1":
        value = value + grad_sq(r2_penalty, x_fake, d_fake, N)
    return weight * (0.5 * value if name == "r3gan" else value)
