"""[GWF] U-Net generator and critic (gwf/models/unet.py): parameter shapes equal to the official code's (written
below as data from its constructors), forward shapes and gradients at small width, known answers for the attention
blocks, resampling and initialization, the official quirk, clear errors."""

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from gwf.models.unet import CriticAttention, CriticBlock, SelfAttention, UNetCritic, UNetGenerator, Upsample

# ----------------------------------------------------------------------------------------------------------------
# Official parameter shapes (Paulcauch/GWF @ aa47d03), one helper per official class
# ----------------------------------------------------------------------------------------------------------------


def conv(c_in, c_out, k, bias=True):
    """nn.Conv2d(c_in, c_out, k) (unet.py conv2d; OTM.py SpectralConv2d's inner conv, its weight_orig)."""
    return [(c_out, c_in, k, k)] + ([(c_out,)] if bias else [])


def linear(c_in, c_out):
    """nn.Linear (OTM.py SpectralLinear's inner linear, its weight_orig)."""
    return [(c_out, c_in), (c_out,)]


def gn(c):
    """unet.py group_norm: nn.GroupNorm(32, c, affine=True)."""
    return [(c,), (c,)]


def resblock(c_in, c_out):
    """unet.py ResidualBlock: norm1, conv1 3x3, norm2, conv2 3x3, conv2d 1x1 shortcut when in_ch != out_ch
    (conv_shortcut is never set). No temb_proj: GWF removed sdeflow-light's time embedding."""
    return gn(c_in) + conv(c_in, c_out, 3) + gn(c_out) + conv(c_out, c_out, 3) + (
        conv(c_in, c_out, 1) if c_in != c_out else [])


def selfattn(c):
    """unet.py SelfAttention: attn_q, attn_k, attn_v, proj_out (1x1 with bias), norm."""
    return 4 * conv(c, c, 1) + gn(c)


def resample(c):
    """unet.py downsample / upsample with resamp_with_conv=True: one conv2d(c, c) 3x3."""
    return conv(c, c, 3)


def official_unet_cifar10():
    """UNet(input_channels=3, input_height=32, ch=96, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,))
    module by module. Skip widths left by the down path: [96 | 96, 96, 96 | 192, 192, 192 | 192, 192, 192 | 192,
    192], popped from the right by the up path."""
    s = conv(3, 96, 3)  # begin_conv
    s += 2 * resblock(96, 96) + resample(96)  # down level 0 (32x32)
    s += resblock(96, 192) + selfattn(192) + resblock(192, 192) + selfattn(192) + resample(192)  # level 1 (16x16)
    s += 2 * resblock(192, 192) + resample(192)  # level 2 (8x8)
    s += 2 * resblock(192, 192)  # level 3 (4x4)
    s += resblock(192, 192) + selfattn(192) + resblock(192, 192)  # mid_modules
    s += 3 * resblock(384, 192) + resample(192)  # up level 3 (4x4), then upsample
    s += 3 * resblock(384, 192) + resample(192)  # up level 2 (8x8)
    s += 2 * (resblock(384, 192) + selfattn(192)) + resblock(288, 192) + selfattn(192) + resample(192)  # level 1
    s += resblock(288, 96) + 2 * resblock(192, 96)  # up level 0 (32x32)
    s += gn(96) + conv(96, 3, 3)  # end_conv: normalize, act, conv2d
    return s


def official_unet_mnist28():
    """UNet(input_channels=1, input_height=28, ch=96, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=()):
    attention only in the middle. Skip widths [96 | 96, 96, 96 | 192, 192, 192 | 192, 192]."""
    s = conv(1, 96, 3)
    s += 2 * resblock(96, 96) + resample(96)  # 28x28
    s += resblock(96, 192) + resblock(192, 192) + resample(192)  # 14x14
    s += 2 * resblock(192, 192)  # 7x7
    s += resblock(192, 192) + selfattn(192) + resblock(192, 192)  # mid
    s += 3 * resblock(384, 192) + resample(192)  # up 7x7
    s += 2 * resblock(384, 192) + resblock(288, 192) + resample(192)  # up 14x14
    s += resblock(288, 96) + 2 * resblock(192, 96)  # up 28x28
    s += gn(96) + conv(96, 1, 3)
    return s


def first_res_block_discriminator(c_in, c_out):
    """OTM.py FirstResBlockDiscriminator(stride=2): model conv 3x3, conv 3x3; bypass conv 1x1 (conv_layer =
    SpectralConv2d, bias=True by default: D_bias is never read)."""
    return conv(c_in, c_out, 3) + conv(c_out, c_out, 3) + conv(c_in, c_out, 1)


def res_block_discriminator(c_in, c_out, stride):
    """OTM.py ResBlockDiscriminator: two 3x3 convs; stride 2 adds a 1x1 bypass conv, stride 1 an empty bypass."""
    return conv(c_in, c_out, 3) + conv(c_out, c_out, 3) + (conv(c_in, c_out, 1) if stride != 1 else [])


def attention(ch):
    """OTM.py Attention (BigGAN SNConv2d, bias=False): theta, phi C -> C/8, g C -> C/2, o C/2 -> C; gamma scalar."""
    return (conv(ch, ch // 8, 1, False) + conv(ch, ch // 8, 1, False) + conv(ch, ch // 2, 1, False)
            + conv(ch // 2, ch, 1, False) + [()])


def official_discriminator_unet(nc, ndf):
    """OTM.py Discriminator_unet (networks/__init__.py: ndf 164 on CIFAR-10, 128 on MNIST), and separately the
    unused concat projection of BaseDiscriminator.__init__ (conditioning 'concat', num_classes 1, projection_dim
    128: SpectralLinear(129, 1)), which its forward never calls."""
    used = first_res_block_discriminator(nc, ndf)  # H -> H/2
    used += res_block_discriminator(ndf, 2 * ndf, 2)  # -> H/4
    used += attention(2 * ndf)
    used += res_block_discriminator(2 * ndf, 4 * ndf, 2)  # -> H/8
    used += res_block_discriminator(4 * ndf, 4 * ndf, 1)
    used += linear(4 * ndf, 1)  # final_layer: SpectralLinear(ch, 1)
    dead = linear(1 + 128, 1)  # self.projection
    return used, dead


def numel(shapes):
    return sum(torch.Size(s).numel() for s in shapes)


def shapes_of(module):
    return Counter(tuple(p.shape) for p in module.parameters())


def test_generator_matches_the_official_cifar10_unet():
    gen = UNetGenerator([3, 32, 32])
    official = official_unet_cifar10()
    assert shapes_of(gen) == Counter(official)
    assert sum(p.numel() for p in gen.parameters()) == numel(official) == 18_492_387
    assert sum(isinstance(m, SelfAttention) for m in gen.modules()) == 6  # 2 down, 1 mid, 3 up at 16x16
    assert gen.noise_shape == (3, 32, 32)


def test_generator_matches_the_official_mnist28_unet():
    gen = UNetGenerator([1, 28, 28], ch_mult=(1, 2, 2), attn_resolutions=())
    official = official_unet_mnist28()
    assert shapes_of(gen) == Counter(official)
    assert sum(p.numel() for p in gen.parameters()) == numel(official) == 12_540_193
    assert sum(isinstance(m, SelfAttention) for m in gen.modules()) == 1


@pytest.mark.parametrize("nc,ndf,total", [(3, 164, 15_663_936), (1, 128, 9_541_124)])
def test_critic_matches_the_official_discriminator_unet(nc, ndf, total):
    critic = UNetCritic([nc, 32, 32] if nc == 3 else [nc, 28, 28], ndf=ndf)
    used, dead = official_discriminator_unet(nc, ndf)
    assert numel(used) + numel(dead) == total  # the official count, its dead projection (130) included
    assert shapes_of(critic) == Counter(used)  # spectral norm: the un-normalized weights are the parameters
    assert sum(p.numel() for p in critic.parameters()) == total - 130
    assert all(parametrize.is_parametrized(m, "weight") for m in critic.modules()
               if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))


# ----------------------------------------------------------------------------------------------------------------
# Forward passes at small width
# ----------------------------------------------------------------------------------------------------------------

SMALL = dict(ch=8, ch_mult=(1, 2, 2), attn_resolutions=(8,), norm_groups=4)


@pytest.mark.parametrize("shape", [[3, 16, 16], [1, 12, 8]])
def test_generator_forward_shapes_and_gradients(shape):
    torch.manual_seed(0)
    gen = UNetGenerator(shape, **SMALL)
    z = torch.rand(3, *shape) * 2 - 1  # the official default noise: uniform on [-1, 1], image-shaped
    x = gen(z)
    assert x.shape == (3, *shape) and torch.isfinite(x).all()
    assert x.abs().max() < 1e-3  # official init: the last conv at scale 0, so the generator starts near zero
    x.square().sum().backward()
    assert all(p.grad is not None for p in gen.parameters())
    with torch.no_grad():  # away from the near-zero init, every parameter gets a nonzero gradient
        for p in gen.parameters():
            p.normal_(0.0, 0.3)
    gen.zero_grad()
    gen(z, None, torch.ones(3)).square().sum().backward()  # labels, alpha accepted (unconditional, ignored)
    for name, p in gen.named_parameters():
        assert p.grad.abs().sum() > 0, name
    assert gen.noise_shape == tuple(shape)


def test_generator_is_per_sample():
    """GroupNorm only: output i depends on z_i alone (eval mode; no dropout at the default 0)."""
    torch.manual_seed(0)
    gen = UNetGenerator([1, 8, 8], ch=8, ch_mult=(1, 2), attn_resolutions=(4,), norm_groups=4)
    with torch.no_grad():
        for p in gen.parameters():
            p.normal_(0.0, 0.3)
    z = torch.randn(3, 1, 8, 8)
    jac = torch.autograd.functional.jacobian(lambda t: gen(t).flatten(1).sum(1), z)  # [3, 3, 1, 8, 8]
    norms = jac.flatten(2).norm(dim=2)
    assert (norms.diagonal() > 0).all() and torch.equal(norms * (1 - torch.eye(3)), torch.zeros(3, 3))


@pytest.mark.parametrize("out_dim", [1, 4])
def test_critic_forward_shapes_and_gradients(out_dim):
    torch.manual_seed(0)
    critic = UNetCritic([3, 16, 16], ndf=8, out_dim=out_dim)
    x = torch.randn(5, 3, 16, 16)
    out = critic(x)
    assert out.shape == ((5,) if out_dim == 1 else (5, out_dim)) and torch.isfinite(out).all()
    with torch.no_grad():
        critic.blocks[2].gamma.fill_(0.5)  # gamma starts at 0, which blocks the attention convs' gradients
    critic.zero_grad()
    critic(x).sum().backward()
    for name, p in critic.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_critic_handles_the_official_mnist_sizes():
    """28 -> 14 -> 7 (attention max-pools 7x7 to 3x3) -> 3 (floor), as the official at image_size 28."""
    critic = UNetCritic([1, 28, 28], ndf=8)
    assert critic(torch.randn(2, 1, 28, 28)).shape == (2,)
    assert critic.blocks[:4](torch.randn(2, 1, 28, 28)).shape == (2, 32, 3, 3)


def test_critic_gradients_are_per_sample():
    torch.manual_seed(0)
    critic = UNetCritic([1, 8, 8], ndf=8)
    with torch.no_grad():
        critic.blocks[2].gamma.fill_(1.0)
    critic.eval()  # fixed spectral-norm vectors: the same function for every call of the jacobian
    x = torch.randn(4, 1, 8, 8)
    jac = torch.autograd.functional.jacobian(lambda t: critic(t), x)  # [4, 4, 1, 8, 8]
    norms = jac.flatten(2).norm(dim=2)
    assert (norms.diagonal() > 0).all() and torch.equal(norms * (1 - torch.eye(4)), torch.zeros(4, 4))


# ----------------------------------------------------------------------------------------------------------------
# Known answers
# ----------------------------------------------------------------------------------------------------------------


def test_generator_attention_against_a_direct_computation():
    torch.manual_seed(0)
    attn = SelfAttention(8, groups=4)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0.0, 0.5)
    x = torch.randn(2, 8, 3, 5)
    h = F.group_norm(x, 4, attn.norm.weight, attn.norm.bias, eps=1e-6)
    q, k, v = (torch.einsum("oc,bchw->bohw", f.weight[:, :, 0, 0], h) + f.bias[:, None, None]
               for f in (attn.q, attn.k, attn.v))
    logits = torch.einsum("cij,ckl->ijkl", q[0], k[0]) / 8**0.5  # sample 0: [3, 5 (query), 3, 5 (key)]
    w = logits.flatten(2).softmax(-1).view(3, 5, 3, 5)
    out = torch.einsum("ijkl,ckl->cij", w, v[0])
    expected = x[0] + torch.einsum("oc,cij->oij", attn.proj.weight[:, :, 0, 0], out) + attn.proj.bias[:, None, None]
    assert torch.allclose(attn(x)[0], expected, atol=1e-5)
    with torch.no_grad():  # q = 0: uniform attention, every position reads the mean of v
        attn.q.weight.zero_(), attn.q.bias.zero_()
    mean_v = v.mean(dim=(2, 3), keepdim=True).expand_as(v)
    assert torch.allclose(attn(x), x + attn.proj(mean_v), atol=1e-5)


def test_critic_attention_against_a_direct_computation():
    torch.manual_seed(0)
    attn = CriticAttention(16).eval()  # eval: the spectrally normalized weights stay fixed
    x = torch.randn(2, 16, 4, 6)
    assert torch.equal(attn(x), x)  # gamma starts at 0: the identity
    with torch.no_grad():
        attn.gamma.fill_(0.7)
    w = {n: getattr(attn, n).weight[:, :, 0, 0] for n in ("theta", "phi", "g", "o")}  # normalized weights
    theta = torch.einsum("oc,bchw->bohw", w["theta"], x).flatten(2)  # [2, 2, 24]
    pool = lambda t: t.view(2, -1, 2, 2, 3, 2).amax(dim=(3, 5)).flatten(2)  # 2x2 max-pool: [2, C', 6]
    phi, g = pool(torch.einsum("oc,bchw->bohw", w["phi"], x)), pool(torch.einsum("oc,bchw->bohw", w["g"], x))
    beta = torch.einsum("bcn,bcm->bnm", theta, phi).softmax(-1)  # [2, 24, 6], no temperature
    o = torch.einsum("bcm,bnm->bcn", g, beta)  # [2, 8, 24]
    expected = x + 0.7 * torch.einsum("oc,bcn->bon", w["o"], o).view(2, 16, 4, 6)
    assert torch.allclose(attn(x), expected, atol=1e-5)
    for name in ("theta", "phi", "g", "o"):  # the effective weights have spectral norm 1
        assert torch.linalg.matrix_norm(w[name], ord=2).item() == pytest.approx(1.0, abs=1e-3)


def test_upsample_and_downsample_against_direct_computations():
    torch.manual_seed(0)
    up = Upsample(4, with_conv=True)
    x = torch.randn(2, 4, 3, 5)
    nearest = x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.allclose(up(x), F.conv2d(nearest, up.conv.weight, up.conv.bias, padding=1), atol=1e-6)
    gen = UNetGenerator([1, 28, 28], ch=8, ch_mult=(1, 2, 2), attn_resolutions=(), norm_groups=4)
    down = gen.down[0].resample  # conv3x3, stride 2, padding 1: 28 -> 14 -> 7 as the official
    assert down.stride == (2, 2) and down(torch.randn(1, 8, 28, 28)).shape == (1, 8, 14, 14)
    pooled = UNetGenerator([1, 8, 8], ch=8, ch_mult=(1, 2), norm_groups=4, resamp_with_conv=False).down[0].resample
    y = torch.randn(2, 4, 2, 4)
    assert torch.allclose(pooled(y), y.view(2, 4, 1, 2, 2, 2).mean(dim=(3, 5)), atol=1e-6)


def test_generator_initialization_is_the_official_variance_scaling():
    """Uniform on +-sqrt(3 * scale / fan_out) (the official 'fan_avg' returns fan_out), zero biases; scale 0 (as
    1e-10) for each block's conv2, the attention projection and the last conv."""
    torch.manual_seed(0)
    gen = UNetGenerator([3, 32, 32], ch=32, ch_mult=(1, 2), attn_resolutions=(16,), num_res_blocks=1)
    zero_scale = {id(m.conv2.weight) for m in gen.modules() if hasattr(m, "conv2")}
    zero_scale |= {id(m.proj.weight) for m in gen.modules() if isinstance(m, SelfAttention)}
    zero_scale.add(id(gen.conv_out.weight))
    for name, p in gen.named_parameters():
        if "norm" in name:
            assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)), name
        elif name.endswith("bias"):
            assert torch.equal(p, torch.zeros_like(p)), name
        else:
            fan_out = p.shape[0] * p.shape[2] * p.shape[3]
            bound = (3.0 * (1e-10 if id(p) in zero_scale else 1.0) / fan_out) ** 0.5
            assert p.abs().max() <= bound and p.abs().max() > 0.9 * bound, name
            assert p.std().item() == pytest.approx(bound / 3**0.5, rel=0.15), name  # uniform: std = bound / sqrt(3)
    assert gen.begin.weight.abs().max() > 0.9 * (3.0 / (32 * 9)) ** 0.5  # fan_out = 32 * 9, not fan_in = 3 * 9


def test_critic_official_quirk_shortcut_reads_the_activated_input():
    torch.manual_seed(0)
    plain = CriticBlock(8, 8, down=False)
    quirk = CriticBlock(8, 8, down=False, official_quirks=True)
    quirk.load_state_dict(plain.state_dict())
    plain.eval(), quirk.eval()
    x = torch.randn(2, 8, 4, 4)
    assert torch.allclose(quirk(x) - plain(x), F.leaky_relu(x, 0.2) - x, atol=1e-6)
    down_plain, down_quirk = CriticBlock(8, 16, down=True), CriticBlock(8, 16, down=True, official_quirks=True)
    down_quirk.load_state_dict(down_plain.state_dict())
    down_plain.eval(), down_quirk.eval()
    skip = lambda t: F.avg_pool2d(down_plain.skip(t), 2)  # [conv1x1, avg-pool], as the official bypass
    assert torch.allclose(down_quirk(x) - down_plain(x), skip(F.leaky_relu(x, 0.2)) - skip(x), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------------------


def test_clear_errors():
    gen = UNetGenerator([1, 8, 8], ch=8, ch_mult=(1, 2), norm_groups=4)
    with pytest.raises(ValueError, match="image-shaped noise"):
        gen(torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        gen(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="unconditional"):
        UNetGenerator([3, 32, 32], num_classes=10)
    with pytest.raises(ValueError, match="divisible by 8"):
        UNetGenerator([3, 28, 28])  # 4 levels need H divisible by 2^3
    with pytest.raises(ValueError, match="norm_groups"):
        UNetGenerator([3, 16, 16], ch=8, ch_mult=(1, 2))  # 8 channels in groups of 32
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        UNetGenerator([2])
    critic = UNetCritic([1, 8, 8], ndf=8)
    with pytest.raises(ValueError, match=r"\[B, 1, 8, 8\]"):
        critic(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="unconditional"):
        UNetCritic([3, 32, 32], num_classes=10)
    with pytest.raises(ValueError, match="H, W >= 8"):
        UNetCritic([1, 4, 4])
    with pytest.raises(ValueError, match="critic=mlp"):
        UNetCritic([2])


def test_spectral_norm_option_does_not_normalize_twice():
    """critic.spectral_norm=true on the U-Net critic (spectrally normalized by construction) leaves every layer with
    one parametrization: the parameter count and the parametrized layers are unchanged."""
    from torch.nn.utils import parametrize

    from gwf.models.critics import build_critic

    plain = build_critic("unet", in_shape=[3, 16, 16], ndf=8)
    again = build_critic("unet", spectral_norm=True, in_shape=[3, 16, 16], ndf=8)
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in again.parameters())
    for module in again.modules():
        if parametrize.is_parametrized(module, "weight"):
            assert len(module.parametrizations.weight) == 1
