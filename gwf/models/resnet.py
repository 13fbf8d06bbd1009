"""The [GWF] CIFAR-10 "Small-Net": a ResNet generator from a flat latent and a ResNet critic, matched against the
official code (provenance and differences in docs/recipes.md). ``official_quirks=True`` reproduces two quirks of that
code (off by default). Optional class and alpha conditioning: conditional batch norm in the generator
(zero-initialized), projection in the critic (Miyato & Koyama 2018).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gwf.models.mlp import conditioning_layers, conditioning_vector


def _num_doublings(size: int, bottom: int) -> int:
    """k with size = bottom * 2^k, or a clear error."""
    k = round(math.log2(size / bottom)) if size >= bottom else -1
    if k < 0 or bottom * 2**k != size:
        raise ValueError(f"the ResNet generator needs H = W = {bottom} * 2^k (model.bottom={bottom}); got {size}. "
                         f"Resize the data or set model.bottom to a divisor of {size} of the form {size} / 2^k")
    return k


def check_shortcut(shortcut: str) -> None:
    if shortcut not in ("auto", "conv"):
        raise ValueError(f"shortcut must be 'auto' (a 1x1 convolution where the channels change) or 'conv' (in every "
                         f"block, the official resnet_MMDGAN), got {shortcut!r}")


class CondBatchNorm2d(nn.Module):
    """BN(x) * (gamma + dgamma(c)) + (beta + dbeta(c)); dgamma, dbeta are linear in the conditioning vector c and
    start at zero, so the layer starts as a plain affine BatchNorm2d. x [B, C, H, W], c [B, cond_dim] or None."""

    def __init__(self, channels: int, cond_dim: int = 0):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.cond = nn.Linear(cond_dim, 2 * channels) if cond_dim > 0 else None
        if self.cond is not None:
            nn.init.zeros_(self.cond.weight)
            nn.init.zeros_(self.cond.bias)

    def forward(self, x: Tensor, c: Tensor | None) -> Tensor:
        h = self.bn(x)
        if self.cond is None:
            return h
        dgain, dbias = self.cond(c)[:, :, None, None].chunk(2, dim=1)
        return h * (1 + dgain) + dbias


class GBlock(nn.Module):
    """Up-block: [BN, ReLU, nearest x2, conv3x3, BN, ReLU, conv3x3] + shortcut (nearest x2, conv1x1 when the channel
    count changes). x [B, C_in, H, W] -> [B, C_out, 2H, 2W]."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int = 0, official_quirks: bool = False,
                 shortcut: str = "auto"):
        super().__init__()
        self.bn1, self.bn2 = CondBatchNorm2d(c_in, cond_dim), CondBatchNorm2d(c_out, cond_dim)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if (c_in != c_out or shortcut == "conv") else nn.Identity()
        self.official_quirks = official_quirks

    def main(self, x: Tensor, c: Tensor | None) -> Tensor:
        h = F.interpolate(F.relu(self.bn1(x, c)), scale_factor=2, mode="nearest")
        return self.conv2(F.relu(self.bn2(self.conv1(h), c)))

    def forward(self, x: Tensor, c: Tensor | None) -> Tensor:
        if self.official_quirks:  # official Generator_otm block: model(x) + model(x), the shortcut is never used
            return self.main(x, c) + self.main(x, c)
        return self.main(x, c) + self.skip(F.interpolate(x, scale_factor=2, mode="nearest"))


class ResNetGenerator(nn.Module):
    """[GWF] Small-Net generator. ``z`` [B, noise_dim], ``labels`` [B] int64 or None, ``alpha`` [B] >= 1 or None
    -> x [B, *out_shape] in [-1, 1], out_shape = [C, H, W] with H = W = bottom * 2^k. Batch norm mixes the samples
    of one call in training mode (eval mode uses running statistics). ``shortcut``: ``auto`` (a 1x1 convolution
    only where the channel count changes) or ``conv`` (in every block, as the official resnet_MMDGAN)."""

    def __init__(self, out_shape: list[int] | tuple[int, ...], noise_dim: int = 192, ngf: int = 256, bottom: int = 4,
                 num_classes: int = 0, class_dim: int = 128, alpha_dim: int = 0, official_quirks: bool = False,
                 shortcut: str = "auto"):
        super().__init__()
        check_shortcut(shortcut)
        if len(out_shape) != 3 or out_shape[1] != out_shape[2]:
            raise ValueError(f"the ResNet generator makes square images [C, H, H]; got out_shape {list(out_shape)}")
        self.out_shape = tuple(int(s) for s in out_shape)
        n_up = _num_doublings(self.out_shape[1], bottom)
        self.noise_dim, self.ngf, self.bottom, self.num_classes = noise_dim, ngf, bottom, num_classes
        self.class_emb, self.alpha_emb, cond_dim = conditioning_layers(num_classes, class_dim, alpha_dim)
        self.fc = nn.Linear(noise_dim, ngf * bottom * bottom)
        self.blocks = nn.ModuleList(GBlock(ngf, ngf, cond_dim, official_quirks, shortcut) for _ in range(n_up))
        self.bn_out = CondBatchNorm2d(ngf, cond_dim)
        self.conv_out = nn.Conv2d(ngf, self.out_shape[0], 3, padding=1)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (self.noise_dim,)

    def _cond(self, z: Tensor, labels: Tensor | None, alpha: Tensor | None) -> Tensor | None:
        return conditioning_vector(self.class_emb, self.alpha_emb, z, labels, alpha)

    def forward(self, z: Tensor, labels: Tensor | None = None, alpha: Tensor | None = None) -> Tensor:
        if z.ndim != 2 or z.shape[1] != self.noise_dim:
            raise ValueError(f"ResNetGenerator expects z of shape [B, {self.noise_dim}], got {tuple(z.shape)}")
        c = self._cond(z, labels, alpha)
        h = self.fc(z).view(len(z), self.ngf, self.bottom, self.bottom)  # [B, ngf, 4, 4]
        for block in self.blocks:
            h = block(h, c)  # doubles H and W
        return torch.tanh(self.conv_out(F.relu(self.bn_out(h, c))))


class DBlock(nn.Module):
    """Critic block. ``first``: the optimized first block [conv3x3, act, conv3x3, avg-pool] + [avg-pool, conv1x1]
    (no activation on raw pixels). Otherwise [act, conv3x3, act, conv3x3, (avg-pool)] + [(conv1x1, avg-pool) or
    identity]. x [B, C_in, H, W] -> [B, C_out, H/2, W/2] (down) or [B, C_out, H, W]."""

    def __init__(self, c_in: int, c_out: int, down: bool, first: bool = False, slope: float = 0.2,
                 official_quirks: bool = False, shortcut: str = "auto"):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if (down or c_in != c_out or shortcut == "conv") else nn.Identity()
        self.down, self.first, self.slope = down, first, slope
        self.official_quirks = official_quirks

    def act(self, x: Tensor) -> Tensor:
        return F.leaky_relu(x, self.slope)

    def forward(self, x: Tensor) -> Tensor:
        pool = (lambda t: F.avg_pool2d(t, 2)) if self.down else (lambda t: t)
        if self.first:
            return pool(self.conv2(self.act(self.conv1(x)))) + self.skip(pool(x))
        h = pool(self.conv2(self.act(self.conv1(self.act(x)))))
        # official quirk: an in-place activation has already overwritten x when the shortcut reads it
        return h + pool(self.skip(self.act(x) if self.official_quirks else x))


class ResNetCritic(nn.Module):
    """[GWF] Small-Net critic. x [B, *in_shape] (and labels [B] when num_classes > 0) -> [B] scores when
    ``out_dim == 1``, else [B, out_dim] embeddings. ``n_down`` blocks halve the resolution, ``n_same`` more keep
    it. No batch norm: gradient penalties need per-sample gradients. ``head``: ``sum`` (global sum pool, then a
    linear layer) or ``flatten`` (every position into the linear layer, as the official resnet_MMDGAN);
    ``shortcut``: ``auto`` or ``conv`` (a 1x1 convolution in every block, as there)."""

    def __init__(self, in_shape: list[int] | tuple[int, ...], ndf: int = 256, n_down: int = 2, n_same: int = 2,
                 out_dim: int = 1, num_classes: int = 0, slope: float = 0.2, official_quirks: bool = False,
                 head: str = "sum", shortcut: str = "auto"):
        super().__init__()
        check_shortcut(shortcut)
        if head not in ("sum", "flatten"):
            raise ValueError(f"critic.head must be 'sum' or 'flatten', got {head!r}")
        if len(in_shape) != 3:
            raise ValueError(f"the ResNet critic takes images [C, H, W]; got in_shape {list(in_shape)} "
                             "(use method.critic.name=mlp for flat data)")
        self.in_shape = tuple(int(s) for s in in_shape)
        c, height, width = self.in_shape
        if n_down < 1 or height % 2**n_down or width % 2**n_down:
            raise ValueError(f"ResNetCritic: H and W ({height}, {width}) must be divisible by 2^n_down = "
                             f"2^{n_down} with n_down >= 1; lower method.critic.n_down")
        blocks = [DBlock(c, ndf, down=True, first=True, slope=slope)]
        blocks += [DBlock(ndf, ndf, down=True, slope=slope, official_quirks=official_quirks, shortcut=shortcut)
                   for _ in range(n_down - 1)]
        blocks += [DBlock(ndf, ndf, down=False, slope=slope, official_quirks=official_quirks, shortcut=shortcut)
                   for _ in range(n_same)]
        self.blocks = nn.Sequential(*blocks)
        self.pool = head
        features = ndf if head == "sum" else ndf * (height // 2**n_down) * (width // 2**n_down)
        self.head = nn.Linear(features, out_dim)
        # projection discriminator: + <embed(y), h> (per output dimension when out_dim > 1). Named class_emb like
        # MLPCritic's: the MMD GAN kernel looks for it to decide whether to pass labels.
        self.class_emb = nn.Embedding(num_classes, out_dim * features) if num_classes > 0 else None
        self.features, self.out_dim = features, out_dim

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        if tuple(x.shape[1:]) != self.in_shape:
            raise ValueError(f"ResNetCritic expects x of shape [B, {', '.join(map(str, self.in_shape))}], "
                             f"got {tuple(x.shape)}")
        h = F.relu(self.blocks(x))
        h = h.sum(dim=(2, 3)) if self.pool == "sum" else h.flatten(1)  # [B, features]
        out = self.head(h)  # [B, out_dim]
        if self.class_emb is not None:
            if labels is None:
                raise ValueError("this critic is class-conditional (num_classes > 0): pass labels")
            out = out + torch.einsum("bkc,bc->bk", self.class_emb(labels).view(len(x), self.out_dim, self.features), h)
        return out.squeeze(-1) if self.out_dim == 1 else out
