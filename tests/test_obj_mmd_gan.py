"""JKO MMD GAN: the learned kernel, its parameters in the critic, and a critic that learns to separate two clouds."""

import math

import pytest
import torch

from gwf.models.critics import MLPCritic
from gwf.objectives.base import GenBatch, RealBatch
from gwf.objectives.mmd import mmd2_unbiased
from gwf.objectives.mmd_gan import MixtureKernelCritic, MMDGAN


def make(penalty_weight=0.0, num_classes=0, bandwidths=(0.5, 1.0, 2.0, 4.0)):
    torch.manual_seed(0)
    phi = MLPCritic(in_shape=(2,), hidden=32, depth=2, out_dim=8, num_classes=num_classes)
    return MMDGAN(phi, bandwidths=bandwidths, penalty_weight=penalty_weight)


def clouds(seed=1, n_problems=2, n=64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_problems, n, 2, generator=g), torch.randn(n_problems, n, 2, generator=g) * 0.5 + 1.0


def test_critic_holds_embedding_and_mixture_logits():
    obj = make()
    assert isinstance(obj.critic, MixtureKernelCritic)
    params = list(obj.critic.parameters())
    assert any(p is obj.critic.logits for p in params)  # the trainer's critic optimizer sees the logits
    assert all(any(p is q for p in params) for q in obj.critic.phi.parameters())
    obj.critic.logits.data = torch.tensor([3.0, -1.0, 0.5, 2.0])
    assert float(obj.critic.weights.detach().sum()) == pytest.approx(1.0, abs=1e-6)
    assert bool((obj.critic.weights > 0).all())


def test_mixture_kernel_matches_double_loop():
    obj = make()
    obj.critic.logits.data = torch.tensor([0.3, -0.2, 1.0, 0.0])
    w = obj.critic.weights.tolist()
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(1, 5, 3, generator=g), torch.randn(1, 4, 3, generator=g)
    out = obj.critic.kernel(a, b)[0].detach()
    for i in range(5):
        for j in range(4):
            r2 = float((a[0, i] - b[0, j]).square().sum())
            ref = sum(wi * math.exp(-r2 / (2 * s**2)) for wi, s in zip(w, (0.5, 1.0, 2.0, 4.0)))
            assert float(out[i, j]) == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_losses_are_plus_and_minus_the_learned_kernel_mmd2():
    obj = make()
    x_gen, x_real = clouds()
    gen_loss, logs = obj.generator_loss(GenBatch(x_gen, None, None, None), RealBatch(x_real), torch.Generator())
    critic_loss, _ = obj.critic_loss(x_gen, RealBatch(x_real), torch.Generator())
    ref = mmd2_unbiased(obj.critic(x_real), obj.critic(x_gen), obj.critic.kernel).mean()
    torch.testing.assert_close(gen_loss, ref)
    torch.testing.assert_close(critic_loss, -ref)
    torch.testing.assert_close(logs["mmd2"], ref.detach())


def test_critic_loss_decreases_with_adam_between_two_clouds():
    """Seeded: 60 Adam steps (lr 1e-3) of the critic raise the learned MMD^2 between two fixed clouds, and the
    logits receive gradient."""
    obj = make()
    x_gen, x_real = clouds(n=48)
    opt = torch.optim.Adam(obj.critic.parameters(), lr=1e-3, betas=(0.5, 0.9))
    losses = []
    for _ in range(60):
        loss, _ = obj.critic_loss(x_gen, RealBatch(x_real), torch.Generator())
        opt.zero_grad()
        loss.backward()
        assert obj.critic.logits.grad is not None and torch.isfinite(obj.critic.logits.grad).all()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.05, (losses[0], losses[-1])
    assert float(obj.critic.weights.detach().sum()) == pytest.approx(1.0, abs=1e-6)


def test_generator_gradient_reaches_the_samples():
    obj = make()
    x_gen, x_real = clouds()
    x = x_gen.clone().requires_grad_(True)
    loss, _ = obj.generator_loss(GenBatch(x, None, None, None), RealBatch(x_real), torch.Generator())
    loss.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # identical samples: finite gradient (MMD^2 ~ 0 there)
    x = x_real.clone().requires_grad_(True)
    loss, _ = obj.generator_loss(GenBatch(x, None, None, None), RealBatch(x_real), torch.Generator())
    loss.backward()
    assert torch.isfinite(x.grad).all()


def test_witness_penalty_matches_brute_force_on_an_identity_embedding():
    """With phi = identity (a linear layer set to I) and one bandwidth, grad_z f(z) is written out by hand."""
    phi = torch.nn.Linear(2, 2, bias=False)
    phi.weight.data = torch.eye(2)
    obj = MMDGAN(phi, bandwidths=(1.0,), penalty_weight=10.0)
    x_gen, x_real = clouds(n=6, n_problems=1)
    gp = obj.witness_penalty(x_gen, x_real, None, rng=torch.Generator().manual_seed(3))
    t = torch.rand(1, 6, 1, generator=torch.Generator().manual_seed(3))
    z = t * x_real + (1 - t) * x_gen
    total = 0.0
    for i in range(6):
        grad = torch.zeros(2)
        for j in range(6):  # grad of exp(-|z - y|^2 / 2) = -(z - y) exp(...)
            for y, sign in ((x_real[0, j], 1.0), (x_gen[0, j], -1.0)):
                grad += sign * -(z[0, i] - y) * math.exp(-float((z[0, i] - y).square().sum()) / 2) / 6
        total += float(grad.square().sum())
    assert float(gp.detach()) == pytest.approx(total / 6, rel=1e-4)
    loss, logs = obj.critic_loss(x_gen, RealBatch(x_real), rng=torch.Generator().manual_seed(3))
    assert "gp" in logs and float(logs["gp"]) == pytest.approx(total / 6, rel=1e-4)
    torch.testing.assert_close(loss, -obj.mmd2(x_gen, x_real, None).mean() + 10.0 * gp)


def test_class_conditional_embedding_uses_labels():
    obj = make(num_classes=3)
    x_gen, x_real = clouds(n_problems=3, n=8)
    loss, _ = obj.critic_loss(x_gen, RealBatch(x_real, labels=torch.tensor([0, 1, 2])), torch.Generator())
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="labels"):
        obj.critic_loss(x_gen, RealBatch(x_real), torch.Generator())


def test_bad_bandwidths_raise():
    with pytest.raises(ValueError, match="bandwidths"):
        MMDGAN(MLPCritic(in_shape=(2,), out_dim=4), bandwidths=(1.0, -1.0))
