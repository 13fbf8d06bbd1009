"""The geomloss engine: T_{x->y}(x_i) = x_i - N grad_{x_i} OT_eps(x, y), from geomloss's entropic OT cost
(p = 2, debias=False, uniform source weights: grad_{x_i} OT_eps = a_i (x_i - T(x_i)), whatever the target weights).
Only the quadratic cost: under ||x - y|| (p = 1) the gradient is a plan-weighted mean of unit vectors, not x - T(x).

geomloss anneals eps down to blur = sqrt(eps) (eps-scaling) instead of running a fixed number of iterations:
`n_iters` is accepted for the common engine signature and ignored; `scaling` sets the accuracy.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gwf.constants import DEFAULT_GEOMLOSS_SCALING
from gwf.ot.sinkhorn import as_eps, check_cost, check_point_clouds, check_target_weights


def _projection_one_eps(x: Tensor, y: Tensor, eps: float, scaling: float, weights: Tensor | None = None) -> Tensor:
    import geomloss  # noqa: PLC0415  (kept local: only this engine needs it)

    blur = math.sqrt(eps)
    # Start of the annealing: geomloss's own estimate (diagonal of the bounding box of both clouds), floored at
    # blur, since geomloss fails on a zero diameter (identical points: log(0) in its eps schedule).
    both = torch.cat([x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])])
    diameter = max(float((both.amax(0) - both.amin(0)).norm()), blur)
    # backend="tensorized": plain PyTorch, no KeOps compilation; p=2 gives C = ||x-y||^2/2.
    loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=blur, debias=False, backend="tensorized", scaling=scaling,
                                diameter=diameter)
    with torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        if weights is None:
            ot_eps = loss(x, y.detach())  # [B] for batched input
        else:  # uniform source weights a_i = 1/N, so that N grad_{x_i} OT = x_i - T(x_i) still holds
            a = torch.full(x.shape[:2], 1.0 / x.shape[1], dtype=x.dtype, device=x.device)
            ot_eps = loss(a, x, weights / weights.sum(-1, keepdim=True), y.detach())
        # WARNING: geomloss's gradient is exact to first order only (the potentials are detached at the final
        # extrapolation step). Fine for a barycentric projection; never differentiate it again (e.g. inside a
        # gradient penalty): second derivatives through geomloss are wrong.
        (grad,) = torch.autograd.grad(ot_eps.sum(), x)
    return x.detach() - x.shape[1] * grad


def barycentric_projection_geomloss(x: Tensor, y: Tensor, eps: float | Tensor, n_iters: int | None = None,
                                    mask_diagonal: bool = False, *, scaling: float = DEFAULT_GEOMLOSS_SCALING,
                                    chunk_size: int | None = None, cost: str = "sq",
                                    target_weights: Tensor | None = None) -> Tensor:
    """T [B, N, D] (fp32, detached) of x [B, N, D] onto y [B, M, D], from geomloss (tensorized, fp32).

    eps: float or [B] tensor (> 0). n_iters and chunk_size: ignored. mask_diagonal: unsupported (raises).
    scaling: geomloss's eps-scaling ratio in (0, 1). cost: "sq" only ("l2" raises). target_weights: [B, M] weights
    >= 0 of the target points (normalized per problem; None: uniform).
    """
    check_point_clouds(x, y)
    check_cost(cost)
    check_target_weights(target_weights, y)
    return _barycentric_projection_geomloss(x, y, as_eps(eps, x.shape[0], x.device), n_iters, mask_diagonal,
                                            scaling=scaling, chunk_size=chunk_size, cost=cost,
                                            target_weights=target_weights)


def _barycentric_projection_geomloss(x: Tensor, y: Tensor, eps: Tensor, n_iters: int | None = None,
                                     mask_diagonal: bool = False, *, scaling: float = DEFAULT_GEOMLOSS_SCALING,
                                     chunk_size: int | None = None, cost: str = "sq",
                                     target_weights: Tensor | None = None) -> Tensor:
    """barycentric_projection_geomloss for checked clouds and eps a valid fp32 tensor [B]."""
    del n_iters, chunk_size
    if cost != "sq":
        raise ValueError(f"the geomloss engine has the quadratic cost only (got cost {cost!r}: under ||x - y|| its "
                         f"gradient is not a barycentric projection); use engine='own' (method.engine=own)")
    if mask_diagonal:
        raise ValueError("geomloss cannot mask the self pairs (mask_diagonal=True); use engine='own'")
    if not 0.0 < scaling < 1.0:
        raise ValueError(f"scaling must be in (0, 1), got {scaling}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = x.detach().float(), y.detach().float()
        # One geomloss call per problem: its batched mode shares one annealing schedule, started from the diameter
        # of the WHOLE batch, so a problem's T would depend on its batchmates.
        w = None if target_weights is None else target_weights.detach().float()
        return torch.cat([_projection_one_eps(x[b : b + 1], y[b : b + 1], float(eps[b]), scaling,
                                              None if w is None else w[b : b + 1])
                          for b in range(x.shape[0])])
