"""Feature-space drift, shared by the objectives that move particles along a field (W-Flow, Drifting).

With a frozen encoder phi and its feature sets k = 1..K, the field V_k is computed in each feature space, one
transport problem per (label, token), and the generator loss is ([DRIFT] Sec. 3.5, [WF] Sec. 4)

    loss = 1/K sum_k  mean || phi_k(x) / s_k - stopgrad(phi_k(x) / s_k + eta V_k) ||^2

so that dloss/dx = sum_k J_k(x)^T (-2 eta V_k / (K s_k numel_k)): each feature set pushes the generator along
its field pulled back through the encoder's Jacobian J_k (autograd does the pull-back; the encoder is frozen).

s_k (detached) puts the feature sets on one scale: s_k^2 = mean ||phi_i - t_j||^2 / C_k over the generated
features and the problem's targets, averaged over every problem of the set, as in the official W-Flow code
(``drift_loss_ot``: features divided by scale / sqrt(S)). With ``normalize=False``, s_k = 1. The velocities do not
depend on s_k: eps is relative and V is RMS-normalized, both invariant to a rescaling of the features.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from gwf.features import FeatureSpec, build_features
from gwf.features.base import FeatureEncoder
from gwf.ot.velocity import mean_squared_distance


def attach_encoder(objective: nn.Module, encoder: FeatureEncoder | None) -> None:
    """Set ``objective.features`` to the frozen encoder (None, or an identity encoder: data space).

    Held outside the module tree on purpose: it is never trained, never seen by DDP or the optimizers, and never
    written into checkpoints (a resumed run rebuilds it from method.features; a sampler can rebuild the module with
    method.features=null and load a checkpoint strictly). It follows the samples' device and dtype when used.
    """
    object.__setattr__(objective, "features", None if encoder is None or encoder.is_identity else encoder)


def attach_features(objective: nn.Module, spec: FeatureSpec) -> None:
    """``attach_encoder`` of the encoder that ``build_features(spec)`` loads (at construction: a wrong path fails
    before training starts)."""
    attach_encoder(objective, build_features(spec))


def as_tokens(f: Tensor) -> Tensor:
    """A feature set [B, T, C] or [B, C] -> [B, T, C] (T = 1 for the latter)."""
    if f.dim() == 2:
        return f[:, None]
    if f.dim() != 3:
        raise ValueError(f"a feature set must be [B, T, C] or [B, C], got shape {tuple(f.shape)}")
    return f


def grouped_problems(f: Tensor, num_problems: int) -> Tensor:
    """Features of L*N samples grouped by label, [L*N, T, C] or [L*N, C] -> [L*T, N, C]: one transport problem per
    (label, token), label-major (problem l*T + t holds token t of label l's N samples)."""
    f = as_tokens(f)
    ln, t, c = f.shape
    if ln % num_problems:
        raise ValueError(f"{ln} feature rows do not split into {num_problems} problems")
    return f.reshape(num_problems, ln // num_problems, t, c).transpose(1, 2).reshape(num_problems * t, -1, c)


def shared_problems(f: Tensor, num_problems: int) -> Tensor:
    """Features of U samples shared by every label (guidance's unconditional reals), [U, T, C] or [U, C] ->
    [L*T, U, C], the same points for every label, in the layout of ``grouped_problems``."""
    f = as_tokens(f)
    u, t, c = f.shape
    return f.transpose(0, 1)[None].expand(num_problems, t, u, c).reshape(num_problems * t, u, c)


def encode_problems(
    encoder: FeatureEncoder,
    x: Tensor,
    grouped: Mapping[str, Tensor],
    shared: Mapping[str, Tensor],
) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """Feature sets of a step's samples, as transport problems.

    x: [L, N, *shape] generated samples (gradient kept); grouped: name -> [L, M, *shape] (per-label reals, the
    second batch); shared: name -> [U, *shape]. The references are encoded in one call without gradient.
    Returns ({k: [L*T_k, N, C_k]}, {name: {k: [L*T_k, M, C_k]}}).
    """
    num_problems = x.shape[0]
    encoder = encoder.to(x.device)  # no-op once there (the encoder is outside the module tree)
    param = next(encoder.parameters(), None)
    dtype = x.dtype if param is None else param.dtype  # e.g. fp32 weights under a bf16-true trainer
    gen = {k: grouped_problems(f, num_problems) for k, f in encoder(x.flatten(0, 1).to(dtype)).items()}
    refs: dict[str, dict[str, Tensor]] = {}
    parts = [(name, t.flatten(0, 1), True) for name, t in grouped.items()]
    parts += [(name, t, False) for name, t in shared.items()]
    if parts:
        with torch.no_grad():
            feats = encoder(torch.cat([p[1] for p in parts]).to(dtype))
        start = 0
        for name, flat, is_grouped in parts:
            rows = slice(start, start + flat.shape[0])
            to_problems = grouped_problems if is_grouped else shared_problems
            refs[name] = {k: to_problems(f[rows], num_problems) for k, f in feats.items()}
            start += flat.shape[0]
    return gen, refs


def feature_scale(f_gen: Tensor, targets: list[Tensor]) -> Tensor:
    """s_k = sqrt(mean over problems of mean_{i, j} ||f_i - t_j||^2 / C), a detached fp32 scalar (>= tiny).

    f_gen: [B, N, C]; targets: list of [B, M, C] (the problem's targets, f_gen itself included by the caller).
    """
    msd = mean_squared_distance(f_gen, targets)  # [B], exact and without the [N, M] matrix
    return (msd.mean() / f_gen.shape[-1]).sqrt().clamp_min(torch.finfo(torch.float32).tiny)


def drift_loss(f_gen: Tensor, velocity: Tensor, eta: float, scale: Tensor | None = None) -> Tensor:
    """mean || f / s - stopgrad(f / s + eta V) ||^2 in fp32: gradient -2 eta V / (s * numel) w.r.t. f.

    f_gen: [B, N, C] (with gradient); velocity: [B, N, C] detached; scale: scalar s or None (s = 1).
    """
    f = f_gen.float()
    if scale is not None:
        f = f / scale
    target = (f + eta * velocity.float()).detach()
    return (f - target).pow(2).mean()
