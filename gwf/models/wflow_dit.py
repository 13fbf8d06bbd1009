"""The official W-Flow one-step generator ([WF]; hanjq17/W-Flow ``models/generator.py`` ``DitGen`` around a
``LightningDiT``), written from the official constructors and forward, not copied. Line numbers below cite
models/generator.py of the public fork hudsonchen/riesz_flow_hudson at commit a8941cb (the released code).
``model=dit_tiny | dit_b2 | dit_l2 | dit_xl2`` (DIT_SIZES below) build it; every ImageNet recipe runs it. The Drifting
release's Drift-L config sets the same options (configs/gen/latent_sota_L.yaml, read in its copy
yhsure/drifting-models-pytorch: noise_classes 64, noise_coords 32, n_cls_tokens 16, use_qknorm / use_swiglu /
use_rope / use_rmsnorm, attn_fp32 false). The LightningDiT-style DiT gwf had before
(2D axial RoPE, log-alpha embedding, no noise tokens, nonzero output init) was removed: docs/differences.md.

Architecture (official configs configs/gen/latent_sota_{B,L,XL}_ot_*.yaml: cond_dim = hidden_size, patch 2 on 4x32x32
SD-VAE latents, use_qknorm / use_swiglu / use_rope / use_rmsnorm true, n_cls_tokens 16, noise_classes 64,
noise_coords 32):

* conditioning vector c [B, hidden] (``c_cfg_noise_to_cond``, l.585-607): class embedding + the embeddings of 32
  discrete noise tokens (one table of 64 rows per coordinate) + 0.02 * RMSNorm(MLP(sinusoid(cfg_scale))), with
  cfg_scale = alpha = w + 1 fed raw (not its log) to a DiT timestep embedder (256 frequencies, cos then sin, l.476-490);
* trunk (``LightningDiT.forward``, l.436-465): linear patch embedding + a LEARNABLE 2D sin-cos position embedding
  (l.414-415); 16 in-context tokens = Linear(c) + a learned per-token embedding, put FIRST (l.440-444); blocks with
  adaLN (6 modulations from c), RMSNorm with learned gains (l.266-268), attention with qkv bias, QK-RMSNorm and a 1D
  RoPE over the whole sequence, class tokens at positions 0..15 and patches at 16.. (l.177-185, 199-207), a SwiGLU
  whose width int(2/3 * 4 * hidden) is rounded UP to a multiple of 32 (l.284-288); final RMSNorm + adaLN (shift,
  scale) + linear, the class tokens dropped (l.452-455);
* initialization: every Linear xavier-uniform with zero bias, except the adaLN modulations AND the final projection,
  all zero (l.292-295, 324-335), the alpha MLP N(0, 0.02^2) (l.473-474), the class and noise tables N(0, 0.02^2)
  (l.539-546), the in-context token embedding 0.02 * N(0, 1) (l.417), RMSNorm gains 1. So at initialization the
  generator outputs exactly 0 for every input (tested); the first update moves the final projection, whose input
  depends on z. Modules are built in the official order, each initialized right after it is built, as the official
  ``TorchLinear`` does (l.56-67), so the random stream is consumed in the official order.

gwf interface: ONE flat noise vector per sample, ``z`` [B, C*H*W + noise_coords] = [latent noise | noise coordinates]:
* ``z[:, :C*H*W]`` viewed as [B, C, H, W] is the Gaussian latent the official draws as randn [B, H, W, C] (l.617);
  gwf's layout is channels-first, the official's channels-last; both are i.i.d. N(0, 1), so the laws agree, and
  the patch order (row, column, channel) is the same (official l.425-434 vs ``patchify``), so weights
  need no permutation.
* the discrete noise token of coordinate i is ``floor(noise_classes * Phi(z[:, C*H*W + i]))`` (clamped to
  noise_classes - 1), Phi the standard normal CDF: for z_i ~ N(0, 1), Phi(z_i) is uniform on (0, 1), so the token is
  uniform on {0, ..., noise_classes - 1}, independently per coordinate: the law of the official
  ``torch.randint(0, noise_classes, (B, noise_coords))`` (l.620-627). ``noise_from_tokens`` is a right inverse (the
  bin centres), to feed official noise draws through ``forward``.
* ``normal_tail`` = the whole length: gwf draws all of z N(0, I) even with ``noise: uniform``, as the official.
* ``identity_input(z)`` is the latent part (jko.start=noise).
Labels are required when num_classes > 0 (the official always takes ``c``); num_classes = 0 (a gwf extension) keeps
one class row, used for every sample. alpha None means 1.0 (the official default ``cfg_scale=1.0``, l.609). The
official ``temp`` (noise scale, default 1.0 everywhere in the released scripts) is not an input here: scale z.

Numerics as the official under autocast: the conditioning vector stays fp32 (embeddings, RMSNorm of the alpha MLP's
output in fp32, l.599-605), each adaLN modulation is computed from c.float() and cast to the stream's dtype
(l.298, 338); the residual stream takes the dtype of the patch embedding (bf16 under bf16 autocast, as the
official). ``attn_fp32`` (official default true, the SOTA configs false) runs RoPE and attention in fp32 with
autocast off (l.199-224); otherwise RoPE runs in q's dtype. The state dict differs from the official only in its
names (no ``model.`` trunk prefix, no ``TorchLinear`` ``.linear`` level): ``official_key`` maps them; gwf.convert
converts released checkpoints. (The order of ``parameters()`` differs: pos_embed and cls_embed come first here.)

Checked once against the official file itself (a scratch comparison outside the tests, the official code not being a
dependency): the same seed gives bit-identical initial weights, and given weights, noise, labels and cfg scales the
outputs are bit-identical in fp32 and under CPU bf16 autocast, with attn_fp32 true and false.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from gwf.constants import SD_VAE_LATENT_SHAPE

CHECKPOINTING = ("none", "blocks", "every_k")  # model.checkpointing
ROPE_THETA = 10000.0  # rotary base frequency (official l.177; RoFormer, Su et al. 2021)
ALPHA_FREQ_DIM = 256  # frequencies of the cfg-scale embedder (official TimestepEmbedder default, l.469)
ALPHA_EMBED_SCALE = 0.02  # c += 0.02 * RMSNorm(alpha embedding) (official l.605)
SINCOS_BASE = 10000.0  # the position embedding's frequency base (official l.18)
TRUNK = ("patch_embed", "blocks", "final_layer", "pos_embed", "cls_embed", "c_token_proj")  # official DitGen.model.*


# ------------------------------------------------------------------------------------------------ pure functions
def patchify(x: Tensor, p: int) -> Tensor:
    """x [B, C, H, W] -> tokens [B, (H/p)*(W/p), p*p*C], row-major over patches, (p_row, p_col, C) within one (the
    official _patch_embed's order on its channels-last input, l.425-434)."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Tensor, p: int, c: int, h: int, w: int) -> Tensor:
    """Inverse of ``patchify``: tokens [B, (h/p)*(w/p), p*p*c] -> x [B, c, h, w]."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // p, w // p, p, p, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


def rms_norm(x: Tensor, weight: Tensor | None = None, eps: float = 1e-6) -> Tensor:
    """RMSNorm (Zhang & Sennrich 2019): x / sqrt(mean(x^2) + eps) * weight over the last dim, computed in fp32."""
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float() if weight is not None else y).to(x.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x [B, N, D] * (1 + scale [B, D]) + shift [B, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def swiglu_width(hidden: int, mlp_ratio: float = 4.0) -> int:
    """SwiGLU width: int(2/3 * int(hidden * mlp_ratio)) rounded up to a multiple of 32 (official l.284-287)."""
    width = int(2 / 3 * int(hidden * float(mlp_ratio)))
    return (width + 31) // 32 * 32


def sincos_pos_embed(dim: int, grid_h: int, grid_w: int) -> Tensor:
    """[grid_h*grid_w, dim] fp32 position table of the official ``get_2d_sincos_pos_embed`` (l.14-36), row-major
    tokens: [sin(col w), cos(col w), sin(row w), cos(row w)] with w_i = 10000^(-i / (dim/4)), i < dim/4. The
    official meshgrid(grid_w, grid_h) makes its "emb_h" half encode the COLUMN index (l.29-35)."""
    if dim % 4:
        raise ValueError(f"the 2D sin-cos position embedding needs hidden divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / SINCOS_BASE ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [dim/4]
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)  # row of each token
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)
    a_col, a_row = cols[:, None] * omega, rows[:, None] * omega  # [N, dim/4]
    return torch.cat([a_col.sin(), a_col.cos(), a_row.sin(), a_row.cos()], dim=1).float()


def rope_tables(seq_len: int, head_dim: int) -> tuple[Tensor, Tensor]:
    """cos, sin [seq_len, head_dim] of the official 1D RoPE (l.177-185): angle t * theta^(-i / (head_dim/2)) for
    position t, repeated over both halves (rotate-half form), computed in fp32 as the official."""
    half = head_dim // 2
    freqs = 1.0 / (ROPE_THETA ** (torch.arange(0, half, dtype=torch.float32) / half))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), freqs)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def alpha_features(alpha: Tensor, dim: int = ALPHA_FREQ_DIM) -> Tensor:
    """[B, dim] = [cos(alpha f), sin(alpha f)], f_i = exp(-ln(10000) i / (dim/2)), in fp32 (official l.476-485)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=alpha.device, dtype=torch.float32) / half)
    args = alpha.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def _linear(d_in: int, d_out: int, init: str = "xavier") -> nn.Linear:
    """nn.Linear initialized as the official TorchLinear (l.39-67): xavier-uniform, N(0, 0.02^2) or zero weight;
    zero bias. The default nn.Linear init runs first, as in the official, so the random stream matches."""
    layer = nn.Linear(d_in, d_out)
    if init == "xavier":
        nn.init.xavier_uniform_(layer.weight)
    elif init == "normal":
        nn.init.normal_(layer.weight, std=0.02)
    else:
        nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    return layer


# ------------------------------------------------------------------------------------------------ layers
class RMSNorm(nn.Module):
    """RMSNorm with a learned gain (official RMSNorm, eps 1e-6)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class AlphaEmbedder(nn.Module):
    """Official TimestepEmbedder (l.468-490) on alpha: Linear(256, D), SiLU, Linear(D, D), weights N(0, 0.02^2)."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = _linear(ALPHA_FREQ_DIM, dim, "normal")
        self.fc2 = _linear(dim, dim, "normal")

    def forward(self, alpha: Tensor) -> Tensor:
        return self.fc2(F.silu(self.fc1(alpha_features(alpha))))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), all with bias (official SwiGLUFFN, l.125-134; built in the order w1, w3, w2)."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.w1 = _linear(dim, width)
        self.w3 = _linear(dim, width)
        self.w2 = _linear(width, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Attention(nn.Module):
    """Self-attention, qkv with bias, QK-RMSNorm (learned gains), then 1D RoPE (official Attention, l.137-232):
    x [B, N, D], cos and sin [N, head_dim] -> [B, N, D]."""

    def __init__(self, dim: int, num_heads: int, attn_fp32: bool):
        super().__init__()
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"hidden {dim} must split into num_heads={num_heads} heads of even size (RoPE)")
        self.num_heads, self.head_dim, self.attn_fp32 = num_heads, dim // num_heads, attn_fp32
        self.qkv = _linear(dim, 3 * dim)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        self.proj = _linear(dim, dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).unbind(2)  # [B, N, h, hd]
        q, k = self.q_norm(q), self.k_norm(k)
        dtype = torch.float32 if self.attn_fp32 else q.dtype  # official l.200: RoPE in fp32 or in q's dtype
        cos, sin = cos[:n, None].to(dtype), sin[:n, None].to(dtype)  # [N, 1, hd]: broadcast over heads
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, h, N, hd]
        if self.attn_fp32:
            with torch.autocast(device_type=x.device.type, enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """adaLN block (official LightningDiTBlock, l.246-306): x [B, N, D], c [B, D] -> [B, N, D]; the identity at init
    (zero modulations, so zero gates)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, attn_fp32: bool):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = Attention(dim, num_heads, attn_fp32)
        self.mlp = SwiGLU(dim, swiglu_width(dim, mlp_ratio))
        self.adaLN_mod = nn.Sequential(nn.SiLU(), _linear(dim, 6 * dim, "zeros"))

    def forward(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_mod(c.float()).to(x.dtype).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """RMSNorm, adaLN (shift, scale), linear; modulation and projection zero at init (official l.309-340)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm_final = RMSNorm(dim)
        self.adaLN_mod = nn.Sequential(nn.SiLU(), _linear(dim, 2 * dim, "zeros"))
        self.linear = _linear(dim, out_dim, "zeros")

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_mod(c.float()).to(x.dtype).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ------------------------------------------------------------------------------------------------ generator
class WFlowDiT(nn.Module):
    """The official W-Flow generator (``DitGen``). ``z`` [B, C*H*W + noise_coords] (``noise_shape``), ``labels`` [B]
    int64 (required when num_classes > 0), ``alpha`` [B] >= 1 (None: 1) -> x [B, C, H, W]. out_shape = [C, H, W],
    H and W divisible by ``patch``. See the module docstring for the noise mapping."""

    def __init__(self, out_shape: list[int] | tuple[int, ...], num_classes: int = 0, hidden: int = 768,
                 depth: int = 12, num_heads: int = 12, patch: int = 2, mlp_ratio: float = 4.0,
                 n_cls_tokens: int = 16, noise_classes: int = 64, noise_coords: int = 32, attn_fp32: bool = False,
                 checkpointing: str = "none", checkpoint_every: int = 2):
        super().__init__()
        if len(out_shape) != 3 or out_shape[1] % patch or out_shape[2] % patch:
            raise ValueError(f"the W-Flow DiT takes [C, H, W] with H and W divisible by model.patch={patch}; got "
                             f"out_shape {list(out_shape)}")
        if checkpointing not in CHECKPOINTING or checkpoint_every < 1:
            raise ValueError(f"model.checkpointing must be one of {CHECKPOINTING} (model.checkpoint_every >= 1), got "
                             f"{checkpointing!r} ({checkpoint_every})")
        if noise_classes < 0 or noise_coords < 0 or n_cls_tokens < 0:
            raise ValueError("model.noise_classes, model.noise_coords and model.n_cls_tokens must be >= 0")
        self.out_shape = tuple(int(s) for s in out_shape)
        c, h, w = self.out_shape
        self.num_classes, self.patch, self.hidden = int(num_classes), int(patch), int(hidden)
        self.n_cls_tokens, self.noise_classes = int(n_cls_tokens), int(noise_classes)
        self.noise_coords = int(noise_coords) if noise_classes > 0 else 0  # official: no tokens without classes
        self.latent_dim = c * h * w
        self.normal_tail = self.latent_dim + self.noise_coords  # all of z is N(0, I), whatever gwf's `noise`
        # activation checkpointing (official use_remat, l.446-450): "blocks" = every block
        self.remat = [checkpointing == "blocks" or (checkpointing == "every_k" and i % checkpoint_every == 0)
                      for i in range(depth)]

        # conditioning, in the official construction order (DitGen.__init__, l.539-550); cond_dim = hidden
        self.class_embed = nn.Embedding(max(self.num_classes, 1), hidden)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        self.noise_embeds = nn.ModuleList()
        for _ in range(self.noise_coords):
            self.noise_embeds.append(nn.Embedding(self.noise_classes, hidden))
            nn.init.normal_(self.noise_embeds[-1].weight, std=0.02)
        self.cfg_embedder = AlphaEmbedder(hidden)
        self.cfg_norm = RMSNorm(hidden)

        # trunk (LightningDiT.__init__, l.382-423)
        self.patch_embed = _linear(patch * patch * c, hidden)
        self.blocks = nn.ModuleList(Block(hidden, num_heads, mlp_ratio, attn_fp32) for _ in range(depth))
        self.final_layer = FinalLayer(hidden, patch * patch * c)
        self.pos_embed = nn.Parameter(sincos_pos_embed(hidden, h // patch, w // patch).unsqueeze(0))  # [1, N, D]
        if self.n_cls_tokens:
            self.cls_embed = nn.Parameter(torch.randn(1, self.n_cls_tokens, hidden) * 0.02)  # [1, T, D]
            self.c_token_proj = _linear(hidden, hidden)
        cos, sin = rope_tables(self.n_cls_tokens + (h // patch) * (w // patch), hidden // num_heads)
        self.register_buffer("rope_cos", cos, persistent=False)  # [T + N, head_dim], official _rope_cos
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (self.latent_dim + self.noise_coords,)

    # ------------------------------------------------------------------------------------------------ noise
    def _check(self, z: Tensor) -> None:
        if z.ndim != 2 or z.shape[1] != self.noise_shape[0]:
            c, h, w = self.out_shape
            raise ValueError(f"WFlowDiT expects flat z of shape [B, {self.noise_shape[0]}] = [B, {c}*{h}*{w} latent "
                             f"noise + {self.noise_coords} noise coordinates], got {tuple(z.shape)}")

    def split_noise(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """z [B, C*H*W + K] -> (latent noise [B, C, H, W], noise tokens [B, K] int64 = floor(classes * Phi(z_i)))."""
        self._check(z)
        latent = z[:, : self.latent_dim].reshape(len(z), *self.out_shape)
        u = torch.special.ndtr(z[:, self.latent_dim:].float())  # uniform on (0, 1) for N(0, 1) coordinates
        tokens = (u * self.noise_classes).floor().long().clamp_(0, max(self.noise_classes - 1, 0))
        return latent, tokens

    def noise_from_tokens(self, latent: Tensor, tokens: Tensor) -> Tensor:
        """The inverse of ``split_noise``: z [B, C*H*W + K] whose coordinates are the centres of the tokens' bins,
        Phi^{-1}((k + 1/2) / classes); e.g. to feed the official draw (x NHWC permuted to NCHW, noise_labels)."""
        centres = torch.special.ndtri((tokens.double() + 0.5) / self.noise_classes).to(latent.dtype)
        return torch.cat([latent.reshape(len(latent), -1), centres], dim=1)

    def identity_input(self, z: Tensor) -> Tensor:
        """The latent part of z [B, C, H, W] (jko.start=noise: T_0 = identity on the latent noise)."""
        return self.split_noise(z)[0]

    # ------------------------------------------------------------------------------------------------ forward
    def condition(self, labels: Tensor | None, tokens: Tensor, alpha: Tensor | None) -> Tensor:
        """c [B, D] fp32 = class + noise-token embeddings + 0.02 RMSNorm(alpha MLP) (official l.585-607)."""
        b = len(tokens)
        if labels is None:
            if self.num_classes > 0:
                raise ValueError("this generator is class-conditional (num_classes > 0): pass labels")
            labels = torch.zeros(b, dtype=torch.long, device=tokens.device)
        if alpha is None:
            alpha = torch.ones(b, device=tokens.device)
        c = self.class_embed(labels)
        for i, table in enumerate(self.noise_embeds):  # summed one by one, in the official order
            c = c + table(tokens[:, i])
        a = self.cfg_norm(self.cfg_embedder(alpha).float())  # fp32 even under autocast (official l.600-601)
        return c + a.to(c.dtype) * ALPHA_EMBED_SCALE

    def generate(self, latent: Tensor, tokens: Tensor, labels: Tensor | None = None,
                 alpha: Tensor | None = None) -> Tensor:
        """The official DitGen on given noise: latent [B, C, H, W], noise tokens [B, K] -> x [B, C, H, W]."""
        c = self.condition(labels, tokens, alpha)  # [B, D]
        x = self.patch_embed(patchify(latent, self.patch))  # [B, N, D]
        x = x + self.pos_embed.to(x.dtype)
        if self.n_cls_tokens:
            cls = self.c_token_proj(c).unsqueeze(1) + self.cls_embed.to(x.dtype)  # [B, T, D]
            x = torch.cat([cls.to(x.dtype), x], dim=1)  # class tokens first: RoPE positions 0..T-1
        for block, remat in zip(self.blocks, self.remat):
            if remat and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, self.rope_cos, self.rope_sin, use_reentrant=False)
            else:
                x = block(x, c, self.rope_cos, self.rope_sin)
        # the final layer acts token by token: dropping the class tokens first gives the official result
        x = self.final_layer(x[:, self.n_cls_tokens:], c)  # [B, N, p*p*C]
        return unpatchify(x, self.patch, *self.out_shape)

    def forward(self, z: Tensor, labels: Tensor | None = None, alpha: Tensor | None = None) -> Tensor:
        latent, tokens = self.split_noise(z)
        return self.generate(latent, tokens, labels, alpha)


def official_key(module: nn.Module, key: str) -> str:
    """The official DitGen state-dict name of ``key`` of ``module`` (a WFlowDiT): the trunk lives under ``model.``
    (DitGen.model = LightningDiT, l.552) and every Linear's parameters one level down (TorchLinear.linear, l.66)."""
    owner, _, leaf = key.rpartition(".")
    if owner and isinstance(module.get_submodule(owner), nn.Linear):
        key = f"{owner}.linear.{leaf}"
    return f"model.{key}" if key.split(".")[0] in TRUNK else key


def official_keys(module: nn.Module) -> dict[str, str]:
    """{our state-dict key: the official key} for every parameter of ``module``."""
    return {key: official_key(module, key) for key in module.state_dict()}


# ------------------------------------------------------------------------------------------------ sizes
# The one home of each size's numbers (the official configs latent_sota_{B,L,XL}_ot_1node.yaml, model: hidden_size,
# depth, num_heads; cond_dim = hidden_size); conf/model/dit_*.yaml name the size and hold the other options.
DIT_SIZES: dict[str, dict[str, int]] = {
    "dit_tiny": dict(hidden=64, depth=2, num_heads=4),  # tests and CPU runs (not an official size)
    "dit_b2": dict(hidden=768, depth=12, num_heads=12),
    "dit_l2": dict(hidden=1024, depth=24, num_heads=16),
    "dit_xl2": dict(hidden=1152, depth=28, num_heads=16),
}

# [WF] Table: B/2, L/2, XL/2 parameter counts (1000 classes).
PAPER_PARAMS = {"dit_b2": 132.7e6, "dit_l2": 462.9e6, "dit_xl2": 678.9e6}


def dit(size: str, out_shape, num_classes: int = 0, **options) -> WFlowDiT:
    """The W-Flow DiT of a named size (a DIT_SIZES key); ``options`` (patch, noise_coords, ...; or a size number)
    go through."""
    return WFlowDiT(out_shape, num_classes, **{**DIT_SIZES[size], **options})


dit_tiny = partial(dit, "dit_tiny")


def count_parameters(size: str, out_shape=SD_VAE_LATENT_SHAPE, num_classes: int = 1000, **options) -> int:
    """Parameters of a size at the official settings (unless overridden), built on the meta device."""
    with torch.device("meta"):
        model = dit(size, out_shape, num_classes, **options)
    return sum(p.numel() for p in model.parameters())
