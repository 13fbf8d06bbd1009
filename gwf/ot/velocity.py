"""The W-Flow velocity field ([WF] Han et al.; docs/wflow.md): the Wasserstein gradient of the Sinkhorn
divergence S_eps(q, p) at the generated particles x ~ q,

    V(x) = T_{q->p}(x) - T_{q->q'}(x)                                       ([WF] Sec. 3.3)
    V~(x) = V(x) + w (T_{q->p(c)}(x) - T_{q->p(empty)}(x))                  ([WF] Eq. 16)

with relative eps (docs/conventions.md). This module only computes V (detached, fp32). Ablations of [WF] Table 2:
the cost ||x - y|| (``cost="l2"``, eps relative to the mean distance instead of the mean squared one) and
distribution guidance (``guidance="distribution"``: the unconditional reals join q' as targets of weight
w (N - 1) / U each, N generated and U unconditional points, beside q''s points of weight 1; no third term), both
as the official drift_loss_ot.py and train.py.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Sequence

import torch
from torch import Tensor

import gwf.ot as _ot  # the engine registry gwf.ot.ENGINES (defined before this module is imported)
from gwf.constants import DEFAULT_EPS_REL, DEFAULT_N_ITERS, ESTIMATORS, RMS_FLOOR_REL
from gwf.ot.sinkhorn import check_cost, check_point_clouds, distances_into, fp32_island

# Absolute floor of eps, so that identical points (all distances 0) give a finite problem.
_EPS_FLOOR = 1e-12


def _mean_squared_distance(x: Tensor, ys: Sequence[Tensor], weights: Sequence[Tensor | None] | None = None) -> Tensor:
    """mean_squared_distance for checked clouds: Var(x) + Var(y) + ||mean(x) - mean(y)||^2 per target set.
    weights: None, or per set None (weight 1) or a [B] weight of each of its points."""

    def mean_and_var(t: Tensor) -> tuple[Tensor, Tensor]:
        t = t.detach().float()
        m = t.mean(1)  # [B, D]
        return m, torch.linalg.vector_norm(t - m[:, None], dim=-1).square().mean(1)

    with fp32_island(x.device):
        mx, var_x = mean_and_var(x)
        total = torch.zeros_like(var_x)
        count = 0.0
        for k, t in enumerate(ys):
            mt, var_t = mean_and_var(t)
            w = t.shape[1] if weights is None or weights[k] is None else t.shape[1] * weights[k].float()
            total += w * (var_x + var_t + (mx - mt).square().sum(-1))
            count = count + w
        return total / count


def _mean_distance(x: Tensor, ys: Sequence[Tensor], weights: Sequence[Tensor | None] | None = None) -> Tensor:
    """mean_{i, j} ||x_i - t_j|| per problem, [B] fp32, over the union of the target sets ys (each point of set k
    weighted by weights[k], [B], or 1): the distance scale of the cost ||x - y||. One [B, N, M] buffer per set, the
    GEMM form of the distance on clouds centred on the target's mean (a set that is x itself: diagonal 0)."""
    with fp32_island(x.device):
        xf = x.detach().float()
        total = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
        count = 0.0
        for k, t in enumerate(ys):
            tf = t.detach().float()
            centre = tf.mean(1, keepdim=True)
            d = distances_into(xf - centre, tf - centre, xf.new_empty(x.shape[0], x.shape[1], t.shape[1]))
            if t is x:
                d.diagonal(dim1=1, dim2=2).zero_()
            w = 1.0 if weights is None or weights[k] is None else weights[k].float()
            total += w * d.sum((1, 2)) / x.shape[1]
            count = count + w * t.shape[1]
        return total / count


def _target_sets(x: Tensor, y: Tensor | Sequence[Tensor]) -> list[Tensor]:
    """The target sets of a distance scale (one tensor or a sequence), each checked against x."""
    ys = [y] if isinstance(y, Tensor) else list(y)
    if not ys:
        raise ValueError("relative eps needs at least one target set")
    for t in ys:
        check_point_clouds(x, t, "x", "y")
    return ys


def mean_squared_distance(x: Tensor, y: Tensor | Sequence[Tensor]) -> Tensor:
    """mean_{i, j} ||x_i - y_j||^2 per problem, [B] fp32, exact and without the [N, M] matrix.

    x: [B, N, D]; y: [B, M, D] or a sequence of such tensors (their union, every point weighted equally).
    """
    return _mean_squared_distance(x, _target_sets(x, y))


def mean_distance(x: Tensor, y: Tensor | Sequence[Tensor]) -> Tensor:
    """mean_{i, j} ||x_i - y_j|| per problem, [B] fp32 (the distance scale of the cost ||x - y||).

    x: [B, N, D]; y: [B, M, D] or a sequence of such tensors (their union, every point weighted equally).
    """
    return _mean_distance(x, _target_sets(x, y))


def _check_eps_rel(eps_rel: float) -> None:
    if not eps_rel > 0:
        raise ValueError(f"eps_rel must be > 0, got {eps_rel}")


def relative_eps(x: Tensor, y: Tensor | Sequence[Tensor], eps_rel: float = DEFAULT_EPS_REL, cost: str = "sq") -> Tensor:
    """eps = eps_rel * mean_squared_distance(x, y) per problem (cost "sq"; "l2": eps_rel * mean_distance(x, y), the
    official eps = R sqrt(S) on features scaled to mean distance sqrt(S)), [B] fp32 (floored so identical points stay
    finite)."""
    _check_eps_rel(eps_rel)
    check_cost(cost)
    scale = mean_squared_distance(x, y) if cost == "sq" else mean_distance(x, y)
    return (eps_rel * scale).clamp(min=_EPS_FLOOR)


def _projector(engine: str, compile: bool, cost: str = "sq") -> Callable[..., list[Tensor]]:
    """project(xs, ys, eps, n_iters, mask_diagonal=False, target_weights=None) -> [T_k] for checked sets: the own
    engine solves every set in one loop; another engine (gwf.ot.ENGINES, looked up now: tests replace entries) is
    called once per set. cost and target weights reach the engine only when not the defaults (sq, uniform)."""
    engine_fn = _ot.ENGINES[engine]
    multi = _ot._MULTI_SET.get(engine_fn)
    extra = {} if cost == "sq" else {"cost": cost}
    if multi is not None:
        def project(xs, ys, eps, n_iters, target_weights=None, **kw):
            if target_weights is not None:
                kw["target_weights"] = target_weights
            return multi(xs, ys, eps, n_iters=n_iters, compile=compile, **extra, **kw)

        return project
    if compile is True:
        raise ValueError(f"compile=True needs engine='own' (it compiles the own engine's loop), got {engine!r}")
    single = _ot._UNCHECKED.get(engine_fn, engine_fn)

    def project_each(xs, ys, eps, n_iters, target_weights=None, **kw):
        weights = [None] * len(xs) if target_weights is None else target_weights
        return [single(x, y, e, n_iters=n_iters, **extra, **kw, **({} if w is None else {"target_weights": w}))
                for x, y, e, w in zip(xs, ys, eps, weights)]

    return project_each


# The energy ablation of [WF] Table 2a: fewer Sinkhorn iterations than one. 0 (MMD-like): the unnormalized kernel,
# "T" = x + mean_j k_ij (y_j - x_i), so T_p - T_q' is the Gaussian-kernel MMD flow's mean shift; 0.5 (KL-like): one
# row normalization, T = sum_j k_ij y_j / sum_j k_ij, so T_p - T_q' is eps times the KL flow's grad log p^ - grad log
# q^ between kernel density estimates. k_ij = exp(-||x_i - y_j||^2 / (2 eps)), the Sinkhorn kernel of the cost
# (cost "l2": exp(-||x_i - y_j|| / eps), the same two maps, no longer those flows). With target weights b (summing
# to 1), the means over j are b-weighted: the flows of the weighted measure.
PARTIAL_ITERATIONS = (0, 0.5)


def check_n_iters(n_iters: float) -> None:
    if n_iters not in PARTIAL_ITERATIONS and not (float(n_iters).is_integer() and n_iters >= 1):
        raise ValueError(f"n_iters must be an integer >= 1 (Sinkhorn iterations), 0 (MMD-like: the unnormalized "
                         f"kernel) or 0.5 (KL-like: one row normalization), got {n_iters}")


def kernel_projections(xs: Sequence[Tensor], ys: Sequence[Tensor], eps: Sequence[Tensor], n_iters: float,
                       mask_diagonal: bool = False, cost: str = "sq",
                       target_weights: Sequence[Tensor | None] | None = None) -> list[Tensor]:
    """The ``PARTIAL_ITERATIONS`` maps of each set: x_k [B, N, D], y_k [B, M, D], eps_k [B] -> [B, N, D];
    target_weights: None or per set None / [B, M] weights >= 0 of the targets (normalized per problem)."""
    out = []
    weights = [None] * len(xs) if target_weights is None else target_weights
    for x, y, e, w in zip(xs, ys, eps, weights):
        dist = torch.cdist(x, y)
        logk = (-0.5 * dist.square() if cost == "sq" else -dist) / e[:, None, None]  # [B, N, M]
        if mask_diagonal:  # the first N targets are x itself
            logk = logk.clone()
            logk.diagonal(dim1=1, dim2=2).fill_(-math.inf)
        if w is not None:  # log b_j added: exp gives b_j k_ij
            w = w.float()
            logk = logk + (w.log() - w.sum(-1, keepdim=True).log())[:, None, :]
        if n_iters == 0:
            k = logk.exp()
            mean_k = (lambda t: t) if w is not None else (lambda t: t / y.shape[1])  # b_j k_ij sum to the mean
            out.append(x + mean_k(torch.bmm(k, y) - k.sum(-1, keepdim=True) * x))
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
                      rms_normalize: bool = True, compile: bool | str = False, cost: str = "sq",
                      guidance: str = "velocity") -> tuple[Tensor, dict]:
    """W-Flow velocity V [B, N, D] (fp32, detached) for B independent problems (e.g. one per class).

    x: [B, N, D] generated samples; pos: [B, M, D] positives; neg: [B, N2, D] a second, independent batch from
    the model ("two_batch" only). eps = relative_eps(x, [x, neg, pos], eps_rel, cost), shared by a problem's terms.
    engine: a key of gwf.ot.ENGINES; n_iters: iterations of the own engine. estimator: "two_batch" (q' = neg),
    "single" (q' = x unmasked: the ablation) or "masked" (q' = x, self pairs masked; own engine only).
    uncond: [B, U, D] or [U, D] unconditional reals, with guidance_w (float or [B]) w = alpha - 1 for guidance:
    ``guidance`` "velocity" adds w (T_{q->p} - T_{q->uncond}) ([WF] Eq. 16); "distribution" makes the self term's
    target q' + uncond, q''s points of weight 1 and the unconditional reals of weight w (N - 1) / U each (the official
    train.py with use_new_cfg=False; eps's mean distance then counts them with that weight, as the official scale).
    cost: "sq" (||x - y||^2 / 2) or "l2" (||x - y||, eps relative to the mean distance; own engine only).
    rms_normalize: divide V by its RMS over (N, D), per problem. compile: the own engine's loop through
    torch.compile (same V within fp32 rounding); "auto": on CUDA only.
    Returns V and {"eps": [B], "v_rms": [B] RMS of V before normalization, and the distance scale eps is relative
    to: "msd" [B] the mean squared distance (cost sq) or "mean_dist" [B] the mean distance (cost l2)}.
    """
    vs, infos = sinkhorn_velocities(
        [x], [pos], None if neg is None else [neg], eps_rel=eps_rel, engine=engine, n_iters=n_iters,
        estimator=estimator, uncond=None if uncond is None else [uncond],
        guidance_w=None if guidance_w is None else [guidance_w], rms_normalize=rms_normalize, compile=compile,
        cost=cost, guidance=guidance)
    return vs[0], infos[0]


GUIDANCE_KINDS = ("velocity", "distribution")  # of sinkhorn_velocities (no guidance: uncond=None)


def sinkhorn_velocities(xs: Sequence[Tensor], pos: Sequence[Tensor], neg: Sequence[Tensor] | None = None, *,
                        eps_rel: float = DEFAULT_EPS_REL, engine: str = "own", n_iters: int = DEFAULT_N_ITERS,
                        estimator: str = "two_batch", uncond: Sequence[Tensor] | None = None,
                        guidance_w: Sequence[float | Tensor] | None = None, rms_normalize: bool = True,
                        compile: bool | str = False, cost: str = "sq",
                        guidance: str = "velocity") -> tuple[list[Tensor], list[dict]]:
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
    check_cost(cost)
    if cost != "sq" and engine != "own":
        raise ValueError(f"cost {cost!r} needs engine='own' (the {engine!r} engine has the quadratic cost only)")
    if guidance not in GUIDANCE_KINDS:
        raise ValueError(f"unknown guidance {guidance!r}; valid: {list(GUIDANCE_KINDS)} (no guidance: uncond=None)")
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
        raise ValueError("guidance needs both uncond and guidance_w (or neither)")
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
    project = (functools.partial(kernel_projections, cost=cost) if n_iters in PARTIAL_ITERATIONS
               else _projector(engine, compile, cost))
    distribution = ws is not None and guidance == "distribution"

    with fp32_island(xs[0].device):
        xs = [x.detach().float() for x in xs]
        selfs = [neg[k] if estimator == "two_batch" else x for k, x in enumerate(xs)]  # q'
        # official uncond weight (train.py): (alpha - 1)(n_gen - 1) / n_uncond per point, beside q''s points of 1
        unc_w = [w * ((x.shape[1] - 1) / u.shape[1]) for x, w, u in zip(xs, ws, uncond)] if distribution else None
        scales = []
        for k, x in enumerate(xs):  # [B_k], over all the terms' targets (distribution: the uncond reals weighted)
            targets = [x, pos[k]] if estimator != "two_batch" else [x, neg[k], pos[k]]
            weights = None
            if distribution:
                targets, weights = targets + [uncond[k]], [None] * len(targets) + [unc_w[k]]
            scales.append(_mean_squared_distance(x, targets, weights) if cost == "sq"
                          else _mean_distance(x, targets, weights))
        eps = [(eps_rel * scale).clamp(min=_EPS_FLOOR) for scale in scales]

        t_pos = project(xs, pos, eps, n_iters)  # T_{q->p}
        masked = estimator == "masked"
        if distribution:  # T_{q->(q' + uncond)}, q''s points of weight 1, the uncond reals of unc_w each
            targets = [torch.cat([q.float(), u.float()], dim=1) for q, u in zip(selfs, uncond)]
            weights = [torch.cat([w.new_ones(len(w), q.shape[1]), uw[:, None].expand(-1, u.shape[1])], dim=1)
                       for q, u, w, uw in zip(selfs, uncond, ws, unc_w)]
            t_self = project(xs, targets, eps, n_iters, mask_diagonal=masked, target_weights=weights)
            del targets
        elif estimator == "two_batch":  # T_{q->q'}, q' an independent batch: W-Flow's two-batch estimator
            t_self = project(xs, neg, eps, n_iters)
        else:  # q' = q: nearly diagonal plan ("single"), or its diagonal masked (Drifting-style "masked")
            t_self = project(xs, xs, eps, n_iters, mask_diagonal=masked)
        vs = [tp - ts for tp, ts in zip(t_pos, t_self)]
        del t_self
        if ws is not None and not distribution:  # velocity guidance, [WF] Eq. 16: + w (T_{q->p(c)} - T_{q->p(empty)})
            for v, tp, tu, w in zip(vs, t_pos, project(xs, uncond, eps, n_iters), ws):
                tp.sub_(tu)
                v.add_(w[:, None, None] * tp)
        del t_pos

        infos = []
        for v, e, x, scale in zip(vs, eps, xs, scales):
            v_rms = v.square().mean(dim=(1, 2)).sqrt()  # [B]
            if rms_normalize:  # floor relative to the per-coordinate distance scale (e / eps_rel: msd or mean_dist)
                if cost == "sq":
                    floor = RMS_FLOOR_REL * (e / (eps_rel * x.shape[2])).sqrt()
                else:
                    floor = e * (RMS_FLOOR_REL / (eps_rel * math.sqrt(x.shape[2])))
                v.div_(torch.maximum(v_rms, floor).clamp(min=torch.finfo(torch.float32).tiny)[:, None, None])
            infos.append({"eps": e, "v_rms": v_rms, "msd" if cost == "sq" else "mean_dist": scale})
    return vs, infos
