"""Drifting field ([DRIFT] Algorithm 2) against a brute-force loop; equilibrium and direction; the objective's loss."""

import math

import pytest
import torch

from gwf.objectives.base import GenBatch, RealBatch
from gwf.objectives.drifting import Drifting, drifting_field


def brute_field(x, pos, temperatures, rms_normalize):
    """One problem, plain Python loops: x [N, D], pos [M, D]; negatives = x with the self pair masked."""
    n, m, d = len(x), len(pos), x.shape[1]
    targets = [pos[j] for j in range(m)] + [x[k] for k in range(n)]
    dist = [[math.dist(x[i].tolist(), t.tolist()) for t in targets] for i in range(n)]
    masked = [[j >= m and j - m == i for j in range(m + n)] for i in range(n)]
    unmasked = [dist[i][j] for i in range(n) for j in range(m + n) if not masked[i][j]]
    scale = sum(unmasked) / len(unmasked)
    total = torch.zeros(n, d, dtype=torch.float64)
    for t in temperatures:
        e = [[0.0 if masked[i][j] else math.exp(-dist[i][j] / (t * scale)) for j in range(m + n)] for i in range(n)]
        row = [sum(e[i]) for i in range(n)]
        col = [sum(e[i][j] for i in range(n)) for j in range(m + n)]
        a = [[math.sqrt(e[i][j] / row[i] * e[i][j] / col[j]) for j in range(m + n)] for i in range(n)]
        v = torch.zeros(n, d, dtype=torch.float64)
        for i in range(n):
            s_pos, s_neg = sum(a[i][:m]), sum(a[i][m:])
            for j in range(m + n):
                w = a[i][j] * s_neg if j < m else -a[i][j] * s_pos
                v[i] += w * targets[j].double()
        if rms_normalize:
            v = v / v.square().mean().sqrt()
        total += v
    return total


@pytest.mark.parametrize("rms_normalize", [False, True])
@pytest.mark.parametrize("temperatures", [(0.2,), (0.2, 0.05, 0.02)])
def test_field_matches_brute_force(rms_normalize, temperatures):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    pos = torch.randn(2, 5, 3, generator=g, dtype=torch.float64) + 0.5
    v = drifting_field(x, pos, temperatures=temperatures, rms_normalize=rms_normalize)
    assert v.shape == (2, 6, 3)
    for b in range(2):
        torch.testing.assert_close(v[b], brute_field(x[b], pos[b], temperatures, rms_normalize), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(drifting_field(x[0], pos[0], temperatures=temperatures, rms_normalize=rms_normalize),
                               v[0])  # 2-D inputs: one problem


def test_field_is_translation_equivariant_and_scale_free():
    """sum_j W+_ij = sum_k W-_ik makes V_T depend on differences only; the relative temperature makes the
    normalized field invariant to rescaling the data."""
    g = torch.Generator().manual_seed(1)
    x, pos = torch.randn(1, 32, 2, generator=g, dtype=torch.float64), torch.randn(1, 40, 2, generator=g, dtype=torch.float64)
    v = drifting_field(x, pos)
    shift = torch.tensor([3.0, -7.0], dtype=torch.float64)
    torch.testing.assert_close(drifting_field(x + shift, pos + shift), v, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(drifting_field(10 * x, 10 * pos), v, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(drifting_field(10 * x, 10 * pos, rms_normalize=False),
                               10 * drifting_field(x, pos, rms_normalize=False), rtol=1e-6, atol=1e-9)


def test_net_field_vanishes_for_point_symmetric_clouds():
    """x = {s, -s}, pos = {t, -t}: the configuration is invariant under z -> -z, so V(-x) = -V(x) and the net field
    sum_i V(x_i) is exactly 0 (up to rounding), although each particle moves."""
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(1, 256, 2, generator=g, dtype=torch.float64), torch.randn(1, 300, 2, generator=g, dtype=torch.float64)
    x, pos = torch.cat([s, -s], 1), torch.cat([t, -t], 1)
    v = drifting_field(x, pos, rms_normalize=False)[0]
    rms = v.square().sum(-1).mean().sqrt()
    assert rms > 1e-3
    assert v.mean(0).norm() < 1e-9 * rms
    torch.testing.assert_close(v[256:], -v[:256])


def test_net_field_is_small_at_equilibrium_and_points_to_the_positives_when_shifted():
    """x and pos: independent samples of N(0, I_2), 1024 each. The net field mean_i V(x_i) is < 0.1 of the one
    with pos shifted by two units along e1 (seeds 2-4 give 0.03-0.05: the sample means differ by ~0.04), which
    points along +e1."""
    g = torch.Generator().manual_seed(2)
    x, pos = torch.randn(1, 1024, 2, generator=g), torch.randn(1, 1024, 2, generator=g)
    net_eq = drifting_field(x, pos, rms_normalize=False)[0].mean(0)
    v = drifting_field(x, pos + torch.tensor([2.0, 0.0]), rms_normalize=False)[0]
    net = v.mean(0)
    assert net_eq.norm() < 0.1 * net.norm()
    assert net[0] > 0 and net[1].abs() < 0.1 * net[0]
    assert (v[:, 0] > 0).float().mean() > 0.8  # most particles move toward the positives


def test_objective_gradient_is_the_field():
    """loss = mean ||x - sg(x + eta V)||^2 => dloss/dx = -2 eta V / numel: one SGD step moves x along V."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 16, 1, 2, 2, generator=g).requires_grad_(True)
    pos = torch.randn(2, 24, 1, 2, 2, generator=g) + 1
    obj = Drifting(eta=0.5)
    loss, logs = obj.generator_loss(GenBatch(x, None, None, None), RealBatch(pos), torch.Generator())
    loss.backward()
    v = drifting_field(x.detach().flatten(2), pos.flatten(2))
    torch.testing.assert_close(x.grad.flatten(2), -2 * 0.5 * v / x.numel())
    torch.testing.assert_close(logs["v_rms"], v.square().mean((1, 2)).sqrt().mean())  # per problem, as W-Flow's
    assert 1.0 < float(logs["v_rms"]) <= 3.0 + 1e-5  # the sum of 3 unit-RMS fields (triangle inequality)


def test_identical_points_and_bad_input():
    x = torch.zeros(1, 8, 2)  # all generated samples and positives at one point: finite (zero) field
    v = drifting_field(x, x.clone())
    assert torch.isfinite(v).all() and v.abs().max() == 0
    with pytest.raises(ValueError, match="at least 2"):
        drifting_field(torch.zeros(1, 1, 2), torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match="temperatures"):
        Drifting(temperatures=(0.1, 0.0))
    with pytest.raises(ValueError, match="share B"):
        drifting_field(torch.zeros(2, 4, 2), torch.zeros(2, 3, 5))


def brute_guided_field(x, pos, unc, weight, temperature):
    """One problem, loops, the official guided drift (drift_loss.py with train.py's weights): targets [pos, x (self
    masked), uncond], A = sqrt(row softmax * column softmax) over all of them, times the column weight (1, 1, w);
    s = weighted mean distance over the unmasked pairs."""
    n, m, u, d = len(x), len(pos), len(unc), x.shape[1]
    targets = [pos[j] for j in range(m)] + [x[k] for k in range(n)] + [unc[k] for k in range(u)]
    w = [1.0] * (m + n) + [weight] * u
    dist = [[math.dist(x[i].tolist(), t.tolist()) for t in targets] for i in range(n)]
    masked = [[m <= j < m + n and j - m == i for j in range(m + n + u)] for i in range(n)]
    num = sum(dist[i][j] * w[j] for i in range(n) for j in range(m + n + u) if not masked[i][j])
    den = sum(w[j] for i in range(n) for j in range(m + n + u) if not masked[i][j])
    scale = num / den
    e = [[0.0 if masked[i][j] else math.exp(-dist[i][j] / (temperature * scale)) for j in range(m + n + u)]
         for i in range(n)]
    row = [sum(e[i]) for i in range(n)]
    col = [sum(e[i][j] for i in range(n)) for j in range(m + n + u)]
    a = [[math.sqrt(e[i][j] / row[i] * e[i][j] / col[j]) * w[j] for j in range(m + n + u)] for i in range(n)]
    v = torch.zeros(n, d, dtype=torch.float64)
    for i in range(n):
        s_pos, s_neg = sum(a[i][:m]), sum(a[i][m:])
        for j in range(m + n + u):
            v[i] += (a[i][j] * s_neg if j < m else -a[i][j] * s_pos) * targets[j].double()
    return v


def test_guided_field_matches_the_official_weighted_negatives():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)
    pos = torch.randn(2, 5, 3, generator=g, dtype=torch.float64) + 0.5
    unc = torch.randn(2, 4, 3, generator=g, dtype=torch.float64) - 0.5
    w = torch.tensor([0.0, 2.5], dtype=torch.float64)
    v = drifting_field(x, pos, temperatures=(0.2,), rms_normalize=False, uncond=unc, uncond_weight=w)
    for b in range(2):
        torch.testing.assert_close(v[b], brute_guided_field(x[b], pos[b], unc[b], float(w[b]), 0.2), rtol=1e-6,
                                   atol=1e-9)
    # the objective: alpha 1 and 3.5 with N = 6, U = 4 give the weights (alpha - 1) * 5 / 4
    obj = Drifting(temperatures=(0.2,), rms_normalize=False)
    gen = GenBatch(x.float(), torch.tensor([0, 1]), torch.tensor([1.0, 3.5]), sample=lambda: None)
    grouped, shared = obj.references(gen, RealBatch(pos.float(), unc[0].float(), torch.tensor([0, 1])))
    assert shared.keys() == {"uncond"} and "uncond" not in grouped
    field = obj.field(x.float(), {"pos": pos.float(), "uncond": unc.float()}, gen, tokens=1)[0]
    expected = drifting_field(x, pos, temperatures=(0.2,), rms_normalize=False, uncond=unc,
                              uncond_weight=torch.tensor([0.0, 2.5 * 5 / 4], dtype=torch.float64))
    torch.testing.assert_close(field.double(), expected, rtol=1e-4, atol=1e-6)
    grouped, shared = Drifting(temperatures=(0.2,), guidance=False).references(gen, RealBatch(pos.float(),
                                                                                             unc[0].float()))
    assert grouped.keys() == {"pos"} and not shared  # guidance off: no unconditional negatives
