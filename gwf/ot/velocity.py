"""The W-Flow velocity field ([WF] Han et al.; docs/wflow.md): the Wasserstein gradient of the Sinkhorn
divergence S_eps(q, p) at the generated particles x ~ q,

    V(x) = T_{q->p}(x) - T_{q->q'}(x)                                       ([WF] Sec. 3.3)
    V~(x) = V(x) + w (T_{q->p(c)}(x) - T_{q->p(empty)}(x))                  ([WF] Eq. 16)

with relative eps (docs/conventions.md). This module only computes V (detached, fp32).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

import gwf.ot as _ot  # the engine registry gwf.ot.ENGINES (defined before this module is imported)
from gwf.constants import DEFAULT_EPS_REL, DEFAULT_N_ITERS, ESTIMATORS, RMS_FLOOR_REL
from gwf.ot.sinkhorn import check_point_clouds, fp32_island

# Absolute floor of eps, so that identical points (all distances 0) give a finite problem.
_EPS_FLOOR = 1e-12


def _mean_squared_distance(x: Tensor, ys: Sequence[Tensor]) -> Tensor:
    """mean_squared_distance for checked clouds: Var(x) + Var(y) + ||mean(x) - mean(y)||^2 per target set."""

    def mean_and_var(t: Tensor) -> tuple[Tensor, Tensor]:
        t = t.detach().float()
        m = t.mean(1)  # [B, D]
        return m, torch.linalg.vector_norm(t - m[:, None], dim=-1).square().mean(1)

    with fp32_island(x.device):
        mx, var_x = mean_and_var(x)
        total = torch.zeros_like(var_x)
        for t in ys:
            mt, var_t = mean_and_var(t)
            total += t.shape[1] * (var_x + var_t + (mx - mt).square().sum(-1))
        return total / sum(t.shape[1] for t in ys)


def mean_squared_distance(x: Tensor, y: Tensor | Sequence[Tensor]) -> Tensor:
    """mean_{i, j} ||x_i - y_j||^2 per problem, [B] fp32, exact and without the [N, M] matrix.

    x: [B, N, D]; y: [B, M, D] or a sequence of such tensors (their union, every point weighted equally).
    """
    ys = [y] if isinstance(y, Tensor) else list(y)
    if not ys:
        raise ValueError("relative eps needs at least one target set")
    for t in ys:
        check_point_clouds(x, t, "x", "y")
    return _mean_squared_distance(x, ys)


def _check_eps_rel(eps_rel: float) -> None:
    if not eps_rel > 0:
        raise ValueError(f"eps_rel must be > 0, got {eps_rel}")


def relative_eps(x: Tensor, y: Tensor | Sequence[Tensor], eps_rel: float = DEFAULT_EPS_REL) -> Tensor:
    """eps = eps_rel * mean_squared_distance(x, y) per problem, [B] fp32 (floored so identical points stay finite)."""
    _check_eps_rel(eps_rel)
    return (eps_rel * mean_squared_distance(x, y)).clamp(min=_EPS_FLOOR)


def sinkhorn_velocity(x: Tensor, pos: Tensor, neg: Tensor | None = None, *, eps_rel: float = DEFAULT_EPS_REL,
                      engine: str = "own", n_iters: int = DEFAULT_N_ITERS, estimator: str = "two_batch",
                      uncond: Tensor | None = None, guidance_w: float | Tensor | None = None,
                      rms_normalize: bool = True) -> tuple[Tensor, dict]:
    """W-Flow velocity V [B, N, D] (fp32, detached) for B independent problems (e.g. one per class).

    x: [B, N, D] generated samples; pos: [B, M, D] positives; neg: [B, N2, D] a second, independent batch from
    the model ("two_batch" only). eps = relative_eps(x, [x, neg, pos], eps_rel), shared by a problem's terms.
    engine: a key of gwf.ot.ENGINES; n_iters: iterations of the own engine. estimator: "two_batch" (q' = neg),
    "single" (q' = x unmasked: the ablation) or "masked" (q' = x, self pairs masked; own engine only).
    uncond: [B, U, D] or [U, D] unconditional reals, with guidance_w (float or [B]) for velocity guidance.
    rms_normalize: divide V by its RMS over (N, D), per problem.
    Returns V and {"eps": [B], "v_rms": [B] RMS of V before normalization}.
    """
    engines = _ot.ENGINES
    if engine not in engines:
        raise ValueError(f"unknown engine {engine!r}; valid engines: {sorted(engines)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid estimators: {list(ESTIMATORS)}")
    check_point_clouds(x, pos, "x", "pos")
    if estimator == "two_batch":
        if neg is None:
            raise ValueError("estimator='two_batch' needs neg, a second independent batch [B, N2, D] from the model")
        check_point_clouds(x, neg, "x", "neg")
    if estimator == "masked" and engine != "own":
        raise ValueError(f"estimator='masked' needs engine='own' ({engine!r} cannot mask the self pairs)")
    if (uncond is None) != (guidance_w is None):
        raise ValueError("velocity guidance needs both uncond and guidance_w (or neither)")
    batch = x.shape[0]
    if uncond is not None:
        if uncond.dim() == 2:  # one unconditional batch shared by every problem
            uncond = uncond.expand(batch, *uncond.shape)
        check_point_clouds(x, uncond, "x", "uncond")
        w = torch.as_tensor(guidance_w, dtype=torch.float32, device=x.device).detach().reshape(-1)
        if w.numel() == 1:
            w = w.expand(batch)
        if w.shape != (batch,):
            raise ValueError(f"guidance_w must be a float or a [B] = [{batch}] tensor, got {tuple(w.shape)}")
    _check_eps_rel(eps_rel)
    # Inputs and eps are checked here: the built-in engines run without checking them again.
    project = _ot._UNCHECKED.get(engines[engine], engines[engine])

    with fp32_island(x.device):
        x = x.detach().float()
        targets = [x, pos] if estimator != "two_batch" else [x, neg, pos]
        eps = (eps_rel * _mean_squared_distance(x, targets)).clamp(min=_EPS_FLOOR)  # [B], shared by all terms

        t_pos = project(x, pos, eps, n_iters=n_iters)  # T_{q->p}
        if estimator == "two_batch":  # T_{q->q'}, q' an independent batch: W-Flow's two-batch estimator
            t_self = project(x, neg, eps, n_iters=n_iters)
        else:  # q' = q: nearly diagonal plan ("single"), or its diagonal masked (Drifting-style "masked")
            t_self = project(x, x, eps, n_iters=n_iters, mask_diagonal=estimator == "masked")
        v = t_pos - t_self
        del t_self
        if uncond is not None:  # velocity guidance, [WF] Eq. 16: + w (T_{q->p(c)} - T_{q->p(empty)})
            t_pos.sub_(project(x, uncond, eps, n_iters=n_iters))
            v.add_(w[:, None, None] * t_pos)
        del t_pos

        v_rms = v.square().mean(dim=(1, 2)).sqrt()  # [B]
        if rms_normalize:
            floor = RMS_FLOOR_REL * (eps / (eps_rel * x.shape[2])).sqrt()
            v.div_(torch.maximum(v_rms, floor).clamp(min=torch.finfo(torch.float32).tiny)[:, None, None])
    return v, {"eps": eps, "v_rms": v_rms}
