"""The [GWF] "U-Net" pair: a U-Net generator from image-shaped noise and its spectrally normalized critic, ported
from the official code (Paulcauch/GWF, commit aa47d03) and matched against it layer by layer
(tests/test_models_unet.py).

Files read: ``networks/__init__.py`` (``get_model``, ``name == "unet"``; ``apply_unet_discriminator_args``),
``networks/unet.py`` (``UNet``, adapted from CW-Huang/sdeflow-light ``lib/models/unet.py``) and
``networks/modelOTM/OTM.py`` (``Discriminator_unet`` and the layers it uses).

Generator (``UNetGenerator``), official ``UNet(input_channels=C, input_height=H, ch=96, ch_mult=(1, 2, 2, 2),
num_res_blocks=2, attn_resolutions=(16,), resamp_with_conv=True, dropout=0.0)`` on CIFAR-10 (MNIST-28: ch_mult
(1, 2, 2), no attention). A DDPM-style U-Net that maps noise z [B, C, H, W] to an image of the same shape:

- no time embedding. sdeflow-light's UNet took a time input (``temb_net`` and a ``temb_proj`` in every residual
  block, ``forward(x, temp)``); GWF's copy removed both, so its ``forward(x)`` sees the noise only. Reproduced: no
  time input, no embedding parameters.
- residual blocks [GroupNorm(32, eps 1e-6), swish, conv3x3, GroupNorm, swish, (Dropout2d), conv3x3] + shortcut (a
  1x1 convolution where the channels change), self-attention blocks (GroupNorm, 1x1 q/k/v, softmax(q^T k / sqrt(C)),
  1x1 output projection, residual) at the heights in ``attn_resolutions`` and always in the middle, downsampling by
  a stride-2 conv3x3 (``resamp_with_conv``; else 2x2 average pooling), upsampling by nearest x2 then conv3x3; the up
  path has ``num_res_blocks + 1`` blocks per level, each reading one skip tensor of the down path (concatenated).
- output: GroupNorm, swish, conv3x3 -- no tanh, the output is unbounded.
- initialization as the official: every conv weight uniform on +-sqrt(3 * scale / fan_out) (its "fan_avg" variance
  scaling actually returns fan_out, a quirk inherited from sdeflow-light), biases zero, scale 1 except the second
  conv of each residual block, the attention output projection and the final conv (scale 0, implemented as 1e-10).
  Hence the generator starts as the zero map (every output ~1e-5), not as the identity that the official JKO loop
  uses as the previous generator of the first step (``netT_old = lambda x: x``).

Critic (``UNetCritic``), official ``Discriminator_unet`` with ndf 164 (CIFAR-10) or 128 (MNIST-28); every conv and
linear weight spectrally normalized (``apply_unet_discriminator_args``: D_conv spectral_conv, D_linear
spectral_linear; the attention's convs are BigGAN's SNConv2d), one power iteration per training forward:

- first block (C -> ndf, H -> H/2): [conv3x3, LeakyReLU(0.2), conv3x3, avg-pool 2] + [avg-pool 2, conv1x1];
- block (ndf -> 2 ndf, H/2 -> H/4): [LeakyReLU, conv3x3, LeakyReLU, conv3x3, avg-pool] + [conv1x1, avg-pool];
- SAGAN attention at 2 ndf: theta, phi (C -> C/8), g (C -> C/2), o (C/2 -> C), 1x1 without bias; phi and g max-pooled
  2x2; out = x + gamma * o(g softmax(theta^T phi)^T), gamma a scalar starting at 0 (the block starts as identity);
- block (2 ndf -> 4 ndf, H/4 -> H/8), block (4 ndf -> 4 ndf, identity shortcut), LeakyReLU(0.2), global sum pool,
  linear(4 ndf, out_dim). Convs keep their biases (the official ``D_bias = False`` is never read). Weights start
  at PyTorch's defaults: the official ``weights_init_xavier`` is called on a Sequential (no ``.apply``) and on layers
  whose class names it skips, so it changes nothing.

Differences from the official critic, on purpose:

- the official output is always [B, 1] (``Discriminator_unet`` ignores ``embed_dim``); here ``out_dim`` sets the
  linear head's width (out_dim = 1 is the official).
- ``BaseDiscriminator.__init__`` gives the official critic a concat-projection ``SpectralLinear(num_classes +
  projection_dim = 129, 1)`` (130 parameters) that its forward never calls; it is left out (no effect on any output
  or gradient; the parameter count is the official's minus those 130).
- spectral norm is torch's parametrization (``torch.nn.utils.parametrizations.spectral_norm``), where the official
  uses the older ``torch.nn.utils.spectral_norm`` (and BigGAN's own SNConv2d in the attention): same parameters
  (the un-normalized weight) and the same one power iteration per training forward; the parametrization starts its
  singular vectors with 15 power iterations, and in eval mode reuses them where BigGAN's SNConv2d iterates once more.
- the in-place LeakyReLU that opens each official non-first block also overwrites its input before the shortcut
  reads it: the shortcut sees LeakyReLU(x), not x (its identity shortcut returns LeakyReLU(x)). Off by default,
  as critic=resnet's; ``official_quirks=True`` reproduces it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm


# ----------------------------------------------------------------------------------------------------------------
# Generator
# ----------------------------------------------------------------------------------------------------------------

def variance_scaling_(weight: Tensor, scale: float) -> Tensor:
    """The official initialization, in place: uniform on +-sqrt(3 * s / max(1, fan_out)) with s = scale, or 1e-10
    for scale 0. fan_out = out_channels * kernel area (the official "fan_avg" mode falls through to fan_out)."""
    fan_out = weight.shape[0] * math.prod(weight.shape[2:])
    bound = math.sqrt(3.0 * (scale if scale != 0 else 1e-10) / max(1.0, fan_out))
    with torch.no_grad():
        return weight.uniform_(-bound, bound)


def init_conv(c_in: int, c_out: int, kernel: int = 3, stride: int = 1, init_scale: float = 1.0) -> nn.Conv2d:
    """Conv2d (padding kernel // 2) with the official variance-scaling weights and zero bias."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=kernel // 2)
    variance_scaling_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    if channels % groups:
        raise ValueError(f"the U-Net generator normalizes {channels} channels in groups of model.norm_groups={groups}, "
                         f"which does not divide them; choose model.ch (and ch_mult) so that every width, and every "
                         f"sum of two widths at a skip connection, is a multiple of norm_groups, or lower norm_groups")
    return nn.GroupNorm(groups, channels, eps=1e-6)


class ResBlock(nn.Module):
    """[GroupNorm, swish, conv3x3, GroupNorm, swish, (Dropout2d), conv3x3 (scale 0)] + shortcut (conv1x1 where the
    channel count changes). x [B, C_in, H, W] -> [B, C_out, H, W]."""

    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = group_norm(c_in, groups), init_conv(c_in, c_out)
        self.norm2 = group_norm(c_out, groups)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = init_conv(c_out, c_out, init_scale=0.0)
        self.skip = init_conv(c_in, c_out, kernel=1) if c_in != c_out else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """x + proj(v softmax(q^T k / sqrt(C))^T) with q, k, v 1x1 convolutions of GroupNorm(x), over the H*W positions.
    x [B, C, H, W] -> same shape; starts as the identity (proj at scale 0)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q, self.k, self.v = (init_conv(channels, channels, kernel=1) for _ in range(3))
        self.proj = init_conv(channels, channels, kernel=1, init_scale=0.0)

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        h = self.norm(x)
        q, k, v = (f(h).view(b, c, height * width) for f in (self.q, self.k, self.v))  # [B, C, N]
        attn = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c**-0.5, dim=-1)  # [B, N query, N key]
        out = torch.bmm(v, attn.transpose(1, 2)).view(b, c, height, width)
        return x + self.proj(out)


class Upsample(nn.Module):
    """Nearest x2, then conv3x3 (``with_conv``). [B, C, H, W] -> [B, C, 2H, 2W]."""

    def __init__(self, channels: int, with_conv: bool):
        super().__init__()
        self.conv = init_conv(channels, channels) if with_conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Level(nn.Module):
    """One resolution of the U-Net: residual blocks, each followed by attention or not, then a resampling layer."""

    def __init__(self, blocks: list[nn.Module], attention: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.blocks, self.attention = nn.ModuleList(blocks), nn.ModuleList(attention)
        self.resample = resample


class UNetGenerator(nn.Module):
    """[GWF] U-Net generator. ``z`` [B, *out_shape] image-shaped noise -> x [B, *out_shape], unbounded (no tanh).
    out_shape = [C, H, W] with H and W divisible by 2^(len(ch_mult) - 1). Unconditional: ``labels`` and ``alpha``
    are accepted and ignored. Attention follows every residual block at the heights in ``attn_resolutions`` (heights
    of the feature maps: 16 is the 16x16 level of 32x32 images) and in the middle. GroupNorm only, so the samples
    of a batch never mix."""

    def __init__(self, out_shape: list[int] | tuple[int, ...], num_classes: int = 0, ch: int = 96,
                 ch_mult: list[int] | tuple[int, ...] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: list[int] | tuple[int, ...] = (16,), dropout: float = 0.0,
                 resamp_with_conv: bool = True, norm_groups: int = 32):
        super().__init__()
        if num_classes > 0:
            raise ValueError(f"the U-Net generator is unconditional (the official GWF UNet has no class input); got "
                             f"num_classes={num_classes}. Use unlabeled data or a conditional model (model=resnet)")
        if len(out_shape) != 3:
            raise ValueError(f"the U-Net generator makes images [C, H, W]; got out_shape {list(out_shape)}")
        self.out_shape = tuple(int(s) for s in out_shape)
        c, height, width = self.out_shape
        levels = len(ch_mult)
        if levels < 1 or height % 2 ** (levels - 1) or width % 2 ** (levels - 1):
            raise ValueError(f"the U-Net halves the resolution {levels - 1} times (len(model.ch_mult) - 1): H and W "
                             f"({height}, {width}) must be divisible by {2 ** (levels - 1)}; shorten model.ch_mult")
        self.num_classes = 0
        self.begin = init_conv(c, ch)
        skips, width_now, size = [ch], ch, height  # widths of the tensors the down path leaves for the up path
        down = []
        for i, mult in enumerate(ch_mult):
            blocks, attention = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(width_now, ch * mult, norm_groups, dropout))
                width_now = ch * mult
                attention.append(SelfAttention(width_now, norm_groups) if size in attn_resolutions else nn.Identity())
                skips.append(width_now)
            resample = None
            if i != levels - 1:
                resample = init_conv(width_now, width_now, stride=2) if resamp_with_conv else nn.AvgPool2d(2)
                size //= 2
                skips.append(width_now)
            down.append(Level(blocks, attention, resample))
        self.down = nn.ModuleList(down)
        self.mid = nn.Sequential(ResBlock(width_now, width_now, norm_groups, dropout),
                                 SelfAttention(width_now, norm_groups),
                                 ResBlock(width_now, width_now, norm_groups, dropout))
        up = []
        for i in reversed(range(levels)):
            blocks, attention = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(width_now + skips.pop(), ch * ch_mult[i], norm_groups, dropout))
                width_now = ch * ch_mult[i]
                attention.append(SelfAttention(width_now, norm_groups) if size in attn_resolutions else nn.Identity())
            resample = None
            if i != 0:
                resample = Upsample(width_now, resamp_with_conv)
                size *= 2
            up.append(Level(blocks, attention, resample))
        self.up = nn.ModuleList(up)
        assert not skips, "U-Net skip bookkeeping"
        self.norm_out = group_norm(width_now, norm_groups)
        self.conv_out = init_conv(width_now, c, init_scale=0.0)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return self.out_shape

    def forward(self, z: Tensor, labels: Tensor | None = None, alpha: Tensor | None = None) -> Tensor:
        if tuple(z.shape[1:]) != self.out_shape or z.ndim != 4:
            raise ValueError(f"UNetGenerator expects image-shaped noise z of shape [B, "
                             f"{', '.join(map(str, self.out_shape))}] (its noise_shape), got {tuple(z.shape)}")
        hs = [self.begin(z)]
        for level in self.down:
            for block, attention in zip(level.blocks, level.attention):
                hs.append(attention(block(hs[-1])))
            if level.resample is not None:
                hs.append(level.resample(hs[-1]))
        h = self.mid(hs[-1])
        for level in self.up:
            for block, attention in zip(level.blocks, level.attention):
                h = attention(block(torch.cat([h, hs.pop()], dim=1)))
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


# ----------------------------------------------------------------------------------------------------------------
# Critic
# ----------------------------------------------------------------------------------------------------------------

def sn_conv(c_in: int, c_out: int, kernel: int, bias: bool = True) -> nn.Module:
    """Spectrally normalized Conv2d (padding kernel // 2), PyTorch's default initialization."""
    return spectral_norm(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=bias))


class CriticBlock(nn.Module):
    """``first``: [conv3x3, act, conv3x3, avg-pool] + [avg-pool, conv1x1] (no activation on raw pixels). Otherwise
    [act, conv3x3, act, conv3x3, (avg-pool)] + [conv1x1, avg-pool] (``down``) or identity. x [B, C_in, H, W] ->
    [B, C_out, H // 2, W // 2] (down) or [B, C_out, H, W]. ``official_quirks``: the shortcut reads act(x)."""

    def __init__(self, c_in: int, c_out: int, down: bool, first: bool = False, slope: float = 0.2,
                 official_quirks: bool = False):
        super().__init__()
        if not down and (first or c_in != c_out):
            raise ValueError("a critic block that keeps the resolution has an identity shortcut: c_in == c_out")
        self.conv1, self.conv2 = sn_conv(c_in, c_out, 3), sn_conv(c_out, c_out, 3)
        self.skip = sn_conv(c_in, c_out, 1) if down else nn.Identity()
        self.down, self.first, self.slope, self.official_quirks = down, first, slope, official_quirks

    def pool(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, 2) if self.down else x

    def forward(self, x: Tensor) -> Tensor:
        if self.first:
            return self.pool(self.conv2(F.leaky_relu(self.conv1(x), self.slope))) + self.skip(self.pool(x))
        a = F.leaky_relu(x, self.slope)
        h = self.pool(self.conv2(F.leaky_relu(self.conv1(a), self.slope)))
        # official quirk: the block's in-place activation has overwritten x when the shortcut reads it
        return h + self.pool(self.skip(a if self.official_quirks else x))


class CriticAttention(nn.Module):
    """SAGAN/BigGAN self-attention: theta, phi (C -> C/8), g (C -> C/2), o (C/2 -> C), spectrally normalized 1x1
    convolutions without bias; phi and g max-pooled 2x2; x + gamma * o(g softmax(theta^T phi)^T), no temperature.
    gamma starts at 0. x [B, C, H, W] (H, W >= 2) -> same shape."""

    def __init__(self, channels: int):
        super().__init__()
        self.theta, self.phi = sn_conv(channels, channels // 8, 1, False), sn_conv(channels, channels // 8, 1, False)
        self.g, self.o = sn_conv(channels, channels // 2, 1, False), sn_conv(channels // 2, channels, 1, False)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        b, _, height, width = x.shape
        theta = self.theta(x).flatten(2)  # [B, C/8, N]
        phi = F.max_pool2d(self.phi(x), 2).flatten(2)  # [B, C/8, M], M = (H // 2) (W // 2)
        g = F.max_pool2d(self.g(x), 2).flatten(2)  # [B, C/2, M]
        beta = torch.softmax(torch.bmm(theta.transpose(1, 2), phi), dim=-1)  # [B, N, M]
        out = torch.bmm(g, beta.transpose(1, 2)).view(b, -1, height, width)  # [B, C/2, H, W]
        return x + self.gamma * self.o(out)


class UNetCritic(nn.Module):
    """[GWF] U-Net critic (official ``Discriminator_unet``). x [B, *in_shape] -> [B] scores when ``out_dim == 1``,
    else [B, out_dim] embeddings. Widths ndf, 2 ndf, 4 ndf over three halvings (floor: 28 -> 14 -> 7 -> 3), attention
    at H/4, a last block at H/8, LeakyReLU, global sum pool, linear. Spectral norm is built in (every conv and
    linear); no batch norm, so gradient penalties get per-sample gradients. Unconditional."""

    def __init__(self, in_shape: list[int] | tuple[int, ...], ndf: int = 164, out_dim: int = 1, num_classes: int = 0,
                 slope: float = 0.2, official_quirks: bool = False):
        super().__init__()
        if num_classes > 0:
            raise ValueError(f"the U-Net critic is unconditional (the official Discriminator_unet never reads labels); "
                             f"got num_classes={num_classes}. Use critic=resnet (projection conditioning) for "
                             f"labeled data")
        if len(in_shape) != 3:
            raise ValueError(f"the U-Net critic takes images [C, H, W]; got in_shape {list(in_shape)} "
                             "(use critic=mlp for flat data)")
        self.in_shape = tuple(int(s) for s in in_shape)
        c, height, width = self.in_shape
        if min(height, width) < 8:
            raise ValueError(f"the U-Net critic halves H and W three times and max-pools the attention input at H/4: "
                             f"it needs H, W >= 8, got ({height}, {width}); use critic=resnet for smaller images")
        q = dict(slope=slope, official_quirks=official_quirks)
        self.blocks = nn.Sequential(
            CriticBlock(c, ndf, down=True, first=True, slope=slope),  # H -> H/2
            CriticBlock(ndf, 2 * ndf, down=True, **q),  # H/2 -> H/4
            CriticAttention(2 * ndf),
            CriticBlock(2 * ndf, 4 * ndf, down=True, **q),  # H/4 -> H/8
            CriticBlock(4 * ndf, 4 * ndf, down=False, **q),
        )
        self.head = spectral_norm(nn.Linear(4 * ndf, out_dim))
        self.slope, self.out_dim = slope, out_dim

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        if tuple(x.shape[1:]) != self.in_shape or x.ndim != 4:
            raise ValueError(f"UNetCritic expects x of shape [B, {', '.join(map(str, self.in_shape))}], "
                             f"got {tuple(x.shape)}")
        h = F.leaky_relu(self.blocks(x), self.slope).sum(dim=(2, 3))  # [B, 4 ndf]
        out = self.head(h)
        return out.squeeze(-1) if self.out_dim == 1 else out
