"""Batched log-domain Sinkhorn for many small entropic OT problems at once (the "own" engine; gwf.ot conventions).

A fixed number of iterations from g = 0, as in the W-Flow code; f and the rows of the plan are recomputed from the
final g, so row marginals are exact. fp32, outside autocast, without autograd.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from gwf.constants import DEFAULT_N_ITERS

# Entries of the [B, N, M] matrix per chunk: 2^18 fp32 = 1 MiB, so a chunk and its temporaries stay in cache.
_CHUNK_ENTRIES = 1 << 18


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
    """eps as a detached fp32 tensor [B]; a float or a 0-d / [1] / [B] tensor. Raises unless eps > 0 and finite."""
    e = torch.as_tensor(eps, dtype=torch.float32, device=device).detach().reshape(-1)
    if e.numel() == 1:
        e = e.expand(batch_size)
    if e.shape != (batch_size,):
        raise ValueError(f"eps must be a float or a tensor of shape [B] = [{batch_size}], got {tuple(e.shape)}")
    if not bool(torch.isfinite(e).all()) or bool((e <= 0).any()):
        raise ValueError(f"eps must be finite and > 0, got {e.tolist() if e.numel() <= 8 else e}")
    return e.contiguous()


@contextmanager
def fp32_island(device: torch.device):
    """OT runs in fp32 without autograd, whatever the trainer's autocast/precision."""
    with torch.autocast(device_type=device.type, enabled=False), torch.no_grad():
        yield


def _blocks(batch: int, n: int, m: int, chunk_size: int | None) -> Iterator[tuple[slice, slice]]:
    """Blocks (problems, rows), each a contiguous view of [B, N, M] with about _CHUNK_ENTRIES entries.

    chunk_size = rows per block (None: automatic); a block holds several whole problems or rows of one problem.
    """
    rows = chunk_size if chunk_size is not None else max(1, _CHUNK_ENTRIES // max(m, 1))
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


def _log_kernel(x: Tensor, y: Tensor, eps: Tensor, mask_diagonal: bool, chunk_size: int | None) -> Tensor:
    """-C/eps [B, N, M] with C = ||x||^2/2 + ||y||^2/2 - <x, y> (one GEMM, clamped so C >= 0)."""
    hx = torch.linalg.vector_norm(x, dim=-1).square_().mul_(0.5)  # [B, N] (no [B, N, D] temporary)
    hy = torch.linalg.vector_norm(y, dim=-1).square_().mul_(0.5)  # [B, M]
    inv_eps = (1.0 / eps)[:, None, None]
    logk = torch.bmm(x, y.transpose(1, 2))  # [B, N, M] = <x_i, y_j>
    for bs, rs in _blocks(*logk.shape, chunk_size):
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


def _workspace(logk: Tensor, chunk_size: int | None) -> Tensor:
    """One flat buffer reused by every block of every sweep (as large as the largest block)."""
    blocks = _blocks(*logk.shape, chunk_size)
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
    blocks = list(_blocks(batch, n, m, chunk_size))
    work = _workspace(logk, chunk_size)
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


def _final_alpha(logk: Tensor, beta: Tensor, chunk_size: int | None) -> Tensor:
    work = _workspace(logk, chunk_size)
    alpha = torch.empty(logk.shape[:2], dtype=logk.dtype, device=logk.device)
    for bs, rs in _blocks(*logk.shape, chunk_size):
        blk = logk[bs, rs]
        buf = torch.add(blk, beta[bs, None, :], out=work[: blk.numel()].view(blk.shape))
        alpha[bs, rs] = math.log(logk.shape[2]) - _lse_(buf, dim=-1)
    return alpha


def _solve(x: Tensor, y: Tensor, eps: Tensor, n_iters: int, mask_diagonal: bool, chunk_size: int | None):
    """(logk, beta, y centred, shift) for checked clouds and eps [B]; checks the options."""
    if mask_diagonal:
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"mask_diagonal needs N == M (x and y the same batch), got N={x.shape[1]}, M={y.shape[1]}")
        if x.shape[1] < 2:
            raise ValueError("mask_diagonal needs at least 2 points per problem (a masked 1-point plan is empty)")
    if int(n_iters) < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    # The cost is translation invariant: centre both clouds on y's mean so that ||x||^2 + ||y||^2 - 2<x,y>
    # does not cancel catastrophically in fp32 for data far from the origin (e.g. latents with a large mean).
    x, y = x.detach().float(), y.detach().float()
    shift = y.mean(dim=1, keepdim=True)  # [B, 1, D]
    x, y = (x - shift).contiguous(), (y - shift).contiguous()
    logk = _log_kernel(x, y, eps, mask_diagonal, chunk_size)
    _, beta = _sinkhorn_loop(logk, int(n_iters), chunk_size)
    return logk, beta, y, shift


def sinkhorn_potentials(x: Tensor, y: Tensor, eps: float | Tensor, n_iters: int = DEFAULT_N_ITERS,
                        mask_diagonal: bool = False, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Entropic OT dual potentials f [B, N], g [B, M] (fp32, detached) for x [B, N, D], y [B, M, D].

    eps: float or [B] tensor (> 0). n_iters (f, g) updates, then f from the last g. mask_diagonal sets C_ii = +inf
    (N == M, x and y the same batch). chunk_size: rows per chunk of the sweeps (None: automatic; same results).
    """
    check_point_clouds(x, y)
    eps = as_eps(eps, x.shape[0], x.device)
    with fp32_island(x.device):
        logk, beta, _, _ = _solve(x, y, eps, n_iters, mask_diagonal, chunk_size)
        alpha = _final_alpha(logk, beta, chunk_size)
        return alpha * eps[:, None], beta * eps[:, None]


def barycentric_projection(x: Tensor, y: Tensor, eps: float | Tensor, n_iters: int = DEFAULT_N_ITERS,
                           mask_diagonal: bool = False, chunk_size: int | None = None) -> Tensor:
    """Entropic barycentric projection T [B, N, D] (fp32, detached) of x [B, N, D] onto y [B, M, D].

    Arguments as in sinkhorn_potentials; each T(x_i) is a convex combination of the y_j.
    """
    check_point_clouds(x, y)
    return _barycentric_projection(x, y, as_eps(eps, x.shape[0], x.device), n_iters, mask_diagonal, chunk_size)


def _barycentric_projection(x: Tensor, y: Tensor, eps: Tensor, n_iters: int = DEFAULT_N_ITERS,
                            mask_diagonal: bool = False, chunk_size: int | None = None) -> Tensor:
    """barycentric_projection for checked clouds and eps a valid fp32 tensor [B]."""
    with fp32_island(x.device):
        logk, beta, y, shift = _solve(x, y, eps, n_iters, mask_diagonal, chunk_size)
        # Rows of the plan, normalized (= the final f-update): P_ij = softmax_j(logk_ij + beta_j). Computed in
        # place over logk (its last use), so P @ y is one GEMM and no second [B, N, M] buffer is needed.
        for bs, rs in _blocks(*logk.shape, chunk_size):
            blk = logk[bs, rs].add_(beta[bs, None, :])
            blk.sub_(blk.amax(dim=-1, keepdim=True)).exp_()
            blk.div_(blk.sum(dim=-1, keepdim=True))
        return torch.bmm(logk, y).add_(shift)
