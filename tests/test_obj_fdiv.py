"""f-divergence objectives against closed forms between 1-D Gaussians at the analytically optimal critic.

p = N(MP, SP^2) is the data, q = N(MQ, SQ^2) the generated distribution; r = q/p is known in closed form, so the
optimal critic d*(x) of each objective is a plain function of log r (docs/objectives.md table).
SQ = 0.95 keeps chi2 finite in both directions and the Monte Carlo estimators at finite variance.
"""

import gwf  # noqa: F401

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from gwf.models.critics import MLPCritic
from gwf.objectives.base import GenBatch, RealBatch
from gwf.objectives import OBJECTIVES
from gwf.objectives.critic import CriticDivergence

MP, SP, MQ, SQ = 0.0, 1.0, 0.5, 0.95
CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
B = 200_000  # Monte Carlo samples per distribution
CLASSES = {name: OBJECTIVES[name] for name in ("kl", "kl_centered", "kl_dv", "chi2", "js")}  # the f-divergence rows
CASES = [(name, rev) for name in CLASSES for rev in (False, True)]


def log_normal(x, m, s):
    return -((x - m) ** 2) / (2 * s * s) - math.log(s * math.sqrt(2 * math.pi))


def kl_gauss(ma, sa, mb, sb):  # KL(N(ma, sa^2) || N(mb, sb^2))
    return math.log(sb / sa) + (sa**2 + (ma - mb) ** 2) / (2 * sb**2) - 0.5


def chi2_gauss(ma, sa, mb, sb):  # Pearson chi2(a||b) = int a^2/b - 1, finite iff 2 sb^2 > sa^2
    return sb**2 / (sa * math.sqrt(2 * sb**2 - sa**2)) * math.exp((ma - mb) ** 2 / (2 * sb**2 - sa**2)) - 1


def gan_div_quad(mq, sq):  # 2 JS(p, q) - log 4 by trapezoidal quadrature on a fine grid
    x = torch.linspace(-20, 20, 200_001, dtype=torch.float64)
    lp, lq = log_normal(x, MP, SP), log_normal(x, mq, sq)
    lm = torch.logaddexp(lp, lq)  # log(p + q)
    return torch.trapezoid(lp.exp() * (lp - lm) + lq.exp() * (lq - lm), x).item()


# Energy each (divergence, reverse) generator descends, as a function of q's mean (for the translation check).
ENERGY = {
    ("kl", False): lambda m: kl_gauss(m, SQ, MP, SP),
    ("kl_dv", False): lambda m: kl_gauss(m, SQ, MP, SP),
    ("kl_centered", False): lambda m: kl_gauss(m, SQ, MP, SP),
    ("kl_centered", True): lambda m: kl_gauss(MP, SP, m, SQ),
    ("chi2", False): lambda m: chi2_gauss(m, SQ, MP, SP),
    ("js", False): lambda m: kl_gauss(m, SQ, MP, SP) - gan_div_quad(m, SQ) - math.log(4),  # KL(q||p) - 2 JS
    ("kl", True): lambda m: kl_gauss(MP, SP, m, SQ),
    ("kl_dv", True): lambda m: kl_gauss(MP, SP, m, SQ),
    ("chi2", True): lambda m: chi2_gauss(MP, SP, m, SQ),
    ("js", True): lambda m: gan_div_quad(m, SQ),  # 2 JS - log 4
}
# Value of -critic_loss at the optimal critic: D_f(q||p) forward, D_f(p||q) reverse, 2 JS - log 4 for js.
VALUE = {
    ("kl", False): kl_gauss(MQ, SQ, MP, SP), ("kl_dv", False): kl_gauss(MQ, SQ, MP, SP),
    ("kl", True): kl_gauss(MP, SP, MQ, SQ), ("kl_dv", True): kl_gauss(MP, SP, MQ, SQ),
    ("kl_centered", False): kl_gauss(MQ, SQ, MP, SP), ("kl_centered", True): kl_gauss(MP, SP, MQ, SQ),
    ("chi2", False): chi2_gauss(MQ, SQ, MP, SP), ("chi2", True): chi2_gauss(MP, SP, MQ, SQ),
    ("js", False): gan_div_quad(MQ, SQ), ("js", True): gan_div_quad(MQ, SQ),
}

# d* as a function of log r = log(q/p); DV is optimal up to a constant (0.3 here, to test the invariance).
OPTIMAL_D = {
    ("kl", False): lambda lr: -1 - lr, ("kl", True): lambda lr: 1 - lr,
    ("kl_centered", False): lambda lr: -lr, ("kl_centered", True): lambda lr: -lr,
    ("kl_dv", False): lambda lr: 0.3 - lr, ("kl_dv", True): lambda lr: 0.3 - lr,
    ("chi2", False): lambda lr: -2 * (lr.exp() - 1), ("chi2", True): lambda lr: 2 * ((-lr).exp() - 1),
    ("js", False): lambda lr: -lr, ("js", True): lambda lr: -lr,
}


def log_ratio(x):  # log q(x)/p(x) and its x-derivative g
    lr = log_normal(x, MQ, SQ) - log_normal(x, MP, SP)
    g = -(x - MQ) / SQ**2 + (x - MP) / SP**2
    return lr, g


class OptimalCritic(nn.Module):
    def __init__(self, key):
        super().__init__()
        self.fn = OPTIMAL_D[key]

    def forward(self, x, labels=None):
        return self.fn(log_ratio(x[:, 0])[0])


def samples(seed=0):
    g = torch.Generator().manual_seed(seed)
    x_real = MP + SP * torch.randn(1, B, 1, generator=g, dtype=torch.float64)
    x_fake = MQ + SQ * torch.randn(1, B, 1, generator=g, dtype=torch.float64)
    return x_real, x_fake


def expected_field(key, x):  # B * d(generator loss)/dx_i at d*, analytic (module table)
    lr, g = log_ratio(x)
    r = lr.exp()
    return {
        ("kl", False): g, ("kl_dv", False): g, ("kl_centered", False): g, ("chi2", False): 2 * r * g,
        ("js", False): r / (1 + r) * g,  # q/(p+q) grad log(q/p): non-saturating
        ("kl", True): g / r,  # -grad(p/q)
        ("kl_centered", True): g / r,
        ("kl_dv", True): (1 / r) / (1 / r).mean() * g,  # -grad(p/q) normalized by the batch mean of p/q
        ("chi2", True): 2 * r.pow(-2) * g,  # -grad (p/q)^2
        ("js", True): g / (1 + r),  # grad log(q/(p+q))
    }[key]


@pytest.mark.parametrize("name,reverse", CASES)
def test_bound_at_optimal_critic_equals_closed_form(name, reverse):
    x_real, x_fake = samples()
    obj = CLASSES[name](OptimalCritic((name, reverse)), penalty=None, reverse=reverse)
    loss, logs = obj.critic_loss(x_fake, RealBatch(pos=x_real), torch.Generator())
    expected = VALUE[name, reverse]
    # Monte Carlo, B = 2e5: errors over seeds 0-2 were < 0.004, except chi2(p||q) (< 0.01) whose estimator
    # E_q[(p/q)^2] has a barely finite variance (int p^4/q^3 < inf needs SQ^2 > 3/4 SP^2)
    tol = 0.03 if (name, reverse) == ("chi2", True) else 0.01
    assert -loss.item() == pytest.approx(expected, abs=tol), (name, reverse, -loss.item(), expected)
    assert logs["fdiv"].item() == pytest.approx(-loss.item(), abs=1e-6)


@pytest.mark.parametrize("name,reverse", CASES)
def test_generator_gradient_is_wasserstein_gradient(name, reverse):
    x_real, x_fake = samples(1)
    x = x_fake.clone().requires_grad_(True)
    obj = CLASSES[name](OptimalCritic((name, reverse)), penalty=None, reverse=reverse)
    gen = GenBatch(x=x, labels=None, alpha=None, sample=lambda: None)
    loss, _ = obj.generator_loss(gen, RealBatch(pos=x_real), torch.Generator())
    (grad,) = torch.autograd.grad(loss, x)
    field = grad[0, :, 0] * B
    # pointwise against the analytic field (exact up to float64 rounding)
    torch.testing.assert_close(field, expected_field((name, reverse), x_fake[0, :, 0]), rtol=1e-8, atol=1e-10)
    # and it is the Wasserstein gradient of the energy: E_q[field] = d/dm E(q shifted by m) (translation)
    h = 1e-4
    dE = (ENERGY[name, reverse](MQ + h) - ENERGY[name, reverse](MQ - h)) / (2 * h)
    # Monte Carlo: relative errors over seeds 0-2 were < 0.002, except chi2(p||q) (< 0.012)
    assert field.mean().item() == pytest.approx(dE, rel=0.04), (name, reverse, field.mean().item(), dE)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_critic_loss_decreases_with_adam(name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x_real = torch.randn(1, 256, 2, generator=g)
    x_fake = torch.randn(1, 256, 2, generator=g) * 0.5 + torch.tensor([1.5, -1.0])
    critic = MLPCritic([2], hidden=32, depth=2)
    obj = CLASSES[name](critic)  # default R1, weight 0.2
    opt = torch.optim.Adam(critic.parameters(), lr=1e-2, betas=(0.5, 0.9))
    real = RealBatch(pos=x_real)
    first, _ = obj.critic_loss(x_fake, real, torch.Generator())
    for _ in range(60):
        loss, _ = obj.critic_loss(x_fake, real, torch.Generator())
        opt.zero_grad()
        loss.backward()
        opt.step()
    last, logs = obj.critic_loss(x_fake, real, torch.Generator())
    assert last.item() < first.item() - 0.1, (name, first.item(), last.item())
    floor = -math.log(4) if name == "js" else 0.0  # the bound's value for identical distributions
    assert logs["fdiv"].item() > floor + 0.1  # the clouds are far apart: the bound is clearly above it
    assert logs["d_real"].item() > logs["d_fake"].item()  # d is high on data in both conventions (d* ~ log p/q)


@pytest.mark.parametrize("name,reverse", CASES)
@pytest.mark.parametrize("penalty", ["r1", "r1+r2", "interpolated", "wgan_gp"])
def test_finite_on_identical_points(name, reverse, penalty):
    torch.manual_seed(0)
    critic = MLPCritic([2], hidden=16, depth=2, num_classes=3)
    obj = CLASSES[name](critic, penalty=penalty, penalty_weight=1.0, reverse=reverse)
    labels = torch.tensor([0, 2])
    x = torch.ones(2, 4, 2)  # L = 2 problems, every point identical
    loss_c, logs = obj.critic_loss(x, RealBatch(pos=x.clone()[:, :3], labels=labels), torch.Generator())  # M = 3, N = 4
    loss_c.backward()
    assert torch.isfinite(loss_c) and all(torch.isfinite(v) for v in logs.values())
    assert all(torch.isfinite(p.grad).all() for p in critic.parameters())
    xg = x.clone().requires_grad_(True)
    loss_g, _ = obj.generator_loss(GenBatch(x=xg, labels=labels, alpha=None, sample=lambda: None),
                                   RealBatch(pos=x, labels=labels), torch.Generator())
    (grad,) = torch.autograd.grad(loss_g, xg)
    assert torch.isfinite(loss_g) and torch.isfinite(grad).all()


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_method_config_builds(name):
    """conf/method/<name>.yaml: loop keys as the trainer expects, the rest are this class's constructor arguments."""
    from omegaconf import OmegaConf

    from gwf.models.critics import build_critic
    from gwf.module import OptimConfig
    from tests.conftest import compose_config

    cfg = compose_config([f"method={name}"])
    method = OmegaConf.to_container(cfg.method, resolve=True)
    assert method.pop("name") == name and cfg.loop.critic_steps == 1 and cfg.loop.generator_steps == 1
    assert OptimConfig(**OmegaConf.to_container(cfg.critic_optim)).lr == pytest.approx(1e-4)
    spec = method.pop("critic")
    obj = CLASSES[name](critic=build_critic(spec.pop("name"), in_shape=[2], **spec), **method)
    assert (obj.divergence, obj.penalty, obj.penalty_weight, obj.reverse) == (name, "r1", 0.2, False)


def test_bad_names_raise():
    critic = MLPCritic([2], hidden=8, depth=1)
    with pytest.raises(ValueError, match="kl_dv"):
        CriticDivergence("hellinger", critic)
    with pytest.raises(ValueError, match="r1\\+r2"):
        CLASSES["kl"](critic, penalty="r3")


@pytest.mark.parametrize("penalty,forwards", [("r1", 2), ("r3gan", 2), ("interpolated", 3), ("none", 2)])
def test_critic_step_runs_the_critic_as_the_official(penalty, forwards):
    """R1 and r3gan differentiate the scores of the reals (and fakes) that the bound uses, as the official sjko and
    r3gan penalties: two critic forwards per critic step; the interpolated penalty scores its own points (three).
    The loss and the critic's gradients equal those of the penalty computed on a second forward."""
    from gwf.objectives.penalties import penalty as penalty_fn

    torch.manual_seed(0)
    critic = MLPCritic([2], hidden=16, depth=2)
    calls = []
    critic.register_forward_hook(lambda *args: calls.append(1))
    obj = CriticDivergence("kl_dv", critic, penalty=penalty, penalty_weight=0.2)
    g = torch.Generator().manual_seed(1)
    x_real, x_fake = torch.randn(1, 32, 2, generator=g), torch.randn(1, 32, 2, generator=g) + 1.0
    loss, logs = obj.critic_loss(x_fake, RealBatch(pos=x_real), torch.Generator().manual_seed(2))
    assert len(calls) == forwards
    loss.backward()
    grads = [p.grad.clone() for p in critic.parameters()]
    critic.zero_grad()
    d_real, d_fake = critic(x_real[0]), critic(x_fake[0])
    again = obj.row.critic_loss(d_real, d_fake, False) + penalty_fn(
        penalty, 0.2, critic, x_real, x_fake, rng=torch.Generator().manual_seed(2))
    again.backward()
    torch.testing.assert_close(loss, again, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads, [p.grad for p in critic.parameters()], rtol=1e-5, atol=1e-7)
