"""Batched log-domain Sinkhorn for many small entropic OT problems at once (the "own" engine; gwf.ot conventions).

A fixed number of iterations from g = 0, as in the W-Flow code; f and the rows of the plan are recomputed from the
final g, so row marginals are exact. fp32, outside autocast, without autograd, with fp32 matmuls. Several sets of
problems that share N and M (feature sets of different dimensions) go through one loop: each set builds its own
log-kernel -C/eps, up to a per-row constant (its own GEMM), into one [sum B_k, N, M] buffer, and projects onto its
own targets at the end.

Two forms of the same iteration. On an accelerator, the log-domain form: two log-sum-exp sweeps per iteration, no
host synchronization. On the CPU, the "row-frame" form (bound by the exponentials, so it computes half as many):
the row sweep keeps E_ij = exp(logk_ij + beta_j - r_i) (r_i its row maximum), which gives alpha, and the column
update is a matrix-vector product with these E, w_i = M / sum_j E_ij in [1, M]:

    LSE_i(logk_ij + alpha_i) = log(sum_i E_ij w_i) - beta_j,   so   beta_j <- beta_j + log N - log(sum_i E_ij w_i).

Exact unless a column's entries underflow in every row frame (a column far from every x, early in the loop): those
iterations redo the column update in the log domain. The last iteration's E, kept in place of the log-kernel, gives
the plan's rows without another exponential.

Cost (``cost``): "sq" = ||x - y||^2 / 2 (the default, gwf.ot's convention) or "l2" = ||x - y|| (the official W-Flow
code's ``use_quadratic_cost=False``), both from one GEMM. Target marginal: uniform, or ``target_weights`` [B, M]
(non-negative, normalized per problem; the official ``target_weights``): with b_j the normalized weights and
lw_j = log(M b_j), the loop keeps beta~ = beta + lw in place of beta, so that the row update is unchanged and the
column update gains + lw_j; a target of weight 0 keeps beta~_j = -inf, no mass, exactly.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor

from gwf.constants import COSTS, DEFAULT_N_ITERS

# Entries of the [B, N, M] matrix per chunk of a sweep. CPU: 2^18 fp32 = 1 MiB, so a chunk and its temporaries stay
# in cache (3-4x faster than whole-matrix passes). Other devices: a memory budget for the one reused workspace
# (2^28 fp32 = 1 GiB), i.e. one chunk, and so the fewest kernel launches, for the recipes' problems.
_CHUNK_ENTRIES = 1 << 18
_DEVICE_CHUNK_ENTRIES = 1 << 28


_FORCED = {"log_domain": False, "accelerator": False}


@contextmanager
def _forcing(key: str) -> Iterator[None]:
    saved = _FORCED[key]
    _FORCED[key] = True
    try:
        yield
    finally:
        _FORCED[key] = saved


def as_on_accelerator():
    """Inside, the transport takes an accelerator's path (the log-domain loop, chunks by the memory budget) whatever
    the tensors' device: how gwf-bench-step and the tests count on the CPU what a GPU would run."""
    return _forcing("accelerator")


def log_domain_loop():
    """Inside, the loop runs in the log-domain form on every device (the CPU keeps its cache-sized chunks): the
    form accelerators run, timed on the CPU by gwf-bench-velocity's ``own-logdomain`` row."""
    return _forcing("log_domain")


def chunk_entries(device: torch.device) -> int:
    """Entries of the [B, N, M] matrix per chunk of a sweep on ``device`` (a cache size on CPU, a memory budget
    elsewhere)."""
    return _CHUNK_ENTRIES if device.type == "cpu" and not _FORCED["accelerator"] else _DEVICE_CHUNK_ENTRIES


def row_frame_loop(device: torch.device) -> bool:
    """Whether the loop on ``device`` runs in the row-frame form (CPU: half the exponentials, a host check per
    iteration for underflow) or the log-domain form (accelerators: no host synchronization)."""
    return device.type == "cpu" and not (_FORCED["accelerator"] or _FORCED["log_domain"])


def compiled_loop(compile: bool | str, device: torch.device) -> bool:
    """Whether the loop runs through torch.compile: ``compile`` true, or "auto" on CUDA (where the eager loop's
    launches, about 22 per iteration, dominate small problems)."""
    return compile is True or (compile == "auto" and device.type == "cuda")


def check_point_clouds(x: Tensor, y: Tensor, name_x: str = "x", name_y: str = "y") -> None:
    """Raise ValueError unless x [B, N, D] and y [B, M, D] are floating batched point clouds that match."""
    for name, t in ((name_x, x), (name_y, y)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(
                f"{name} must have shape [B, N, D] (B independent problems of N points in R^D), got {tuple(t.shape)}"
            )
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {t.dtype}")
        if t.shape[1] == 0:
            raise ValueError(f"{name} has no points: shape {tuple(t.shape)}")
    if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(
            f"{name_x} {tuple(x.shape)} and {name_y} {tuple(y.shape)} must share B (problems) and D (dimension)"
        )


def check_cost(cost: str) -> None:
    if cost not in COSTS:
        raise ValueError(f"unknown cost {cost!r}; valid costs: {list(COSTS)} (sq: ||x - y||^2 / 2, l2: ||x - y||)")


def check_target_weights(w: Tensor | None, y: Tensor, name: str = "target_weights") -> None:
    """Raise unless w is None or a [B, M] tensor of finite weights >= 0 with a positive sum per problem (y [B, M, D]).

    Reads w back (a host synchronization): for the public API, not for the training path."""
    if w is None:
        return
    if not isinstance(w, Tensor) or tuple(w.shape) != tuple(y.shape[:2]):
        raise ValueError(f"{name} must be a tensor of shape [B, M] = {list(y.shape[:2])} (one weight per target "
                         f"point), got {tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
    w = w.detach().float()
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError(f"{name} must be finite and >= 0")
    if bool((w.sum(-1) <= 0).any()):
        raise ValueError(f"{name} must have a positive sum in every problem (a target marginal of mass 0)")


def as_eps(eps: float | Tensor, batch_size: int, device: torch.device) -> Tensor:
    """eps as a detached fp32 tensor [B]; a float or a 0-d / [1] / [B] tensor. Raises unless eps > 0 and finite.

    Reads eps back to check it (a host synchronization): for the public API, not for the training path."""
    e = torch.as_tensor(eps, dtype=torch.float32, device=device).detach().reshape(-1)
    if e.numel() == 1:
        e = e.expand(batch_size)
    if e.shape != (batch_size,):
        raise ValueError(f"eps must be a float or a tensor of shape [B] = [{batch_size}], got {tuple(e.shape)}")
    if not bool(torch.isfinite(e).all()) or bool((e <= 0).any()):
        raise ValueError(f"eps must be finite and > 0, got {e.tolist() if e.numel() <= 8 else e}")
    return e.contiguous()


@contextmanager
def fp32_matmul() -> Iterator[None]:
    """fp32 matmuls inside (no TF32 on CUDA, no bf16 passes in oneDNN), whatever the user set; restored on exit.

    Speaks whichever API the user speaks: torch refuses to read the legacy setting once the per-backend one was
    used, so a legacy setting is pinned and restored with the legacy call, a per-backend one per backend."""
    cuda, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    saved = (cuda.fp32_precision, mkldnn.fp32_precision)
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # the user set the per-backend API with different values
        legacy = None
    if legacy is not None:
        torch.set_float32_matmul_precision("highest")
    else:
        cuda.fp32_precision = mkldnn.fp32_precision = "ieee"
    try:
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy)
        cuda.fp32_precision, mkldnn.fp32_precision = saved


@contextmanager
def fp32_island(device: torch.device) -> Iterator[None]:
    """OT runs in fp32 without autograd and with fp32 matmuls, whatever the trainer's autocast/precision."""
    with torch.autocast(device_type=device.type, enabled=False), torch.no_grad(), fp32_matmul():
        yield


def _blocks(batch: int, n: int, m: int, chunk_size: int | None, entries: int) -> Iterator[tuple[slice, slice]]:
    """Blocks (problems, rows), each a contiguous view of [B, N, M] with about ``entries`` entries.

    chunk_size = rows per block (None: automatic); a block holds several whole problems or rows of one problem.
    """
    rows = chunk_size if chunk_size is not None else max(1, entries // max(m, 1))
    if rows < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if rows >= n:
        per = max(1, rows // n)
        for b0 in range(0, batch, per):
            yield slice(b0, min(b0 + per, batch)), slice(0, n)
    else:
        for b in range(batch):
            for r0 in range(0, n, rows):
                yield slice(b, b + 1), slice(r0, min(r0 + rows, n))


def _block_list(logk: Tensor, chunk_size: int | None) -> list[tuple[slice, slice]]:
    return list(_blocks(*logk.shape, chunk_size, chunk_entries(logk.device)))


def distances_into(x: Tensor, y: Tensor, out: Tensor) -> Tensor:
    """||x_i - y_j|| [B, N, M] into ``out`` from one GEMM, sqrt(max(||x||^2 + ||y||^2 - 2 <x, y>, 0)), as
    torch.cdist computes it for more than 25 points (the official code's cost). Centre the clouds first: the absolute
    error of the square is about fp32 epsilon x (||x||^2 + ||y||^2)."""
    torch.baddbmm(torch.linalg.vector_norm(y, dim=-1).square_()[:, None, :], x, y.transpose(1, 2), alpha=-2, out=out)
    return out.add_(torch.linalg.vector_norm(x, dim=-1).square_()[:, :, None]).clamp_(min=0).sqrt_()


def _log_kernels(xs: Sequence[Tensor], ys: Sequence[Tensor], eps: Tensor, mask_diagonal: bool,
                 cost: str = "sq") -> Tensor:
    """Log-kernels [sum B_k, N, M] of the sets (x_k [B_k, N, D_k], y_k [B_k, M, D_k]; eps [sum B_k]), one GEMM per
    set. cost "sq": x_k already divided by its problem's eps,

        logk_ij = <x_i / eps, y_j> - ||y_j||^2 / (2 eps) = -C_ij / eps + ||x_i||^2 / (2 eps).

    The row constant ||x_i||^2 / (2 eps) shifts alpha_i only (``row_offsets``): beta and the plan do not see it.
    cost "l2": x_k not divided, logk_ij = -||x_i - y_j|| / eps exactly (no row constant).
    mask_diagonal: C_ii = +inf for i < N (the first N targets are x itself; M >= N)."""
    logk = xs[0].new_empty(eps.shape[0], xs[0].shape[1], ys[0].shape[1])
    start = 0
    for x, y in zip(xs, ys):
        b = x.shape[0]
        out = logk[start : start + b]  # [B_k, N, M]
        if cost == "sq":
            half_y2 = torch.linalg.vector_norm(y, dim=-1).square_().div_(eps[start : start + b, None]).mul_(-0.5)
            torch.baddbmm(half_y2[:, None, :], x, y.transpose(1, 2), out=out)
        else:
            distances_into(x, y, out).div_(eps[start : start + b, None, None]).neg_()
        start += b
    if mask_diagonal:  # Drifting-style self-pair mask: C_ii = +inf
        logk.diagonal(dim1=1, dim2=2).fill_(-math.inf)
    return logk


def _log_target_weights(weights: Sequence[Tensor | None] | None, ys: Sequence[Tensor]) -> Tensor | None:
    """lw [sum B_k, M] = log(M b_j) of the sets' target weights (b = w / sum w per problem; a set without weights:
    0, uniform), or None when no set has weights. log 0 = -inf: a target of weight 0."""
    if weights is None or all(w is None for w in weights):
        return None
    parts = []
    for w, y in zip(weights, ys):
        if w is None:
            parts.append(y.new_zeros(y.shape[0], y.shape[1], dtype=torch.float32))
        else:
            w = w.detach().float()
            parts.append(w.log().sub_(w.mean(-1, keepdim=True).log_()))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def row_offsets(xs: Sequence[Tensor], eps: Tensor) -> Tensor:
    """||x_i||^2 / (2 eps) [sum B_k, N] of the sets x_k / eps: alpha = alpha' + this, for the potential alpha' of
    ``_log_kernels``."""
    half_x2 = [torch.linalg.vector_norm(x, dim=-1).square_().mul_(0.5) for x in xs]  # ||x / eps||^2 / 2
    return torch.cat(half_x2).mul_(eps[:, None])


def _lse_(buf: Tensor, dim: int) -> Tensor:
    """log-sum-exp of `buf` along `dim`, in place in `buf` (destroyed): no fresh chunk-sized allocation per call."""
    # A slice may be all -inf (a one-row chunk of a masked self problem): clamping its max to the most negative
    # float keeps (-inf) - m = -inf, exp = 0, log 0 = -inf, instead of NaN.
    m = buf.amax(dim=dim, keepdim=True).clamp_(min=torch.finfo(buf.dtype).min)
    buf.sub_(m).exp_()
    return buf.sum(dim=dim).log_().add_(m.squeeze(dim))


def _workspace(logk: Tensor, blocks: Sequence[tuple[slice, slice]]) -> Tensor:
    """One flat buffer reused by every block of every sweep (as large as the largest block)."""
    largest = max((bs.stop - bs.start) * (rs.stop - rs.start) for bs, rs in blocks)
    return torch.empty(largest * logk.shape[2], dtype=logk.dtype, device=logk.device)


def _sinkhorn_loop(logk: Tensor, n_iters: int, chunk_size: int | None,
                   log_w: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Scaled potentials (alpha, beta) = (f/eps, g/eps) after n_iters (f, g) updates from g = 0.

    alpha_i = log M - LSE_j(logk_ij + beta_j),   beta_j = log N - LSE_i(logk_ij + alpha_i) (+ lw_j).
    With target weights (log_w = lw [B, M], ``_log_target_weights``) beta is beta~ = g/eps + lw (module docstring).
    One sweep per iteration: each row chunk gets its new alpha and, while in cache, adds its partial column
    log-sum-exp to the new beta.
    """
    batch, n, m = logk.shape
    log_n, log_m = math.log(n), math.log(m)
    blocks = _block_list(logk, chunk_size)
    work = _workspace(logk, blocks)
    alpha = logk.new_zeros(batch, n)
    beta = logk.new_zeros(batch, m)
    for _ in range(n_iters):
        acc = beta.new_full((batch, m), -math.inf) if len(blocks) > 1 else None
        for bs, rs in blocks:
            blk = logk[bs, rs]
            buf = work[: blk.numel()].view(blk.shape)
            alpha[bs, rs] = log_m - _lse_(torch.add(blk, beta[bs, None, :], out=buf), dim=-1)
            part = _lse_(torch.add(blk, alpha[bs, rs, None], out=buf), dim=1)  # [b, M]
            if acc is None:  # one block: the whole columns at once
                beta = log_n - part
            else:
                acc[bs] = torch.logaddexp(acc[bs], part)
        if acc is not None:
            beta = log_n - acc
        if log_w is not None:
            beta = beta + log_w
    return alpha, beta


def _column_update(logk: Tensor, alpha: Tensor, blocks, work: Tensor, log_w: Tensor | None = None) -> Tensor:
    """beta_j = log N - LSE_i(logk_ij + alpha_i) (+ lw_j) in the log domain, sweeping the row blocks."""
    batch, n, m = logk.shape
    acc = alpha.new_full((batch, m), -math.inf)
    for bs, rs in blocks:
        blk = logk[bs, rs]
        part = _lse_(torch.add(blk, alpha[bs, rs, None], out=work[: blk.numel()].view(blk.shape)), dim=1)  # [b, M]
        acc[bs] = torch.logaddexp(acc[bs], part)
    acc = acc.neg_().add_(math.log(n))
    return acc if log_w is None else acc.add_(log_w)


def _sinkhorn_loop_rows(logk: Tensor, n_iters: int, chunk_size: int | None, keep_plan: bool = False,
                        rebuild=None, log_w: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor | None]:
    """_sinkhorn_loop in the row-frame form (module docstring): (alpha, beta, q), half the exponentials.

    keep_plan: the last iteration leaves E_ij = exp(logk_ij + beta_j - r_i) in place of logk, and q [B, M] =
    exp(beta_new - beta_old), so that the plan's rows are E_ij q_j normalized (``_plan_from_rows``); q is None (and
    logk the log-kernel again, made by ``rebuild()``) when that last iteration needed the log-domain column update.
    Reads a flag back per iteration: for the CPU, where that costs nothing. log_w: as ``_sinkhorn_loop``; a column
    of weight 0 (lw = -inf) has E = 0, beta~ = -inf and q = 0 without the log-domain detour.
    """
    batch, n, m = logk.shape
    log_n, log_m = math.log(n), math.log(m)
    blocks = _block_list(logk, chunk_size)
    work = _workspace(logk, blocks)
    alpha, beta = logk.new_empty(batch, n), logk.new_zeros(batch, m)
    col = logk.new_empty(batch, 1, m)
    # A column sum below this may have lost terms to underflow (E < the smallest normal, times w <= M, N rows): it
    # is then at most eps-relative wrong; below, the column is updated in the log domain instead.
    tiny = n * m * torch.finfo(logk.dtype).tiny / torch.finfo(logk.dtype).eps
    dead = None if log_w is None else torch.isneginf(log_w)  # targets of weight 0

    def updated(sums: Tensor) -> Tensor:  # beta~ + lw + log N - log(sum_i E_ij w_i); -inf for a target of weight 0
        if log_w is None:
            return beta + (log_n - sums.log())
        return (beta + log_w + (log_n - sums.log())).masked_fill_(dead, -math.inf)

    for it in range(n_iters):
        in_place = keep_plan and it == n_iters - 1
        col.zero_()
        for bs, rs in blocks:
            blk = logk[bs, rs]
            e = blk.add_(beta[bs, None, :]) if in_place else torch.add(
                blk, beta[bs, None, :], out=work[: blk.numel()].view(blk.shape))
            r = e.amax(dim=-1, keepdim=True)  # finite: every row has an unmasked entry
            rowsum = e.sub_(r).exp_().sum(dim=-1, keepdim=True)  # [b, rows, 1], in [1, M]
            alpha[bs, rs] = rowsum.log().add_(r).squeeze(-1).neg_().add_(log_m)
            w = rowsum.reciprocal_().mul_(m).view(e.shape[0], 1, e.shape[1])  # [b, 1, rows], canonical strides:
            col[bs] += torch.bmm(w, e)  # sum_i E_ij w_i; a transposed view would change the kernel with b
        sums = col.squeeze(1)
        bad = sums < tiny if dead is None else (sums < tiny) & ~dead
        if bool(bad.any()):
            if in_place:  # the log-kernel was overwritten: make it again, the plan takes the log-domain way
                logk.copy_(rebuild())
                return alpha, torch.where(bad, _column_update(logk, alpha, blocks, work, log_w), updated(sums)), None
            beta = torch.where(bad, _column_update(logk, alpha, blocks, work, log_w), updated(sums))
        else:
            beta = updated(sums)
    if not keep_plan:
        return alpha, beta, None
    if log_w is None:
        return alpha, beta, sums.reciprocal().mul_(n)
    return alpha, beta, (log_w + (log_n - sums.log())).exp_().masked_fill_(dead, 0.0)  # exp(lw) N / sums


def _plan_from_rows(e: Tensor, q: Tensor, ys: Sequence[Tensor], shifts: Sequence[Tensor]) -> list[Tensor]:
    """T_k = (E q-weighted rows, normalized) @ y_k + shift_k from ``_sinkhorn_loop_rows(keep_plan=True)``: one GEMM
    per set against q y (in place in y) and a matrix-vector product against q (each row's normalizer)."""
    out, start = [], 0
    for y, shift in zip(ys, shifts):
        b = y.shape[0]
        qk, ek = q[start : start + b, :, None], e[start : start + b]  # [b, M, 1], [b, N, M]
        out.append(torch.bmm(ek, y.mul_(qk)).div_(torch.bmm(ek, qk)).add_(shift))  # y: _solve's copy, last use
        start += b
    return out


def _lse(t: Tensor, dim: int) -> Tensor:
    m = t.amax(dim=dim, keepdim=True).clamp(min=torch.finfo(t.dtype).min)  # all -inf slices: see _lse_
    return (t - m).exp().sum(dim).log() + m.squeeze(dim)


def _iteration(logk: Tensor, beta: Tensor, log_n: float, log_m: float) -> tuple[Tensor, Tensor]:
    """One (f, g) update on the whole matrix, for torch.compile: each log-sum-exp becomes one fused kernel."""
    alpha = log_m - _lse(logk + beta[:, None, :], 2)
    return alpha, log_n - _lse(logk + alpha[:, :, None], 1)


def _weighted_iteration(logk: Tensor, beta: Tensor, log_w: Tensor, log_n: float, log_m: float
                        ) -> tuple[Tensor, Tensor]:
    """``_iteration`` with target weights (beta is beta~, ``_sinkhorn_loop``)."""
    alpha = log_m - _lse(logk + beta[:, None, :], 2)
    return alpha, log_n - _lse(logk + alpha[:, :, None], 1) + log_w


_COMPILED: dict[str, object] = {}


def _compiled_iteration(weighted: bool = False):
    """``_iteration`` (or ``_weighted_iteration``) compiled once per process, with dynamic shapes (one compilation
    serves every B, N, M)."""
    key = "weighted" if weighted else "iteration"
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(_weighted_iteration if weighted else _iteration, dynamic=True)
    return _COMPILED[key]


def _sinkhorn_loop_compiled(logk: Tensor, n_iters: int, log_w: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """_sinkhorn_loop's iterations through the compiled ``_iteration`` (same V within fp32 rounding)."""
    batch, n, m = logk.shape
    step = _compiled_iteration(log_w is not None)
    alpha, beta = logk.new_zeros(batch, n), logk.new_zeros(batch, m)
    for _ in range(n_iters):
        if log_w is None:
            alpha, beta = step(logk, beta, math.log(n), math.log(m))
        else:
            alpha, beta = step(logk, beta, log_w, math.log(n), math.log(m))
    return alpha, beta


def _final_alpha(logk: Tensor, beta: Tensor, chunk_size: int | None) -> Tensor:
    blocks = _block_list(logk, chunk_size)
    work = _workspace(logk, blocks)
    alpha = torch.empty(logk.shape[:2], dtype=logk.dtype, device=logk.device)
    for bs, rs in blocks:
        blk = logk[bs, rs]
        buf = torch.add(blk, beta[bs, None, :], out=work[: blk.numel()].view(blk.shape))
        alpha[bs, rs] = math.log(logk.shape[2]) - _lse_(buf, dim=-1)
    return alpha


def _check_options(xs: Sequence[Tensor], ys: Sequence[Tensor], n_iters: int, mask_diagonal: bool) -> None:
    """Shape rules of a multi-set solve (metadata only, no synchronization)."""
    n, m = xs[0].shape[1], ys[0].shape[1]
    if any(x.shape[1] != n for x in xs) or any(y.shape[1] != m for y in ys):
        raise ValueError(f"sets solved together must share N and M, got N {[x.shape[1] for x in xs]}, "
                         f"M {[y.shape[1] for y in ys]}")
    if mask_diagonal:
        if m < n:
            raise ValueError(f"mask_diagonal needs M >= N (the first N targets are x itself), got N={n}, M={m}")
        if m < 2:
            raise ValueError("mask_diagonal needs at least 2 points per problem (a masked 1-point plan is empty)")
    if int(n_iters) < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")


def _solve(xs: Sequence[Tensor], ys: Sequence[Tensor], eps: Sequence[Tensor], n_iters: int, mask_diagonal: bool,
           chunk_size: int | None, compile: bool | str = False, keep_plan: bool = False, cost: str = "sq",
           target_weights: Sequence[Tensor | None] | None = None):
    """(logk, alpha, beta, q, centred x_k (/ eps for cost sq), centred y_k, shifts, eps, lw) of checked sets, eps_k
    [B_k], target_weights one [B_k, M] tensor or None per set (None: all uniform); logk, alpha, beta, eps and lw
    (``_log_target_weights``, None when uniform) stack the sets' problems, beta is beta~ = g/eps + lw; q is the
    row-frame loop's plan weights when it kept the plan (see ``_sinkhorn_loop_rows``), else None and logk the
    log-kernel."""
    _check_options(xs, ys, n_iters, mask_diagonal)
    # The cost is translation invariant: centre both clouds on y's mean so that <x, y> and ||y||^2 stay small for
    # data far from the origin (e.g. latents with a large mean), where fp32 would lose the cost to cancellation.
    cx, cy, shifts = [], [], []
    for x, y, e in zip(xs, ys, eps):
        x, y = x.detach().float(), y.detach().float()
        shift = y.mean(dim=1, keepdim=True)  # [B, 1, D]
        # sq: divided by eps here (no other copy of x); l2: the distances are divided by eps instead
        cx.append((x - shift).div_(e[:, None, None]) if cost == "sq" else x - shift)
        cy.append((y - shift).contiguous())
        shifts.append(shift)
    eps = eps[0] if len(eps) == 1 else torch.cat(list(eps))
    log_w = _log_target_weights(target_weights, ys)
    logk = _log_kernels(cx, cy, eps, mask_diagonal, cost)
    q = None
    if compiled_loop(compile, logk.device):
        alpha, beta = _sinkhorn_loop_compiled(logk, int(n_iters), log_w)
    elif row_frame_loop(logk.device):
        alpha, beta, q = _sinkhorn_loop_rows(logk, int(n_iters), chunk_size, keep_plan,
                                             rebuild=lambda: _log_kernels(cx, cy, eps, mask_diagonal, cost),
                                             log_w=log_w)
    else:
        alpha, beta = _sinkhorn_loop(logk, int(n_iters), chunk_size, log_w)
    return logk, alpha, beta, q, cx, cy, shifts, eps, log_w


def sinkhorn_potentials(x: Tensor, y: Tensor, eps: float | Tensor, n_iters: int = DEFAULT_N_ITERS,
                        mask_diagonal: bool = False, chunk_size: int | None = None,
                        compile: bool | str = False, *, cost: str = "sq",
                        target_weights: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Entropic OT dual potentials f [B, N], g [B, M] (fp32, detached) for x [B, N, D], y [B, M, D]:
    pi_ij = a_i b_j exp((f_i + g_j - C_ij) / eps).

    eps: float or [B] tensor (> 0). n_iters (f, g) updates, then f from the last g. mask_diagonal sets C_ii = +inf
    for i < N (M >= N: the first N targets are x itself). chunk_size: rows per chunk of the sweeps (None: automatic;
    same results). compile: run the iterations through torch.compile (same results within fp32 rounding); "auto": on
    CUDA only. cost: "sq" (||x - y||^2 / 2) or "l2" (||x - y||). target_weights: [B, M] weights >= 0 of the target
    points (normalized per problem; None: uniform); g_j of a target of weight 0 does not enter the plan and is
    returned as 0.
    """
    check_point_clouds(x, y)
    check_cost(cost)
    check_target_weights(target_weights, y)
    eps = as_eps(eps, x.shape[0], x.device)
    with fp32_island(x.device):
        logk, _, beta, _, cx, _, _, _, log_w = _solve([x], [y], [eps], n_iters, mask_diagonal, chunk_size, compile,
                                                      cost=cost, target_weights=[target_weights])
        alpha = _final_alpha(logk, beta, chunk_size)
        if cost == "sq":
            alpha.add_(row_offsets(cx, eps))
        if log_w is not None:
            beta = (beta - log_w).masked_fill_(torch.isneginf(log_w), 0.0)
        return alpha * eps[:, None], beta * eps[:, None]


def barycentric_projection(x: Tensor, y: Tensor, eps: float | Tensor, n_iters: int = DEFAULT_N_ITERS,
                           mask_diagonal: bool = False, chunk_size: int | None = None,
                           compile: bool | str = False, *, cost: str = "sq",
                           target_weights: Tensor | None = None) -> Tensor:
    """Entropic barycentric projection T [B, N, D] (fp32, detached) of x [B, N, D] onto y [B, M, D].

    Arguments as in sinkhorn_potentials; each T(x_i) is a convex combination of the y_j.
    """
    check_point_clouds(x, y)
    check_cost(cost)
    check_target_weights(target_weights, y)
    return _barycentric_projection(x, y, as_eps(eps, x.shape[0], x.device), n_iters, mask_diagonal, chunk_size,
                                   compile, cost=cost, target_weights=target_weights)


def barycentric_projections(xs: Sequence[Tensor], ys: Sequence[Tensor], eps: Sequence[float | Tensor],
                            n_iters: int = DEFAULT_N_ITERS, mask_diagonal: bool = False,
                            chunk_size: int | None = None, compile: bool | str = False, *, cost: str = "sq",
                            target_weights: Sequence[Tensor | None] | None = None) -> list[Tensor]:
    """barycentric_projection of several sets of problems in one Sinkhorn loop: x_k [B_k, N, D_k] onto
    y_k [B_k, M, D_k] with eps_k (float or [B_k]) and target_weights_k ([B_k, M] or None); N and M shared by every
    set, B_k and D_k free. Same T_k as one call per set (bitwise on CPU where the kernels' arithmetic does not depend
    on the batch)."""
    if not len(xs) == len(ys) == len(eps) > 0:
        raise ValueError(f"need as many x, y and eps sets (>= 1), got {len(xs)}, {len(ys)}, {len(eps)}")
    check_cost(cost)
    if target_weights is not None and len(target_weights) != len(ys):
        raise ValueError(f"target_weights needs one entry (a [B_k, M] tensor or None) per set, got "
                         f"{len(target_weights)} for {len(ys)} sets")
    for k, (x, y) in enumerate(zip(xs, ys)):
        check_point_clouds(x, y, f"xs[{k}]", f"ys[{k}]")
        check_target_weights(None if target_weights is None else target_weights[k], y, f"target_weights[{k}]")
    eps = [as_eps(e, x.shape[0], x.device) for e, x in zip(eps, xs)]
    return _barycentric_projections(xs, ys, eps, n_iters, mask_diagonal, chunk_size, compile, cost=cost,
                                    target_weights=target_weights)


def _barycentric_projection(x: Tensor, y: Tensor, eps: Tensor, n_iters: int = DEFAULT_N_ITERS,
                            mask_diagonal: bool = False, chunk_size: int | None = None,
                            compile: bool | str = False, *, cost: str = "sq",
                            target_weights: Tensor | None = None) -> Tensor:
    """barycentric_projection for checked clouds and eps a valid fp32 tensor [B]."""
    return _barycentric_projections([x], [y], [eps], n_iters, mask_diagonal, chunk_size, compile, cost=cost,
                                    target_weights=None if target_weights is None else [target_weights])[0]


def _barycentric_projections(xs: Sequence[Tensor], ys: Sequence[Tensor], eps: Sequence[Tensor],
                             n_iters: int = DEFAULT_N_ITERS, mask_diagonal: bool = False,
                             chunk_size: int | None = None, compile: bool | str = False, *, cost: str = "sq",
                             target_weights: Sequence[Tensor | None] | None = None) -> list[Tensor]:
    """barycentric_projections for checked clouds, eps valid fp32 tensors [B_k] and target weights (None, or one
    [B_k, M] tensor or None per set, each row with a positive sum): no host synchronization."""
    with fp32_island(xs[0].device):
        logk, _, beta, q, _, ys, shifts, _, _ = _solve(xs, ys, eps, n_iters, mask_diagonal, chunk_size, compile,
                                                        keep_plan=True, cost=cost, target_weights=target_weights)
        if q is not None:  # the row-frame loop left the plan's rows in logk
            return _plan_from_rows(logk, q, ys, shifts)
        # Rows of the plan, normalized (= the final f-update): P_ij = softmax_j(logk_ij + beta_j). Computed in
        # place over logk (its last use), so P @ y is one GEMM per set and no second [B, N, M] buffer is needed.
        for bs, rs in _block_list(logk, chunk_size):
            blk = logk[bs, rs].add_(beta[bs, None, :])
            blk.sub_(blk.amax(dim=-1, keepdim=True)).exp_()
            blk.div_(blk.sum(dim=-1, keepdim=True))
        if len(ys) == 1:
            return [torch.bmm(logk, ys[0]).add_(shifts[0])]
        out, start = [], 0
        for y, shift in zip(ys, shifts):
            out.append(torch.bmm(logk[start : start + y.shape[0]], y).add_(shift))
            start += y.shape[0]
        return out
