"""W-Flow velocity field (gwf.ot.velocity): identities, estimator physics, guidance, numerics, errors."""

import gwf  # noqa: F401  (first: torchvision workaround)

import functools
import math

import geomloss
import pytest
import torch

import gwf.ot
from gwf.constants import DEFAULT_EPS_REL
from gwf.ot import (
    ENGINES,
    barycentric_projection,
    barycentric_projection_geomloss,
    relative_eps,
    sinkhorn_velocity,
)


def _clouds(seed, batch, n, d, k=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n, d, generator=g) for _ in range(k)]


def _radial(v, x):
    """mean_i <V(x_i), x_i - mean(x)> / mean_i ||x_i - mean(x)||^2, averaged over problems: > 0 = expansion."""
    xc = x - x.mean(1, keepdim=True)
    return float(((v * xc).sum(-1).mean(1) / xc.square().sum(-1).mean(1)).mean())


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# --------------------------------------------------------------------------------------------------------
# The velocity identity and the engines
# --------------------------------------------------------------------------------------------------------


def test_velocity_equals_geomloss_gradient_identity():
    """V = N (grad_x OT_eps(x, x') - grad_x OT_eps(x, y)) (geomloss, debias=False) = T_{x->y} - T_{x->x'}.

    geomloss stops its eps-annealing with one update at the target eps, so its error is O(1 - scaling):
    relative error < 3e-3 at scaling = 0.999 (measured 8.5e-4), and 10x smaller than at scaling = 0.99.
    """
    x, pos, neg = _clouds(0, 1, 64, 16)
    pos = 1.3 * pos + 0.5
    eps = float(relative_eps(x, [x, neg, pos]))
    v_own = barycentric_projection(x, pos, eps, n_iters=300) - barycentric_projection(x, neg, eps, n_iters=300)

    def v_geomloss(scaling):
        loss = geomloss.SamplesLoss("sinkhorn", p=2, blur=math.sqrt(eps), debias=False, backend="tensorized",
                                    scaling=scaling)
        xg = x[0].clone().requires_grad_(True)
        (grad_self,) = torch.autograd.grad(loss(xg, neg[0]), xg)
        (grad_pos,) = torch.autograd.grad(loss(xg, pos[0]), xg)
        return x.shape[1] * (grad_self - grad_pos)[None]

    err_fine, err_coarse = _rel(v_geomloss(0.999), v_own), _rel(v_geomloss(0.99), v_own)
    assert err_fine < 3e-3
    assert err_fine < err_coarse / 4


def test_velocity_engines_agree(monkeypatch):
    monkeypatch.setitem(gwf.ot.ENGINES, "geomloss", functools.partial(barycentric_projection_geomloss,
                                                                      scaling=0.999))
    x, pos, neg = _clouds(1, 2, 48, 8)
    v_own, info_own = sinkhorn_velocity(x, pos + 1.0, neg, n_iters=200, rms_normalize=False)
    v_geo, info_geo = sinkhorn_velocity(x, pos + 1.0, neg, engine="geomloss", rms_normalize=False)
    torch.testing.assert_close(info_own["eps"], info_geo["eps"])
    assert _rel(v_geo, v_own) < 3e-3


def test_relative_eps_matches_brute_force_per_problem():
    x, pos, neg = _clouds(2, 3, 20, 5)
    pos[1] *= 10.0  # problems get their own eps
    eps = relative_eps(x, [x, neg, pos], 0.05)
    for b in range(3):
        targets = torch.cat([x[b], neg[b], pos[b]]).double()
        brute = (torch.cdist(x[b].double(), targets) ** 2).mean()
        assert float(eps[b]) == pytest.approx(0.05 * float(brute), rel=1e-5)
    _, info = sinkhorn_velocity(x, pos, neg, n_iters=5)  # the velocity uses the official target set [x, q', p]
    torch.testing.assert_close(info["eps"], relative_eps(x, [x, neg, pos], DEFAULT_EPS_REL))
    assert not eps.requires_grad


def test_scale_equivariance_and_rms_normalization():
    x, pos, neg = _clouds(3, 2, 32, 6)
    v, info = sinkhorn_velocity(x, pos + 0.5, neg, rms_normalize=False, n_iters=50)
    c = 7.0
    v_c, info_c = sinkhorn_velocity(c * x, c * (pos + 0.5), c * neg, rms_normalize=False, n_iters=50)
    torch.testing.assert_close(v_c, c * v, atol=1e-4, rtol=1e-4)  # eps ~ scale^2: the field is equivariant
    torch.testing.assert_close(info_c["eps"], c**2 * info["eps"], rtol=1e-5, atol=0)
    v_n, info_n = sinkhorn_velocity(x, pos + 0.5, neg, n_iters=50)
    torch.testing.assert_close(v_n.square().mean(dim=(1, 2)).sqrt(), torch.ones(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(info_n["v_rms"], v.square().mean(dim=(1, 2)).sqrt())
    torch.testing.assert_close(v_n * info_n["v_rms"][:, None, None], v, atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------
# Estimators: the single batch loses the repulsion, two batches keep it (measured)
# --------------------------------------------------------------------------------------------------------


def test_at_equilibrium_two_batch_is_stationary_and_single_batch_collapses():
    """q = p (x, pos, neg i.i.d. N(0, I_8)): the exact flow is at rest.

    The two-batch (and masked) field has no net radial component, while the single-batch one contracts every
    particle towards the mean (measured radial rate ~ -0.34 here, against |.| < 0.01 for the others).
    """
    x, pos, neg = _clouds(4, 16, 64, 8)
    rates = {}
    for estimator in ("two_batch", "single", "masked"):
        v, _ = sinkhorn_velocity(x, pos, neg if estimator == "two_batch" else None, estimator=estimator,
                                 rms_normalize=False, n_iters=50)
        rates[estimator] = _radial(v, x)
    assert abs(rates["two_batch"]) < 0.03, rates
    assert abs(rates["masked"]) < 0.03, rates
    assert rates["single"] < -0.25, rates


def test_two_batch_self_term_repels_and_single_batch_self_term_does_not():
    """The self term x - T_{q->q'}(x) is the repulsion. With an independent q' it pushes particles apart as much
    as T_{q->p} pulls them in (radial rate ~ +0.42 vs -0.42); with q' = x the self plan is nearly diagonal and
    only ~17% of the repulsion is left."""
    x, pos, neg = _clouds(5, 16, 64, 8)
    eps = relative_eps(x, [x, neg, pos])
    attraction = _radial(barycentric_projection(x, pos, eps, n_iters=50) - x, x)
    repulsion_two = _radial(x - barycentric_projection(x, neg, eps, n_iters=50), x)
    repulsion_single = _radial(x - barycentric_projection(x, x, eps, n_iters=50), x)
    assert repulsion_two > 0.3
    assert repulsion_two == pytest.approx(-attraction, abs=0.03)
    assert repulsion_single < 0.25 * repulsion_two


# --------------------------------------------------------------------------------------------------------
# Velocity guidance (W-Flow Eq. 16)
# --------------------------------------------------------------------------------------------------------


def test_guidance_zero_weight_and_linearity():
    x, pos, neg, uncond = _clouds(6, 2, 24, 4, k=4)
    pos = pos + 1.0
    kw = dict(rms_normalize=False, n_iters=60)
    v0, info0 = sinkhorn_velocity(x, pos, neg, **kw)
    vw0, _ = sinkhorn_velocity(x, pos, neg, uncond=uncond, guidance_w=0.0, **kw)
    torch.testing.assert_close(vw0, v0, atol=1e-6, rtol=0)
    w = torch.tensor([0.5, 3.0])
    v1, _ = sinkhorn_velocity(x, pos, neg, uncond=uncond, guidance_w=torch.ones(2), **kw)
    vw, info = sinkhorn_velocity(x, pos, neg, uncond=uncond, guidance_w=w, **kw)
    torch.testing.assert_close(vw - v0, w[:, None, None] * (v1 - v0), atol=1e-5, rtol=1e-5)
    # the guidance direction is T_{q->p(c)} - T_{q->p(empty)}, with the problem's eps
    eps = info0["eps"]
    direction = barycentric_projection(x, pos, eps, n_iters=60) - barycentric_projection(x, uncond, eps, n_iters=60)
    torch.testing.assert_close(v1 - v0, direction, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(info["eps"], eps)  # uncond does not change eps


def test_guidance_broadcasts_a_shared_unconditional_batch():
    x, pos, neg, uncond = _clouds(7, 3, 16, 4, k=4)
    shared = uncond[0, :10]  # [U, D]
    v_shared, _ = sinkhorn_velocity(x, pos, neg, uncond=shared, guidance_w=2.0, n_iters=30)
    v_expanded, _ = sinkhorn_velocity(x, pos, neg, uncond=shared.expand(3, 10, 4), guidance_w=2.0, n_iters=30)
    torch.testing.assert_close(v_shared, v_expanded)


# --------------------------------------------------------------------------------------------------------
# Numerics
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_degenerate_inputs_stay_finite(engine):
    same = torch.ones(2, 6, 3)
    v, info = sinkhorn_velocity(same, same, same, engine=engine, n_iters=5)
    assert torch.isfinite(v).all() and torch.isfinite(info["eps"]).all() and (info["eps"] > 0).all()
    torch.testing.assert_close(v, torch.zeros_like(v))
    # identical generated points, spread positives
    x = torch.zeros(2, 8, 3)
    pos, neg = torch.randn(2, 8, 3), torch.zeros(2, 8, 3)
    v, _ = sinkhorn_velocity(x, pos, neg, engine=engine, n_iters=20, rms_normalize=False)
    torch.testing.assert_close(v, pos.mean(1, keepdim=True).expand_as(v), atol=1e-3, rtol=0)
    # one point per problem: V = pos - neg (two batches), pos - x (single batch)
    x1, p1, n1 = _clouds(8, 3, 1, 4)
    v, _ = sinkhorn_velocity(x1, p1, n1, engine=engine, n_iters=5, rms_normalize=False)
    torch.testing.assert_close(v, p1 - n1, atol=1e-5, rtol=0)
    v, _ = sinkhorn_velocity(x1, p1, engine=engine, estimator="single", n_iters=5, rms_normalize=False)
    torch.testing.assert_close(v, p1 - x1, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_and_autocast_give_fp32(dtype):
    x, pos, neg = (t.to(dtype) for t in _clouds(9, 2, 16, 4))
    ref, _ = sinkhorn_velocity(x.float(), pos.float(), neg.float(), n_iters=20)
    v, info = sinkhorn_velocity(x, pos, neg, n_iters=20)
    assert v.dtype == torch.float32 and info["eps"].dtype == torch.float32
    torch.testing.assert_close(v, ref, atol=1e-5, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v_ac, _ = sinkhorn_velocity(x.float(), pos.float(), neg.float(), n_iters=20)
    assert v_ac.dtype == torch.float32
    torch.testing.assert_close(v_ac, ref, atol=1e-5, rtol=0)


def test_generator_output_is_detached():
    x, pos, neg = _clouds(10, 1, 8, 2)
    x = x.requires_grad_(True)
    v, info = sinkhorn_velocity(x * 2.0, pos, neg, n_iters=5)
    assert not v.requires_grad and not any(t.requires_grad for t in info.values())
    # the W-Flow loss: ||x - stopgrad(x + V)||^2 has gradient -2 V / (N D) with respect to x
    target = (x * 2.0).detach() + v
    loss = ((x * 2.0) - target).square().mean()
    (grad,) = torch.autograd.grad(loss, x)
    torch.testing.assert_close(grad, -2.0 * 2.0 * v / v.numel())


# --------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------


def test_bad_input_raises_clear_errors():
    x, pos, neg = _clouds(11, 2, 8, 3)
    with pytest.raises(ValueError, match=r"valid engines: \['geomloss', 'own'\]"):
        sinkhorn_velocity(x, pos, neg, engine="keops")
    with pytest.raises(ValueError, match=r"valid estimators: \['two_batch', 'single', 'masked'\]"):
        sinkhorn_velocity(x, pos, neg, estimator="debiased")
    with pytest.raises(ValueError, match="needs neg"):
        sinkhorn_velocity(x, pos)
    with pytest.raises(ValueError, match="engine='own'"):
        sinkhorn_velocity(x, pos, estimator="masked", engine="geomloss")
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        sinkhorn_velocity(x[0], pos, neg)
    with pytest.raises(ValueError, match="share B"):
        sinkhorn_velocity(x, pos[..., :2], neg)
    with pytest.raises(ValueError, match="share B"):
        sinkhorn_velocity(x, pos, neg[:1])
    with pytest.raises(ValueError, match="eps_rel"):
        sinkhorn_velocity(x, pos, neg, eps_rel=0.0)
    with pytest.raises(ValueError, match="both uncond and guidance_w"):
        sinkhorn_velocity(x, pos, neg, uncond=pos)
    with pytest.raises(ValueError, match="guidance_w"):
        sinkhorn_velocity(x, pos, neg, uncond=pos, guidance_w=torch.ones(3))
    with pytest.raises(ValueError, match="at least 2 points"):
        sinkhorn_velocity(x[:, :1], pos, estimator="masked")


def test_eps_rel_list_is_the_sum_of_single_eps_fields():
    """method.eps_rel=[a, b] (the official R_list): the field is the sum of the unit-RMS fields at a and at b, and its
    loss gradient is that sum; a list needs rms_normalize."""
    from gwf.objectives.base import GenBatch, RealBatch
    from gwf.objectives.wflow import WFlow

    g = torch.Generator().manual_seed(3)
    x, pos, neg = (torch.randn(2, 24, 3, generator=g) for _ in range(3))
    gen = GenBatch(x, None, None, sample=lambda: neg)
    refs = {"pos": [pos], "neg": [neg]}
    both = WFlow(eps_rel=[0.02, 0.2])._fields([x], refs, gen)[0]
    single = [WFlow(eps_rel=e)._fields([x], refs, gen)[0] for e in (0.02, 0.2)]
    torch.testing.assert_close(both[0], single[0][0] + single[1][0])
    torch.testing.assert_close(both[2], single[0][2])  # the scale's targets do not depend on eps
    assert float(both[1]["eps"].mean()) == pytest.approx(float((single[0][1]["eps"] + single[1][1]["eps"]).mean()) / 2)
    xg = x.clone().requires_grad_(True)
    loss, _ = WFlow(eps_rel=[0.02, 0.2]).generator_loss(GenBatch(xg, None, None, sample=lambda: neg),
                                                        RealBatch(pos), torch.Generator())
    (grad,) = torch.autograd.grad(loss, xg)
    torch.testing.assert_close(grad, -2 * both[0] / x[0].numel() / 2, rtol=1e-5, atol=1e-7)  # mean over 2 problems
    with pytest.raises(ValueError, match="rms_normalize"):
        WFlow(eps_rel=[0.02, 0.2], rms_normalize=False)
    with pytest.raises(ValueError, match="eps_rel must be > 0"):
        WFlow(eps_rel=[0.02, -1.0])


@pytest.mark.parametrize("n_iters", [0, 0.5])
def test_partial_iterations_are_the_mmd_and_kl_kernel_flows(n_iters):
    """n_iters=0 (MMD-like): V = eps grad_x (mean_j k(x, p_j) - mean_j k(x, q'_j)), the Gaussian-kernel MMD flow;
    n_iters=0.5 (KL-like): V = eps grad_x (log mean_j k(x, p_j) - log mean_j k(x, q'_j)), the KL flow between kernel
    density estimates; k = exp(-||x - y||^2 / (2 eps)), checked by autograd of the closed forms."""
    g = torch.Generator().manual_seed(11)
    x, pos = torch.randn(2, 20, 3, generator=g), torch.randn(2, 16, 3, generator=g) + 0.5
    neg = torch.randn(2, 18, 3, generator=g)
    v, info = sinkhorn_velocity(x, pos, neg, n_iters=n_iters, rms_normalize=False)
    eps = info["eps"].double()[:, None, None]
    xd = x.double().requires_grad_(True)

    def kde(y):  # [B, N]: mean_j k(x_i, y_j)
        return torch.exp(-torch.cdist(xd, y.double()).square() / (2 * eps)).mean(-1)

    energy = (kde(pos) - kde(neg)) if n_iters == 0 else (kde(pos).log() - kde(neg).log())
    (grad,) = torch.autograd.grad(energy.sum(), xd)
    torch.testing.assert_close(v.double(), eps * grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="0.5 \\(KL-like"):
        sinkhorn_velocity(x, pos, neg, n_iters=0.3)


def test_float_iteration_counts_from_a_config_run():
    """n_iters=2.0 (a YAML float) runs two Sinkhorn iterations, as n_iters=2."""
    g = torch.Generator().manual_seed(2)
    x, pos, neg = (torch.randn(1, 8, 2, generator=g) for _ in range(3))
    torch.testing.assert_close(sinkhorn_velocity(x, pos, neg, n_iters=2.0)[0],
                               sinkhorn_velocity(x, pos, neg, n_iters=2)[0])
