"""Sliced-Wasserstein objective: the exact 1-D W2 against POT's linear program, the Monte-Carlo SW2 against POT with the
same directions and against the closed form between isotropic Gaussians, the flow direction of its gradient, and
its randomness coming from the rng argument only."""

import gwf  # noqa: F401

import numpy as np
import ot
import pytest
import torch

from gwf.objectives import OBJECTIVES
from gwf.objectives.base import GenBatch, RealBatch
from gwf.objectives.sliced import random_directions, sliced_w2, w2_1d


@pytest.mark.parametrize("n,m", [(7, 5), (6, 6), (1, 4), (13, 29)])
def test_1d_w2_equals_the_linear_program(n, m):
    g = np.random.default_rng(n * 100 + m)
    u, v = g.normal(size=n), g.normal(size=m) + 0.7
    lp = ot.emd2(np.full(n, 1 / n), np.full(m, 1 / m), (u[:, None] - v[None]) ** 2)
    got = w2_1d(torch.tensor(u)[None, :, None], torch.tensor(v)[None, :, None])  # [1, 1]
    assert got.item() == pytest.approx(lp, rel=1e-10, abs=1e-12)


def test_sliced_w2_equals_pot_with_the_same_directions():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 5, generator=g, dtype=torch.float64)
    y = torch.randn(2, 25, 5, generator=g, dtype=torch.float64)
    theta = random_directions(16, 5, torch.Generator().manual_seed(1)).double()
    ours = sliced_w2(x, y, theta)  # [2]
    for b in range(2):  # POT returns SW_2 = sqrt(mean over directions of W_2^2)
        pot = ot.sliced_wasserstein_distance(x[b].numpy(), y[b].numpy(), projections=theta.T.numpy(), p=2)
        assert ours[b].sqrt().item() == pytest.approx(pot, rel=1e-9)


def test_sliced_w2_between_isotropic_gaussians_closed_form():
    """theta.X ~ N(theta.m, s^2) for X ~ N(m, s^2 I): SW_2^2 = E_theta (theta.dm)^2 + (s1 - s2)^2
    = |dm|^2 / D + (s1 - s2)^2. Directions in whole orthonormal bases make the mean of (theta.dm)^2 exact, so what
    remains is the sampling error of the 20,000 points."""
    d, n = 4, 20_000
    g = torch.Generator().manual_seed(2)
    m1, m2, s1, s2 = torch.zeros(d), torch.tensor([2.0, -1.0, 0.5, 0.0]), 1.0, 0.5
    x = (m1 + s1 * torch.randn(1, n, d, generator=g)).double()
    y = (m2 + s2 * torch.randn(1, n, d, generator=g)).double()
    bases = torch.linalg.qr(torch.randn(8, d, d, generator=g, dtype=torch.float64)).Q  # 8 random orthonormal bases
    expected = (m1 - m2).square().sum().item() / d + (s1 - s2) ** 2
    assert sliced_w2(x, y, bases.reshape(-1, d)).item() == pytest.approx(expected, rel=0.01)


def test_gradient_is_the_sliced_wasserstein_flow():
    """N = M: grad_{x_i} = (2 / (N P)) sum_theta (theta.x_i - theta.y_sigma(i)) theta, sigma the monotone matching."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, 9, 3, generator=g, dtype=torch.float64)
    theta = random_directions(5, 3, torch.Generator().manual_seed(5)).double()
    sliced_w2(x, y, theta).sum().backward()
    expected = torch.zeros(9, 3, dtype=torch.float64)
    for t in theta:
        px, py = x[0].detach() @ t, y[0] @ t
        matched = py.sort().values[px.argsort().argsort()]  # the y quantile of each x_i's rank
        expected += 2 / (9 * 5) * (px - matched)[:, None] * t
    torch.testing.assert_close(x.grad[0], expected, rtol=1e-10, atol=1e-12)


def test_directions_come_from_the_rng_argument_only():
    obj = OBJECTIVES["sw"](num_projections=8)
    g = torch.Generator().manual_seed(6)
    gen = GenBatch(torch.randn(2, 16, 3, generator=g), None, None, None)
    real = RealBatch(torch.randn(2, 20, 3, generator=g))

    def loss(seed):
        torch.manual_seed(seed * 7919)  # the global RNG must not matter
        return obj.generator_loss(gen, real, torch.Generator().manual_seed(seed))[0]

    assert torch.equal(loss(1), loss(1)) and not torch.equal(loss(1), loss(2))
    with pytest.raises(ValueError, match="num_projections"):
        OBJECTIVES["sw"](num_projections=0)
