"""The geomloss engine: T_{x->y}(x_i) = x_i - N grad_{x_i} OT_eps(x, y), from geomloss's entropic OT cost
(p = 2, debias=False, uniform weights: grad_{x_i} OT_eps = a_i (x_i - T(x_i))).

geomloss anneals eps down to blur = sqrt(eps) (eps-scaling) instead of running a fixed number of iterations:
`n_iters` is accepted for the common engine signature and ignored; `scaling` sets the accuracy.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from gwf.constants import DEFAULT_GEOMLOSS_SCALING
from gwf.ot.sinkhorn import as_eps, check_point_clouds


def _projection_one_eps(x: Tensor, y: Tensor, eps: float, scaling: float) -> Tensor:
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
        ot_eps = loss(x, y.detach())  # [B] for batched input
        # WARNING: geomloss's gradient is exact to first order only (the potentials are detached at the final
        # extrapolation step). Fine for a barycentric projection; never differentiate it again (e.g. inside a
        # gradient penalty): second derivatives through geomloss are wrong.
        (grad,) = torch.autograd.grad(ot_eps.sum(), x)
    return x.detach() - x.shape[1] * grad


def barycentric_projection_geomloss(x: Tensor, y: Tensor, eps: float | Tensor, n_iters: int | None = None,
                                    mask_diagonal: bool = False, *, scaling: float = DEFAULT_GEOMLOSS_SCALING,
                                    chunk_size: int | None = None) -> Tensor:
    """T [B, N, D] (fp32, detached) of x [B, N, D] onto y [B, M, D], from geomloss (tensorized, fp32).

    eps: float or [B] tensor (> 0). n_iters and chunk_size: ignored. mask_diagonal: unsupported (raises).
    scaling: geomloss's eps-scaling ratio in (0, 1).
    """
    check_point_clouds(x, y)
    return _barycentric_projection_geomloss(x, y, as_eps(eps, x.shape[0], x.device), n_iters, mask_diagonal,
                                            scaling=scaling, chunk_size=chunk_size)


def _barycentric_projection_geomloss(x: Tensor, y: Tensor, eps: Tensor, n_iters: int | None = None,
                                     mask_diagonal: bool = False, *, scaling: float = DEFAULT_GEOMLOSS_SCALING,
                                     chunk_size: int | None = None) -> Tensor:
    """barycentric_projection_geomloss for checked clouds and eps a valid fp32 tensor [B]."""
    del n_iters, chunk_size
    if mask_diagonal:
        raise ValueError("geomloss cannot mask the self pairs (mask_diagonal=True); use engine='own'")
    if not 0.0 < scaling < 1.0:
        raise ValueError(f"scaling must be in (0, 1), got {scaling}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = x.detach().float(), y.detach().float()
        # One geomloss call per problem: its batched mode shares one annealing schedule, started from the diameter
        # of the WHOLE batch, so a problem's T would depend on its batchmates.
        return torch.cat([_projection_one_eps(x[b : b + 1], y[b : b + 1], float(eps[b]), scaling)
                          for b in range(x.shape[0])])
