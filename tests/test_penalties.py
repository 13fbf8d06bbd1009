"""Gradient penalties against hand-computed values on a quadratic critic d(x) = x^T A x / 2 + b^T x (grad = A x + b)."""

import gwf  # noqa: F401

import pytest
import torch
from torch import nn

from gwf.objectives.penalties import (PENALTIES, interpolated_penalty, penalty, r1_penalty, r2_penalty,
                                      scored_inputs, wgan_gp_penalty)

D = 3


class Quadratic(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(D, D, generator=g, dtype=torch.float64)
        self.A = nn.Parameter(a + a.T)
        self.b = nn.Parameter(torch.randn(D, generator=g, dtype=torch.float64))

    def forward(self, x, labels=None):
        return 0.5 * torch.einsum("bi,ij,bj->b", x, self.A, x) + x @ self.b

    def grad(self, x):  # analytic grad_x d
        return (x @ self.A.T + self.b).detach()


def points(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g, dtype=torch.float64)


def eps_like(seed, n):  # the documented draw: eps = torch.rand(B, generator=rng)
    return torch.rand(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)[:, None]


def test_r1_r2_hand_values():
    critic, x_real, x_fake = Quadratic(), points(1), points(2, 12)
    expected_r1 = critic.grad(x_real).pow(2).sum(1).mean()
    expected_r2 = critic.grad(x_fake).pow(2).sum(1).mean()
    torch.testing.assert_close(r1_penalty(critic, x_real).double(), expected_r1, rtol=1e-6, atol=0)
    torch.testing.assert_close(r2_penalty(critic, x_fake).double(), expected_r2, rtol=1e-6, atol=0)
    # grouped helper: r1+r2 = weight (R1 + R2), all reals and all fakes used
    value = penalty("r1+r2", 0.2, critic, x_real.view(2, 8, D), x_fake.view(2, 6, D))
    torch.testing.assert_close(value.double(), 0.2 * (expected_r1 + expected_r2), rtol=1e-6, atol=0)
    # r3gan: the official GWF weight 0.5 (R1 + R2)
    value = penalty("r3gan", 0.2, critic, x_real.view(2, 8, D), x_fake.view(2, 6, D))
    torch.testing.assert_close(value.double(), 0.1 * (expected_r1 + expected_r2), rtol=1e-6, atol=0)


class Counting(Quadratic):
    calls = 0

    def forward(self, x, labels=None):
        self.calls += 1
        return super().forward(x, labels)


@pytest.mark.parametrize("name,expected", [("r1", lambda r1, r2: 0.2 * r1), ("r2", lambda r1, r2: 0.2 * r2),
                                           ("r1+r2", lambda r1, r2: 0.2 * (r1 + r2)),
                                           ("r3gan", lambda r1, r2: 0.1 * (r1 + r2))])
def test_scored_penalties_reuse_the_scores(name, expected):
    """With the scores of scored_inputs' leaves (the official sjko / r3gan), R1 and R2 differentiate them: the hand
    values, with no critic forward of their own; the critic's parameter gradients equal the recomputed penalty's."""
    critic, x_real, x_fake = Counting(), points(1).view(2, 8, D), points(2, 12).view(2, 6, D)
    r1 = critic.grad(x_real.reshape(-1, D)).pow(2).sum(1).mean()
    r2 = critic.grad(x_fake.reshape(-1, D)).pow(2).sum(1).mean()
    real, fake = scored_inputs(name, 0.2, x_real, x_fake)
    assert real.requires_grad == (name != "r2") and fake.requires_grad == (name != "r1")
    d_real, d_fake = critic(real.flatten(0, 1)), critic(fake.flatten(0, 1))
    calls = critic.calls
    value = penalty(name, 0.2, critic, real, fake, scores=(d_real, d_fake))
    assert critic.calls == calls  # no forward of its own
    torch.testing.assert_close(value.double(), expected(r1, r2), rtol=1e-6, atol=0)
    loss = d_fake.mean() - d_real.mean() + value
    loss.backward()
    scored = [critic.A.grad.clone(), critic.b.grad.clone()]
    critic.zero_grad()
    again = critic(x_fake.flatten(0, 1)).mean() - critic(x_real.flatten(0, 1)).mean() + penalty(
        name, 0.2, critic, x_real, x_fake)
    again.backward()
    torch.testing.assert_close(scored, [critic.A.grad, critic.b.grad], rtol=1e-12, atol=1e-12)


def test_scores_of_inputs_without_grad_are_refused():
    critic, x = Quadratic(), points(1).view(1, 16, D)
    with pytest.raises(ValueError, match="scored_inputs"):
        penalty("r1", 0.2, critic, x, x, scores=(critic(x[0]), critic(x[0])))
    real, fake = scored_inputs("r1", 0.0, x, x)  # a zero weight differentiates nothing
    assert not real.requires_grad and not fake.requires_grad


def test_interpolated_and_wgan_gp_hand_values():
    critic, x_real, x_fake = Quadratic(), points(1), points(2)
    eps = eps_like(7, 16)
    g_hat = critic.grad(eps * x_real + (1 - eps) * x_fake)
    expected_sq = g_hat.pow(2).sum(1).mean()
    expected_gp = (g_hat.norm(dim=1) - 1).pow(2).mean()
    gen = torch.Generator().manual_seed(7)
    torch.testing.assert_close(interpolated_penalty(critic, x_real, x_fake, rng=gen).double(), expected_sq,
                               rtol=1e-6, atol=0)
    gen = torch.Generator().manual_seed(7)
    torch.testing.assert_close(wgan_gp_penalty(critic, x_real, x_fake, rng=gen).double(), expected_gp,
                               rtol=1e-6, atol=1e-9)


def test_interpolation_edge_cases():
    critic, x = Quadratic(), points(3)
    # x_real == x_fake: every interpolate is x itself, whatever eps -> interpolated = R1
    torch.testing.assert_close(interpolated_penalty(critic, x, x), r1_penalty(critic, x))
    # A = 0: grad = b everywhere -> ||b||^2 and (||b|| - 1)^2 exactly
    with torch.no_grad():
        critic.A.zero_()
    b = critic.b.detach()
    torch.testing.assert_close(interpolated_penalty(critic, x, points(4)).double(), b.pow(2).sum(), rtol=1e-6, atol=0)
    torch.testing.assert_close(wgan_gp_penalty(critic, x, points(4)).double(), (b.norm() - 1) ** 2, rtol=1e-6, atol=0)


def test_penalty_trains_the_critic():
    """create_graph=True: d R1 / d b = 2 E[A x + b] and d R1 / d A reach the critic's parameters."""
    critic, x = Quadratic(), points(5)
    r1_penalty(critic, x).backward()
    torch.testing.assert_close(critic.b.grad, 2 * critic.grad(x).mean(0), rtol=1e-6, atol=1e-9)
    assert critic.A.grad is not None and critic.A.grad.abs().sum() > 0


def test_grouped_interpolation_pairs_within_problem_and_labels():
    """With L problems, interpolation pairs the first min(M, N) samples of each problem; labels go per sample."""
    seen = []

    class LabelRecorder(Quadratic):
        def forward(self, x, labels=None):
            seen.append(labels)
            return super().forward(x, labels)

    critic = LabelRecorder()
    x_real, x_fake = points(1, 2 * 5).view(2, 5, D), points(2, 2 * 3).view(2, 3, D)
    labels = torch.tensor([4, 9])
    value = penalty("interpolated", 10.0, critic, x_real, x_fake, labels, torch.Generator().manual_seed(3))
    eps = eps_like(3, 6)
    g_hat = critic.grad(eps * x_real[:, :3].reshape(6, D) + (1 - eps) * x_fake.reshape(6, D))
    torch.testing.assert_close(value.double(), 10 * g_hat.pow(2).sum(1).mean(), rtol=1e-6, atol=0)
    assert seen[-1].tolist() == [4, 4, 4, 9, 9, 9]


def test_none_and_zero_weight_are_zero():
    critic, x = Quadratic(), points(1).view(1, 16, D)
    assert penalty(None, 1.0, critic, x, x).item() == 0
    assert penalty("none", 1.0, critic, x, x).item() == 0
    assert penalty("r1", 0.0, critic, x, x).item() == 0


def test_unknown_penalty_lists_valid_names():
    critic, x = Quadratic(), points(1).view(1, 16, D)
    with pytest.raises(ValueError, match="wgan_gp"):
        penalty("gp", 1.0, critic, x, x)
    assert set(PENALTIES) == {"r1", "r2", "interpolated", "wgan_gp"}
