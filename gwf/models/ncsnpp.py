"""The [GWF] "Large-Net" generator: NCSN++ with adaptive group normalization (AdaGN), as the official code builds it
for ``--model_name ncsnpp`` / ``ncsnpp_embed`` (Paulcauch/GWF networks/ncsnpp/ncsnpp_generator_adagn.py ``NCSNpp``,
hyperparameters from networks/__init__.py ``apply_ncsnpp_args``; itself the Denoising Diffusion GAN generator). A
U-Net on image-shaped noise x [B, C, H, W] whose every group norm is modulated by a latent zz [B, nz] (PixelNorm, then
an MLP: ``z_transform``), ending in a tanh. Written from the official constructors, not copied: the same modules in the
same order and under the same names (``all_modules.<i>.<name>``, ``z_transform.<i>``), so parameter shapes, counts and
state-dict keys equal the official ones, and the same initialization (DDPM variance scaling, the official dense
layers' fan-out scaling, the zero-scaled output convolutions). The FIR up/down-sampling (StyleGAN2 upfirdn2d) is pure
PyTorch here (no CUDA extension): ``upfirdn2d`` and the functions after it.

gwf interface: ONE flat noise vector per sample, ``z`` [B, C*H*W + nz] = [image noise | latent]. ``noise_shape`` is
``(C*H*W + nz,)``; ``normal_tail = nz`` makes gwf draw the latent part N(0, I) whatever the configured noise (the
official ``zz = torch.randn(B, nz)`` next to ``--type_noise unif`` image noise); ``identity_input(z)`` is the image
part (the official first JKO step's previous generator, train.py ``netT_old = lambda x, z: x``).

What the official GWF generator does with the NCSN++ time embedding (the "t" input of score models) -- nothing:
  * ncsnpp_generator_adagn.py:109-115 -- the time-embedding MLP (``if conditional: Linear(embed_dim, 4 nf), Linear``)
    is commented out, and ``embedding_type: positional`` adds no module; ``forward(self, x, z)`` (line 277) takes
    no time input and sets ``temb = None`` (line 283) before every block call.
  * ncsnpp_generator_adagn.py:156 -- yet the biggan blocks are still built with ``temb_dim=nf * 4``, so each
    ResnetBlockBigGANpp_Adagn (networks/ncsnpp/layerspp.py) creates ``Dense_0 = Linear(4 nf, out_ch)`` which its
    forward uses only ``if temb is not None``: 28 dead layers (3,283,200 parameters at the CIFAR-10 settings) that
    count in the official parameter total but never receive a gradient (official train.py wraps the generator in
    DDP with ``find_unused_parameters=True``; Adam skips parameters without gradients). Reproduced exactly:
    ``temb_dense=True`` (default) keeps them, with the official initialization, FROZEN (requires_grad False: the
    same training dynamics, and DDP or an optimizer never waits for their gradients); ``temb_dense=False`` drops
    them (and their state-dict keys).
Other official facts reproduced or checked: ``embedding_type: fourier`` would put a GaussianFourierProjection at
``all_modules[0]`` (line 98), which the official forward then applies to the image as if it were the input
convolution (line 294, ``hs = [modules[m_idx](x)]`` with m_idx = 0), so only ``positional`` works and
``fourier_scale`` is unused; ``resamp_with_conv`` only matters for ``resblock_type: ddpm`` and ``progressive_combine``
only for ``progressive_input: input_skip`` (both recorded, unused at the official settings); ``centered: false`` maps
the image noise x -> 2x - 1 first; the output convolutions of every block, attention and the network are
zero-scaled (1e-10), so a fresh generator outputs ~0 (|x| ~ 1e-5). The official GWF repository imports
networks/ncsnpp/layers.py and up_or_down_sampling.py, which it does not contain; their content
(conv3x3/conv1x1/NIN/``default_init``, the FIR functions) is taken from the code GWF's files come from,
NVlabs/denoising-diffusion-gan score_sde/models/{layers,up_or_down_sampling}.py, with GWF's own
networks/ncsnpp/op/upfirdn2d.py (its pure-PyTorch ``upfirdn2d_native`` fallback, which ``upfirdn2d`` here matches
bit for bit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# --------------------------------------------------------------------------------------------------------------------
# Initialization (the official two schemes)
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def ddpm_init_(weight: Tensor, scale: float = 1.0) -> Tensor:
    """DDPM ``default_init(scale)`` (score_sde layers.py ``variance_scaling(scale, 'fan_avg', 'uniform')``): uniform
    with variance scale / ((fan_in + fan_out) / 2), the fans read from dims 1 and 0 times the receptive field; a zero
    scale means 1e-10 (a near-zero, not exactly zero, layer)."""
    scale = 1e-10 if scale == 0 else scale
    shape = weight.shape
    receptive = math.prod(shape) // (shape[0] * shape[1])
    fan_avg = (shape[0] + shape[1]) * receptive / 2
    return weight.uniform_(-math.sqrt(3 * scale / fan_avg), math.sqrt(3 * scale / fan_avg))


@torch.no_grad()
def fan_out_init_(weight: Tensor, scale: float = 1.0) -> Tensor:
    """The official dense_layer.py ``variance_scaling_init_``: called with mode 'fan_avg', but its
    ``_calculate_correct_fan`` returns fan_in only for 'fan_in' and fan_out otherwise, so the variance is
    scale / fan_out (torch's fan_out: dim 0 times the receptive field), uniform; a zero scale means 1e-10."""
    gain = 1e-10 if scale == 0 else scale
    fan_out = weight.shape[0] * (math.prod(weight.shape[2:]) if weight.ndim > 2 else 1)
    bound = math.sqrt(3.0 * gain / max(1.0, fan_out))
    return weight.uniform_(-bound, bound)


def conv3x3(c_in: int, c_out: int, init_scale: float = 1.0, stride: int = 1, padding: int = 1) -> nn.Conv2d:
    """score_sde ``ddpm_conv3x3``: 3x3 convolution, DDPM init, zero bias."""
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=padding)
    ddpm_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def conv1x1(c_in: int, c_out: int, init_scale: float = 1.0) -> nn.Conv2d:
    """score_sde ``ddpm_conv1x1``: 1x1 convolution, DDPM init, zero bias."""
    conv = nn.Conv2d(c_in, c_out, 1)
    ddpm_init_(conv.weight, init_scale)
    nn.init.zeros_(conv.bias)
    return conv


def dense(d_in: int, d_out: int, init_scale: float = 1.0) -> nn.Linear:
    """The official dense_layer.py ``dense``: linear layer, fan-out variance scaling, zero bias."""
    lin = nn.Linear(d_in, d_out)
    fan_out_init_(lin.weight, init_scale)
    nn.init.zeros_(lin.bias)
    return lin


def num_groups(channels: int) -> int:
    """The official group count min(C // 4, 32), checked to divide C."""
    groups = min(channels // 4, 32)
    if groups < 1 or channels % groups:
        raise ValueError(f"NCSN++ group norms use min(C // 4, 32) groups, which does not divide C = {channels}: "
                         "choose model.num_channels_dae (nf) a multiple of 32 (or of 4 below 128 channels)")
    return groups


# --------------------------------------------------------------------------------------------------------------------
# FIR resampling (StyleGAN2 upfirdn2d), pure PyTorch
# --------------------------------------------------------------------------------------------------------------------


def fir_kernel_2d(k: Sequence[float] | Tensor) -> Tensor:
    """The 2-D FIR filter of ``k``: the outer product of a 1-D ``k`` with itself (2-D ``k`` as is), normalized to
    sum 1 (float32)."""
    k = torch.as_tensor(k, dtype=torch.float32)
    if k.ndim == 1:
        k = torch.outer(k, k)
    if k.ndim != 2 or k.shape[0] != k.shape[1]:
        raise ValueError(f"the FIR kernel must be 1-D or square 2-D, got shape {tuple(k.shape)}")
    return k / k.sum()


def upfirdn2d(x: Tensor, kernel: Tensor, up: int = 1, down: int = 1, pad: tuple[int, int] = (0, 0)) -> Tensor:
    """Upsample by zero insertion (factor ``up``), pad each spatial side by (pad[0] before, pad[1] after; negative
    crops), convolve every channel with the 2-D FIR ``kernel`` (a true convolution: the kernel flipped), keep every
    ``down``-th sample. x [B, C, H, W] -> [B, C, (H up + p0 + p1 - kh) // down + 1, likewise for W]."""
    b, c, h, w = x.shape
    kh, kw = kernel.shape
    out = x.reshape(b * c, 1, h, 1, w, 1)
    if up > 1:
        out = F.pad(out, [0, up - 1, 0, 0, 0, up - 1])
    out = out.reshape(b * c, 1, h * up, w * up)
    p0, p1 = pad
    out = F.pad(out, [max(p0, 0), max(p1, 0), max(p0, 0), max(p1, 0)])
    out = out[:, :, max(-p0, 0): out.shape[2] - max(-p1, 0), max(-p0, 0): out.shape[3] - max(-p1, 0)]
    weight = torch.flip(kernel, [0, 1]).to(device=x.device, dtype=x.dtype).view(1, 1, kh, kw)
    out = F.conv2d(out, weight, stride=down)  # stride = the full convolution subsampled by `down`
    return out.view(b, c, out.shape[2], out.shape[3])


def upsample_2d(x: Tensor, kernel: Tensor, factor: int = 2, gain: float = 1.0) -> Tensor:
    """FIR upsampling by ``factor`` (``kernel``: normalized 2-D, as fir_kernel_2d makes it; scaled by gain factor^2
    so a constant image stays constant x gain). [B, C, H, W] -> [B, C, factor H, factor W]."""
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel * (gain * factor**2), up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x: Tensor, kernel: Tensor, factor: int = 2, gain: float = 1.0) -> Tensor:
    """FIR downsampling by ``factor``: [B, C, H, W] -> [B, C, H // factor, W // factor] (even H, W)."""
    p = kernel.shape[0] - factor
    return upfirdn2d(x, kernel * gain, down=factor, pad=((p + 1) // 2, p // 2))


def conv_downsample_2d(x: Tensor, weight: Tensor, kernel: Tensor, factor: int = 2, gain: float = 1.0) -> Tensor:
    """The fused convolution + FIR downsampling of StyleGAN2 (``weight`` [out, in, k, k], k odd): one padding, the
    FIR filter, then the convolution with stride ``factor``."""
    p = (kernel.shape[0] - factor) + (weight.shape[-1] - 1)
    x = upfirdn2d(x, kernel * gain, pad=((p + 1) // 2, p // 2))
    return F.conv2d(x, weight, stride=factor)


def naive_upsample_2d(x: Tensor, factor: int = 2) -> Tensor:
    """Nearest-neighbour upsampling (the official fir=False path)."""
    return x.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def naive_downsample_2d(x: Tensor, factor: int = 2) -> Tensor:
    """Mean over factor x factor cells (the official fir=False path)."""
    return F.avg_pool2d(x, factor)


class _Resampler(nn.Module):
    """Holds the normalized FIR kernel as a non-persistent buffer (follows .to(); no state-dict key)."""

    def __init__(self, fir: bool, fir_kernel: Sequence[float]):
        super().__init__()
        self.fir = fir
        self.register_buffer("fir_k", fir_kernel_2d(fir_kernel), persistent=False)

    def up(self, x: Tensor) -> Tensor:
        return upsample_2d(x, self.fir_k) if self.fir else naive_upsample_2d(x)

    def down(self, x: Tensor) -> Tensor:
        return downsample_2d(x, self.fir_k) if self.fir else naive_downsample_2d(x)


# --------------------------------------------------------------------------------------------------------------------
# Layers (official names: layerspp.py, score_sde layers.py, up_or_down_sampling.py)
# --------------------------------------------------------------------------------------------------------------------


class PixelNorm(nn.Module):
    """z / sqrt(mean(z^2 over dim 1) + 1e-8)."""

    def forward(self, z: Tensor) -> Tensor:
        return z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)


class NIN(nn.Module):
    """Per-position linear map (score_sde ``NIN``): W [in, out], b [out]; DDPM init with scale ``init_scale``."""

    def __init__(self, c_in: int, c_out: int, init_scale: float = 0.1):
        super().__init__()
        self.W = nn.Parameter(ddpm_init_(torch.empty(c_in, c_out), init_scale))
        self.b = nn.Parameter(torch.zeros(c_out))

    def forward(self, x: Tensor) -> Tensor:  # [B, in, H, W] -> [B, out, H, W]
        return torch.einsum("bchw,cd->bdhw", x, self.W) + self.b[:, None, None]


class AdaptiveGroupNorm(nn.Module):
    """GroupNorm without affine (eps 1e-6), then gamma * . + beta with (gamma, beta) = ``style``(zemb); the style
    layer's bias starts at gamma = 1, beta = 0."""

    def __init__(self, groups: int, channels: int, style_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6, affine=False)
        self.style = dense(style_dim, 2 * channels)
        with torch.no_grad():
            self.style.bias[:channels].fill_(1.0)
            self.style.bias[channels:].fill_(0.0)

    def forward(self, x: Tensor, zemb: Tensor) -> Tensor:
        gamma, beta = self.style(zemb)[:, :, None, None].chunk(2, dim=1)
        return gamma * self.norm(x) + beta


class AttnBlock(nn.Module):
    """Single-head self-attention over the H x W positions (layerspp ``AttnBlockpp``): GroupNorm, q/k/v NINs,
    softmax(q k / sqrt(C)) v, output NIN (zero-scaled init), residual, / sqrt(2) when ``skip_rescale``."""

    def __init__(self, channels: int, skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        self.GroupNorm_0 = nn.GroupNorm(num_groups(channels), channels, eps=1e-6)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        hn = self.GroupNorm_0(x)
        q, k, v = (nin(hn).flatten(2) for nin in (self.NIN_0, self.NIN_1, self.NIN_2))  # [B, C, HW]
        attn = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c**-0.5, dim=-1)  # [B, HW (query), HW (key)]
        out = self.NIN_3(torch.bmm(v, attn.transpose(1, 2)).view(b, c, h, w))
        return (x + out) / math.sqrt(2.0) if self.skip_rescale else x + out


class FIRConv2d(nn.Module):
    """up_or_down_sampling ``Conv2d`` with ``down=True`` (the only use at the official settings): the fused 3x3
    convolution + FIR downsampling; DDPM init, zero bias."""

    def __init__(self, c_in: int, c_out: int, fir_kernel: Sequence[float], kernel: int = 3):
        super().__init__()
        self.weight = nn.Parameter(ddpm_init_(torch.empty(c_out, c_in, kernel, kernel)))
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.register_buffer("fir_k", fir_kernel_2d(fir_kernel), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return conv_downsample_2d(x, self.weight, self.fir_k) + self.bias[:, None, None]


class Downsample(nn.Module):
    """layerspp ``Downsample`` with a convolution (the ``progressive_input: residual`` pyramid): ``Conv2d_0``, the
    fused FIR convolution (fir) or ``Conv_0``, a stride-2 3x3 convolution after padding right/bottom by one."""

    def __init__(self, c_in: int, c_out: int, fir: bool, fir_kernel: Sequence[float]):
        super().__init__()
        self.fir = fir
        if fir:
            self.Conv2d_0 = FIRConv2d(c_in, c_out, fir_kernel)
        else:
            self.Conv_0 = conv3x3(c_in, c_out, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.Conv2d_0(x) if self.fir else self.Conv_0(F.pad(x, (0, 1, 0, 1)))


class ResnetBlockBigGAN(nn.Module):
    """layerspp ``ResnetBlockBigGANpp_Adagn``: AdaGN, SiLU, (FIR up/down-sampling of both paths), conv3x3, AdaGN,
    SiLU, dropout, conv3x3 (zero-scaled init) + shortcut (conv1x1 when the channels or the size change), / sqrt(2)
    when ``skip_rescale``. ``temb_dim``: the official unused time-embedding layer ``Dense_0`` (frozen; see the module
    docstring), or None for none."""

    def __init__(self, c_in: int, c_out: int | None = None, zemb_dim: int = 256, temb_dim: int | None = None,
                 up: bool = False, down: bool = False, dropout: float = 0.0, fir: bool = True,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1), skip_rescale: bool = True, init_scale: float = 0.0):
        super().__init__()
        c_out = c_out or c_in
        self.GroupNorm_0 = AdaptiveGroupNorm(num_groups(c_in), c_in, zemb_dim)
        self.up, self.down, self.skip_rescale = up, down, skip_rescale
        self.Conv_0 = conv3x3(c_in, c_out)
        if temb_dim is not None:
            self.Dense_0 = nn.Linear(temb_dim, c_out)
            ddpm_init_(self.Dense_0.weight)
            nn.init.zeros_(self.Dense_0.bias)
            self.Dense_0.requires_grad_(False)  # never used: the official forward gets temb = None
        self.GroupNorm_1 = AdaptiveGroupNorm(num_groups(c_out), c_out, zemb_dim)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = conv3x3(c_out, c_out, init_scale=init_scale)
        if c_in != c_out or up or down:
            self.Conv_2 = conv1x1(c_in, c_out)
        self.resample = _Resampler(fir, fir_kernel) if (up or down) else None

    def forward(self, x: Tensor, zemb: Tensor) -> Tensor:
        h = F.silu(self.GroupNorm_0(x, zemb))
        if self.resample is not None:
            resample = self.resample.up if self.up else self.resample.down
            h, x = resample(h), resample(x)
        h = self.Conv_0(h)
        h = self.Conv_1(self.Dropout_0(F.silu(self.GroupNorm_1(h, zemb))))
        if hasattr(self, "Conv_2"):
            x = self.Conv_2(x)
        return (x + h) / math.sqrt(2.0) if self.skip_rescale else x + h


# --------------------------------------------------------------------------------------------------------------------
# The generator
# --------------------------------------------------------------------------------------------------------------------

_SUPPORTED = {
    "resblock_type": ("biggan",),
    "progressive": ("none",),
    "progressive_input": ("none", "residual"),
    "progressive_combine": ("sum", "cat"),
    "embedding_type": ("positional",),
}


class NCSNppGenerator(nn.Module):
    """[GWF] Large-Net generator (NCSN++ with AdaGN). ``z`` [B, C*H*W + nz]: image noise (the first C*H*W
    coordinates, read as [B, C, H, W]) then the latent (nz) -> x [B, C, H, W] in [-1, 1] (tanh; sigmoid or none with
    the official ``not_use_tanh`` / ``use_sigmoid``). Unconditional: ``labels`` and ``alpha`` are ignored (a
    ValueError for ``num_classes > 0``). Square images with H divisible by 2^(len(ch_mult) - 1). Defaults: the
    official CIFAR-10 settings (``apply_ncsnpp_args``, ``--nz 128``); the keys are the official names, see
    conf/model/ncsnpp.yaml. ``temb_dense``: keep the official dead time-embedding layers (frozen), see the module
    docstring."""

    def __init__(self, out_shape: Sequence[int], num_classes: int = 0, nz: int = 128, num_channels_dae: int = 128,
                 n_mlp: int = 4, ch_mult: Sequence[int] = (1, 2, 2, 2), num_res_blocks: int = 2,
                 attn_resolutions: Sequence[int] = (16,), dropout: float = 0.0, resamp_with_conv: bool = True,
                 fir: bool = True, fir_kernel: Sequence[float] = (1, 3, 3, 1), skip_rescale: bool = True,
                 resblock_type: str = "biggan", progressive: str = "none", progressive_input: str = "residual",
                 progressive_combine: str = "sum", embedding_type: str = "positional", fourier_scale: float = 16.0,
                 z_emb_dim: int = 256, centered: bool = True, not_use_tanh: bool = False, use_sigmoid: bool = False,
                 temb_dense: bool = True):
        super().__init__()
        if num_classes > 0:
            raise ValueError(f"the NCSN++ generator is unconditional (the official GWF one has no class input); got "
                             f"num_classes={num_classes}: use unconditional data or another model (model=dit_*, "
                             "model=resnet)")
        if len(out_shape) != 3 or out_shape[1] != out_shape[2]:
            raise ValueError(f"the NCSN++ generator makes square images [C, H, H]; got out_shape {list(out_shape)}")
        options = dict(resblock_type=resblock_type, progressive=progressive, progressive_input=progressive_input,
                       progressive_combine=progressive_combine, embedding_type=embedding_type)
        for key, value in options.items():
            if str(value).lower() not in _SUPPORTED[key]:
                raise ValueError(f"model.{key}={value!r} is not supported by this port; choose one of "
                                 f"{_SUPPORTED[key]} (the official GWF settings are biggan, none, residual, sum, "
                                 "positional; 'fourier' breaks the official forward, see gwf/models/ncsnpp.py)")
        self.out_shape = tuple(int(s) for s in out_shape)
        channels, size = self.out_shape[0], self.out_shape[1]
        n_res = len(ch_mult)
        if n_res < 1 or size % 2 ** (n_res - 1):
            raise ValueError(f"the NCSN++ generator halves the resolution {n_res - 1} times (len(ch_mult) = {n_res}): "
                             f"H = {size} must be divisible by {2 ** (n_res - 1)}; shorten model.ch_mult")
        self.nz, self.nf, self.image_dim = int(nz), int(num_channels_dae), math.prod(self.out_shape)
        self.normal_tail = self.nz  # gwf draws the latent part N(0, I), as the official zz = torch.randn(B, nz)
        self.centered, self.not_use_tanh, self.use_sigmoid = centered, not_use_tanh, use_sigmoid
        self.skip_rescale = skip_rescale
        self.residual_input = progressive_input.lower() == "residual"
        nf, attn = self.nf, {int(r) for r in attn_resolutions}
        resolutions = [size // 2**i for i in range(n_res)]

        def block(c_in: int, c_out: int | None = None, up: bool = False, down: bool = False) -> nn.Module:
            return ResnetBlockBigGAN(c_in, c_out, zemb_dim=z_emb_dim, temb_dim=4 * nf if temb_dense else None, up=up,
                                     down=down, dropout=dropout, fir=fir, fir_kernel=fir_kernel,
                                     skip_rescale=skip_rescale, init_scale=0.0)

        mods: list[nn.Module] = []

        def add(module: nn.Module) -> int:
            mods.append(module)
            return len(mods) - 1

        # The official module order (ncsnpp_generator_adagn.py NCSNpp.__init__), with the indices the forward uses.
        self._conv_in = add(conv3x3(channels, nf))
        skips, c, pyramid_c = [nf], nf, channels
        self._down: list[tuple[list[tuple[int, int | None]], int | None, int | None]] = []
        for level in range(n_res):
            blocks = []
            for _ in range(num_res_blocks):
                out_c = nf * ch_mult[level]
                rb = add(block(c, out_c))
                c = out_c
                blocks.append((rb, add(AttnBlock(c)) if resolutions[level] in attn else None))
                skips.append(c)
            down = pyr = None
            if level != n_res - 1:
                down = add(block(c, down=True))
                if self.residual_input:
                    pyr = add(Downsample(pyramid_c, c, fir, fir_kernel))
                    pyramid_c = c
                skips.append(c)
            self._down.append((blocks, down, pyr))
        self._mid = (add(block(c)), add(AttnBlock(c)), add(block(c)))
        self._up: list[tuple[list[int], int | None, int | None]] = []
        for level in reversed(range(n_res)):
            blocks = []
            for _ in range(num_res_blocks + 1):
                out_c = nf * ch_mult[level]
                blocks.append(add(block(c + skips.pop(), out_c)))
                c = out_c
            at = add(AttnBlock(c)) if resolutions[level] in attn else None
            up = add(block(c, up=True)) if level != 0 else None
            self._up.append((blocks, at, up))
        assert not skips
        self._out = (add(nn.GroupNorm(num_groups(c), c, eps=1e-6)), add(conv3x3(c, channels, init_scale=0.0)))
        self.all_modules = nn.ModuleList(mods)
        mapping: list[nn.Module] = [PixelNorm(), dense(nz, z_emb_dim), nn.SiLU()]
        for _ in range(n_mlp):
            mapping += [dense(z_emb_dim, z_emb_dim), nn.SiLU()]
        self.z_transform = nn.Sequential(*mapping)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (self.image_dim + self.nz,)

    def _check(self, z: Tensor) -> None:
        if z.ndim != 2 or z.shape[1] != self.image_dim + self.nz:
            c, h, w = self.out_shape
            raise ValueError(f"NCSNppGenerator expects flat z of shape [B, {self.image_dim + self.nz}] = [B, "
                             f"{c}*{h}*{w} image noise + nz={self.nz} latent], got {tuple(z.shape)}")

    def identity_input(self, z: Tensor) -> Tensor:
        """The image-shaped part of ``z`` [B, C, H, W] (the official first JKO step: T_0(x, zz) = x)."""
        self._check(z)
        return z[:, : self.image_dim].view(len(z), *self.out_shape)

    def forward(self, z: Tensor, labels: Tensor | None = None, alpha: Tensor | None = None) -> Tensor:
        self._check(z)
        return self.generate(z[:, : self.image_dim].reshape(len(z), *self.out_shape), z[:, self.image_dim:])

    def generate(self, x: Tensor, latent: Tensor) -> Tensor:
        """The official ``NCSNpp.forward(x, z)``: image noise x [B, C, H, W], latent [B, nz] -> [B, C, H, W]."""
        m = self.all_modules
        zemb = self.z_transform(latent)
        if not self.centered:
            x = 2 * x - 1.0
        pyramid = x
        hs = [m[self._conv_in](x)]
        for blocks, down, pyr in self._down:
            for rb, at in blocks:
                h = m[rb](hs[-1], zemb)
                hs.append(m[at](h) if at is not None else h)
            if down is not None:
                h = m[down](hs[-1], zemb)
                if pyr is not None:
                    pyramid = m[pyr](pyramid) + h
                    pyramid = pyramid / math.sqrt(2.0) if self.skip_rescale else pyramid
                    h = pyramid
                hs.append(h)
        rb0, at, rb1 = self._mid
        h = m[rb1](m[at](m[rb0](hs[-1], zemb)), zemb)
        for blocks, at, up in self._up:
            for rb in blocks:
                h = m[rb](torch.cat([h, hs.pop()], dim=1), zemb)
            if at is not None:
                h = m[at](h)
            if up is not None:
                h = m[up](h, zemb)
        norm, conv = self._out
        h = m[conv](F.silu(m[norm](h)))
        if not self.not_use_tanh:
            return torch.tanh(h)
        return torch.sigmoid(h) if self.use_sigmoid else h
