"""Batched log-domain Sinkhorn for many small entropic OT problems at once (the "own" engine).

Conventions (shared by every engine in gwf.ot):
- cost C(x, y) = ||x - y||^2 / 2 (geomloss's p = 2 cost), uniform weights a_i = 1/N, b_j = 1/M;
- OT_eps(a, b) = min_pi <pi, C> + eps KL(pi | a (x) b), so geomloss's blur = sqrt(eps);
- potentials (f, g) in cost units: pi_ij = a_i b_j exp((f_i + g_j - C_ij) / eps), OT_eps = <a, f> + <b, g>;
- barycentric projection T_{a->b}(x_i) = E_pi[y | x_i] = sum_j pi_ij y_j / a_i.

Fixed number of iterations (no stopping test), as in the W-Flow code: one iteration = an f-update then a
g-update, starting from g = 0; the returned f (and the rows of the plan used for T) are recomputed from the
final g, so row marginals are exact (the same "final extrapolation" as geomloss, and the official code's
division by the row mass). All work is fp32, outside autocast, without autograd.

Cost: one GEMM for the cost matrix (stored once as the log-kernel -C/eps, 4 bytes per entry: B*N*M*4 bytes),
one sweep over it per iteration (the row and column log-sum-exps are fused in the same pass over a chunk of
rows, so the chunk is read from memory once), one GEMM for P @ y. Temporaries are bounded by the chunk size.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import Tensor

from gwf.constants import DEFAULT_N_ITERS  # W-Flow's sinkhorn_num_iter default

# Entries of the [B, N, M] matrix processed per chunk: 2^18 fp32 = 1 MiB, so a chunk and its log-sum-exp
# temporaries stay in the L2/L3 cache (measured ~3-4x faster than one pass over the whole matrix).
_CHUNK_ENTRIES = 1 << 18


# ----------------------------------------------------------------------------------------------------------
# Input checks and the fp32 island
# ----------------------------------------------------------------------------------------------------------


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
    """OT runs in fp32 without autograd, whatever the trainer's autocast/precision (DESIGN sec. 4)."""
    with torch.autocast(device_type=device.type, enabled=False), torch.no_grad():
        yield


# ----------------------------------------------------------------------------------------------------------
# Chunking
# ----------------------------------------------------------------------------------------------------------


def _blocks(batch: int, n: int, m: int, chunk_size: int | None) -> Iterator[tuple[slice, slice]]:
    """Blocks (problems, rows) tiling [B, N, M] with about _CHUNK_ENTRIES entries each.

    chunk_size = rows per block (None: automatic). When it covers whole problems, several problems share a
    block; otherwise each block is a range of rows of one problem. Every block is a contiguous view of [B, N, M].
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


# ----------------------------------------------------------------------------------------------------------
# Core
# ----------------------------------------------------------------------------------------------------------


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
    """log-sum-exp of `buf` along `dim`, computed in place in `buf` (destroyed).

    torch.logsumexp allocates chunk-sized temporaries on every call; large fresh allocations are page-faulted in
    by the kernel each time (measured: most of the wall time went to system time at N = 1024).
    """
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
    One sweep per iteration: each row chunk gets its new alpha (from the old beta) and, while it is in
    cache, contributes its partial column log-sum-exp to the new beta (standard alternating Sinkhorn).
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


def _prepare(x: Tensor, y: Tensor, eps, mask_diagonal: bool, n_iters: int):
    check_point_clouds(x, y)
    if mask_diagonal:
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"mask_diagonal needs N == M (x and y the same batch), got N={x.shape[1]}, M={y.shape[1]}")
        if x.shape[1] < 2:
            raise ValueError("mask_diagonal needs at least 2 points per problem (a masked 1-point plan is empty)")
    if int(n_iters) < 1:
        raise ValueError(f"n_iters must be >= 1, got {n_iters}")
    eps = as_eps(eps, x.shape[0], x.device)
    x = x.detach().float()
    y = y.detach().float()
    # The cost is translation invariant: centre both clouds on y's mean so that ||x||^2 + ||y||^2 - 2<x,y>
    # does not cancel catastrophically in fp32 for data far from the origin (e.g. latents with a large mean).
    shift = y.mean(dim=1, keepdim=True)  # [B, 1, D]
    return (x - shift).contiguous(), (y - shift).contiguous(), shift, eps


def sinkhorn_potentials(
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    n_iters: int = DEFAULT_N_ITERS,
    mask_diagonal: bool = False,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Entropic OT dual potentials for B independent problems, fixed number of iterations.

    Args:
        x: [B, N, D] source points (weights 1/N), any float dtype; detached.
        y: [B, M, D] target points (weights 1/M).
        eps: float or [B] tensor, entropic regularization (> 0), in cost units (cost ||x - y||^2 / 2).
        n_iters: number of (f, g) updates; f is then recomputed from the last g (exact row marginals).
        mask_diagonal: set C_ii = +inf (needs N == M, x and y the same batch): Drifting-style self mask.
        chunk_size: rows per chunk of the [B, N, M] sweeps (None: automatic). Does not change results.

    Returns:
        f [B, N], g [B, M] (fp32, detached) with pi_ij = exp((f_i + g_j - C_ij) / eps) / (N M) and
        OT_eps = mean(f) + mean(g) at convergence.
    """
    with fp32_island(x.device):
        x, y, _, eps = _prepare(x, y, eps, mask_diagonal, n_iters)
        logk = _log_kernel(x, y, eps, mask_diagonal, chunk_size)
        _, beta = _sinkhorn_loop(logk, int(n_iters), chunk_size)
        alpha = _final_alpha(logk, beta, chunk_size)
        return alpha * eps[:, None], beta * eps[:, None]


def barycentric_projection(
    x: Tensor,
    y: Tensor,
    eps: float | Tensor,
    n_iters: int = DEFAULT_N_ITERS,
    mask_diagonal: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """Entropic barycentric projection T_{x->y}(x_i) = sum_j pi_ij y_j / a_i for B problems at once.

    Args:
        x: [B, N, D] source points (any float dtype, detached). y: [B, M, D] target points.
        eps: float or [B] tensor (> 0), cost units (cost ||x - y||^2 / 2).
        n_iters, mask_diagonal, chunk_size: as in sinkhorn_potentials.

    Returns:
        T [B, N, D], fp32, detached: each T(x_i) is a convex combination of the y_j.
    """
    with fp32_island(x.device):
        x, y, shift, eps = _prepare(x, y, eps, mask_diagonal, n_iters)
        logk = _log_kernel(x, y, eps, mask_diagonal, chunk_size)
        _, beta = _sinkhorn_loop(logk, int(n_iters), chunk_size)
        # Rows of the plan, normalized (= the final f-update): P_ij = softmax_j(logk_ij + beta_j). Computed in
        # place over logk (its last use), so P @ y is one GEMM and no second [B, N, M] buffer is needed.
        for bs, rs in _blocks(*logk.shape, chunk_size):
            blk = logk[bs, rs].add_(beta[bs, None, :])
            blk.sub_(blk.amax(dim=-1, keepdim=True)).exp_()
            blk.div_(blk.sum(dim=-1, keepdim=True))
        return torch.bmm(logk, y).add_(shift)
