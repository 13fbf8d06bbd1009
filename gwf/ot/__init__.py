"""Optimal-transport core of W-Flow: entropic OT, barycentric projections, the W-Flow velocity field.

Pure functions of tensors, batched: x [B, N, D], y [B, M, D] are B independent problems; outputs fp32, detached.
Conventions (docs/conventions.md): cost ||x - y||^2 / 2, uniform weights, OT_eps = min <pi, C> + eps KL(pi | a (x) b)
(geomloss blur = sqrt(eps)), T_{a->b}(x_i) = E_pi[y | x_i]. Options of the ablations: cost ||x - y|| (``cost="l2"``,
own engine) and a non-uniform target marginal (``target_weights`` [B, M]).

ENGINES maps an engine name to a barycentric projection with the common signature
    project(x [B, N, D], y [B, M, D], eps: float | Tensor [B], n_iters=..., mask_diagonal=False) -> T [B, N, D]
(and, where used, the keywords cost= and target_weights=).
"""

from gwf.ot.geomloss_engine import _barycentric_projection_geomloss, barycentric_projection_geomloss
from gwf.ot.sinkhorn import (
    DEFAULT_N_ITERS,
    _barycentric_projection,
    _barycentric_projections,
    barycentric_projection,
    barycentric_projections,
    sinkhorn_potentials,
)

ENGINES = {
    "own": barycentric_projection,
    "geomloss": barycentric_projection_geomloss,
}
# The built-in engines without input checks, for callers that checked x, y and eps (an fp32 tensor [B]) already.
_UNCHECKED = {
    barycentric_projection: _barycentric_projection,
    barycentric_projection_geomloss: _barycentric_projection_geomloss,
}
# Engines that solve several sets of problems (same N and M, any B and D) in one loop, unchecked:
# project(xs, ys, eps [B_k] tensors, n_iters=..., mask_diagonal=False, compile=False) -> [T_k].
_MULTI_SET = {barycentric_projection: _barycentric_projections}

# Imported after ENGINES: velocity looks engines up in gwf.ot.ENGINES.
from gwf.ot.velocity import (  # noqa: E402
    mean_distance,
    mean_squared_distance,
    relative_eps,
    sinkhorn_velocities,
    sinkhorn_velocity,
)

__all__ = [
    "DEFAULT_N_ITERS",
    "ENGINES",
    "barycentric_projection",
    "barycentric_projection_geomloss",
    "barycentric_projections",
    "mean_distance",
    "mean_squared_distance",
    "relative_eps",
    "sinkhorn_potentials",
    "sinkhorn_velocities",
    "sinkhorn_velocity",
]
