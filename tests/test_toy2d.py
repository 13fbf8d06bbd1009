"""2D targets and their metrics against known answers."""

import math

import pytest
import torch

from gwf.data.toy2d import TARGETS, GaussianMixture, imbalanced, make_sampler
from gwf.eval.toy2d import Toy2DEvaluator, mode_metrics, sinkhorn_divergence


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_every_target_samples_finite_2d_points(name):
    x = make_sampler(name)(4096, _g())
    assert x.shape == (4096, 2) and torch.isfinite(x).all()
    assert torch.equal(x, make_sampler(name)(4096, _g()))  # seeded


def test_mixture_weights_and_mode_metrics_known_answers():
    mix = imbalanced()
    x = mix(200_000, _g(1))
    # each sample comes from its nearest center here (modes are far apart relative to std)
    nearest = torch.cdist(x, mix.centers).argmin(1)
    freq = torch.bincount(nearest, minlength=8).float() / len(x)
    assert torch.allclose(freq, mix.weights, atol=3e-3)
    m = mode_metrics(x, mix)
    # 2D isotropic Gaussian: P(|z| <= 3) = 1 - exp(-9/2)
    assert abs(m["hq_rate"] - (1 - math.exp(-4.5))) < 2e-3
    assert m["mode_recall"] == 1.0
    # samples of the six major modes only: the two minor modes are missed
    major = GaussianMixture(mix.centers[:6], mix.std)
    assert mode_metrics(major(20_000, _g(2)), mix)["mode_recall"] == pytest.approx(6 / 8)
    # uniform noise far from every mode is not high quality
    assert mode_metrics(torch.rand(10_000, 2, generator=_g(3)) * 0.2 + 10, mix)["hq_rate"] == 0.0


def test_sinkhorn_divergence_separates_target_from_shifted_copy():
    ev = Toy2DEvaluator("8gaussians", num_samples=1000)
    same = ev.evaluate(make_sampler("8gaussians")(1000, _g(5)))
    shifted = ev.evaluate(make_sampler("8gaussians")(1000, _g(5)) + 1.0)
    assert same["sinkhorn_div"] < 0.05 * shifted["sinkhorn_div"]
    # translation by t, cost |x-y|^2/2: S_eps(mu, mu + t) = |t|^2 / 2 exactly, for any eps (the cross term
    # <x - y, t> integrates to <E x - E y, t> = 0 under any coupling of mu with itself)
    t = torch.tensor([1.0, 1.0]) / math.sqrt(2)
    assert sinkhorn_divergence(ev.reference, ev.reference + t) == pytest.approx(0.5, abs=1e-4)
    assert set(same) == {"sinkhorn_div", "mmd2", "hq_rate", "mode_recall"} and same["mode_recall"] == 1.0
    # unbiased MMD^2 of two samples of the same law is ~0 (either sign); far below the shifted copy's
    assert abs(same["mmd2"]) < 0.02 * shifted["mmd2"]


def test_the_references_self_term_is_computed_once_per_schedule_with_the_same_divergence():
    """The evaluator keeps OT_eps(y, y)'s potential of its reference per annealing schedule (which starts from the
    diameter of both clouds): samples inside the reference's box share one, samples beyond it get their own; the
    divergence is the one computed inline to the last bit. Another cloud than the memo's is refused."""
    ev = Toy2DEvaluator("8gaussians_gwf", num_samples=500)
    inside = make_sampler("8gaussians_gwf")(400, _g(9)) * 0.5
    for x in (inside, inside + 0.01, inside * 4):
        assert sinkhorn_divergence(x, ev.reference, y_potentials=ev.reference_potentials) == \
            sinkhorn_divergence(x, ev.reference)
    assert len(ev.reference_potentials._memo) == 2
    assert ev.evaluate(inside)["sinkhorn_div"] == sinkhorn_divergence(inside, ev.reference)
    with pytest.raises(ValueError, match="another cloud"):
        sinkhorn_divergence(inside, ev.reference + 1.0, y_potentials=ev.reference_potentials)


@pytest.mark.parametrize("target, scale, n, m", [("8gaussians", 1.1, 600, 500), ("moons", 1.0, 400, 400),
                                                  ("checkerboard", 3.0, 300, 350)])
def test_sinkhorn_divergence_is_geomlosss_to_float_rounding(target, scale, n, m):
    """The evaluator's own loop against geomloss's SamplesLoss (the algorithm it follows) on near and far clouds:
    the clamped exponents (below -87, where fp32 exp underflows) change nothing beyond fp32 rounding."""
    from geomloss import SamplesLoss

    x, y = make_sampler(target)(n, _g(7)) * scale, make_sampler(target)(m, _g(8))
    ref = float(SamplesLoss("sinkhorn", p=2, blur=0.05, scaling=0.9, debias=True, backend="tensorized")(x, y))
    assert sinkhorn_divergence(x, y) == pytest.approx(ref, rel=2e-5, abs=1e-8)


def test_domain_transfer_oval_to_circle_is_near_optimal_transport(tmp_path):
    """W-Flow + JKO from the source itself (T_0 = identity): the pushed oval matches the circle, and the generator
    moves points on average no more than 15% beyond W1(oval, circle), the least possible mean displacement
    (measured: 1.00 vs W1 0.95-0.99; the angle-preserving map moves every point by exactly 1)."""
    import numpy as np
    import ot

    from gwf.train import train
    from tests.conftest import compose_config

    cfg = compose_config(["experiment=transfer_2d", "jko.steps=3", "eval.every_n_updates=600", "logger=none",
                          "trainer.enable_progress_bar=false"])
    summary = train(cfg, tmp_path / "transfer")
    first, last = summary["first"], summary["last"]
    assert last["sinkhorn_div"] < first["sinkhorn_div"] / 50, (first, last)
    n = 1500
    x = make_sampler("oval")(n, _g(7)).double().numpy()
    y = make_sampler("circle")(n, _g(8)).double().numpy()
    w1 = ot.emd2(np.full(n, 1 / n), np.full(n, 1 / n), ot.dist(x, y, metric="euclidean"), numItermax=10**7)
    assert last["mean_transport"] <= 1.15 * w1, (last["mean_transport"], w1)


def test_eval2d_benchmark_runs_and_agrees_with_geomloss(tmp_path):
    import json

    from gwf.bench.eval2d import main as bench

    bench(["--sizes", "80", "--repeats", "1", "--json", str(tmp_path / "rows.json")])
    (row,) = json.loads((tmp_path / "rows.json").read_text())
    assert row["points"] == 80 and row["abs_diff"] <= 1e-5 * abs(row["geomloss"]) + 1e-8


def test_official_gwf_targets_have_the_official_geometry():
    """[GWF] dataset.py's samplers: 8 modes on the unit circle with variance 0.01; circles of radius 4 and 8 (noise
    0.2) alternating; three noiseless rings of radius 0.3 centred at y = 0, -0.75, -1.5; moons x 3 - 1."""
    x = make_sampler("8gaussians_gwf")(100_000, _g(1))
    mix = make_sampler("8gaussians_gwf")
    assert torch.allclose(mix.centers.norm(dim=1), torch.ones(8)) and mix.std == pytest.approx(0.1)
    resid = x - mix.centers[torch.cdist(x, mix.centers).argmin(1)]
    assert float(resid.var(0).mean()) == pytest.approx(0.01, rel=0.02)
    assert mode_metrics(x, mix)["hq_rate"] == pytest.approx(1 - math.exp(-4.5), abs=2e-3)

    c = make_sampler("circles_gwf")(20_000, _g(2))
    r = c.norm(dim=1)
    assert float(r[0::2].mean()) == pytest.approx(4.0, abs=0.01) and float(r[1::2].mean()) == pytest.approx(8.0, abs=0.01)
    assert float(r[0::2].std()) == pytest.approx(0.2, rel=0.05)

    t = make_sampler("three_rings")(30_000, _g(3))
    centers = torch.tensor([[0.0, 0.0], [0.0, -0.75], [0.0, -1.5]])
    d = torch.cdist(t, centers)
    assert torch.allclose(d.min(1).values, torch.full((len(t),), 0.3), atol=1e-6)  # on a ring, no noise
    assert torch.bincount(d.argmin(1), minlength=3).float().div(len(t)).tolist() == pytest.approx([1 / 3] * 3, abs=0.01)

    m = make_sampler("moons_gwf")(200_000, _g(4))
    # E over both moons of (x, y) before x 3 - 1: upper (0, 2/pi), lower (1, 0.5 - 2/pi) -> mean (0.5, 0.25)
    assert m.mean(0).tolist() == pytest.approx([0.5, -0.25], abs=0.02)


def test_official_mmd_is_the_uniform_learned_kernel_mmd():
    """official_mmd: mmd2_gwf is the official --compute_MMD value (unbiased, the 7 families weighted 1/7 each, on
    raw points), checked against its formula pair by pair on a small set; ~0 for the target itself."""
    from tests.test_obj_mmd_gan import families_by_hand

    ev = Toy2DEvaluator("8gaussians_gwf", num_samples=12, official_mmd=True)
    x = make_sampler("8gaussians_gwf")(10, _g(7)) + 0.3
    out = ev.evaluate(x)

    def k(a, b):
        return sum(families_by_hand(a.tolist(), b.tolist())) / 7

    ref, n, m = ev.reference.double(), 12, 10
    xx = x.double()
    same_r = sum(k(ref[i], ref[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    same_x = sum(k(xx[i], xx[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    cross = sum(k(ref[i], xx[j]) for i in range(n) for j in range(m)) / (n * m)
    assert out["mmd2_gwf"] == pytest.approx(same_r + same_x - 2 * cross, rel=1e-9)
    big = Toy2DEvaluator("8gaussians_gwf", num_samples=2000, official_mmd=True)
    same = big.evaluate(make_sampler("8gaussians_gwf")(2000, _g(8)))["mmd2_gwf"]
    assert abs(same) < 0.05 * big.evaluate(make_sampler("8gaussians_gwf")(2000, _g(8)) + 0.3)["mmd2_gwf"]
    assert "mmd2_gwf" not in Toy2DEvaluator("8gaussians_gwf", num_samples=12).evaluate(x)


def test_mode_metrics_count_the_extra_samples_and_the_divergences_the_scored_ones():
    """evaluate(x, mode_x=y): hq_rate and mode_recall are those of y (known: a far cloud has none, the target's own
    samples recall every mode), the Sinkhorn divergence and MMD^2 those of x alone, to the last bit."""
    ev = Toy2DEvaluator("8gaussians_gwf", num_samples=300, mode_samples=5000)
    target = make_sampler("8gaussians_gwf")
    x, many = target(300, _g(21)), target(5000, _g(22))
    alone, both = ev.evaluate(x), ev.evaluate(x, mode_x=many)
    assert both["sinkhorn_div"] == alone["sinkhorn_div"] and both["mmd2"] == alone["mmd2"]
    assert both["hq_rate"] == mode_metrics(many, target)["hq_rate"] and both["mode_recall"] == 1.0
    assert abs(both["hq_rate"] - (1 - math.exp(-4.5))) < 0.01  # within 3 std of a 2D Gaussian's centre
    assert ev.evaluate(x, mode_x=many * 0.01 + 10)["hq_rate"] == 0.0
    with pytest.raises(ValueError, match="mode_samples"):
        Toy2DEvaluator("8gaussians_gwf", num_samples=10, mode_samples=0)
    assert Toy2DEvaluator("moons", num_samples=10, mode_samples=5000).mode_samples is None  # no modes to count


def test_a_2d_run_counts_its_mode_metrics_on_mode_samples_of_the_fixed_noise(tmp_path):
    """The evaluation callback draws eval.evaluator.mode_samples samples apart from the scored ones: the logged
    hq_rate is that of the final generator's mode_samples samples of the evaluation seed, the divergences those of
    its num_samples alone (the same as a run without mode_samples)."""
    import json

    from gwf.callbacks import EvalCallback
    from gwf.sample import load_module
    from gwf.train import train
    from tests.conftest import compose_config

    run = ["experiment=gwf_2d", "method=wflow", "jko.steps=1", "jko.updates_per_step=20", "eval.every_n_updates=20",
           "eval.num_samples=300", "eval.evaluator.num_samples=300", "checkpoint.every_n_updates=20"]
    train(compose_config([*run, "eval.evaluator.mode_samples=4000"]), tmp_path / "many")
    train(compose_config([*run, "eval.evaluator.mode_samples=null"]), tmp_path / "few")
    many, few = (json.loads((tmp_path / d / "eval_summary.json").read_text())["last"] for d in ("many", "few"))
    assert many["sinkhorn_div"] == few["sinkhorn_div"] and many["mmd2"] == few["mmd2"]
    module, cfg = load_module(tmp_path / "many" / "checkpoints" / "last.ckpt")
    seed = EvalCallback(lambda: None).seed  # the evaluations' fixed-noise seed
    expected = mode_metrics(module.sample(4000, seed=seed), make_sampler(cfg.data.target))
    assert many["hq_rate"] == pytest.approx(expected["hq_rate"], abs=1e-9)
    assert many["mode_recall"] == expected["mode_recall"]
    scored = mode_metrics(module.sample(300, seed=seed), make_sampler(cfg.data.target))
    assert few["hq_rate"] == pytest.approx(scored["hq_rate"], abs=1e-9)
    assert 0 < many["hq_rate"] != few["hq_rate"]  # a generator part-way there: the counts differ
