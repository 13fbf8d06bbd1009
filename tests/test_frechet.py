"""Frechet distance against closed forms: FD = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})."""

import numpy as np
import pytest
import scipy.linalg
import torch

import gwf  # noqa: F401
from gwf.eval.frechet import feature_statistics, frechet_distance


def _commuting_closed_form(mu1, mu2, a, b):
    """S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T commute: Tr(S1 + S2 - 2 (S1 S2)^{1/2}) = sum (sqrt a - sqrt b)^2."""
    return float(((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum())


def _random_spd(rng, F, cond=10.0):
    q, _ = np.linalg.qr(rng.standard_normal((F, F)))
    return (q * np.geomspace(1.0, 1.0 / cond, F)) @ q.T


def test_one_dimensional_gaussians():
    # N(1, 2^2) vs N(-2, 0.5^2): (1 + 2)^2 + (2 - 0.5)^2 = 11.25
    assert frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([-2.0]), np.array([[0.25]])) == pytest.approx(
        11.25, rel=1e-12
    )


def test_diagonal_covariances():
    rng = np.random.default_rng(0)
    mu1, mu2, a, b = rng.standard_normal(8), rng.standard_normal(8), rng.uniform(0.1, 3, 8), rng.uniform(0.1, 3, 8)
    fd = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert fd == pytest.approx(_commuting_closed_form(mu1, mu2, a, b), rel=1e-12)


def test_commuting_covariances():
    rng = np.random.default_rng(1)
    F = 12
    q, _ = np.linalg.qr(rng.standard_normal((F, F)))
    a, b = rng.uniform(0.01, 5, F), rng.uniform(0.01, 5, F)
    mu1, mu2 = rng.standard_normal(F), rng.standard_normal(F)
    fd = frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
    assert fd == pytest.approx(_commuting_closed_form(mu1, mu2, a, b), rel=1e-10)


def test_general_covariances_match_scipy_sqrtm():
    rng = np.random.default_rng(2)
    F = 32
    s1, s2 = _random_spd(rng, F), _random_spd(rng, F, cond=100.0)
    mu1, mu2 = rng.standard_normal(F), rng.standard_normal(F)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(reference, rel=1e-9)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(reference, rel=1e-9)  # symmetric


def test_singular_covariances_closed_form():
    # rank-deficient covariances (dead features): the closed form still holds, no offset needed
    a, b = np.array([2.0, 0.5, 0.0, 0.0]), np.array([1.0, 0.0, 3.0, 0.0])
    mu = np.zeros(4)
    assert frechet_distance(mu, np.diag(a), mu, np.diag(b)) == pytest.approx(_commuting_closed_form(mu, mu, a, b))
    # fewer samples than features: the empirical covariance has rank 4 of 16
    feats = np.random.default_rng(3).standard_normal((5, 16))
    assert frechet_distance(*feature_statistics(feats), *feature_statistics(feats)) == pytest.approx(0.0, abs=1e-9)


def test_statistics_and_self_distance():
    feats = torch.randn(500, 10, generator=torch.Generator().manual_seed(0)) * 3 + 1
    mu, sigma = feature_statistics(feats)
    assert mu.dtype == np.float64 and sigma.shape == (10, 10)
    np.testing.assert_allclose(mu, feats.double().mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(feats.double().numpy(), rowvar=False), rtol=1e-12)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-9)


def test_sample_estimate_approaches_closed_form():
    rng = np.random.default_rng(4)
    a, b = np.array([1.0, 4.0, 0.25]), np.array([2.0, 1.0, 1.0])
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([0.5, 0.0, 0.0])
    x1 = mu1 + np.sqrt(a) * rng.standard_normal((200_000, 3))
    x2 = mu2 + np.sqrt(b) * rng.standard_normal((200_000, 3))
    fd = frechet_distance(*feature_statistics(x1), *feature_statistics(x2))
    assert fd == pytest.approx(_commuting_closed_form(mu1, mu2, a, b), rel=0.02)  # 3.67; sampling error ~1% at N = 200k


def test_bad_inputs():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="non-finite"):
        frechet_distance(np.zeros(2), np.eye(2) * np.nan, np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 3)))
