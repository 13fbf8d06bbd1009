"""Kernels and MMD estimators against brute-force loops and closed forms (Gaussian-kernel MMD between Gaussians)."""

import math
import statistics

import pytest
import torch

from gwf.objectives.base import GenBatch, RealBatch
from gwf.objectives.kernels import KERNELS, make_kernel
from gwf.objectives.mmd import MMD, mmd2_biased, mmd2_unbiased

# (name, params, scalar k(x, y) as a function of r = ||x - y||); "median" bandwidths are resolved in the test
CASES = [
    ("gaussian", {"sigma": 0.7}, lambda r: math.exp(-r**2 / (2 * 0.7**2))),
    ("multi_gaussian", {"sigmas": (0.5, 2.0), "base": 1.5},
     lambda r: math.exp(-r**2 / (2 * 0.75**2)) + math.exp(-r**2 / (2 * 3.0**2))),
    ("imq", {"c": 1.3}, lambda r: 1.3 / math.sqrt(1.3**2 + r**2)),
    ("rational_quadratic", {"alpha": 0.8, "scale": 0.9}, lambda r: (1 + r**2 / (2 * 0.8 * 0.9**2)) ** -0.8),
    ("energy", {"beta": 1.0}, lambda r: -r),
    ("energy", {"beta": 1.5}, lambda r: -r**1.5),
]
PD_KERNELS = ["gaussian", "multi_gaussian", "imq", "rational_quadratic"]


def brute_gram(x, y, k):
    """[N, M] by a double loop over points, fp64."""
    return torch.tensor([[k(float(torch.linalg.vector_norm(a - b))) for b in y] for a in x], dtype=torch.float64)


@pytest.mark.parametrize("name,params,k", CASES)
def test_kernel_matches_double_loop(name, params, k):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 7, 3, generator=g) * 2 + 5, torch.randn(2, 5, 3, generator=g) * 2 + 5  # off-origin
    out = make_kernel(name, **params)(x, y)
    assert out.shape == (2, 7, 5)
    for b in range(2):
        torch.testing.assert_close(out[b].double(), brute_gram(x[b], y[b], k), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(make_kernel(name, **params)(x[0], y[0]), out[0])  # 2-D inputs: one problem


def test_median_heuristic_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(9, 2, generator=g)
    dists = [float(torch.linalg.vector_norm(x[i] - x[j])) for i in range(9) for j in range(i + 1, 9)]
    sigma = statistics.median_low(dists)  # torch.median returns the lower of the two middle values
    out = make_kernel("gaussian", sigma="median")(x, x)
    torch.testing.assert_close(out.double(), brute_gram(x, x, lambda r: math.exp(-r**2 / (2 * sigma**2))),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", PD_KERNELS)
def test_pd_kernels_have_psd_gram(name):
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    eig = torch.linalg.eigvalsh(make_kernel(name)(x, x))
    assert eig.min() >= -1e-6


def test_energy_kernel_is_conditionally_psd():
    """-||x - y|| is PSD on vectors summing to zero: H K H has no negative eigenvalue (H the centering matrix)."""
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    h = torch.eye(40, dtype=torch.float64) - 1.0 / 40
    eig = torch.linalg.eigvalsh(h @ make_kernel("energy")(x, x) @ h)
    assert eig.min() >= -1e-6


def test_unknown_kernel_and_parameter_raise():
    with pytest.raises(ValueError, match="gaussian.*imq|imq.*gaussian"):
        make_kernel("laplace")
    with pytest.raises(ValueError, match="sigma"):
        make_kernel("gaussian", c=1.0)
    with pytest.raises(ValueError, match="unknown kernel"):
        MMD("laplace")
    with pytest.raises(ValueError, match="beta"):
        make_kernel("energy", beta=2.0)(torch.zeros(2, 1), torch.zeros(2, 1))


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_mmd2_matches_double_loop(name):
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(32, 2, generator=g, dtype=torch.float64), torch.randn(24, 2, generator=g, dtype=torch.float64) + 0.5
    k = make_kernel(name)
    kxx, kyy, kxy = (k(a, b) for a, b in ((x, x), (y, y), (x, y)))
    if name != "gaussian":  # the default gaussian bandwidth is the median: pooled over x and y, checked below
        u = sum(kxx[i, j] for i in range(32) for j in range(32) if i != j) / (32 * 31) \
            + sum(kyy[i, j] for i in range(24) for j in range(24) if i != j) / (24 * 23) - 2 * kxy.mean()
        v = kxx.mean() + kyy.mean() - 2 * kxy.mean()
        torch.testing.assert_close(mmd2_unbiased(x, y, k), u, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(mmd2_biased(x, y, k), v, rtol=1e-9, atol=1e-12)
    # batched = per problem
    xb, yb = torch.stack([x, x + 1]), torch.stack([y, y * 2])
    torch.testing.assert_close(mmd2_unbiased(xb, yb, k)[1], mmd2_unbiased(x + 1, y * 2, k))


def test_median_bandwidth_is_shared_by_the_three_terms():
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(20, 2, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)
    z = torch.cat([x, y])
    dists = [float(torch.linalg.vector_norm(z[i] - z[j])) for i in range(36) for j in range(i + 1, 36)]
    sigma = statistics.median_low(dists)
    fixed = make_kernel("gaussian", sigma=sigma)
    torch.testing.assert_close(mmd2_unbiased(x, y, make_kernel("gaussian")), mmd2_unbiased(x, y, fixed))


def gaussian_mmd2(m1, s1, m2, s2, sigma, d):
    """MMD^2 between N(m1, s1^2 I_d) and N(m2, s2^2 I_d) with k = exp(-|x - y|^2 / (2 sigma^2)):
    for Z = X - Y ~ N(mu, v I),  E exp(-|Z|^2 / (2 sigma^2)) = (sigma^2 / (sigma^2 + v))^(d/2) exp(-|mu|^2 / (2 (sigma^2 + v)))."""
    def e(mu2, v):
        return (sigma**2 / (sigma**2 + v)) ** (d / 2) * math.exp(-mu2 / (2 * (sigma**2 + v)))
    mu2 = float(((m1 - m2) ** 2).sum())
    return e(0.0, 2 * s1**2) + e(0.0, 2 * s2**2) - 2 * e(mu2, s1**2 + s2**2)


CLOSED = dict(m1=torch.zeros(2, dtype=torch.float64), s1=1.0, m2=torch.tensor([1.0, 0.0], dtype=torch.float64),
              s2=1.5, sigma=1.2, d=2)


def sample(n_problems, n, seed):
    g = torch.Generator().manual_seed(seed)
    x = CLOSED["m1"] + CLOSED["s1"] * torch.randn(n_problems, n, 2, generator=g, dtype=torch.float64)
    y = CLOSED["m2"] + CLOSED["s2"] * torch.randn(n_problems, n, 2, generator=g, dtype=torch.float64)
    return x, y


def test_gaussian_mmd2_between_gaussians_closed_form():
    """8 problems of 1500 + 1500 samples: the mean of the unbiased estimates is within 4 standard errors."""
    exact = gaussian_mmd2(**CLOSED)  # ~0.0836
    est = mmd2_unbiased(*sample(8, 1500, 6), make_kernel("gaussian", sigma=CLOSED["sigma"]))
    se = est.std() / math.sqrt(len(est))
    assert abs(est.mean() - exact) < 4 * se + 1e-4, (est.mean(), exact, se)
    assert abs(est.mean() - exact) < 0.01  # and the Monte Carlo error itself is small


def test_unbiased_estimator_is_unbiased_and_biased_one_is_not():
    """4000 repeats of n = 6: U-statistic mean within 4 standard errors of the closed form; the V-statistic is off
    by its known bias (E k(x, x) - E k(x, x')) / n for each sample (1 - E k) / n > 20 standard errors here."""
    exact = gaussian_mmd2(**CLOSED)
    x, y = sample(4000, 6, 7)
    k = make_kernel("gaussian", sigma=CLOSED["sigma"])
    u, v = mmd2_unbiased(x, y, k), mmd2_biased(x, y, k)
    se_u, se_v = u.std() / math.sqrt(4000), v.std() / math.sqrt(4000)
    assert abs(u.mean() - exact) < 4 * se_u, (u.mean(), exact, se_u)
    assert v.mean() - exact > 20 * se_v, (v.mean(), exact, se_v)
    d, s, s1, s2 = CLOSED["d"], CLOSED["sigma"], CLOSED["s1"], CLOSED["s2"]
    bias = (1 - (s**2 / (s**2 + 2 * s1**2)) ** (d / 2)) / 6 + (1 - (s**2 / (s**2 + 2 * s2**2)) ** (d / 2)) / 6
    assert abs(v.mean() - u.mean() - bias) < 4 * se_v


def test_energy_kernel_mmd2_is_the_energy_distance():
    g = torch.Generator().manual_seed(8)
    x, y = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(12, 3, generator=g, dtype=torch.float64) + 1

    def mean_dist(a, b, skip_diag):
        pairs = [(i, j) for i in range(len(a)) for j in range(len(b)) if not (skip_diag and i == j)]
        return sum(float(torch.linalg.vector_norm(a[i] - b[j])) for i, j in pairs) / len(pairs)

    energy_u = 2 * mean_dist(x, y, False) - mean_dist(x, x, True) - mean_dist(y, y, True)
    energy_v = 2 * mean_dist(x, y, False) - mean_dist(x, x, False) - mean_dist(y, y, False)
    k = make_kernel("energy", beta=1.0)
    assert float(mmd2_unbiased(x, y, k)) == pytest.approx(energy_u, rel=1e-9, abs=1e-9)
    assert float(mmd2_biased(x, y, k)) == pytest.approx(energy_v, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("name", sorted(KERNELS))
@pytest.mark.parametrize("degenerate", ["same_batch", "one_point"])
def test_mmd_generator_gradient_is_finite_on_identical_points(name, degenerate):
    g = torch.Generator().manual_seed(9)
    pos = torch.randn(2, 8, 1, 2, 2, generator=g)
    if degenerate == "one_point":
        pos = pos[:, :1].expand(-1, 8, -1, -1, -1).clone()
    x = pos.clone().requires_grad_(True)
    loss, logs = MMD(name).generator_loss(GenBatch(x, None, None, lambda: pos), RealBatch(pos), torch.Generator())
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert set(logs) == {"mmd2"}


def test_mmd_objective_kernel_params_and_descent():
    """Config form (kernel_params dict) equals keyword form; a gradient step on x lowers MMD^2."""
    g = torch.Generator().manual_seed(10)
    pos, x0 = torch.randn(3, 32, 2, generator=g) + 2, torch.randn(3, 32, 2, generator=g)
    a, b = MMD("imq", kernel_params={"c": 2.0}), MMD("imq", c=2.0)
    x = x0.clone().requires_grad_(True)
    loss_a, _ = a.generator_loss(GenBatch(x, None, None, None), RealBatch(pos), torch.Generator())
    loss_b, _ = b.generator_loss(GenBatch(x, None, None, None), RealBatch(pos), torch.Generator())
    torch.testing.assert_close(loss_a, loss_b)
    torch.testing.assert_close(loss_a, mmd2_unbiased(x0, pos, make_kernel("imq", c=2.0)).mean())
    loss_a.backward()
    loss_after, _ = a.generator_loss(GenBatch(x.detach() - 10.0 * x.grad, None, None, None), RealBatch(pos),
                                     torch.Generator())
    assert loss_after < loss_a


@pytest.mark.parametrize("name,params", [(name, params) for name, params, _ in CASES] + [("gaussian", {})])
def test_evaluation_in_row_blocks_equals_the_differentiable_path_bit_for_bit(name, params, monkeypatch):
    """Without autograd, one problem's kernel is computed BLOCK_ROWS rows at a time (kernels._kernel_in_blocks, the
    evaluator's MMD); with autograd (training) on the whole matrix. Same values to the last bit, x against y and x
    against itself, for sizes that are no multiple of the block or of a SIMD width, in fp32 and fp64, and the same
    unbiased MMD^2; a median bandwidth (the default of "gaussian") needs the whole matrix and takes the other path."""
    import gwf.objectives.kernels as kernels

    blocked_calls = []
    real = kernels._kernel_in_blocks
    monkeypatch.setattr(kernels, "_kernel_in_blocks", lambda *a: blocked_calls.append(1) or real(*a))
    k, g = make_kernel(name, **params), torch.Generator().manual_seed(3)
    for n, m, dtype in [(300, 211, torch.float32), (2 * kernels.BLOCK_ROWS + 5, 70, torch.float64)]:
        x = torch.randn(n, 2, generator=g, dtype=dtype) * 2 + 1
        y = torch.randn(m, 2, generator=g, dtype=dtype)
        xg, yg = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
        for fast, whole in ((k(x, y), k(xg, yg)), (k(x, x), k(xg, xg)),
                            (mmd2_unbiased(x, y, k), mmd2_unbiased(xg, y, k))):
            assert fast.dtype == dtype and torch.equal(fast, whole.detach())
    median = name == "gaussian" and "sigma" not in params
    assert len(blocked_calls) == (0 if median else 6)  # k(x, y), k(x, x) and the MMD's pooled kernel, two sizes
