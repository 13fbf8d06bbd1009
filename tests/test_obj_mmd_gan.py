"""The official GWF MMD rows (mmd_gan, smmd, immd, ckmmd): the learned kernel's seven families against their
formulas pair by pair (float64), the MMD^2 estimators against double loops, the penalty of the embedding's
coordinate sum and the sMMD scale against closed forms for a linear embedding, and the kernel weights in both
optimizers."""

import math

import pytest
import torch
from torch import nn

from gwf.models.critics import MLPCritic
from gwf.objectives import OBJECTIVES
from gwf.objectives.base import GenBatch, RealBatch
from gwf.objectives.learned_kernel import FAMILIES, LearnedKernel
from gwf.objectives.mmd_gan import MMDGAN, EmbeddingCritic, mmd2
from gwf.objectives.smmd import ScaledMMD, squared_jacobian_norm


def families_by_hand(a, b):
    """The official kernels.py families for one pair of float64 vectors, written out from their formulas."""
    d2 = sum((x - y) ** 2 for x, y in zip(a, b))
    d1 = sum(abs(x - y) for x, y in zip(a, b))
    r = math.sqrt(d2 + 1e-12) / 10.0
    na, nb = sum(x * x for x in a), sum(y * y for y in b)
    return [
        math.exp(-d2 / (2 * 10.0**2)),
        sum(math.exp(-d2 / (2 * s * s)) for s in (1.0, 2.0, 4.0, 8.0, 16.0)),
        math.exp(-d1 / 100.0),
        math.exp(-r),
        (1 + math.sqrt(3) * r) * math.exp(-math.sqrt(3) * r),
        (1 + math.sqrt(5) * r + 5 / 3 * r * r) * math.exp(-math.sqrt(5) * r),
        -math.sqrt(d2 + 1e-6) + math.sqrt(na + 1e-6) + math.sqrt(nb + 1e-6),
    ]


def test_learned_kernel_families_match_their_formulas():
    kernel = LearnedKernel().double()
    kernel.logits.data = torch.tensor([0.3, -0.2, 1.0, 0.0, -1.5, 0.7, 0.1], dtype=torch.float64)
    w = kernel.weights.tolist()
    assert len(FAMILIES) == 7 and sum(w) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(1, 5, 3, generator=g, dtype=torch.float64) * 4, torch.randn(1, 4, 3, generator=g,
                                                                                   dtype=torch.float64) * 4
    gram = kernel.gram(a, b)[0].detach()
    for i in range(5):
        for j in range(4):
            ref = sum(wf * kf for wf, kf in zip(w, families_by_hand(a[0, i].tolist(), b[0, j].tolist())))
            assert float(gram[i, j]) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    aligned = kernel.aligned(a[0, :4], b[0]).detach()
    for i in range(4):
        ref = sum(wf * kf for wf, kf in zip(w, families_by_hand(a[0, i].tolist(), b[0, i].tolist())))
        assert float(aligned[i]) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert LearnedKernel().weights.tolist() == pytest.approx([1 / 7] * 7)  # uniform at init, as the official


@pytest.mark.parametrize("unbiased", [True, False])
@pytest.mark.parametrize("l", [1.0, -1.0])
def test_mmd2_estimators_match_double_loops(unbiased, l):
    g = torch.Generator().manual_seed(0)
    kxx, kyy, kxy = torch.rand(2, 5, 5, generator=g), torch.rand(2, 4, 4, generator=g), torch.rand(2, 5, 4, generator=g)
    out = mmd2(kxx, kyy, kxy if l > -1 else None, unbiased, l)
    for p in range(2):
        def same(k, n):
            pairs = [(i, j) for i in range(n) for j in range(n) if i != j or not unbiased]
            return sum(float(k[p, i, j]) for i, j in pairs) / len(pairs)
        cross = sum(float(kxy[p, i, j]) for i in range(5) for j in range(4)) / 20
        ref = l * same(kxx, 5) + same(kyy, 4) - (l + 1) * cross
        assert float(out[p]) == pytest.approx(ref, rel=1e-5, abs=1e-6)  # fp32 sums


def linear_phi(in_dim=2, out_dim=3, seed=0):
    """phi(x) = W x, as a critic network (labels ignored)."""
    class Linear(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(in_dim, out_dim, bias=False)
            self.lin.weight.data = torch.randn(out_dim, in_dim, generator=torch.Generator().manual_seed(seed))

        def forward(self, x, labels=None):
            return self.lin(x)

    return Linear()


def clouds(seed=1, n_problems=2, n=16, dim=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n_problems, n, dim, generator=g), torch.randn(n_problems, n, dim, generator=g) * 0.5 + 1.0


def gen_batch(x, z=None):
    return GenBatch(x, None, None, None, z)


@pytest.mark.parametrize("name", ["mmd_gan", "smmd", "immd"])
def test_generator_loss_is_the_embedding_mmd2(name):
    obj = OBJECTIVES[name](linear_phi(), embedding_dim=3, penalty=None)
    x_gen, x_real = clouds()
    loss, _ = obj.generator_loss(gen_batch(x_gen), RealBatch(x_real), torch.Generator())
    e_real, e_gen = x_real @ obj.critic.phi.lin.weight.T, x_gen @ obj.critic.phi.lin.weight.T
    k = obj.critic.mixture.gram
    ref = mmd2(k(e_real, e_real), k(e_gen, e_gen), k(e_real, e_gen), True)
    if name == "smmd":  # 1 / (1 + 10 ||W||_F^2): the Jacobian of a linear map
        ref = ref / (1 + 10 * float(obj.critic.phi.lin.weight.detach().square().sum()))
    torch.testing.assert_close(loss, ref.mean())


@pytest.mark.parametrize("penalty,weight", [("interpolated", 10.0), ("r1", 0.2), ("r3gan", 1.0), ("none", 0.0)])
def test_penalty_differentiates_the_coordinate_sum(penalty, weight):
    """phi = W x: the gradient of sum(phi) is W^T 1 everywhere, so interpolated and R1 are ||W^T 1||^2; r3gan
    differentiates the mean of the coordinates, (R1 + R2) / 2 = ||W^T 1 / E||^2 (losses.py)."""
    phi = linear_phi()
    obj = MMDGAN(phi, embedding_dim=3, penalty=penalty, penalty_weight=weight)
    x_gen, x_real = clouds()
    loss, logs = obj.critic_loss(x_gen, RealBatch(x_real), torch.Generator().manual_seed(3))
    w = phi.lin.weight.detach()
    g2 = float(w.sum(0).square().sum())
    expected = {"interpolated": g2, "r1": g2, "r3gan": g2 / 9, "none": 0.0}[penalty] * weight
    assert float(logs["penalty"]) == pytest.approx(expected, rel=1e-5)
    torch.testing.assert_close(loss, -logs["mmd2"] + logs["penalty"])


def test_immd_critic_drops_the_cross_term():
    obj = OBJECTIVES["immd"](linear_phi(), embedding_dim=3, penalty=None, unbiased=False)
    x_gen, x_real = clouds()
    loss, logs = obj.critic_loss(x_gen, RealBatch(x_real), torch.Generator())
    e = [x @ obj.critic.phi.lin.weight.T for x in (x_real, x_gen)]
    k = obj.critic.mixture.gram
    ref = (k(e[1], e[1]).mean((1, 2)) - k(e[0], e[0]).mean((1, 2))).mean()  # mean k(q, q') - mean k(p, p')
    torch.testing.assert_close(loss, -ref)
    torch.testing.assert_close(logs["immd"], ref.detach())


@pytest.mark.parametrize("scaling", ["grad", "value_and_grad"])
def test_smmd_scale_of_a_linear_embedding(scaling):
    obj = ScaledMMD(linear_phi(), embedding_dim=3, penalty=None, scaling=scaling)
    x_gen, x_real = clouds()
    loss, logs = obj.critic_loss(x_gen, RealBatch(x_real), torch.Generator())
    w = obj.critic.phi.lin.weight.detach()
    e_real, e_gen = x_real @ w.T, x_gen @ w.T
    k = obj.critic.mixture.gram
    raw = mmd2(k(e_real, e_real), k(e_gen, e_gen), k(e_real, e_gen), True)
    extra = e_real.square().mean((1, 2)) if scaling == "value_and_grad" else 0.0
    scale = 1 / (1 + 10 * (w.square().sum() + extra))
    torch.testing.assert_close(loss, -(scale * raw).mean())
    loss.backward()  # the scale is differentiable for the critic (create_graph)
    assert obj.critic.phi.lin.weight.grad is not None


def test_hutchinson_estimates_the_jacobian_norm():
    """32 coordinates (> 16): Hutchinson's E ||J^T v||^2 = ||W||_F^2 for phi = W x; 4,000 probes within 3%; 16
    coordinates: exact."""
    for out_dim, probes, rel in ((32, 4000, 0.03), (16, 1, 1e-6)):
        phi = linear_phi(out_dim=out_dim)
        x = torch.randn(5, 2).requires_grad_(True)
        norm2 = squared_jacobian_norm(phi(x), x, False, probes, torch.Generator().manual_seed(0))
        expected = float(phi.lin.weight.detach().square().sum())
        assert norm2.tolist() == pytest.approx([expected] * 5, rel=rel)


def test_ckmmd_pairs_noise_with_embeddings():
    obj = OBJECTIVES["ckmmd"](linear_phi(out_dim=2), embedding_dim=2, penalty=None)
    x_gen, x_real = clouds(n=6)
    z = torch.randn(12, 2, generator=torch.Generator().manual_seed(5))
    loss, logs = obj.critic_loss(x_gen, RealBatch(x_real), torch.Generator(), z=z)
    w = obj.critic.phi.lin.weight.detach()
    k = obj.critic.mixture.aligned
    zz = z.view(2, 6, 2)
    ref = (k(zz, x_real @ w.T).mean(1) - k(zz, x_gen @ w.T).mean(1)).mean()
    torch.testing.assert_close(loss, -ref)
    gen_loss, _ = obj.generator_loss(gen_batch(x_gen, z), RealBatch(x_real), torch.Generator())
    torch.testing.assert_close(gen_loss, -k(zz, x_gen @ w.T).mean())
    with pytest.raises(ValueError, match="embedding_dim"):
        obj.critic_loss(x_gen, RealBatch(x_real), torch.Generator(), z=torch.randn(12, 5))
    with pytest.raises(ValueError, match="kernel=learned"):
        OBJECTIVES["ckmmd"](linear_phi(), embedding_dim=3, kernel="gaussian", kernel_params={"sigma": 1.0})


def test_fixed_kernel_on_embeddings():
    """kernel: gaussian (the official --kernel rbf --sigma_kernel 10) instead of the learned mixture."""
    obj = MMDGAN(linear_phi(), embedding_dim=3, kernel="gaussian", kernel_params={"sigma": 10.0}, penalty=None)
    assert list(obj.critic.parameters()) == list(obj.critic.phi.parameters()) and obj.generator_parameters() == []
    ref = MMDGAN(linear_phi(), embedding_dim=3, penalty=None)
    ref.critic.mixture.logits.data = torch.tensor([100.0, 0, 0, 0, 0, 0, 0])  # all weight on gaussian(sigma=10)
    x_gen, x_real = clouds()
    a, _ = obj.generator_loss(gen_batch(x_gen), RealBatch(x_real), torch.Generator())
    b, _ = ref.generator_loss(gen_batch(x_gen), RealBatch(x_real), torch.Generator())
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("players", ["both", "critic"])
def test_kernel_weights_in_both_optimizers(players):
    """The trainer's two optimizers hold the logits (official params_T and params_D) or only the critic's."""
    from tests.conftest import compose_config
    from gwf.build import build_module

    cfg = compose_config(["experiment=gwf_2d", "method=mmd_gan", f"method.kernel_players={players}"])
    module = build_module(cfg, (2,), 0)
    logits = module.objective.critic.mixture.logits
    opt_g, opt_c = module.configure_optimizers()[0]
    in_g = any(p is logits for group in opt_g.param_groups for p in group["params"])
    in_c = any(p is logits for group in opt_c.param_groups for p in group["params"])
    assert in_c and in_g == (players == "both")
    assert isinstance(module.objective.critic, EmbeddingCritic) and cfg.method.embedding_dim == 128


def test_class_conditional_embedding_and_bad_shapes():
    phi = MLPCritic(in_shape=(2,), hidden=16, depth=2, out_dim=4, num_classes=3)
    obj = MMDGAN(phi, embedding_dim=4)
    x_gen, x_real = clouds(n_problems=3, n=8)
    loss, _ = obj.critic_loss(x_gen, RealBatch(x_real, labels=torch.tensor([0, 1, 2])), torch.Generator())
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="embedding_dim"):
        MMDGAN(phi, embedding_dim=8).critic_loss(x_gen, RealBatch(x_real, labels=torch.tensor([0, 1, 2])),
                                                  torch.Generator())
    with pytest.raises(ValueError, match="kernel_players"):
        MMDGAN(phi, kernel_players="generator")
