"""Entropic OT engines (gwf.ot.sinkhorn, gwf.ot.geomloss_engine) and closed forms (gwf.ot.gaussian).

References: POT (float64, converged log-domain Sinkhorn), exact OT (ot.emd2), the Bures formula and the entropic
OT closed form between Gaussians (Janati et al. 2020) on fine quantile discretizations.
Convention everywhere: cost ||x - y||^2 / 2, uniform weights, eps KL(pi | a (x) b).
"""

import gwf  # noqa: F401  (first: torchvision workaround)

import contextlib
import math

import numpy as np
import ot
import pytest
import torch
from scipy.stats import norm

from gwf.ot import ENGINES, barycentric_projection, barycentric_projection_geomloss, sinkhorn_potentials
from gwf.ot.sinkhorn import _log_kernels, _log_target_weights, _sinkhorn_loop, _sinkhorn_loop_compiled, log_domain_loop
from gwf.ot.gaussian import (
    bures_w2_squared,
    entropic_barycentric_map_gaussians,
    entropic_ot_gaussians,
    sqrtm_psd,
)


def _problems(seed=0, batch=3, n=24, m=31, d=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d, generator=g)
    y = 1.3 * torch.randn(batch, m, d, generator=g) + 0.7
    return x, y


def _pot_plan(x, y, eps, cost_kind="sq", weights=None, diagonal=0.0):
    """Converged float64 entropic plan from POT for cost ||x - y||^2 / 2 ("sq") or ||x - y|| ("l2"), reg eps (KL to
    a (x) b); b uniform or ``weights`` normalized; ``diagonal`` added to C_ii for i < N (a prohibitive cost: the
    self-pair mask)."""
    x, y = x.double().numpy(), y.double().numpy()
    dist = np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1))
    cost = 0.5 * dist**2 if cost_kind == "sq" else dist
    cost = cost + diagonal * np.eye(len(x), len(y))
    a = np.full(len(x), 1 / len(x))
    b = np.full(len(y), 1 / len(y)) if weights is None else weights.double().numpy()
    b = b / b.sum()  # in float64: POT's stopping test needs marginals of equal mass
    live = b > 0  # POT on the targets of positive weight (log 0 stalls its loop); no mass on the others
    plan = np.zeros((len(x), len(y)))
    plan[:, live] = ot.sinkhorn(a, b[live], cost[:, live], eps, method="sinkhorn_log", numItermax=100_000,
                                stopThr=1e-13)
    b = np.where(live, b, 1.0)  # in the KL term below, 0 log(0 / 0) = 0
    value = (plan * cost).sum() + eps * (plan * np.log(np.maximum(plan, 1e-300) / np.outer(a, b))).sum()
    return plan, cost, value


def _quantiles(k):
    """Quantile discretization of N(0, 1) with k equal-weight points, rescaled to unit variance."""
    q = norm.ppf((np.arange(k) + 0.5) / k)
    return torch.tensor(q / q.std(), dtype=torch.float64)


# --------------------------------------------------------------------------------------------------------
# Against POT
# --------------------------------------------------------------------------------------------------------


def test_own_engine_matches_pot_projection_potentials_and_value():
    x, y = _problems()
    eps = torch.tensor([0.2, 0.6, 1.5])  # one eps per problem
    t = barycentric_projection(x, y, eps, n_iters=1000)
    f, g = sinkhorn_potentials(x, y, eps, n_iters=1000)
    for b in range(x.shape[0]):
        plan, cost, value = _pot_plan(x[b], y[b], float(eps[b]))
        t_ref = x.shape[1] * plan @ y[b].double().numpy()  # sum_j pi_ij y_j / a_i
        np.testing.assert_allclose(t[b].numpy(), t_ref, atol=2e-5)
        # the plan rebuilt from our potentials, pi_ij = a_i b_j exp((f_i + g_j - C_ij) / eps)
        rebuilt = np.exp((f[b].double().numpy()[:, None] + g[b].double().numpy()[None] - cost) / float(eps[b]))
        np.testing.assert_allclose(rebuilt / (x.shape[1] * y.shape[1]), plan, atol=1e-6, rtol=1e-3)
        # OT_eps = <a, f> + <b, g> = <pi, C> + eps KL(pi | a (x) b)
        assert float(f[b].mean() + g[b].mean()) == pytest.approx(value, rel=1e-5)


@pytest.mark.parametrize("loop", ["row_frame", "log_domain"])
@pytest.mark.parametrize("cost", ["sq", "l2"])
@pytest.mark.parametrize("weighted", [False, True])
def test_cost_and_target_marginal_match_pot(cost, weighted, loop):
    """cost ||x - y|| (the official use_quadratic_cost=False) and a non-uniform target marginal (the official
    target_weights, normalized per problem; one target of weight 0) against POT in float64: T = N pi y, and the plan
    rebuilt from the potentials, pi_ij = a_i b_j exp((f_i + g_j - C_ij) / eps). Both forms of the loop."""
    x, y = _problems(seed=12, batch=3, n=14, m=19, d=3)
    eps = torch.tensor([0.25, 0.7, 1.6])
    g = torch.Generator().manual_seed(13)
    w = 0.1 + 3 * torch.rand(3, 19, generator=g) if weighted else None
    if weighted:
        w[1, 4] = 0.0
    with log_domain_loop() if loop == "log_domain" else contextlib.nullcontext():
        t = barycentric_projection(x, y, eps, n_iters=1500, cost=cost, target_weights=w)
        f, gg = sinkhorn_potentials(x, y, eps, n_iters=1500, cost=cost, target_weights=w)
    for b in range(3):
        plan, c, value = _pot_plan(x[b], y[b], float(eps[b]), cost, None if w is None else w[b])
        np.testing.assert_allclose(t[b].numpy(), x.shape[1] * plan @ y[b].double().numpy(), atol=2e-5)
        bw = np.full(19, 1 / 19) if w is None else w[b].double().numpy() / w[b].double().sum().item()
        rebuilt = bw[None] / x.shape[1] * np.exp((f[b].double().numpy()[:, None] + gg[b].double().numpy()[None] - c)
                                                 / float(eps[b]))
        np.testing.assert_allclose(rebuilt, plan, atol=1e-6, rtol=1e-3)
        if w is None or b != 1:
            assert float(f[b].mean() + (torch.tensor(bw) * gg[b].double()).sum()) == pytest.approx(value, rel=1e-5)
    if weighted:  # the target of weight 0 takes no mass: T is the projection onto the other 18 points
        keep = [j for j in range(19) if j != 4]
        alone = barycentric_projection(x[1:2], y[1:2, keep], eps[1:2], n_iters=1500, cost=cost,
                                       target_weights=w[1:2, keep])
        torch.testing.assert_close(t[1:2], alone, atol=2e-6, rtol=0)
        assert float(gg[1, 4]) == 0.0  # its potential does not enter the plan


@pytest.mark.parametrize("cost", ["sq", "l2"])
def test_self_mask_of_a_union_target_matches_pot(cost):
    """mask_diagonal with M > N (the targets [x, other points], as distribution guidance's masked self term): C_ii
    = +inf for i < N only, against POT with a prohibitive cost on those entries; weighted targets."""
    g = torch.Generator().manual_seed(14)
    x, extra = torch.randn(2, 10, 4, generator=g), torch.randn(2, 6, 4, generator=g) + 0.5
    y = torch.cat([x, extra], 1)
    w = torch.cat([torch.ones(2, 10), torch.full((2, 6), 2.5)], 1)
    eps = 0.6
    t = barycentric_projection(x, y, eps, n_iters=1500, mask_diagonal=True, cost=cost, target_weights=w)
    for b in range(2):
        plan, _, _ = _pot_plan(x[b], y[b], eps, cost, w[b], diagonal=1e4)
        np.testing.assert_allclose(t[b].numpy(), x.shape[1] * plan @ y[b].double().numpy(), atol=2e-5)


def test_compiled_loop_with_target_weights():
    """The compiled iteration with target weights (method.compile) gives the eager log-domain loop's potentials."""
    x, y = _problems(seed=15, batch=2, n=12, m=9, d=3)
    eps = torch.tensor([0.5, 1.0])
    w = [torch.rand(2, 9, generator=torch.Generator().manual_seed(16)) + 0.2]
    logk = _log_kernels([x - y.mean(1, keepdim=True)], [y - y.mean(1, keepdim=True)], eps, False, "l2")
    log_w = _log_target_weights(w, [y])
    a_eager, b_eager = _sinkhorn_loop(logk, 30, None, log_w)
    a_comp, b_comp = _sinkhorn_loop_compiled(logk, 30, log_w)
    torch.testing.assert_close(a_comp, a_eager, atol=2e-5, rtol=0)
    torch.testing.assert_close(b_comp, b_eager, atol=2e-5, rtol=0)


def test_target_weights_and_cost_errors():
    x, y = torch.randn(2, 8, 3), torch.randn(2, 9, 3)
    for project in (barycentric_projection, barycentric_projection_geomloss):
        with pytest.raises(ValueError, match=r"shape \[B, M\]"):
            project(x, y, 1.0, target_weights=torch.ones(2, 8))
        with pytest.raises(ValueError, match=">= 0"):
            project(x, y, 1.0, target_weights=-torch.ones(2, 9))
        with pytest.raises(ValueError, match="positive sum"):
            project(x, y, 1.0, target_weights=torch.zeros(2, 9))
        with pytest.raises(ValueError, match="unknown cost"):
            project(x, y, 1.0, cost="l1")
    with pytest.raises(ValueError, match="quadratic cost only"):
        barycentric_projection_geomloss(x, y, 1.0, cost="l2")


def test_geomloss_engine_matches_pot_projection():
    # geomloss anneals eps and stops with one update at the target eps: its error shrinks like (1 - scaling).
    x, y = _problems(seed=1, batch=2, n=20, m=17, d=2)
    eps = 0.5
    t = barycentric_projection_geomloss(x, y, eps, scaling=0.999)
    for b in range(x.shape[0]):
        plan, _, _ = _pot_plan(x[b], y[b], eps)
        t_ref = x.shape[1] * plan @ y[b].double().numpy()
        disp = np.sqrt(((t_ref - x[b].numpy()) ** 2).sum(-1).mean())
        err = np.sqrt(((t[b].numpy() - t_ref) ** 2).sum(-1).mean())
        assert err < 5e-3 * disp, (err, disp)
    # a non-uniform target marginal (geomloss's weights; a target of weight 0)
    w = torch.rand(2, 17, generator=torch.Generator().manual_seed(1)) + 0.1
    w[0, 2] = 0.0
    t = barycentric_projection_geomloss(x, y, eps, scaling=0.999, target_weights=w)
    for b in range(x.shape[0]):
        plan, _, _ = _pot_plan(x[b], y[b], eps, weights=w[b])
        t_ref = x.shape[1] * plan @ y[b].double().numpy()
        disp = np.sqrt(((t_ref - x[b].numpy()) ** 2).sum(-1).mean())
        err = np.sqrt(((t[b].numpy() - t_ref) ** 2).sum(-1).mean())
        assert err < 5e-3 * disp, (err, disp)


def test_brute_force_numpy_loop_on_one_problem():
    """Plain textbook Sinkhorn (numpy, float64, explicit loops over the rows) = own engine."""
    x, y = _problems(seed=2, batch=1, n=12, m=9, d=4)
    eps = 0.8
    xs, ys = x[0].double().numpy(), y[0].double().numpy()
    n, m = len(xs), len(ys)
    cost = np.array([[0.5 * np.sum((xs[i] - ys[j]) ** 2) for j in range(m)] for i in range(n)])
    kernel = np.exp(-cost / eps)
    u, v = np.ones(n), np.ones(m)
    for _ in range(5000):
        u = (1 / n) / (kernel @ v)
        v = (1 / m) / (kernel.T @ u)
    plan = u[:, None] * kernel * v[None]
    t_ref = np.array([sum(plan[i, j] * ys[j] for j in range(m)) * n for i in range(n)])
    np.testing.assert_allclose(barycentric_projection(x, y, eps, n_iters=500)[0].numpy(), t_ref, atol=2e-5)


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_batched_equals_per_problem(engine):
    x, y = _problems(seed=3, batch=3, n=16, m=16, d=5)
    eps = torch.tensor([0.5, 2.0, 4.0])
    batched = ENGINES[engine](x, y, eps, n_iters=50)
    for b in range(3):
        single = ENGINES[engine](x[b : b + 1], y[b : b + 1], eps[b : b + 1], n_iters=50)
        torch.testing.assert_close(batched[b : b + 1], single, atol=1e-5, rtol=1e-5)


def test_geomloss_engine_solves_each_problem_independently():
    # geomloss's batched mode would share one annealing schedule started from the whole batch's diameter, so a
    # problem's answer would depend on its batchmates: here a far-away second problem must not change the first.
    x, y = _problems(seed=4, batch=2, n=16, m=12, d=3)
    x[1], y[1] = 30 * x[1], 30 * y[1]
    out = barycentric_projection_geomloss(x, y, 0.5, scaling=0.9)
    torch.testing.assert_close(out[:1], barycentric_projection_geomloss(x[:1], y[:1], 0.5, scaling=0.9),
                               atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------------------
# Chunking, masking, numerics
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 40, 10**9])
def test_chunked_equals_unchunked(chunk_size):
    x, y = _problems(seed=5, batch=3, n=40, m=33, d=6)
    eps = torch.tensor([0.3, 1.0, 3.0])
    ref = barycentric_projection(x, y, eps, n_iters=30, chunk_size=10**9)
    torch.testing.assert_close(barycentric_projection(x, y, eps, n_iters=30, chunk_size=chunk_size), ref,
                               atol=1e-5, rtol=1e-5)
    f_ref, g_ref = sinkhorn_potentials(x, y, eps, n_iters=30, chunk_size=10**9)
    f, g = sinkhorn_potentials(x, y, eps, n_iters=30, chunk_size=chunk_size)
    torch.testing.assert_close(f, f_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    # masked self problems: a one-row chunk has an all-masked column (must not give NaN)
    masked_ref = barycentric_projection(x, x, eps, n_iters=30, mask_diagonal=True, chunk_size=10**9)
    masked = barycentric_projection(x, x, eps, n_iters=30, mask_diagonal=True, chunk_size=chunk_size)
    torch.testing.assert_close(masked, masked_ref, atol=1e-5, rtol=1e-5)


def test_mask_diagonal_self_plan_has_no_diagonal_mass():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 32, 8, generator=g)
    eps = 0.8  # W-Flow's 0.05 x mean squared distance (= 2 D = 16)
    f, gg = sinkhorn_potentials(x, x, eps, n_iters=500, mask_diagonal=True)
    cost = 0.5 * torch.cdist(x.double(), x.double()) ** 2
    n = x.shape[1]
    plan = torch.exp((f.double()[:, :, None] + gg.double()[:, None, :] - cost) / eps) / n**2
    eye = torch.eye(n, dtype=torch.bool)
    off = plan.masked_fill(eye, 0.0)
    # all the mass sits off the diagonal: marginals of the off-diagonal part alone are uniform
    torch.testing.assert_close(off.sum(2), torch.full((2, n), 1 / n, dtype=torch.float64), atol=1e-6, rtol=0)
    torch.testing.assert_close(off.sum(1), torch.full((2, n), 1 / n, dtype=torch.float64), atol=1e-6, rtol=0)
    # ... and T matches POT with a prohibitive diagonal cost
    t = barycentric_projection(x, x, eps, n_iters=500, mask_diagonal=True)
    for b in range(2):
        xs = x[b].double().numpy()
        c = 0.5 * ((xs[:, None] - xs[None]) ** 2).sum(-1) + 1e4 * np.eye(n)
        a = np.full(n, 1 / n)
        p = ot.sinkhorn(a, a, c, eps, method="sinkhorn_log", numItermax=100_000, stopThr=1e-13)
        np.testing.assert_allclose(t[b].numpy(), n * p @ xs, atol=2e-5)
    # without the mask the self plan of this 8-D cloud is nearly diagonal (why the mask exists)
    f0, g0 = sinkhorn_potentials(x, x, eps, n_iters=500)
    plan0 = torch.exp((f0.double()[:, :, None] + g0.double()[:, None, :] - cost) / eps) / n**2
    assert plan0.diagonal(dim1=1, dim2=2).sum(1).min() > 0.5


def test_far_from_origin_data_keeps_fp32_accuracy():
    # ||x||^2 + ||y||^2 - 2<x, y> would cancel catastrophically at |mean| = 1e3; centring avoids it.
    x, y = _problems(seed=7, batch=1, n=20, m=20, d=3)
    eps = 0.5
    ref = barycentric_projection(x, y, eps, n_iters=200)
    shifted = barycentric_projection(x + 1e3, y + 1e3, eps, n_iters=200) - 1e3
    torch.testing.assert_close(shifted, ref, atol=2e-3, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_runs_in_fp32(dtype):
    x, y = _problems(seed=8, batch=2, n=16, m=16, d=4)
    x, y = x.to(dtype), y.to(dtype)
    for engine in ENGINES.values():
        out = engine(x, y, 1.0, n_iters=50)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, engine(x.float(), y.float(), 1.0, n_iters=50), atol=1e-6, rtol=0)
    ref = barycentric_projection(x.float(), y.float(), 1.0, n_iters=50)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = barycentric_projection(x, y, 1.0, n_iters=50)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_degenerate_inputs_stay_finite():
    y = torch.randn(2, 5, 3)
    same = torch.ones(2, 6, 3)
    # identical sources: the plan is uniform, T = mean(y) for every x_i (up to fp32 rounding of C/eps ~ 1e3)
    t = barycentric_projection(same, y, 1e-3, n_iters=10)
    torch.testing.assert_close(t, y.mean(1, keepdim=True).expand_as(t), atol=1e-3, rtol=0)
    # identical sources and targets, tiny eps
    assert torch.isfinite(barycentric_projection(same, same, 1e-12, n_iters=10)).all()
    assert torch.isfinite(barycentric_projection(same, same, 1e-12, n_iters=10, mask_diagonal=True)).all()
    # one point per problem: T(x) = y
    x1, y1 = torch.randn(3, 1, 4), torch.randn(3, 1, 4)
    for engine in ENGINES.values():
        torch.testing.assert_close(engine(x1, y1, 0.1, n_iters=5), y1, atol=1e-5, rtol=0)
    f, g = sinkhorn_potentials(x1, y1, 0.1, n_iters=5)
    torch.testing.assert_close(f + g, 0.5 * (x1 - y1).square().sum(-1), atol=1e-4, rtol=1e-5)


def test_outputs_are_detached():
    x = torch.randn(1, 8, 2, requires_grad=True)
    y = torch.randn(1, 8, 2)
    for engine in ENGINES.values():
        assert not engine(x, y, 1.0, n_iters=5).requires_grad
    assert not any(t.requires_grad for t in sinkhorn_potentials(x, y, 1.0, n_iters=5))


# --------------------------------------------------------------------------------------------------------
# Closed forms between Gaussians
# --------------------------------------------------------------------------------------------------------


def test_entropic_closed_form_1d_against_sinkhorn_on_quantiles():
    """Janati et al. 2020 in gwf's convention (cost |x-y|^2/2, eps KL), 1-D: value and affine map."""
    q = _quantiles(512)
    s1, s2, m2 = torch.tensor([1.0, 1.0]), torch.tensor([2.0, 0.5]), torch.tensor([0.5, 0.0])
    eps = torch.tensor([0.3, 1.0])
    x = (s1[:, None] * q[None])[..., None].float()  # [2, 512, 1]
    y = (s2[:, None] * q[None] + m2[:, None])[..., None].float()
    f, g = sinkhorn_potentials(x, y, eps, n_iters=300)
    t = barycentric_projection(x, y, eps, n_iters=300)
    for b in range(2):
        args = (torch.zeros(1), s1[b].reshape(1, 1) ** 2, m2[b].reshape(1), s2[b].reshape(1, 1) ** 2, float(eps[b]))
        ref = entropic_ot_gaussians(*args)
        assert float(f[b].mean() + g[b].mean()) == pytest.approx(float(ref), rel=3e-4)
        slope, offset = entropic_barycentric_map_gaussians(*args)
        design = torch.stack([x[b, :, 0].double(), torch.ones(512, dtype=torch.float64)], 1)
        fit = torch.linalg.lstsq(design, t[b].double()).solution[:, 0]
        assert float(fit[0]) == pytest.approx(float(slope), rel=5e-4)
        assert float(fit[1]) == pytest.approx(float(offset), abs=1e-4)


def test_entropic_closed_form_2d_correlated_against_sinkhorn_on_quantile_grid():
    """Non-commuting covariances: checks the matrix formula (D_eps, cross-covariance) too."""
    q = _quantiles(24)
    grid = torch.stack(torch.meshgrid(q, q, indexing="ij"), -1).reshape(-1, 2)  # 576 points, mean 0, cov I
    s1 = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    s2 = torch.tensor([[0.8, -0.2], [-0.2, 1.2]], dtype=torch.float64)
    m1, m2 = torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([1.0, -0.5], dtype=torch.float64)
    x, y = grid @ sqrtm_psd(s1) + m1, grid @ sqrtm_psd(s2) + m2
    eps = torch.tensor([0.25, 1.0])
    xb, yb = x.float().expand(2, -1, -1), y.float().expand(2, -1, -1)
    f, g = sinkhorn_potentials(xb, yb, eps, n_iters=300)
    t = barycentric_projection(xb, yb, eps, n_iters=300)
    design = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    for b in range(2):
        ref = entropic_ot_gaussians(m1, s1, m2, s2, float(eps[b]))
        assert float(f[b].mean() + g[b].mean()) == pytest.approx(float(ref), rel=5e-3)
        slope, offset = entropic_barycentric_map_gaussians(m1, s1, m2, s2, float(eps[b]))
        fit = torch.linalg.lstsq(design, t[b].double()).solution  # [3, 2]
        torch.testing.assert_close(fit[:2].T, slope, atol=8e-3, rtol=0)
        torch.testing.assert_close(fit[2], offset, atol=8e-3, rtol=0)


def test_bures_against_exact_ot_and_entropic_limit():
    q = _quantiles(16)
    grid = torch.stack(torch.meshgrid(q, q, indexing="ij"), -1).reshape(-1, 2)
    s1 = torch.tensor([[1.0, 0.3], [0.3, 0.5]], dtype=torch.float64)
    s2 = torch.tensor([[0.8, -0.2], [-0.2, 1.2]], dtype=torch.float64)
    m1, m2 = torch.tensor([0.0, 0.0], dtype=torch.float64), torch.tensor([1.0, -0.5], dtype=torch.float64)
    x, y = (grid @ sqrtm_psd(s1) + m1).numpy(), (grid @ sqrtm_psd(s2) + m2).numpy()
    w = np.full(len(x), 1 / len(x))
    exact = ot.emd2(w, w, ((x[:, None] - y[None]) ** 2).sum(-1))  # W2^2 for the cost ||x - y||^2
    bures = float(bures_w2_squared(m1, s1, m2, s2))
    assert exact == pytest.approx(bures, rel=1e-4)
    # gwf's OT_eps (cost |x-y|^2/2) tends to W2^2 / 2 as eps -> 0, like eps log(1/eps)
    assert float(entropic_ot_gaussians(m1, s1, m2, s2, 1e-6)) == pytest.approx(bures / 2, abs=1e-4)
    # commuting 1-D sanity check: W2^2 = (m1 - m2)^2 + (s1 - s2)^2
    one = float(bures_w2_squared(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-1.0]),
                                 torch.tensor([[9.0]])))
    assert one == pytest.approx(4.0 + 1.0, rel=1e-12)


# --------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_bad_input_raises_clear_errors(engine):
    project = ENGINES[engine]
    x, y = torch.randn(2, 8, 3), torch.randn(2, 9, 3)
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        project(x[0], y, 1.0)
    with pytest.raises(ValueError, match="share B"):
        project(x, torch.randn(2, 9, 4), 1.0)
    with pytest.raises(ValueError, match="share B"):
        project(x, torch.randn(3, 9, 3), 1.0)
    for bad in (0.0, -1.0, math.nan, torch.tensor([1.0, 0.0])):
        with pytest.raises(ValueError, match="eps"):
            project(x, y, bad)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        project(x, y, torch.ones(3))
    with pytest.raises(ValueError):
        project(y, x, 1.0, mask_diagonal=True)  # M < N (own) / unsupported (geomloss)


def test_mask_and_iteration_errors():
    x = torch.randn(2, 8, 3)
    with pytest.raises(ValueError, match="use engine='own'"):
        barycentric_projection_geomloss(x, x, 1.0, mask_diagonal=True)
    with pytest.raises(ValueError, match="M >= N"):
        barycentric_projection(x, torch.randn(2, 7, 3), 1.0, mask_diagonal=True)
    with pytest.raises(ValueError, match="at least 2 points"):
        barycentric_projection(x[:, :1], x[:, :1], 1.0, mask_diagonal=True)
    with pytest.raises(ValueError, match="n_iters"):
        barycentric_projection(x, x, 1.0, n_iters=0)
    with pytest.raises(ValueError, match="floating"):
        barycentric_projection(x.long(), x, 1.0)
