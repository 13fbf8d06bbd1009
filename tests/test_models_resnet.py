"""[GWF] Small-Net ResNet generator and critic: the official architecture's parameter counts, tanh range,
per-sample critic gradients (no batch statistics), projection conditioning, the official quirks, clear errors."""

import math

import pytest
import torch

from gwf.models import build_model
from gwf.models.critics import build_critic
from gwf.models.resnet import GBlock, ResNetCritic, ResNetGenerator


def _conv(c_in, c_out, k):
    return c_in * c_out * k * k + c_out


def test_generator_matches_the_official_small_net_count():
    """Official Generator_otm with --nz 192 --ngf 256 on CIFAR-10: Linear(192, 4*4*256), 3 blocks of
    [BN(256), conv3x3, BN(256), conv3x3], BN(256), conv3x3(256 -> 3)."""
    gen = ResNetGenerator([3, 32, 32])
    block = 2 * 256 + _conv(256, 256, 3) + 2 * 256 + _conv(256, 256, 3)
    expected = (192 * 4096 + 4096) + 3 * block + 2 * 256 + _conv(256, 3, 3)
    assert sum(p.numel() for p in gen.parameters()) == expected
    assert len(gen.blocks) == 3 and gen.noise_shape == (192,)


def test_critic_matches_the_official_small_net_count():
    """Official Discriminator_otm with ngf = ndf = 256: first block (3 -> 256, 1x1 shortcut), a down block (1x1
    shortcut), two blocks with identity shortcuts, Linear(256, 1)."""
    critic = ResNetCritic([3, 32, 32], ndf=256)
    first = _conv(3, 256, 3) + _conv(256, 256, 3) + _conv(3, 256, 1)
    down = 2 * _conv(256, 256, 3) + _conv(256, 256, 1)
    same = 2 * _conv(256, 256, 3)
    assert sum(p.numel() for p in critic.parameters()) == first + down + 2 * same + 257


@pytest.mark.parametrize("shape,blocks", [([3, 32, 32], 3), ([1, 8, 8], 1), ([3, 16, 16], 2)])
def test_generator_output_is_in_tanh_range(shape, blocks):
    torch.manual_seed(0)
    gen = build_model("resnet", out_shape=shape, num_classes=0, ngf=32)
    z = torch.randn(16, 192)
    x = gen(z)
    assert x.shape == (16, *shape) and len(gen.blocks) == blocks
    assert x.abs().max() < 1.0 and x.std(dim=0).mean() > 0.05  # different z, different images
    with torch.no_grad():
        gen.conv_out.weight.mul_(1e3)  # huge pre-activations saturate the tanh: still within [-1, 1]
    x = gen(z)
    assert x.abs().max() <= 1.0 and x.abs().max() > 0.999


def test_critic_gradients_are_per_sample():
    """d(score_i)/d(x_j) = 0 for i != j: nothing in the critic mixes the samples of a batch."""
    torch.manual_seed(0)
    for num_classes, out_dim in [(0, 1), (5, 1), (0, 3)]:
        critic = build_critic("resnet", in_shape=[3, 16, 16], ndf=16, num_classes=num_classes, out_dim=out_dim)
        x = torch.randn(4, 3, 16, 16)
        labels = torch.tensor([0, 1, 2, 4]) if num_classes else None
        jac = torch.autograd.functional.jacobian(lambda t: critic(t, labels).reshape(4, -1).sum(1), x)  # [4, 4, ...]
        norms = jac.flatten(2).norm(dim=2)  # [i, j]
        assert (norms.diagonal() > 0).all()
        assert torch.equal(norms * (1 - torch.eye(4)), torch.zeros(4, 4)), norms


def test_critic_projection_adds_class_embedding_times_features():
    torch.manual_seed(0)
    critic = ResNetCritic([1, 8, 8], ndf=8, num_classes=3, out_dim=2)
    x, labels = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 2, 0])
    h = torch.relu(critic.blocks(x)).sum(dim=(2, 3))  # features after the global sum pool [5, 8]
    emb = critic.class_emb.weight.view(3, 2, 8)[labels]  # [5, out_dim, ndf]
    expected = critic.head(h) + (emb * h[:, None, :]).sum(-1)
    assert torch.allclose(critic(x, labels), expected, atol=1e-5)
    assert critic(x, labels).shape == (5, 2)


def test_conditional_batch_norm_starts_as_plain_batch_norm():
    torch.manual_seed(0)
    gen = ResNetGenerator([1, 8, 8], ngf=16, num_classes=4, alpha_dim=8)
    z = torch.randn(6, 192)
    x0 = gen(z, torch.zeros(6, dtype=torch.long), torch.ones(6))
    x1 = gen(z, torch.tensor([0, 1, 2, 3, 1, 2]), torch.full((6,), 3.0))
    assert torch.equal(x0, x1)  # zero-initialized class/alpha gains and biases
    with torch.no_grad():
        for block in gen.blocks:
            block.bn1.cond.weight.normal_(0, 0.5)
    assert (gen(z, torch.tensor([0, 1, 2, 3, 1, 2]), torch.full((6,), 3.0)) - x0).abs().max() > 1e-2


def test_official_quirks():
    torch.manual_seed(0)
    block = GBlock(8, 8, official_quirks=True)
    x = torch.randn(2, 8, 4, 4)
    assert torch.allclose(block(x, None), 2 * block.main(x, None))  # the official block: model(x) + model(x)
    block.official_quirks = False
    up = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    assert torch.allclose(block(x, None), block.main(x, None) + up)  # the residual block
    critic = ResNetCritic([1, 8, 8], ndf=4, official_quirks=True)
    same = critic.blocks[-1]  # identity shortcut: the official one reads leaky_relu(x) (in-place activation)
    h = torch.randn(2, 4, 2, 2)
    main = same.conv2(same.act(same.conv1(same.act(h))))
    assert torch.allclose(same(h), main + same.act(h))


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match=r"H = W = 4 \* 2\^k"):
        ResNetGenerator([3, 24, 24])
    with pytest.raises(ValueError, match="square"):
        ResNetGenerator([2])
    with pytest.raises(ValueError, match=r"z of shape \[B, 192\]"):
        ResNetGenerator([1, 8, 8], ngf=8)(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="method.critic.name=mlp"):
        build_critic("resnet", in_shape=[2], num_classes=0)
    with pytest.raises(ValueError, match="n_down"):
        ResNetCritic([1, 6, 6], n_down=2)
    with pytest.raises(ValueError, match="pass labels"):
        ResNetCritic([1, 8, 8], ndf=4, num_classes=2)(torch.randn(2, 1, 8, 8))


def test_small_net_pair_trains_kl_on_digits(digits_dir, tmp_path):
    """The Small-Net pair through the entry point: model=resnet with critic=resnet; 20 KL updates
    on the 8x8 digits lower the Frechet distance by a stated margin (measured 682 -> 433)."""
    from gwf.train import train
    from tests.conftest import compose_config

    cfg = compose_config([f"paths.data_dir={digits_dir.parent}", "data.num_workers=0", "logger=none",
                          "trainer.enable_progress_bar=false", "method=kl", "critic=resnet", "critic.ndf=16",
                          "model=resnet", "model.ngf=16", "jko.updates_first_step=20", "eval.every_n_updates=20",
                          "eval.num_samples=200", "batch.labels_per_update=4", "batch.gen_per_label=16",
                          "batch.pos_per_label=16", "batch.uncond_per_update=16"])
    summary = train(cfg, tmp_path / "run")
    assert summary["last"]["update"] == 20
    assert summary["last"]["fd"] < 0.8 * summary["first"]["fd"], summary


# The official resnet_MMDGAN for CIFAR-10 (Paulcauch/GWF networks/__init__.py, get_model: GeneratorResNet(z_dim=128,
# start_res=4, base_ch=256, n_up=3), DiscriminatorResNet(img_size=32, embed_dim=128, base_ch=128, n_down=2,
# n_nodown=2)), written out as the parameter shapes of each of its layers (weight, bias; BatchNorm: weight, bias).
def _conv_shapes(c_in, c_out, k):
    return [(c_out, c_in, k, k), (c_out,)]


OFFICIAL_G = ([(4096, 128), (4096,)]  # fc
              + 3 * ([(256,), (256,)] + _conv_shapes(256, 256, 3) + [(256,), (256,)] + _conv_shapes(256, 256, 3)
                     + _conv_shapes(256, 256, 1))
              + [(256,), (256,)] + _conv_shapes(256, 3, 3))  # bn_final, conv_out
OFFICIAL_D = (_conv_shapes(3, 128, 3) + _conv_shapes(128, 128, 3) + _conv_shapes(3, 128, 1)  # DFirstResBlock
              # 1 down, 2 no-down DResBlocks
              + 3 * (_conv_shapes(128, 128, 3) + _conv_shapes(128, 128, 3) + _conv_shapes(128, 128, 1))
              + [(128, 128 * 8 * 8), (128,)])  # fc: flatten -> embed_dim


def test_resnet_mmdgan_matches_the_official_parameter_count():
    from gwf.build import build_objective
    from gwf.models import build_model
    from omegaconf import OmegaConf
    from tests.conftest import compose_config

    cfg = OmegaConf.to_container(compose_config(["model=resnet_mmdgan", "critic=resnet_mmdgan", "method=mmd_gan"]),
                                 resolve=True)
    model = dict(cfg["model"])
    model.pop("compile")
    gen = build_model(model.pop("name"), out_shape=[3, 32, 32], num_classes=0, **model)
    critic = build_objective(cfg["method"], (3, 32, 32), 0).critic.phi
    count = lambda shapes: sum(math.prod(s) for s in shapes)  # noqa: E731
    assert sum(p.numel() for p in gen.parameters()) == count(OFFICIAL_G) == 4_276_739
    assert sorted(tuple(p.shape) for p in gen.parameters()) == sorted(OFFICIAL_G)
    assert sum(p.numel() for p in critic.parameters()) == count(OFFICIAL_D) == 2_135_424
    assert sorted(tuple(p.shape) for p in critic.parameters()) == sorted(OFFICIAL_D)
    x = gen(torch.rand(4, 128) * 2 - 1)
    assert x.shape == (4, 3, 32, 32) and critic(x).shape == (4, 128)
