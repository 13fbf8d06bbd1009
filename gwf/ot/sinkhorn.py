"""Batched log-domain Sinkhorn for many small entropic OT problems at once (the "own" engine; gwf.ot conventions).

A fixed number of iterations from g = 0, as in the W-Flow code; f and the rows of the plan are recomputed from the
final g, so row marginals are exact. fp32, outside autocast, without autograd, with fp32 matmuls. Several sets of
problems that share N and M (feature sets of different dimensions) go through one loop: each set builds its own
log-kernel -C/eps (its own GEMM) into one [sum B_k, N, M] buffer, and projects onto its own targets at the end.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor

from gwf.constants import DEFAULT_N_ITERS

# Entries of the [B, N, M] matrix per chunk of a sweep. CPU: 2^18 fp32 = 1 MiB, so a chunk and its temporaries stay
# in cache (3-4x faster than whole-matrix passes). Other devices: a memory budget for the one reused workspace
# (2^28 fp32 = 1 GiB), i.e. one chunk, and so the fewest kernel launches, for the recipes' problems.
_CHUNK_ENTRIES = 1 << 18
_DEVICE_CHUNK_ENTRIES = 1 << 28


def chunk_entries(device: torch.device) -> int:
    """Entries of the [B, N, M] matrix per chunk of a sweep on ``device`` (a cache size on CPU, a memory budget
    elsewhere)."""
    return _CHUNK_ENTRIES if device.type == "cpu" else _DEVICE_CHUNK_ENTRIES


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


def _log_kernels(xs: Sequence[Tensor], ys: Sequence[Tensor], eps: Tensor, mask_diagonal: bool,
                 chunk_size: int | None) -> Tensor:
    """-C/eps [sum B_k, N, M] of the sets (x_k [B_k, N, D_k], y_k [B_k, M, D_k]), eps [sum B_k]; each set one GEMM
    <x_i, y_j> into its rows, then C = ||x||^2/2 + ||y||^2/2 - <x, y> (clamped so C >= 0) in one sweep."""
    hx = [torch.linalg.vector_norm(x, dim=-1) for x in xs]  # [B_k, N] (no [B, N, D] temporary)
    hy = [torch.linalg.vector_norm(y, dim=-1) for y in ys]  # [B_k, M]
    hx = (hx[0] if len(xs) == 1 else torch.cat(hx)).square_().mul_(0.5)
    hy = (hy[0] if len(ys) == 1 else torch.cat(hy)).square_().mul_(0.5)
    inv_eps = (1.0 / eps)[:, None, None]
    if len(xs) == 1:
        logk = torch.bmm(xs[0], ys[0].transpose(1, 2))  # [B, N, M] = <x_i, y_j>
    else:
        logk = xs[0].new_empty(eps.shape[0], xs[0].shape[1], ys[0].shape[1])
        start = 0
        for x, y in zip(xs, ys):
            torch.bmm(x, y.transpose(1, 2), out=logk[start : start + x.shape[0]])
            start += x.shape[0]
    for bs, rs in _block_list(logk, chunk_size):
        blk = logk[bs, rs]  # a view: in-place ops write into logk
        blk.sub_(hx[bs, rs, None]).sub_(hy[bs, None, :]).clamp_(max=0.0).mul_(inv_eps[bs])
    if mask_diagonal:  # Drifting-style self-pair mask: C_ii = +inf
        logk.diagonal(dim1=1, dim2=2).fill_(-math.inf)
    return logk


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


def _sinkhorn_loop(logk: Tensor, n_iters: int, chunk_size: int | None) -> tuple[Tensor, Tensor]:
    """Scaled potentials (alpha, beta) = (f/eps, g/eps) after n_iters (f, g) updates from g = 0.

    alpha_i = log M - LSE_j(logk_ij + beta_j),   beta_j = log N - LSE_i(logk_ij + alpha_i).
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
    return alpha, beta


def _lse(t: Tensor, dim: int) -> Tensor:
    m = t.amax(dim=dim, keepdim=True).clamp(min=torch.finfo(t.dtype).min)  # all -inf slices: see _lse_
    return (t - m).exp().sum(dim).log() + m.squeeze(dim)


def _iteration(logk: Tensor, beta: Tensor, log_n: float, log_m: float) -> tuple[Tensor, Tensor]:
    """One (f, g) update on the whole matrix, for torch.compile: each log-sum-exp becomes one fused kernel."""
    alpha = log_m - _lse(logk + beta[:, None, :], 2)
    return alpha, log_n - _lse(logk + alpha[:, :, None], 1)


_COMPILED: dict[str, object] = {}


def _compiled_iteration():
    """``_iteration`` compiled once per process, with dynamic shapes (one compilation serves every B, N, M)."""
    if "iteration" not in _COMPILED:
        _COMPILED["iteration"] = torch.compile(_iteration, dynamic=True)
    return _COMPILED["iteration"]


def _sinkhorn_loop_compiled(logk: Tensor, n_iters: int) -> tuple[Tensor, Tensor]:
    """_sinkhorn_loop's iterations through the compiled ``_iteration`` (same V within fp32 rounding)."""
    batch, n, m = logk.shape
    step = _compiled_iteration()
    alpha, beta = logk.new_zeros(batch, n), logk.new_zeros(batch, m)
    for _ in range(n_iters):
        alpha, beta = step(logk, beta, math.log(n), math.log(m))
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
        if n != m:
            raise ValueError(f"mask_diagonal needs N == M (x and y the same batch), got N={n}, M={m}")
        if n < 2:
            raise ValueError("mask_diagonal needs at least 2 points per problem (a masked 1-point plan is empty)")
    if int(n_iters) < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")


def _solve(xs: Sequence[Tensor], ys: Sequence[Tensor], eps: Sequence[Tensor], n_iters: int, mask_diagonal: bool,
           chunk_size: int | None, compile: bool = False):
    """(logk, beta, centred y_k, shifts) of checked sets, eps_k [B_k]; logk and beta stack the sets' problems."""
    _check_options(xs, ys, n_iters, mask_diagonal)
    # The cost is translation invariant: centre both clouds on y's mean so that ||x||^2 + ||y||^2 - 2<x,y>
    # does not cancel catastrophically in fp32 for data far from the origin (e.g. latents with a large mean).
    cx, cy, shifts = [], [], []
    for x, y in zip(xs, ys):
        x, y = x.detach().float(), y.detach().float()
        shift = y.mean(dim=1, keepdim=True)  # [B, 1, D]
        cx.append((x - shift).contiguous())
        cy.append((y - shift).contiguous())
        shifts.append(shift)
    eps = eps[0] if len(eps) == 1 else torch.cat(list(eps))
    logk = _log_kernels(cx, cy, eps, mask_diagonal, chunk_size)
    if compile:
        _, beta = _sinkhorn_loop_compiled(logk, int(n_iters))
    else:
        _, beta = _sinkhorn_loop(logk, int(n_iters), chunk_size)
    return logk, beta, cy, shifts


def sinkhorn_potentials(x: Tensor, y: Tensor, eps: float | Tensor, n_iters: int = DEFAULT_N_ITERS,
                        mask_diagonal: bool = False, chunk_size: int | None = None,
                        compile: bool = False) -> tuple[Tensor, Tensor]:
    """Entropic OT dual potentials f [B, N], g [B, M] (fp32, detached) for x [B, N, D], y [B, M, D].

    eps: float or [B] tensor (> 0). n_iters (f, g) updates, then f from the last g. mask_diagonal sets C_ii = +inf
    (N == M, x and y the same batch). chunk_size: rows per chunk of the sweeps (None: automatic; same results).
    compile: run the iterations through torch.compile (same results within fp32 rounding).
    """
    check_point_clouds(x, y)
    eps = as_eps(eps, x.shape[0], x.device)
    with fp32_island(x.device):
        logk, beta, _, _ = _solve([x], [y], [eps], n_iters, mask_diagonal, chunk_size, compile)
        alpha = _final_alpha(logk, beta, chunk_size)
        return alpha * eps[:, None], beta * eps[:, None]


def barycentric_projection(x: Tensor, y: Tensor, eps: float | Tensor, n_iters: int = DEFAULT_N_ITERS,
                           mask_diagonal: bool = False, chunk_size: int | None = None,
                           compile: bool = False) -> Tensor:
    """Entropic barycentric projection T [B, N, D] (fp32, detached) of x [B, N, D] onto y [B, M, D].

    Arguments as in sinkhorn_potentials; each T(x_i) is a convex combination of the y_j.
    """
    check_point_clouds(x, y)
    return _barycentric_projection(x, y, as_eps(eps, x.shape[0], x.device), n_iters, mask_diagonal, chunk_size,
                                   compile)


def barycentric_projections(xs: Sequence[Tensor], ys: Sequence[Tensor], eps: Sequence[float | Tensor],
                            n_iters: int = DEFAULT_N_ITERS, mask_diagonal: bool = False,
                            chunk_size: int | None = None, compile: bool = False) -> list[Tensor]:
    """barycentric_projection of several sets of problems in one Sinkhorn loop: x_k [B_k, N, D_k] onto
    y_k [B_k, M, D_k] with eps_k (float or [B_k]); N and M shared by every set, B_k and D_k free. Same T_k as one
    call per set (bitwise on CPU where the kernels' arithmetic does not depend on the batch)."""
    if not len(xs) == len(ys) == len(eps) > 0:
        raise ValueError(f"need as many x, y and eps sets (>= 1), got {len(xs)}, {len(ys)}, {len(eps)}")
    for k, (x, y) in enumerate(zip(xs, ys)):
        check_point_clouds(x, y, f"xs[{k}]", f"ys[{k}]")
    eps = [as_eps(e, x.shape[0], x.device) for e, x in zip(eps, xs)]
    return _barycentric_projections(xs, ys, eps, n_iters, mask_diagonal, chunk_size, compile)


def _barycentric_projection(x: Tensor, y: Tensor, eps: Tensor, n_iters: int = DEFAULT_N_ITERS,
                            mask_diagonal: bool = False, chunk_size: int | None = None,
                            compile: bool = False) -> Tensor:
    """barycentric_projection for checked clouds and eps a valid fp32 tensor [B]."""
    return _barycentric_projections([x], [y], [eps], n_iters, mask_diagonal, chunk_size, compile)[0]


def _barycentric_projections(xs: Sequence[Tensor], ys: Sequence[Tensor], eps: Sequence[Tensor],
                             n_iters: int = DEFAULT_N_ITERS, mask_diagonal: bool = False,
                             chunk_size: int | None = None, compile: bool = False) -> list[Tensor]:
    """barycentric_projections for checked clouds and eps valid fp32 tensors [B_k]: no host synchronization."""
    with fp32_island(xs[0].device):
        logk, beta, ys, shifts = _solve(xs, ys, eps, n_iters, mask_diagonal, chunk_size, compile)
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
