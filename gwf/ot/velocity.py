"""The W-Flow velocity field (Han et al., "One-Step Generative Modeling via Wasserstein Gradient Flows").

Wasserstein gradient of the Sinkhorn divergence S_eps(q, p) at the generated particles x ~ q:

    V(x) = T_{q->p}(x) - T_{q->q'}(x),      T_{a->b}(x) = E_{pi_eps(a,b)}[y | x]      (DESIGN 2.2)

and, with velocity guidance (W-Flow Eq. 16),

    V~(x) = (T_{q->p(c)} - T_{q->q'}) + w (T_{q->p(c)} - T_{q->p(empty)}).

The generator is then trained towards stopgrad(x + eta V(x)); this module only computes V (detached, fp32).

Relative eps, checked against the official code. The official `drift_loss_ot.py` is not in our code index; we
read the official train.py and two forks that carry drift_loss_ot.py unchanged (hudsonchen/riesz_flow_hudson,
KhoiTrant68/cwg-e). There, features are divided by scale / sqrt(S) (S = feature dim) with
scale^2 = mean_{i, j} ||x_i - t_j||^2 over the generated x and the targets t = [x itself (self pairs included),
the second batch q', the positives], then eps = R * S with the quadratic cost ||x - y||^2 / 2; in original units
eps = R * mean ||x_i - t_j||^2 (no factor 1/2), which is `relative_eps` on that target set. Differences, kept on
purpose: (1) the official scale is one number for the whole batch of one feature map (labels x positions); ours
is per problem, so that a problem's eps does not depend on which other classes share the batch; (2) their
train.py defaults to use_quadratic_cost=False (cost ||x - y||, eps = R * sqrt(S)); the paper and gwf use the
quadratic cost; (3) they sum RMS-normalized fields over several R (R_list, default (0.02, 0.05, 0.2)); gwf
computes one eps_rel per call (sum calls for a multi-scale field); (4) their RMS normalization uses the RMS over
all problems of a feature map, with floor sqrt(1e-8) in normalized units; ours is per problem, with the same
floor expressed in the data's units.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

import gwf.ot as _ot  # the engine registry gwf.ot.ENGINES (defined before this module is imported)
from gwf.constants import DEFAULT_EPS_REL, DEFAULT_N_ITERS, ESTIMATORS, RMS_FLOOR_REL
from gwf.ot.sinkhorn import check_point_clouds, fp32_island


# Absolute floor of eps, so that identical points (all distances 0) give a finite problem: any eps > 0 gives the
# uniform plan there.
_EPS_FLOOR = 1e-12


def mean_squared_distance(x: Tensor, y: Tensor | Sequence[Tensor]) -> Tensor:
    """mean_{i, j} ||x_i - y_j||^2 per problem, [B] fp32, without the [N, M] matrix.

    x: [B, N, D]; y: [B, M, D] or a sequence of such tensors (their union, every point weighted equally).
    Per target set: mean ||x_i - y_j||^2 = Var(x) + Var(y) + ||mean(x) - mean(y)||^2 (total variances), exact.
    """
    ys = [y] if isinstance(y, Tensor) else list(y)
    if not ys:
        raise ValueError("relative eps needs at least one target set")
    for t in ys:
        check_point_clouds(x, t, "x", "y")

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


def relative_eps(x: Tensor, y: Tensor | Sequence[Tensor], eps_rel: float = DEFAULT_EPS_REL) -> Tensor:
    """eps = eps_rel * mean_{i, j} ||x_i - y_j||^2 per problem: [B] fp32, detached (W-Flow's eps_eff = R * D).

    x: [B, N, D]; y: [B, M, D] or a sequence of target sets (their union). eps is floored at a tiny positive
    value so that identical points stay finite.
    """
    if not eps_rel > 0:
        raise ValueError(f"eps_rel must be > 0, got {eps_rel}")
    msd = mean_squared_distance(x, y)
    return (eps_rel * msd).clamp(min=_EPS_FLOOR)


def sinkhorn_velocity(
    x: Tensor,
    pos: Tensor,
    neg: Tensor | None = None,
    *,
    eps_rel: float = DEFAULT_EPS_REL,
    engine: str = "own",
    n_iters: int = DEFAULT_N_ITERS,
    estimator: str = "two_batch",
    uncond: Tensor | None = None,
    guidance_w: float | Tensor | None = None,
    rms_normalize: bool = True,
) -> tuple[Tensor, dict]:
    """W-Flow velocity V(x) = T_{q->p}(x) - T_{q->q'}(x) for B independent problems (e.g. one per class).

    Args:
        x: [B, N, D] generated samples (may require grad: detached here).
        pos: [B, M, D] positives (data of the problem's class).
        neg: [B, N2, D] second, independent batch from the current model (no grad); "two_batch" only.
        eps_rel: eps = eps_rel * mean ||x_i - t_j||^2 per problem, t over [x, neg, pos] (official target set),
            shared by all the terms of a problem.
        engine: a key of gwf.ot.ENGINES ("own": fixed-iteration Sinkhorn; "geomloss": eps-scaling).
        n_iters: Sinkhorn iterations of the own engine (ignored by geomloss).
        estimator: "two_batch" (q' = neg, W-Flow), "single" (q' = x, no mask: the self plan is nearly diagonal
            and the repulsion is lost; the ablation), "masked" (q' = x, self pairs masked, Drifting-style;
            own engine only).
        uncond: [B, U, D] or [U, D] unconditional reals p(.|empty), for velocity guidance (W-Flow Eq. 16).
        guidance_w: w, float or [B] tensor; needs `uncond` (and vice versa).
        rms_normalize: divide V by its RMS over (N, D), per problem (official: unit RMS per feature map).

    Returns:
        V [B, N, D] (fp32, detached), info: {"eps": [B], "v_rms": [B] RMS of V before normalization}.
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
    project = engines[engine]

    with fp32_island(x.device):
        x = x.detach().float()
        targets = [x, pos] if estimator != "two_batch" else [x, neg, pos]
        eps = relative_eps(x, targets, eps_rel)  # [B], one per problem, shared by all its terms

        t_pos = project(x, pos, eps, n_iters=n_iters)  # T_{q->p}
        if estimator == "two_batch":  # T_{q->q'}, q' an independent batch: W-Flow's two-batch estimator
            t_self = project(x, neg, eps, n_iters=n_iters)
        else:  # q' = q: nearly diagonal plan ("single"), or its diagonal masked (Drifting-style "masked")
            t_self = project(x, x, eps, n_iters=n_iters, mask_diagonal=estimator == "masked")
        v = t_pos - t_self
        del t_self
        if uncond is not None:  # velocity guidance, W-Flow Eq. 16: + w (T_{q->p(c)} - T_{q->p(empty)})
            t_pos.sub_(project(x, uncond, eps, n_iters=n_iters))
            v.add_(w[:, None, None] * t_pos)
        del t_pos

        v_rms = v.square().mean(dim=(1, 2)).sqrt()  # [B]
        if rms_normalize:
            floor = RMS_FLOOR_REL * (eps / (eps_rel * x.shape[2])).sqrt()
            v.div_(torch.maximum(v_rms, floor).clamp(min=torch.finfo(torch.float32).tiny)[:, None, None])
    return v, {"eps": eps, "v_rms": v_rms}
