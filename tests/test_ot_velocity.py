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


# --------------------------------------------------------------------------------------------------------
# Ablations of [WF] Table 2: the cost ||x - y|| (2c) and distribution guidance (2b)
# --------------------------------------------------------------------------------------------------------


def _pot_projection(x, y, eps, cost, weights=None, diagonal=0.0):
    """T = N pi y of one problem from POT's converged float64 plan (tests/test_ot_sinkhorn.py's reference)."""
    from tests.test_ot_sinkhorn import _pot_plan

    plan, _, _ = _pot_plan(x, y, eps, cost, weights, diagonal)
    return torch.from_numpy(x.shape[0] * plan @ y.double().numpy())


def test_l2_cost_velocity_against_pot_and_its_eps():
    """cost="l2": eps = eps_rel x mean_{i,j} ||x_i - t_j|| over [x, q', p] (the official eps = R sqrt(S) on features
    scaled to mean distance sqrt(S)), and V = T_p - T_q' with T from POT's float64 plan for the cost ||x - y||.
    The field is scale-equivariant with eps linear in the scale."""
    g = torch.Generator().manual_seed(21)
    x, neg = torch.randn(2, 12, 3, generator=g), torch.randn(2, 10, 3, generator=g)
    pos = 1.2 * torch.randn(2, 15, 3, generator=g) + 0.8
    v, info = sinkhorn_velocity(x, pos, neg, cost="l2", n_iters=1500, rms_normalize=False)
    for b in range(2):
        targets = torch.cat([x[b], neg[b], pos[b]]).double()
        mean_dist = float(torch.cdist(x[b].double(), targets).mean())
        assert float(info["mean_dist"][b]) == pytest.approx(mean_dist, rel=1e-5)
        eps = DEFAULT_EPS_REL * mean_dist
        assert float(info["eps"][b]) == pytest.approx(eps, rel=1e-5)
        v_ref = _pot_projection(x[b], pos[b], eps, "l2") - _pot_projection(x[b], neg[b], eps, "l2")
        torch.testing.assert_close(v[b].double(), v_ref, atol=3e-5, rtol=0)
    torch.testing.assert_close(info["eps"], relative_eps(x, [x, neg, pos], DEFAULT_EPS_REL, cost="l2"))
    assert "msd" not in info
    # the squared cost's field is another one (the test can tell them apart)
    v_sq, _ = sinkhorn_velocity(x, pos, neg, n_iters=1500, rms_normalize=False)
    assert _rel(v_sq, v) > 0.05
    c = 5.0
    v_c, info_c = sinkhorn_velocity(c * x, c * pos, c * neg, cost="l2", n_iters=1500, rms_normalize=False)
    torch.testing.assert_close(v_c, c * v, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(info_c["eps"], c * info["eps"], rtol=1e-5, atol=0)


def _official_distribution_velocity(x, pos, neg, uncond, alpha, eps_rel, n_iter, cost):
    """What the official code computes for one label under distribution guidance (train.py with use_new_cfg=False,
    resample_neg=True, disable_diag_mask=True, the ablation recipe's; drift_loss_ot.py with one R), re-implemented
    in float64 from its text: the unconditional reals join the negatives with weight (cfg - 1)(n_gen - 1) / n_uncond,
    the features are divided by scale / sqrt(S) (scale: the weighted RMS distance for the quadratic cost, the
    weighted mean distance for ||x - y||, over the targets [gen, negatives, positives]), reg = R S or R sqrt(S), and
    n_iter log-domain iterations from log_v = 0 give the plans; V = T_pos - T_neg in the features' units."""
    x, pos, neg, uncond = (t.double() for t in (x, pos, neg, uncond))
    n_gen, n_uncond, dim = x.shape[0], uncond.shape[0], x.shape[1]
    uncond_w = (alpha - 1.0) * (n_gen - 1) / max(1, n_uncond)
    fixed_neg = torch.cat([neg, uncond])
    weight_neg = torch.cat([torch.ones(len(neg)), torch.full((n_uncond,), uncond_w)]).double()
    targets = torch.cat([x, fixed_neg, pos])
    targets_w = torch.cat([torch.ones(n_gen).double(), weight_neg, torch.ones(len(pos)).double()])
    dist = torch.cdist(x, targets)
    if cost == "sq":
        scale = ((dist * dist * targets_w).mean() / (targets_w.mean() + 1e-8)).sqrt()
    else:
        scale = (dist * targets_w).mean() / (targets_w.mean() + 1e-8)
    scale_inputs = torch.clamp(scale / dim**0.5, min=1e-3)
    reg = eps_rel * (dim if cost == "sq" else dim**0.5)

    def bary(z, y, b):
        c = torch.cdist(z, y)
        c = 0.5 * c * c if cost == "sq" else c
        log_k = -c / reg
        log_a = torch.full((len(z),), -math.log(len(z))).double()
        log_b = torch.log((b / b.sum()).clamp_min(1e-30))
        log_u, log_v = torch.zeros_like(log_a), torch.zeros_like(log_b)
        for _ in range(max(int(n_iter), 1)):
            log_u = log_a - torch.logsumexp(log_k + log_v[None, :], dim=-1)
            log_v = log_b - torch.logsumexp(log_k.T + log_u[None, :], dim=-1)
        plan = torch.exp(log_u[:, None] + log_k + log_v[None, :])
        return plan @ y / plan.sum(-1, keepdim=True)

    z = x / scale_inputs
    v = bary(z, pos / scale_inputs, torch.ones(len(pos)).double()) - bary(z, fixed_neg / scale_inputs, weight_neg)
    return v * scale_inputs


@pytest.mark.parametrize("cost", ["sq", "l2"])
def test_distribution_guidance_is_the_official_weighted_negative_target(cost):
    """guidance="distribution" on a small conditional problem (3 labels, alpha 1, 2.5 and 4; 10 iterations, the
    ablation recipe's) equals the official computation per label (``_official_distribution_velocity``): same eps
    (the unconditional reals in the scale with their weight), same plan after the same iterations, no third term."""
    g = torch.Generator().manual_seed(22)
    x, neg = torch.randn(3, 9, 4, generator=g), torch.randn(3, 9, 4, generator=g)
    pos = torch.randn(3, 11, 4, generator=g) + torch.tensor([1.5, 0.0, 0.0, 0.0])
    uncond = 2.0 * torch.randn(3, 6, 4, generator=g)
    alpha = torch.tensor([1.0, 2.5, 4.0])
    v, info = sinkhorn_velocity(x, pos, neg, uncond=uncond, guidance_w=alpha - 1, guidance="distribution",
                                n_iters=10, cost=cost, rms_normalize=False, eps_rel=0.05)
    for b in range(3):
        ref = _official_distribution_velocity(x[b], pos[b], neg[b], uncond[b], float(alpha[b]), 0.05, 10, cost)
        torch.testing.assert_close(v[b].double(), ref, atol=2e-5, rtol=1e-4)
    # velocity guidance is another field (the third term)
    v_vel, _ = sinkhorn_velocity(x, pos, neg, uncond=uncond, guidance_w=alpha - 1, n_iters=10, cost=cost,
                                 rms_normalize=False)
    assert _rel(v_vel[1:], v[1:]) > 0.05
    # at alpha = 1 the unconditional reals have weight 0: the unguided field once converged (the first row update,
    # from g = 0, still sees them, as the official loop's does), and the same eps
    v_off, info_off = sinkhorn_velocity(x, pos, neg, n_iters=500, cost=cost, rms_normalize=False)
    v_conv, _ = sinkhorn_velocity(x, pos, neg, uncond=uncond, guidance_w=alpha - 1, guidance="distribution",
                                  n_iters=500, cost=cost, rms_normalize=False)
    torch.testing.assert_close(v_conv[0], v_off[0], atol=1e-5, rtol=0)
    assert _rel(v[0], v_off[0]) > 1e-3  # after 10 iterations: not yet
    torch.testing.assert_close(info["eps"][0], info_off["eps"][0])
    assert bool((info["eps"][1:] != info_off["eps"][1:]).all())  # the weighted uncond reals enter the scale


def test_distribution_guidance_masked_and_single_estimators_against_pot():
    """q' = x: the self term's targets are [x, uncond] with weights 1 and w (N - 1) / U; "masked" removes the pairs
    (x_i, x_i) only. Converged, against POT with that marginal (and a prohibitive cost on those pairs)."""
    g = torch.Generator().manual_seed(23)
    x, pos, uncond = torch.randn(2, 10, 3, generator=g), torch.randn(2, 8, 3, generator=g) + 1.0, torch.randn(2, 5, 3)
    w = torch.tensor([0.5, 2.0])
    for estimator in ("masked", "single"):
        v, info = sinkhorn_velocity(x, pos, estimator=estimator, uncond=uncond, guidance_w=w, guidance="distribution",
                                    n_iters=1500, rms_normalize=False)
        for b in range(2):
            eps = float(info["eps"][b])
            weights = torch.cat([torch.ones(10), torch.full((5,), float(w[b]) * 9 / 5)])
            t_self = _pot_projection(x[b], torch.cat([x[b], uncond[b]]), eps, "sq", weights,
                                     diagonal=1e4 if estimator == "masked" else 0.0)
            torch.testing.assert_close(v[b].double(), _pot_projection(x[b], pos[b], eps, "sq") - t_self,
                                       atol=3e-5, rtol=0)
            # eps's scale: the weighted mean of ||x_i - t_j||^2 over [x, pos, uncond]
            parts = ((x[b], 1.0), (pos[b], 1.0), (uncond[b], float(w[b]) * 9 / 5))
            msd = sum(s * float(torch.cdist(x[b].double(), t.double()).square().sum()) for t, s in parts) / (
                10 * sum(s * len(t) for t, s in parts))
            assert float(info["msd"][b]) == pytest.approx(msd, rel=1e-5)


@pytest.mark.parametrize("n_iters", [0, 0.5])
def test_partial_iterations_with_distribution_guidance_are_the_weighted_kernel_flows(n_iters):
    """n_iters 0 / 0.5 with distribution guidance: the MMD-like and KL-like flows with the self term's measure
    weighted (q' points 1, uncond reals w (N - 1) / U), checked by autograd of the closed forms."""
    g = torch.Generator().manual_seed(24)
    x, pos, neg, uncond = (torch.randn(2, n, 3, generator=g) for n in (10, 8, 10, 4))
    w = torch.tensor([0.7, 3.0])
    v, info = sinkhorn_velocity(x, pos, neg, uncond=uncond, guidance_w=w, guidance="distribution", n_iters=n_iters,
                                rms_normalize=False)
    eps = info["eps"].double()[:, None, None]
    xd = x.double().requires_grad_(True)
    targets = torch.cat([neg, uncond], 1).double()
    b = torch.cat([torch.ones(2, 10), (w[:, None] * 9 / 4).expand(2, 4)], 1).double()
    b = b / b.sum(-1, keepdim=True)

    def kde(y, weights):  # [B, N]: sum_j b_j k(x_i, y_j)
        return (torch.exp(-torch.cdist(xd, y).square() / (2 * eps)) * weights[:, None, :]).sum(-1)

    k_pos = kde(pos.double(), torch.full((2, 8), 1 / 8).double())
    energy = (k_pos - kde(targets, b)) if n_iters == 0 else (k_pos.log() - kde(targets, b).log())
    (grad,) = torch.autograd.grad(energy.sum(), xd)
    torch.testing.assert_close(v.double(), eps * grad, rtol=1e-4, atol=1e-6)


def test_distribution_guidance_with_the_geomloss_engine(monkeypatch):
    """geomloss takes the self term's target weights: its field agrees with the own engine's (eps-scaling 0.999)."""
    monkeypatch.setitem(gwf.ot.ENGINES, "geomloss", functools.partial(barycentric_projection_geomloss,
                                                                      scaling=0.999))
    x, pos, neg, uncond = _clouds(25, 2, 32, 8, k=4)
    kw = dict(uncond=uncond[:, :12], guidance_w=torch.tensor([1.0, 2.0]), guidance="distribution",
              rms_normalize=False)
    v_own, _ = sinkhorn_velocity(x, pos + 1.0, neg, n_iters=200, **kw)
    v_geo, _ = sinkhorn_velocity(x, pos + 1.0, neg, engine="geomloss", **kw)
    assert _rel(v_geo, v_own) < 3e-3


def test_cost_and_guidance_errors():
    x, pos, neg = _clouds(26, 2, 8, 3)
    with pytest.raises(ValueError, match="unknown cost"):
        sinkhorn_velocity(x, pos, neg, cost="l1")
    with pytest.raises(ValueError, match="needs engine='own'"):
        sinkhorn_velocity(x, pos, neg, cost="l2", engine="geomloss")
    with pytest.raises(ValueError, match="unknown guidance"):
        sinkhorn_velocity(x, pos, neg, uncond=pos, guidance_w=1.0, guidance="both")
    with pytest.raises(ValueError, match="unknown cost"):
        relative_eps(x, pos, cost="l1")
