"""The W-Flow velocity field ([WF] Han et al.; docs/wflow.md): the Wasserstein gradient of the Sinkhorn
divergence S_eps(q, p) at the generated particles x ~ q,

    V(x) = T_{q->p}(x) - T_{q->q'}(x)                                       ([WF] Sec. 3.3)
    V~(x) = V(x) + w (T_{q->p(c)}(x) - T_{q->p(empty)}(x))                  ([WF] Eq. 16)

with relative eps (docs/conventions.md). This module only computes V (detached, fp32).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

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


def _projector(engine: str, compile: bool) -> Callable[..., list[Tensor]]:
    """project(xs, ys, eps, n_iters, mask_diagonal=False) -> [T_k] for checked sets: the own engine solves every set
    in one loop; another engine (gwf.ot.ENGINES, looked up now: tests replace entries) is called once per set."""
    engine_fn = _ot.ENGINES[engine]
    multi = _ot._MULTI_SET.get(engine_fn)
    if multi is not None:
        return lambda xs, ys, eps, n_iters, **kw: multi(xs, ys, eps, n_iters=n_iters, compile=compile, **kw)
    if compile is True:
        raise ValueError(f"compile=True needs engine='own' (it compiles the own engine's loop), got {engine!r}")
    single = _ot._UNCHECKED.get(engine_fn, engine_fn)
    return lambda xs, ys, eps, n_iters, **kw: [single(x, y, e, n_iters=n_iters, **kw) for x, y, e in zip(xs, ys, eps)]


# The energy ablation of [WF] Table 2a: fewer Sinkhorn iterations than one. 0 (MMD-like): the unnormalized kernel,
# "T" = x + mean_j k_ij (y_j - x_i), so T_p - T_q' is the Gaussian-kernel MMD flow's mean shift; 0.5 (KL-like): one
# row normalization, T = sum_j k_ij y_j / sum_j k_ij, so T_p - T_q' is eps times the KL flow's grad log p^ - grad log
# q^ between kernel density estimates. k_ij = exp(-||x_i - y_j||^2 / (2 eps)), the Sinkhorn kernel of the cost.
PARTIAL_ITERATIONS = (0, 0.5)


def check_n_iters(n_iters: float) -> None:
    if n_iters not in PARTIAL_ITERATIONS and not (float(n_iters).is_integer() and n_iters >= 1):
        raise ValueError(f"n_iters must be an integer >= 1 (Sinkhorn iterations), 0 (MMD-like: the unnormalized "
                         f"kernel) or 0.5 (KL-like: one row normalization), got {n_iters}")


def kernel_projections(xs: Sequence[Tensor], ys: Sequence[Tensor], eps: Sequence[Tensor], n_iters: float,
                       mask_diagonal: bool = False) -> list[Tensor]:
    """The ``PARTIAL_ITERATIONS`` maps of each set: x_k [B, N, D], y_k [B, M, D], eps_k [B] -> [B, N, D]."""
    out = []
    for x, y, e in zip(xs, ys, eps):
        logk = -0.5 * torch.cdist(x, y).square() / e[:, None, None]  # [B, N, M]
        if mask_diagonal:
            logk = logk.clone()
            logk.diagonal(dim1=1, dim2=2).fill_(-math.inf)
        if n_iters == 0:
            k = logk.exp()
            out.append(x + (torch.bmm(k, y) - k.sum(-1, keepdim=True) * x) / y.shape[1])
        else:
            out.append(torch.bmm(logk.softmax(-1), y))
    return out


def _as_sets(t: Tensor | Sequence[Tensor] | None, count: int, name: str) -> list | None:
    if t is None:
        return None
    sets = [t] if isinstance(t, Tensor) or not isinstance(t, (list, tuple)) else list(t)
    if len(sets) != count:
        raise ValueError(f"{name} must give one entry per feature set ({count}), got {len(sets)}")
    return sets


def sinkhorn_velocity(x: Tensor, pos: Tensor, neg: Tensor | None = None, *, eps_rel: float = DEFAULT_EPS_REL,
                      engine: str = "own", n_iters: int = DEFAULT_N_ITERS, estimator: str = "two_batch",
                      uncond: Tensor | None = None, guidance_w: float | Tensor | None = None,
                      rms_normalize: bool = True, compile: bool | str = False) -> tuple[Tensor, dict]:
    """W-Flow velocity V [B, N, D] (fp32, detached) for B independent problems (e.g. one per class).

    x: [B, N, D] generated samples; pos: [B, M, D] positives; neg: [B, N2, D] a second, independent batch from
    the model ("two_batch" only). eps = relative_eps(x, [x, neg, pos], eps_rel), shared by a problem's terms.
    engine: a key of gwf.ot.ENGINES; n_iters: iterations of the own engine. estimator: "two_batch" (q' = neg),
    "single" (q' = x unmasked: the ablation) or "masked" (q' = x, self pairs masked; own engine only).
    uncond: [B, U, D] or [U, D] unconditional reals, with guidance_w (float or [B]) for velocity guidance.
    rms_normalize: divide V by its RMS over (N, D), per problem. compile: the own engine's loop through
    torch.compile (same V within fp32 rounding); "auto": on CUDA only.
    Returns V and {"eps": [B], "v_rms": [B] RMS of V before normalization, "msd": [B] the mean squared distance
    that eps is relative to}.
    """
    vs, infos = sinkhorn_velocities(
        [x], [pos], None if neg is None else [neg], eps_rel=eps_rel, engine=engine, n_iters=n_iters,
        estimator=estimator, uncond=None if uncond is None else [uncond],
        guidance_w=None if guidance_w is None else [guidance_w], rms_normalize=rms_normalize, compile=compile)
    return vs[0], infos[0]


def sinkhorn_velocities(xs: Sequence[Tensor], pos: Sequence[Tensor], neg: Sequence[Tensor] | None = None, *,
                        eps_rel: float = DEFAULT_EPS_REL, engine: str = "own", n_iters: int = DEFAULT_N_ITERS,
                        estimator: str = "two_batch", uncond: Sequence[Tensor] | None = None,
                        guidance_w: Sequence[float | Tensor] | None = None, rms_normalize: bool = True,
                        compile: bool | str = False) -> tuple[list[Tensor], list[dict]]:
    """sinkhorn_velocity of K sets of problems (e.g. the feature sets of an update) at once: set k is x_k
    [B_k, N, D_k] with pos_k [B_k, M, D_k], neg_k [B_k, N2, D_k], uncond_k [B_k, U, D_k] or [U, D_k] and
    guidance_w_k (float or [B_k]); N, M, N2, U are shared by the sets, B_k and D_k are free. The own engine
    solves each target (pos, q', uncond) of every set in one Sinkhorn loop. Returns ([V_k], [info_k]).

    Checks only metadata: no host synchronization (guidance_w given as tensors on x's device)."""
    engines = _ot.ENGINES
    if engine not in engines:
        raise ValueError(f"unknown engine {engine!r}; valid engines: {sorted(engines)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid estimators: {list(ESTIMATORS)}")
    xs = list(xs)
    if not xs:
        raise ValueError("sinkhorn_velocities needs at least one set")
    pos, neg = _as_sets(pos, len(xs), "pos"), _as_sets(neg, len(xs), "neg")
    uncond, guidance_w = _as_sets(uncond, len(xs), "uncond"), _as_sets(guidance_w, len(xs), "guidance_w")
    for x, p in zip(xs, pos):
        check_point_clouds(x, p, "x", "pos")
    if estimator == "two_batch":
        if neg is None:
            raise ValueError("estimator='two_batch' needs neg, a second independent batch [B, N2, D] from the model")
        for x, q in zip(xs, neg):
            check_point_clouds(x, q, "x", "neg")
    if estimator == "masked" and engine != "own":
        raise ValueError(f"estimator='masked' needs engine='own' ({engine!r} cannot mask the self pairs)")
    if (uncond is None) != (guidance_w is None):
        raise ValueError("velocity guidance needs both uncond and guidance_w (or neither)")
    ws = None
    if uncond is not None:
        ws = []
        for k, (x, w) in enumerate(zip(xs, guidance_w)):
            batch = x.shape[0]
            if uncond[k].dim() == 2:  # one unconditional batch shared by every problem
                uncond[k] = uncond[k].expand(batch, *uncond[k].shape)
            check_point_clouds(x, uncond[k], "x", "uncond")
            w = torch.as_tensor(w, dtype=torch.float32, device=x.device).detach().reshape(-1)
            if w.numel() == 1:
                w = w.expand(batch)
            if w.shape != (batch,):
                raise ValueError(f"guidance_w must be a float or a [B] = [{batch}] tensor, got {tuple(w.shape)}")
            ws.append(w)
    _check_eps_rel(eps_rel)
    check_n_iters(n_iters)
    if n_iters not in PARTIAL_ITERATIONS:
        n_iters = int(n_iters)  # 2.0 from a config: the loops take an int
    # Inputs are checked here and eps is made here (> 0 by construction): the engines run without checks.
    project = kernel_projections if n_iters in PARTIAL_ITERATIONS else _projector(engine, compile)

    with fp32_island(xs[0].device):
        xs = [x.detach().float() for x in xs]
        msds = [_mean_squared_distance(x, [x, pos[k]] if estimator != "two_batch" else [x, neg[k], pos[k]])
                for k, x in enumerate(xs)]  # [B_k], over all the terms' targets
        eps = [(eps_rel * msd).clamp(min=_EPS_FLOOR) for msd in msds]

        t_pos = project(xs, pos, eps, n_iters)  # T_{q->p}
        if estimator == "two_batch":  # T_{q->q'}, q' an independent batch: W-Flow's two-batch estimator
            t_self = project(xs, neg, eps, n_iters)
        else:  # q' = q: nearly diagonal plan ("single"), or its diagonal masked (Drifting-style "masked")
            t_self = project(xs, xs, eps, n_iters, mask_diagonal=estimator == "masked")
        vs = [tp - ts for tp, ts in zip(t_pos, t_self)]
        del t_self
        if uncond is not None:  # velocity guidance, [WF] Eq. 16: + w (T_{q->p(c)} - T_{q->p(empty)})
            for v, tp, tu, w in zip(vs, t_pos, project(xs, uncond, eps, n_iters), ws):
                tp.sub_(tu)
                v.add_(w[:, None, None] * tp)
        del t_pos

        infos = []
        for v, e, x, msd in zip(vs, eps, xs, msds):
            v_rms = v.square().mean(dim=(1, 2)).sqrt()  # [B]
            if rms_normalize:
                floor = RMS_FLOOR_REL * (e / (eps_rel * x.shape[2])).sqrt()
                v.div_(torch.maximum(v_rms, floor).clamp(min=torch.finfo(torch.float32).tiny)[:, None, None])
            infos.append({"eps": e, "v_rms": v_rms, "msd": msd})
    return vs, infos
