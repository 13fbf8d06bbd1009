"""[GWF] Large-Net: the NCSN++ generator with AdaGN and the small NCSN++ critics (gwf/models/ncsnpp.py,
gwf/models/ncsnpp_critic.py). Parameter names, shapes and counts equal the official code's (Paulcauch/GWF
networks/ncsnpp/, written below as data from its constructors); FIR resampling against known answers and a naive
upfirdn2d; forward, gradients, the gwf interface (flat z, normal_tail, identity_input) and clear errors at a small
width."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from gwf.jko import JKOProximal
from gwf.models.ncsnpp import (NCSNppGenerator, conv_downsample_2d, downsample_2d, fir_kernel_2d, upfirdn2d,
                               upsample_2d)
from gwf.models.ncsnpp_critic import NCSNppCritic

CONF = Path(__file__).resolve().parents[1] / "conf"

# ---------------------------------------------------------------------------------------------------------------------
# The official parameter shapes (CIFAR-10: apply_ncsnpp_args, --nz 128, image_size 32, num_channels 3), as data
# ---------------------------------------------------------------------------------------------------------------------

ZEMB, TEMB = 256, 4 * 128  # z_emb_dim; temb_dim = nf * 4 (ncsnpp_generator_adagn.py, the biggan partial)


def _resblock(c_in, c_out=None, resample=False):
    """layerspp.py ResnetBlockBigGANpp_Adagn(in_ch, out_ch, temb_dim=512, zemb_dim=256, up/down): GroupNorm_0 =
    AdaptiveGroupNorm (style = dense(256, 2 in)), Conv_0 = conv3x3(in, out), Dense_0 = nn.Linear(512, out) (built,
    never used), GroupNorm_1 = AdaptiveGroupNorm (dense(256, 2 out)), Conv_1 = conv3x3(out, out), and Conv_2 =
    conv1x1(in, out) when in != out or up or down."""
    c_out = c_out or c_in
    shapes = {"GroupNorm_0.style.weight": (2 * c_in, ZEMB), "GroupNorm_0.style.bias": (2 * c_in,),
              "Conv_0.weight": (c_out, c_in, 3, 3), "Conv_0.bias": (c_out,),
              "Dense_0.weight": (c_out, TEMB), "Dense_0.bias": (c_out,),
              "GroupNorm_1.style.weight": (2 * c_out, ZEMB), "GroupNorm_1.style.bias": (2 * c_out,),
              "Conv_1.weight": (c_out, c_out, 3, 3), "Conv_1.bias": (c_out,)}
    if c_in != c_out or resample:
        shapes.update({"Conv_2.weight": (c_out, c_in, 1, 1), "Conv_2.bias": (c_out,)})
    return shapes


def _attn(c):
    """layerspp.py AttnBlockpp(channels): GroupNorm_0 (affine), NIN_0..NIN_3 (score_sde layers.py NIN: W [in, out],
    b [out])."""
    shapes = {"GroupNorm_0.weight": (c,), "GroupNorm_0.bias": (c,)}
    for k in range(4):
        shapes.update({f"NIN_{k}.W": (c, c), f"NIN_{k}.b": (c,)})
    return shapes


def _pyramid_down(c_in, c_out):
    """layerspp.py Downsample(fir=True, with_conv=True): Conv2d_0 = up_or_down_sampling.Conv2d(in, out, kernel=3,
    down=True, use_bias=True)."""
    return {"Conv2d_0.weight": (c_out, c_in, 3, 3), "Conv2d_0.bias": (c_out,)}


def _conv3x3(c_in, c_out):
    return {"weight": (c_out, c_in, 3, 3), "bias": (c_out,)}


def _group_norm(c):
    return {"weight": (c,), "bias": (c,)}


# NCSNpp.__init__'s all_modules, in order (nf 128, ch_mult [1, 2, 2, 2] at 32, 16, 8, 4, two blocks per level,
# attention at 16, progressive none, progressive_input residual, biggan blocks). Skips pushed on the way down:
# 128 (input conv), 128, 128, 128 (down block), 256, 256, 256, 256, 256, 256, 256, 256; popped on the way up.
OFFICIAL_MODULES = [
    _conv3x3(3, 128),                                                             # 0: input conv
    _resblock(128, 128), _resblock(128, 128),                                     # 1-2: 32x32
    _resblock(128, resample=True), _pyramid_down(3, 128),                         # 3-4: down block, input pyramid
    _resblock(128, 256), _attn(256), _resblock(256, 256), _attn(256),             # 5-8: 16x16, attention
    _resblock(256, resample=True), _pyramid_down(128, 256),                       # 9-10
    _resblock(256, 256), _resblock(256, 256),                                     # 11-12: 8x8
    _resblock(256, resample=True), _pyramid_down(256, 256),                       # 13-14
    _resblock(256, 256), _resblock(256, 256),                                     # 15-16: 4x4
    _resblock(256), _attn(256), _resblock(256),                                   # 17-19: middle
    _resblock(512, 256), _resblock(512, 256), _resblock(512, 256),                # 20-22: up, 4x4
    _resblock(256, resample=True),                                                # 23: up block
    _resblock(512, 256), _resblock(512, 256), _resblock(512, 256),                # 24-26: 8x8
    _resblock(256, resample=True),                                                # 27
    _resblock(512, 256), _resblock(512, 256), _resblock(384, 256), _attn(256),    # 28-31: 16x16 (skip 128 last)
    _resblock(256, resample=True),                                                # 32
    _resblock(384, 128), _resblock(256, 128), _resblock(256, 128),                # 33-35: 32x32
    _group_norm(128), _conv3x3(128, 3),                                           # 36-37: GroupNorm, output conv
]
# z_transform = Sequential(PixelNorm, dense(nz 128, 256), SiLU, [dense(256, 256), SiLU] x n_mlp 4)
OFFICIAL_Z_TRANSFORM = {"1.weight": (256, 128), "1.bias": (256,),
                        **{f"{i}.{n}": s for i in (3, 5, 7, 9) for n, s in (("weight", (256, 256)), ("bias", (256,)))}}
# Parts of all_modules: (first, last) official indices
PARTS = {"input conv": (0, 0), "down path": (1, 16), "middle": (17, 19), "up path": (20, 35), "output": (36, 37)}
# The official counts, from the shapes above (the sums are checked against these numbers below)
OFFICIAL_PART_COUNTS = {"input conv": 3_584, "down path": 15_311_104, "middle": 3_412_992, "up path": 29_083_392,
                        "output": 3_715, "z_transform": 296_192}
OFFICIAL_GENERATOR_TOTAL = 48_110_979  # of which 3,283,200 in the 28 unused Dense_0 layers
OFFICIAL_DEAD = 3_283_200


def _official_critic(out_dim, ngf=64):
    """discriminator.py Discriminator_small (out_dim 1) / Discriminator_small_embed (o_dim): start_conv =
    conv2d(nc, 2 ngf, 1); conv1..conv4 = DownConvBlock (conv1 = Sequential(conv2d 3x3), conv2 = Sequential(conv2d
    3x3), skip = Sequential(conv2d 1x1, bias=False)); final_conv = conv2d(8 ngf + 1, 8 ngf, 3); end_linear =
    dense(8 ngf, out)."""
    shapes = {"start_conv.weight": (2 * ngf, 3, 1, 1), "start_conv.bias": (2 * ngf,)}
    for name, c_in, c_out in (("conv1", 2 * ngf, 2 * ngf), ("conv2", 2 * ngf, 4 * ngf), ("conv3", 4 * ngf, 8 * ngf),
                              ("conv4", 8 * ngf, 8 * ngf)):
        shapes.update({f"{name}.conv1.0.weight": (c_out, c_in, 3, 3), f"{name}.conv1.0.bias": (c_out,),
                       f"{name}.conv2.0.weight": (c_out, c_out, 3, 3), f"{name}.conv2.0.bias": (c_out,),
                       f"{name}.skip.0.weight": (c_out, c_in, 1, 1)})
    shapes.update({"final_conv.weight": (8 * ngf, 8 * ngf + 1, 3, 3), "final_conv.bias": (8 * ngf,),
                   "end_linear.weight": (out_dim, 8 * ngf), "end_linear.bias": (out_dim,)})
    return shapes


OFFICIAL_CRITIC_TOTAL = {1: 12_247_809, 128: 12_312_960}  # Discriminator_small, Discriminator_small_embed (o_dim 128)


def _count(shapes):
    return sum(math.prod(s) for s in shapes.values())


def _shapes(module):
    return {name: tuple(p.shape) for name, p in module.named_parameters()}


# ---------------------------------------------------------------------------------------------------------------------
# 1. Official parameter counts
# ---------------------------------------------------------------------------------------------------------------------


def test_official_tables_add_up_to_the_official_counts():
    """The hand-listed official shapes give the numbers quoted in the configs and docstrings."""
    for part, (first, last) in PARTS.items():
        assert sum(_count(OFFICIAL_MODULES[i]) for i in range(first, last + 1)) == OFFICIAL_PART_COUNTS[part], part
    assert _count(OFFICIAL_Z_TRANSFORM) == OFFICIAL_PART_COUNTS["z_transform"]
    assert sum(OFFICIAL_PART_COUNTS.values()) == OFFICIAL_GENERATOR_TOTAL
    dead = sum(math.prod(s) for m in OFFICIAL_MODULES for n, s in m.items() if n.startswith("Dense_0"))
    assert dead == OFFICIAL_DEAD == 513 * (6 * 128 + 22 * 256)  # 28 biggan blocks, Linear(512, out_ch)
    for out_dim, total in OFFICIAL_CRITIC_TOTAL.items():
        assert _count(_official_critic(out_dim)) == total


def test_generator_has_the_official_parameter_names_shapes_and_counts():
    with torch.device("meta"):
        gen = NCSNppGenerator([3, 32, 32])
    expected = {f"all_modules.{i}.{n}": s for i, m in enumerate(OFFICIAL_MODULES) for n, s in m.items()}
    expected.update({f"z_transform.{n}": s for n, s in OFFICIAL_Z_TRANSFORM.items()})
    assert _shapes(gen) == expected  # same state-dict keys: official checkpoints load as they are
    assert len(gen.all_modules) == len(OFFICIAL_MODULES) == 38
    for part, (first, last) in PARTS.items():
        got = sum(p.numel() for i in range(first, last + 1) for p in gen.all_modules[i].parameters())
        assert got == OFFICIAL_PART_COUNTS[part], part
    assert sum(p.numel() for p in gen.z_transform.parameters()) == OFFICIAL_PART_COUNTS["z_transform"]
    assert sum(p.numel() for p in gen.parameters()) == OFFICIAL_GENERATOR_TOTAL
    # the official dead time-embedding layers: kept, frozen
    frozen = {n for n, p in gen.named_parameters() if not p.requires_grad}
    assert frozen == {n for n in expected if ".Dense_0." in n}
    assert sum(p.numel() for p in gen.parameters() if p.requires_grad) == OFFICIAL_GENERATOR_TOTAL - OFFICIAL_DEAD
    with torch.device("meta"):
        lean = NCSNppGenerator([3, 32, 32], temb_dense=False)
    assert _shapes(lean) == {n: s for n, s in expected.items() if ".Dense_0." not in n}


@pytest.mark.parametrize("out_dim", [1, 128])
def test_critic_has_the_official_parameter_names_shapes_and_counts(out_dim):
    with torch.device("meta"):
        critic = NCSNppCritic([3, 32, 32], out_dim=out_dim)
    assert _shapes(critic) == _official_critic(out_dim)
    assert sum(p.numel() for p in critic.parameters()) == OFFICIAL_CRITIC_TOTAL[out_dim]


def test_configs_build_the_official_models():
    model = OmegaConf.to_container(OmegaConf.load(CONF / "model" / "ncsnpp.yaml"))
    assert model.pop("name") == "ncsnpp" and model.pop("compile") is False
    critic = OmegaConf.to_container(OmegaConf.load(CONF / "critic" / "ncsnpp.yaml"))
    assert critic.pop("name") == "ncsnpp" and critic.pop("spectral_norm") is False
    with torch.device("meta"):
        gen = NCSNppGenerator(out_shape=[3, 32, 32], num_classes=0, **model)
        embed = NCSNppCritic(in_shape=[3, 32, 32], out_dim=128, num_classes=0, **critic)
    assert sum(p.numel() for p in gen.parameters()) == OFFICIAL_GENERATOR_TOTAL
    assert sum(p.numel() for p in embed.parameters()) == OFFICIAL_CRITIC_TOTAL[128]


def test_official_initialization():
    """DDPM variance scaling (fan_avg) for the NCSN++ convolutions, the official dense layers' fan-out scaling for
    the AdaGN styles, the latent MLP and the critic, 1e-10 scaling where the official init_scale is 0, AdaGN style
    bias = (1, 0)."""
    torch.manual_seed(0)
    gen = NCSNppGenerator([3, 32, 32], num_channels_dae=32, nz=16, z_emb_dim=64)
    block = gen.all_modules[5]  # ResnetBlockBigGAN 32 -> 64

    def bound_ok(w, bound):
        return w.abs().max() <= bound and w.abs().max() > 0.9 * bound

    assert bound_ok(block.Conv_0.weight, math.sqrt(3 / ((32 + 64) * 9 / 2)))  # default_init(): fan_avg
    assert bound_ok(block.Conv_1.weight, math.sqrt(3e-10 / ((64 + 64) * 9 / 2)))  # init_scale 0 -> 1e-10
    assert bound_ok(block.GroupNorm_0.style.weight, math.sqrt(3 / (2 * 32)))  # dense: fan_out = 2 * 32
    assert torch.equal(block.GroupNorm_0.style.bias, torch.cat([torch.ones(32), torch.zeros(32)]))
    assert bound_ok(gen.z_transform[1].weight, math.sqrt(3 / 64))
    attn = gen.all_modules[6]
    assert bound_ok(attn.NIN_0.W, math.sqrt(0.3 / 64)) and attn.NIN_3.W.abs().max() < 1e-5  # NIN init_scale 0.1, 0
    assert bound_ok(gen.all_modules[-1].weight, math.sqrt(3e-10 / ((32 + 3) * 9 / 2)))
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in gen.named_parameters()
               if n.endswith("bias") and "style" not in n and "GroupNorm" not in n)
    critic = NCSNppCritic([3, 32, 32], ngf=8, out_dim=4)
    assert bound_ok(critic.start_conv.weight, math.sqrt(3 / 16))  # fan_out = 16 * 1 * 1
    assert bound_ok(critic.conv2.conv1[0].weight, math.sqrt(3 / (32 * 9)))
    assert bound_ok(critic.conv2.conv2[0].weight, math.sqrt(3e-10 / (32 * 9)))
    assert bound_ok(critic.end_linear.weight, math.sqrt(3 / 4))


# ---------------------------------------------------------------------------------------------------------------------
# 2. FIR resampling
# ---------------------------------------------------------------------------------------------------------------------


def naive_upfirdn2d(x, k, up, down, p0, p1):
    """The definition, one output pixel and one tap at a time: u = x with up - 1 zeros after every sample, P[n] =
    u[n - p0] (zero outside), y[i, j] = sum_ab k[a, b] P[i down + kh - 1 - a, j down + kw - 1 - b] (a true
    convolution, kernel unflipped), for the outputs whose window lies inside the padded signal."""
    b, c, h, w = x.shape
    kh, kw = k.shape
    uh, uw = h * up, w * up

    def padded(n, m):
        r, s = n - p0, m - p0
        if 0 <= r < uh and 0 <= s < uw and r % up == 0 and s % up == 0:
            return x[:, :, r // up, s // up]
        return torch.zeros(b, c, dtype=x.dtype)

    oh, ow = (uh + p0 + p1 - kh) // down + 1, (uw + p0 + p1 - kw) // down + 1
    out = torch.zeros(b, c, oh, ow, dtype=x.dtype)
    for i in range(oh):
        for j in range(ow):
            for a in range(kh):
                for bb in range(kw):
                    out[:, :, i, j] += k[a, bb] * padded(i * down + kh - 1 - a, j * down + kw - 1 - bb)
    return out


@pytest.mark.parametrize("up,down,pad", [(1, 1, (0, 0)), (2, 1, (2, 1)), (1, 2, (1, 1)), (2, 2, (1, -1)),
                                         (3, 2, (-1, 2))])
def test_upfirdn2d_matches_the_naive_definition(up, down, pad):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    k = torch.randn(3, 4, dtype=torch.float64)  # asymmetric, non-square: checks the flip and the axes
    got = upfirdn2d(x, k, up=up, down=down, pad=pad)
    want = naive_upfirdn2d(x, k, up, down, *pad)
    assert got.shape == want.shape and torch.allclose(got, want, atol=1e-12)
    x32, k32 = x.float(), k.float()
    assert torch.allclose(upfirdn2d(x32, k32, up=up, down=down, pad=pad), want.float(), atol=1e-5)


def test_fir_resampling_of_a_constant_image():
    """[1,3,3,1]: constant inside; pixels outside are zeros, so the border rows/columns lose one tap (up: weight
    0.25 of 1, i.e. x 0.75; down: 1/8 of 1, x 7/8 per axis)."""
    k = fir_kernel_2d([1, 3, 3, 1])
    x = torch.full((1, 2, 8, 8), 3.0, dtype=torch.float64)
    up = upsample_2d(x, k.double())
    edge = torch.tensor([0.75] + [1.0] * 14 + [0.75], dtype=torch.float64)
    assert up.shape == (1, 2, 16, 16) and torch.allclose(up, 3.0 * torch.outer(edge, edge).expand_as(up))
    down = downsample_2d(x, k.double())
    edge = torch.tensor([7 / 8, 1.0, 1.0, 7 / 8], dtype=torch.float64)
    assert down.shape == (1, 2, 4, 4) and torch.allclose(down, 3.0 * torch.outer(edge, edge).expand_as(down))


def test_fir_downsample_of_upsample_is_the_direct_composition():
    """1-D, zero outside: up y[2m] = (x[m-1] + 3 x[m]) / 4, y[2m+1] = (3 x[m] + x[m+1]) / 4; down d[m] = (y[2m-1]
    + 3 y[2m] + 3 y[2m+1] + y[2m+2]) / 8. Separable in 2-D: D U X U^T D^T."""
    n = 5
    u = torch.zeros(2 * n, n, dtype=torch.float64)
    for m in range(n):
        u[2 * m, m], u[2 * m + 1, m] = 0.75, 0.75
        if m > 0:
            u[2 * m, m - 1] = 0.25
        if m < n - 1:
            u[2 * m + 1, m + 1] = 0.25
    d = torch.zeros(n, 2 * n, dtype=torch.float64)
    for m in range(n):
        for offset, weight in ((-1, 1), (0, 3), (1, 3), (2, 1)):
            if 0 <= 2 * m + offset < 2 * n:
                d[m, 2 * m + offset] = weight / 8
    torch.manual_seed(1)
    x = torch.randn(2, 3, n, n, dtype=torch.float64)
    k = fir_kernel_2d([1, 3, 3, 1]).double()
    assert torch.allclose(upsample_2d(x, k), u @ x @ u.T, atol=1e-12)
    assert torch.allclose(downsample_2d(upsample_2d(x, k), k), d @ u @ x @ u.T @ d.T, atol=1e-12)
    # inside, the FIR upsampling is bilinear interpolation (half-pixel centers)
    bilinear = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(upsample_2d(x, k)[..., 1:-1, 1:-1], bilinear[..., 1:-1, 1:-1], atol=1e-12)


def test_fused_conv_downsample_with_a_centered_delta_is_fir_downsampling():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 8, 8)
    delta = torch.zeros(3, 3, 3, 3)
    delta[range(3), range(3), 1, 1] = 1.0
    k = fir_kernel_2d([1, 3, 3, 1])
    assert torch.allclose(conv_downsample_2d(x, delta, k), downsample_2d(x, k), atol=1e-6)
    w = torch.randn(4, 3, 3, 3)
    assert conv_downsample_2d(x, w, k).shape == (2, 4, 4, 4)


def test_fir_resampling_has_second_order_gradients():
    """Gradient penalties differentiate the critic's input gradient: double backward through the FIR filter."""
    k = fir_kernel_2d([1, 3, 3, 1]).double()
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: downsample_2d(upsample_2d(t, k), k), (x,))


# ---------------------------------------------------------------------------------------------------------------------
# 3. Forward, gradients, interface, errors (small width)
# ---------------------------------------------------------------------------------------------------------------------

SMALL = dict(num_channels_dae=16, nz=8, z_emb_dim=32)


def _perturbed(module, scale=0.1, seed=0):
    """The official init zero-scales every output convolution (fresh outputs ~1e-5): random weights instead, to see
    the network's behaviour."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def test_generator_forward_shapes_range_and_interface():
    torch.manual_seed(0)
    gen = NCSNppGenerator([3, 32, 32], **SMALL)
    assert gen.noise_shape == (3 * 32 * 32 + 8,) and gen.normal_tail == 8
    z = torch.rand(4, gen.noise_shape[0]) * 2 - 1
    x = gen(z)
    assert x.shape == (4, 3, 32, 32) and torch.isfinite(x).all() and x.abs().max() < 1e-3  # official init: ~0
    assert torch.equal(gen.identity_input(z), z[:, :3072].view(4, 3, 32, 32))
    assert torch.equal(gen(z, labels=None, alpha=torch.ones(4)), x)  # unconditional: alpha ignored
    assert torch.equal(gen.generate(z[:, :3072].view(4, 3, 32, 32), z[:, 3072:]), x)
    _perturbed(gen)
    x = gen(z)
    assert x.abs().max() <= 1.0 and x.std(dim=0).mean() > 0.05  # tanh; different z, different images
    z_img, z_lat = z.clone(), z.clone()
    z_img[:, :3072] = torch.rand(4, 3072) * 2 - 1
    z_lat[:, 3072:] = torch.randn(4, 8)
    assert (gen(z_img) - x).abs().max() > 1e-3 and (gen(z_lat) - x).abs().max() > 1e-3  # both parts matter
    with torch.no_grad():
        gen.all_modules[-1].weight.mul_(1e3)  # saturate: still within [-1, 1]
    x = gen(z)
    assert x.abs().max() <= 1.0 and x.abs().max() > 0.999


def test_generator_gradients_reach_every_trainable_parameter():
    torch.manual_seed(0)
    gen = NCSNppGenerator([3, 16, 16], **SMALL)  # the official init (zero-scaled outputs): tiny, nonzero gradients
    z = torch.rand(4, gen.noise_shape[0]) * 2 - 1
    (gen(z) * torch.randn(4, 3, 16, 16)).sum().backward()
    for name, p in gen.named_parameters():
        if ".Dense_0." in name:
            assert not p.requires_grad and p.grad is None, name  # the official dead time-embedding layers
        else:
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().max() > 0, name


def test_generator_options_centered_and_output():
    torch.manual_seed(0)
    gen = _perturbed(NCSNppGenerator([1, 8, 8], ch_mult=[1, 2], attn_resolutions=[8], **SMALL))
    raw = NCSNppGenerator([1, 8, 8], ch_mult=[1, 2], attn_resolutions=[8], centered=False, not_use_tanh=True,
                          **SMALL)
    raw.load_state_dict(gen.state_dict())
    x, lat = torch.rand(3, 1, 8, 8), torch.randn(3, 8)
    assert torch.allclose(torch.atanh(gen.generate(2 * x - 1, lat)), raw.generate(x, lat), atol=1e-4)
    sig = NCSNppGenerator([1, 8, 8], ch_mult=[1, 2], attn_resolutions=[8], not_use_tanh=True, use_sigmoid=True,
                          **SMALL)
    sig.load_state_dict(gen.state_dict())
    assert torch.allclose(sig.generate(x, lat), torch.sigmoid(torch.atanh(gen.generate(x, lat))), atol=1e-4)
    nofir = NCSNppGenerator([1, 8, 8], ch_mult=[1, 2], fir=False, progressive_input="none", **SMALL)
    assert nofir(torch.randn(2, 72)).shape == (2, 1, 8, 8) and not any("Conv2d_0" in n for n in _shapes(nofir))


def test_jko_noise_start_takes_the_image_part():
    torch.manual_seed(0)
    gen = NCSNppGenerator([1, 8, 8], ch_mult=[1, 2], **SMALL)
    prox = JKOProximal(gen, tau=0.5, start="noise")
    z = torch.rand(4, gen.noise_shape[0]) * 2 - 1
    x = gen(z)
    expected = (x - z[:, :64].view(4, 1, 8, 8)).pow(2).flatten(1).sum(1).mean() / (2 * 0.5)
    assert torch.allclose(prox(x, z), expected)


def test_generator_errors_are_clear():
    gen = NCSNppGenerator([1, 8, 8], ch_mult=[1, 2], **SMALL)
    for bad in (torch.randn(2, 1, 8, 8), torch.randn(2, 64), torch.randn(2, 73)):
        with pytest.raises(ValueError, match=r"flat z of shape \[B, 72\] = \[B, 1\*8\*8 image noise \+ nz=8"):
            gen(bad)
        with pytest.raises(ValueError, match="flat z"):
            gen.identity_input(bad)
    with pytest.raises(ValueError, match="unconditional"):
        NCSNppGenerator([3, 32, 32], num_classes=10, **SMALL)
    with pytest.raises(ValueError, match="square"):
        NCSNppGenerator([3, 32, 16], **SMALL)
    with pytest.raises(ValueError, match="divisible by 8"):
        NCSNppGenerator([3, 12, 12], **SMALL)
    with pytest.raises(ValueError, match="resblock_type='ddpm' is not supported"):
        NCSNppGenerator([3, 32, 32], resblock_type="ddpm", **SMALL)
    with pytest.raises(ValueError, match="embedding_type='fourier'"):
        NCSNppGenerator([3, 32, 32], embedding_type="fourier", **SMALL)
    with pytest.raises(ValueError, match="num_channels_dae"):
        NCSNppGenerator([3, 32, 32], num_channels_dae=18)


def test_critic_outputs_and_minibatch_stddev():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    score = NCSNppCritic([3, 32, 32], ngf=8)
    embed = NCSNppCritic([3, 32, 32], ngf=8, out_dim=5)
    assert score(x).shape == (8,) and embed(x).shape == (8, 5) and score(x, labels=None).shape == (8,)
    # the stddev channel: sample i's value is the mean over (C, H, W) of the std across samples i mod B/G + k B/G
    h = torch.randn(8, 4, 2, 2)
    out = score.minibatch_stddev(h)
    assert out.shape == (8, 5, 2, 2) and torch.equal(out[:, :4], h)
    for i in range(8):
        group = h[i % 2:: 2]  # G = 4 groups of B/G = 2: {0, 2, 4, 6}, {1, 3, 5, 7}
        want = torch.sqrt(group.var(0, unbiased=False) + 1e-8).mean()
        assert torch.allclose(out[i, 4], want.expand(2, 2))
    assert torch.allclose(NCSNppCritic([3, 32, 32], ngf=8, stddev_group=1).minibatch_stddev(h)[:, 4],
                          torch.full((8, 2, 2), 1e-4))


def test_critic_mixes_samples_by_group_unless_stddev_group_is_1():
    torch.manual_seed(0)
    x = torch.randn(8, 1, 8, 8)
    for group, mixed in ((4, True), (1, False)):
        critic = _perturbed(NCSNppCritic([1, 8, 8], ngf=4, stddev_group=group), scale=0.3)
        jac = torch.autograd.functional.jacobian(lambda t: critic(t), x)  # [8, 8, 1, 8, 8]
        norms = jac.flatten(2).norm(dim=2)
        same_group = torch.tensor([[(i - j) % 2 == 0 for j in range(8)] for i in range(8)])
        assert (norms.diagonal() > 0).all()
        assert torch.equal(norms[~same_group], torch.zeros_like(norms[~same_group]))  # never across groups
        off = norms[same_group & ~torch.eye(8, dtype=torch.bool)]
        assert (off > 0).all() if mixed else torch.equal(off, torch.zeros_like(off))


def test_critic_gradient_penalty_backward():
    torch.manual_seed(0)
    critic = NCSNppCritic([3, 16, 16], ngf=4)
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(critic(x).sum(), x, create_graph=True)
    grad.pow(2).sum().backward()
    for name, p in critic.named_parameters():  # the input gradient does not depend on the last bias
        assert (p.grad is None) if name == "end_linear.bias" else torch.isfinite(p.grad).all(), name


def test_critic_errors_are_clear():
    critic = NCSNppCritic([3, 32, 32], ngf=4)
    with pytest.raises(ValueError, match="B = 6 is not a multiple of 4"):
        critic(torch.randn(6, 3, 32, 32))
    assert critic(torch.randn(2, 3, 32, 32)).shape == (2,)  # B < 4: one group of B
    with pytest.raises(ValueError, match=r"expects x of shape \[B, 3, 32, 32\]"):
        critic(torch.randn(4, 3, 16, 16))
    with pytest.raises(ValueError, match="unconditional"):
        NCSNppCritic([3, 32, 32], num_classes=10)
    with pytest.raises(ValueError, match="Discriminator_large"):
        NCSNppCritic([3, 64, 64])
    with pytest.raises(ValueError, match="images"):
        NCSNppCritic([2])
    with pytest.raises(ValueError, match="stddev_group"):
        NCSNppCritic([3, 32, 32], stddev_group=0)
