"""chi2_tight (the official GWF tight chi2 bound, positive critic) against closed forms between 1-D Gaussians at the
optimal critic d* = q/p (forward) or p/q (reverse): the bound equals chi2, the generator's field is chi2's."""

import math

import pytest
import torch
from torch import nn

from gwf.models.critics import MLPCritic
from gwf.objectives import OBJECTIVES
from gwf.objectives.base import GenBatch, RealBatch
from gwf.objectives.chi2_tight import Chi2Tight, PositiveCritic
from tests.test_obj_fdiv import B, MP, MQ, SP, SQ, chi2_gauss, log_ratio, samples


class RatioCritic(nn.Module):
    """Pre-softplus values whose softplus is r = q/p (forward) or p/q (reverse), scaled by c (the bound is
    invariant to it): softplus^-1(y) = log(expm1(y))."""

    def __init__(self, reverse: bool, c: float = 1.7):
        super().__init__()
        self.reverse, self.c = reverse, c

    def forward(self, x, labels=None):
        lr = log_ratio(x[:, 0])[0]
        return torch.expm1(self.c * (-lr if self.reverse else lr).exp()).log()


@pytest.mark.parametrize("reverse", [False, True])
def test_bound_at_optimal_critic_equals_chi2(reverse):
    x_real, x_fake = samples()
    obj = Chi2Tight(RatioCritic(reverse), penalty=None, reverse=reverse)
    loss, logs = obj.critic_loss(x_fake, RealBatch(pos=x_real), torch.Generator())
    expected = chi2_gauss(MP, SP, MQ, SQ) if reverse else chi2_gauss(MQ, SQ, MP, SP)
    # Monte Carlo, B = 2e5 (the reverse ratio's estimator has a barely finite variance, as chi2(p||q) in fdiv)
    assert -loss.item() == pytest.approx(expected, abs=0.03 if reverse else 0.01), (reverse, -loss.item(), expected)
    assert logs["fdiv"].item() == pytest.approx(-loss.item(), abs=1e-9)


@pytest.mark.parametrize("reverse", [False, True])
def test_generator_field_is_the_chi2_field(reverse):
    """B grad_x of the generator loss = 2 (E_q d - E_p d) / Var d * grad d pointwise (the batch's own factor),
    and at d* the factor times c -> 2: the chi2(q||p) field 2 grad(q/p) (forward); reverse, -2 grad(p/q), not the
    chi2(p||q) field -grad (p/q)^2: the official loss holds Var_q(d) fixed, so its first variation is linear in d."""
    x_real, x_fake = samples(1)
    c = 1.7
    obj = Chi2Tight(RatioCritic(reverse, c), penalty=None, reverse=reverse)
    x = x_fake.clone().requires_grad_(True)
    loss, _ = obj.generator_loss(GenBatch(x=x, labels=None, alpha=None, sample=lambda: None), RealBatch(pos=x_real),
                                 torch.Generator())
    (grad,) = torch.autograd.grad(loss, x)
    field = grad[0, :, 0] * B
    lr, g = log_ratio(x_fake[0, :, 0])
    r = lr.exp()
    d_real = obj.scores(x_real, None).detach()
    d_fake = obj.scores(x_fake, None).detach()
    if reverse:  # loss (E_p d - E_q d)^2 / Var_q d, d = c p/q; grad d = -c g / r
        factor = -2 * (d_real.mean() - d_fake.mean()) / d_fake.var(unbiased=False)
        exact = factor * (-c * g / r)
        chi2_field = 2 * g / r  # -2 grad(p/q)
    else:  # loss (E_q d - E_p d)^2 / Var_p d, d = c q/p; grad d = c r g
        factor = 2 * (d_fake.mean() - d_real.mean()) / d_real.var(unbiased=False)
        exact = factor * c * r * g
        chi2_field = 2 * r * g
    torch.testing.assert_close(field, exact, rtol=1e-6, atol=1e-9)
    # at d* the factor times c is 2 up to Monte Carlo error (E_p[r^2] - 1 over Var_p r = 1)
    assert float((field / chi2_field).median()) == pytest.approx(1.0, abs=0.05 if reverse else 0.02)


def test_critic_is_positive_and_learns():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x_real = torch.randn(1, 256, 2, generator=g)
    x_fake = torch.randn(1, 256, 2, generator=g) * 0.5 + torch.tensor([1.5, -1.0])
    obj = OBJECTIVES["chi2_tight"](MLPCritic([2], hidden=32, depth=2))
    assert isinstance(obj.critic, PositiveCritic)
    opt = torch.optim.Adam(obj.critic.parameters(), lr=1e-2, betas=(0.5, 0.9))
    first, _ = obj.critic_loss(x_fake, RealBatch(pos=x_real), torch.Generator())
    for _ in range(60):
        loss, logs = obj.critic_loss(x_fake, RealBatch(pos=x_real), torch.Generator())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first.item() - 0.5 and logs["fdiv"].item() > 1.0
    assert bool((obj.scores(torch.cat([x_real, x_fake], 1), None) > 0).all())


def test_constant_critic_is_finite():
    """A dead critic (zero variance) meets the official floor 1e-4, not a division by zero."""
    class Zero(nn.Module):
        def forward(self, x, labels=None):
            return x[:, 0] * 0.0

    obj = Chi2Tight(Zero(), penalty="r1", penalty_weight=0.2)
    x = torch.ones(1, 8, 2)
    loss, _ = obj.critic_loss(x, RealBatch(pos=x), torch.Generator())
    assert math.isfinite(loss.item()) and loss.item() == 0.0


@pytest.mark.parametrize("reverse", [False, True])
def test_the_bound_is_per_problem(reverse):
    """Two labels: the losses are the mean over labels of each label's own bound (its means and variance), not the
    bound of the pooled scores."""
    torch.manual_seed(0)
    obj = Chi2Tight(MLPCritic([2], hidden=8, depth=1), penalty=None, reverse=reverse)
    g = torch.Generator().manual_seed(1)
    x_real = torch.randn(2, 32, 2, generator=g) + torch.tensor([[[0.0, 0.0]], [[3.0, 0.0]]])
    x_fake = torch.randn(2, 32, 2, generator=g)
    both, _ = obj.critic_loss(x_fake, RealBatch(pos=x_real), torch.Generator())
    each = [obj.critic_loss(x_fake[i:i + 1], RealBatch(pos=x_real[i:i + 1]), torch.Generator())[0] for i in range(2)]
    torch.testing.assert_close(both, (each[0] + each[1]) / 2)
    gen, _ = obj.generator_loss(GenBatch(x_fake, None, None, None), RealBatch(x_real), torch.Generator())
    gens = [obj.generator_loss(GenBatch(x_fake[i:i + 1], None, None, None), RealBatch(x_real[i:i + 1]),
                               torch.Generator())[0] for i in range(2)]
    torch.testing.assert_close(gen, (gens[0] + gens[1]) / 2)
