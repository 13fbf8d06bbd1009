"""The shared JKO machinery: schedule arithmetic, the proximal term's value, the frozen copy."""

import pytest
import torch
from torch import nn

from gwf.jko import JKOProximal, JKOSchedule, tau_from_official_lambda2


@pytest.mark.parametrize("steps,first,inner", [(1, 5, 5), (3, 4, 2), (4, 1, 3)])
def test_schedule_matches_enumeration(steps, first, inner):
    sched = JKOSchedule(steps, updates_per_step=inner, updates_first_step=first)
    enumerated = [(0, i) for i in range(first)] + [(k, i) for k in range(1, steps) for i in range(inner)]
    assert sched.total_updates == len(enumerated)
    assert [sched.locate(u) for u in range(len(enumerated))] == enumerated
    ends = [u for u in range(len(enumerated)) if sched.ends_outer_step(u)]
    assert ends == [first - 1 + k * inner for k in range(steps)]


def test_schedule_rejects_empty():
    with pytest.raises(ValueError, match="jko.steps"):
        JKOSchedule(0, 10, 10)


class Linear(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w.clone())

    def forward(self, z, labels=None, alpha=None):
        return z @ self.w.T


def test_proximal_term_closed_form():
    # G(z) = W z, G_prev(z) = W0 z: prox = mean_b ||(W - W0) z_b||^2 / (2 tau), summed over output dims.
    torch.manual_seed(0)
    w0 = torch.randn(3, 4)
    gen = Linear(w0)
    jko = JKOProximal(gen, tau=0.25)
    with torch.no_grad():
        gen.w.add_(torch.tensor(0.5))
    z = torch.randn(1000, 4)
    expected = ((z @ (gen.w - w0).T) ** 2).sum(1).mean() / (2 * 0.25)
    assert torch.allclose(jko(gen(z), z), expected, rtol=1e-5)
    # E ||D z||^2 = ||D||_F^2 for z ~ N(0, I): the Monte Carlo value agrees with the population value
    population = ((gen.w - w0) ** 2).sum() / (2 * 0.25)
    assert abs(float(jko(gen(z), z).detach()) / float(population.detach()) - 1) < 0.1


def test_proximal_gradient_is_displacement_over_tau():
    torch.manual_seed(1)
    gen = Linear(torch.randn(2, 2))
    jko = JKOProximal(gen, tau=2.0)
    with torch.no_grad():
        gen.w.mul_(1.3)
    z = torch.randn(8, 2)
    x = gen(z).detach().requires_grad_(True)
    jko(x, z).backward()
    # d/dx [ mean_b ||x_b - x_prev_b||^2 / (2 tau) ] = (x - x_prev) / (tau * B)
    assert torch.allclose(x.grad, (x - jko.previous(z)) / (2.0 * 8), atol=1e-6)


def test_refresh_and_no_jko():
    gen = Linear(torch.ones(2, 2))
    jko = JKOProximal(gen, tau=1.0)
    with torch.no_grad():
        gen.w.fill_(3.0)
    z = torch.randn(5, 2)
    assert float(jko(gen(z), z)) > 0
    jko.refresh(gen)
    assert float(jko(gen(z), z)) == 0.0
    assert not any(p.requires_grad for p in jko.previous.parameters())
    none = JKOProximal(gen, tau=None)
    assert none.previous is None and float(none(gen(z), z)) == 0.0


@pytest.mark.parametrize("tau", [0.0, -1.0])
def test_tau_must_be_positive(tau):
    with pytest.raises(ValueError, match="tau must be > 0"):
        JKOProximal(Linear(torch.ones(1, 1)), tau=tau)


def test_official_lambda2_mapping():
    # official: mean_d (x - x_prev)^2 / lambda2 == ours: sum_d (x - x_prev)^2 / (2 tau)
    d, lam = 3072, 1.0
    tau = tau_from_official_lambda2(lam, d)
    diff = torch.randn(d)
    assert torch.isclose((diff**2).mean() / lam, (diff**2).sum() / (2 * tau))


def test_start_from_noise_measures_transport_from_mu0_until_the_first_refresh():
    torch.manual_seed(2)
    gen = Linear(torch.randn(3, 3))
    jko = JKOProximal(gen, tau=0.5, start="noise")
    z = torch.randn(64, 3)
    x = gen(z)
    # T_0 = identity on z: prox = mean ||G(z) - z||^2 / (2 tau)
    assert torch.allclose(jko(x, z), ((x - z) ** 2).sum(1).mean() / (2 * 0.5))
    jko.refresh(gen)  # end of the first outer step: G_theta_1 = frozen copy
    assert float(jko(gen(z), z).detach()) == 0.0
    state = jko.state_dict()
    assert "from_noise" in state and not bool(state["from_noise"])
    with pytest.raises(ValueError, match="noise of the data's size"):
        JKOProximal(gen, 1.0, start="noise")(torch.zeros(4, 2), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="jko.start"):
        JKOProximal(gen, 1.0, start="zeros")


def test_batchnorm_generator_has_zero_proximal_term_at_equal_weights():
    """The frozen copy runs in the generator's mode: with batch norm in train mode, equal weights give exactly 0
    (a copy left in eval mode would compare batch statistics with running ones)."""
    gen = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    prox = JKOProximal(gen, tau=1.0)
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)) * 3 + 1
    gen.train()
    assert float(prox(gen(z), z, train_mode=True)) == 0.0
    assert float(prox(gen(z), z, train_mode=False)) > 0.01  # what the eval-mode copy would have measured


def test_previous_mode_eval_is_the_official_frozen_copy():
    """jko.previous_mode=eval runs the frozen copy in eval mode whatever the generator's mode (the official
    ``netT_old.eval()``): with batch norm, its output is the running-statistics one, so equal weights give the term
    the eval-mode copy measures; other values are refused."""
    gen = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))
    z = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)) * 3 + 1
    official, ours = JKOProximal(gen, tau=1.0, previous_mode="eval"), JKOProximal(gen, tau=1.0)
    gen.train()
    x = gen(z)
    expected = (x - official.previous.eval()(z)).pow(2).sum(1).mean() / 2.0
    assert float(official(x, z, train_mode=True)) == pytest.approx(float(expected), rel=1e-6)
    assert float(expected) > 0.01
    assert float(ours(x, z, train_mode=True)) == 0.0 and not official.previous.training
    with pytest.raises(ValueError, match="jko.previous_mode"):
        JKOProximal(gen, 1.0, previous_mode="train")


def test_fresh_noise_start_is_the_official_flat_latent_first_step():
    """jko.start=fresh_noise: in the first JKO step the previous outputs are fresh N(0, I) of the data's shape,
    independent of z (train.py: netT_old = lambda x: noise_sampler_old.sample()); after the refresh, the generator."""
    from gwf.jko import JKOProximal

    gen = torch.nn.Linear(3, 4)
    prox = JKOProximal(gen, tau=2.0, start="fresh_noise")
    z = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
    x = gen(z)
    eps = torch.randn(6, 4, generator=torch.Generator().manual_seed(5))
    expected = (x - eps).pow(2).sum(1).mean() / (2 * 2.0)
    torch.testing.assert_close(prox(x, z, rng=torch.Generator().manual_seed(5)), expected)
    prox.refresh(gen)
    assert float(prox(gen(z), z, rng=torch.Generator().manual_seed(5))) == 0.0
    with pytest.raises(ValueError, match="fresh_noise"):
        JKOProximal(gen, tau=1.0, start="zeros")


def test_start_from_noise_of_the_wrong_size_fails_when_the_module_is_built():
    """jko.start=noise with noise_dim != the data dimension: refused by build_module, before any update runs."""
    from tests.conftest import compose_config

    from gwf.build import build_datamodule, build_module

    def build(*overrides):
        cfg = compose_config(["experiment=gwf_2d", "method=wflow", *overrides])
        data = build_datamodule(cfg)
        return build_module(cfg, data.shape, data.num_classes)

    with pytest.raises(ValueError, match="noise of the data's size.*model.noise_dim"):
        build("model.noise_dim=16")
    build("model.noise_dim=16", "jko.start=generator")
    build("model.noise_dim=16", "jko.tau=null")
