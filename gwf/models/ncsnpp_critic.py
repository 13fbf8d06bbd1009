"""The [GWF] Large-Net critic: the official ``Discriminator_small`` (``--model_name ncsnpp``, one score) and
``Discriminator_small_embed`` (``ncsnpp_embed``, an ``o_dim`` embedding) of Paulcauch/GWF
networks/ncsnpp/discriminator.py, used for image_size <= 32 (networks/__init__.py ``get_model``, with ``ngf = 64``
from ``apply_ncsnpp_args``). The two have the same layers but the last linear layer's width (1 or o_dim), so ONE
class with ``out_dim`` covers both; their forwards agree too (the embed variant only adds ``return_layers``).
Written from the official constructors: the same names (``start_conv``, ``conv1..4.{conv1,conv2,skip}.0``,
``final_conv``, ``end_linear``), shapes and initialization (the official dense_layer.py fan-out variance scaling,
zero-scaled ``conv2`` and ``final_conv``), so official state dicts load as they are.

Layout (ngf = 64, CIFAR-10): 1x1 conv 3 -> 2 ngf; DownConvBlock 2ngf -> 2ngf at 32x32, then three halving the size
(-> 4 ngf, 8 ngf, 8 ngf; 4x4); a minibatch-stddev channel; 3x3 conv (8 ngf + 1 -> 8 ngf); LeakyReLU(0.2); global
sum pool; linear -> out_dim. DownConvBlock: act, conv3x3, act, (FIR [1,3,3,1] downsampling of both paths), conv3x3
(zero-scaled init) + 1x1 conv shortcut without bias, / sqrt(2).

No time input: DDGAN's discriminators take (x_t, t, x_tp1); GWF's take the image only (the time embedding is
commented out in DownConvBlock.forward, ``# out += self.dense_t1(t_emb)``) and train.py calls ``netD(images)``.

Official quirk kept: the minibatch-stddev channel (StyleGAN) mixes the samples of a batch -- sample i is grouped with
i + B/G, i + 2B/G, ... (G = min(B, 4) groups; the official ``view(group, -1, ...)`` fails unless G divides B, here
a clear ValueError). Scores are therefore NOT per-sample functions, and gradient penalties see cross-sample terms.
``stddev_group=1`` makes that channel the constant sqrt(1e-8) = 1e-4 (same parameter shapes, per-sample critic).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gwf.models.ncsnpp import downsample_2d, fan_out_init_, fir_kernel_2d


def _conv(c_in: int, c_out: int, k: int, init_scale: float = 1.0, bias: bool = True) -> nn.Conv2d:
    """The official dense_layer.py ``conv2d``: k x k convolution (same padding), fan-out variance scaling, zero
    bias."""
    conv = nn.Conv2d(c_in, c_out, k, padding=k // 2, bias=bias)
    fan_out_init_(conv.weight, init_scale)
    if bias:
        nn.init.zeros_(conv.bias)
    return conv


class DownConvBlock(nn.Module):
    """act, conv3x3, act, (FIR downsampling), conv3x3 (zero-scaled) + conv1x1 shortcut (no bias), / sqrt(2). The
    convolutions sit in one-element Sequentials, as in the official code (state-dict keys ``conv1.0.weight``...)."""

    def __init__(self, c_in: int, c_out: int, downsample: bool = False, slope: float = 0.2,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        self.conv1 = nn.Sequential(_conv(c_in, c_out, 3))
        self.conv2 = nn.Sequential(_conv(c_out, c_out, 3, init_scale=0.0))
        self.skip = nn.Sequential(_conv(c_in, c_out, 1, bias=False))
        self.downsample, self.slope = downsample, slope
        self.register_buffer("fir_k", fir_kernel_2d(fir_kernel), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        h = F.leaky_relu(self.conv1(F.leaky_relu(x, self.slope)), self.slope)
        if self.downsample:
            h, x = downsample_2d(h, self.fir_k), downsample_2d(x, self.fir_k)
        return (self.conv2(h) + self.skip(x)) / math.sqrt(2.0)


class NCSNppCritic(nn.Module):
    """[GWF] Large-Net critic (official Discriminator_small / Discriminator_small_embed). x [B, C, H, W] with
    H, W <= 32 -> [B] scores when ``out_dim == 1``, else [B, out_dim] embeddings. Unconditional (a ValueError for
    ``num_classes > 0``); ``labels`` is ignored. ``stddev_group``: the minibatch-stddev group size (official 4; the
    batch must be a multiple of min(B, stddev_group)); 1 gives a per-sample critic."""

    def __init__(self, in_shape: Sequence[int], out_dim: int = 1, num_classes: int = 0, ngf: int = 64,
                 slope: float = 0.2, stddev_group: int = 4, fir_kernel: Sequence[float] = (1, 3, 3, 1)):
        super().__init__()
        if num_classes > 0:
            raise ValueError(f"the NCSN++ critic is unconditional (the official Discriminator_small has no class "
                             f"input); got num_classes={num_classes}: use critic=resnet (projection) for class data")
        if len(in_shape) != 3:
            raise ValueError(f"the NCSN++ critic takes images [C, H, W]; got in_shape {list(in_shape)} "
                             "(use critic=mlp for flat data)")
        self.in_shape = tuple(int(s) for s in in_shape)
        c, height, width = self.in_shape
        if max(height, width) > 32 or min(height, width) < 8:
            raise ValueError(f"the NCSN++ critic is the official Discriminator_small, used for 8 <= image size <= 32 "
                             f"(it halves the size 3 times); got {height}x{width}. The official Discriminator_large "
                             "for larger images is not ported: use critic=resnet")
        if stddev_group < 1:
            raise ValueError(f"critic.stddev_group must be >= 1, got {stddev_group}")
        self.out_dim, self.slope, self.stddev_group = out_dim, slope, stddev_group
        self.start_conv = _conv(c, 2 * ngf, 1)
        self.conv1 = DownConvBlock(2 * ngf, 2 * ngf, slope=slope, fir_kernel=fir_kernel)
        self.conv2 = DownConvBlock(2 * ngf, 4 * ngf, downsample=True, slope=slope, fir_kernel=fir_kernel)
        self.conv3 = DownConvBlock(4 * ngf, 8 * ngf, downsample=True, slope=slope, fir_kernel=fir_kernel)
        self.conv4 = DownConvBlock(8 * ngf, 8 * ngf, downsample=True, slope=slope, fir_kernel=fir_kernel)
        self.final_conv = _conv(8 * ngf + 1, 8 * ngf, 3, init_scale=0.0)
        self.end_linear = nn.Linear(8 * ngf, out_dim)
        fan_out_init_(self.end_linear.weight)
        nn.init.zeros_(self.end_linear.bias)

    def minibatch_stddev(self, h: Tensor) -> Tensor:
        """h [B, C, H, W] -> [B, C + 1, H, W]: the extra channel is, for each sample, the mean over (C, H, W) of the
        standard deviation across its group (samples i, i + B/G, ..., G = min(B, stddev_group))."""
        b, c, height, width = h.shape
        group = min(b, self.stddev_group)
        if b % group:
            raise ValueError(f"the NCSN++ critic's minibatch-stddev splits a batch into groups of min(B, "
                             f"{self.stddev_group}); B = {b} is not a multiple of {group}: use batch sizes divisible "
                             f"by {self.stddev_group}, or critic.stddev_group=1 (per-sample critic)")
        std = torch.sqrt(h.view(group, b // group, c, height, width).var(0, unbiased=False) + 1e-8)  # [B/G, C, H, W]
        std = std.mean(dim=(1, 2, 3)).view(b // group, 1, 1, 1).repeat(group, 1, height, width)  # [B, 1, H, W]
        return torch.cat([h, std], dim=1)

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"NCSNppCritic expects x of shape [B, {', '.join(map(str, self.in_shape))}], "
                             f"got {tuple(x.shape)}")
        h = self.conv4(self.conv3(self.conv2(self.conv1(self.start_conv(x)))))
        h = F.leaky_relu(self.final_conv(self.minibatch_stddev(h)), self.slope)
        out = self.end_linear(h.sum(dim=(2, 3)))  # global sum pool, then [B, out_dim]
        return out.squeeze(-1) if self.out_dim == 1 else out
