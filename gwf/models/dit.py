"""Latent DiT generator (DiT, Peebles & Xie 2023, with the LightningDiT changes, Yao et al. 2025, as in [WF] and
[DRIFT]): noise z [B, C, H, W] -> latent x [B, C, H, W] in one step, conditioned on the class and on the guidance
strength alpha = w + 1 ([WF] Eq. 16) through adaLN-zero and in-context conditioning tokens ([DRIFT] App. A.2);
blocks with QK-norm, 2D RoPE on the patch tokens and SwiGLU. Architecture and parameter counts: docs/recipes.md.

Initialization as DiT (every block the identity), except the final projection: N(0, out_init_rms^2 / hidden), NOT
zero, since with a zero projection a one-step generator maps every z to the same x. Under bf16 autocast, norms,
RoPE and the residual stream stay fp32; the output is bf16.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from torch import Tensor, nn

from gwf.constants import SD_VAE_LATENT_SHAPE
from gwf.models.mlp import AlphaEmbedding

CHECKPOINTING = ("none", "blocks", "every_k")
ROPE_THETA = 10000.0  # rotary base frequency (RoFormer, Su et al. 2021)
ALPHA_FREQ_DIM = 256  # Fourier features of log(alpha) before the alpha MLP (DiT's timestep embedding size)


# ------------------------------------------------------------------------------------------------ pure functions
def patchify(x: Tensor, p: int) -> Tensor:
    """x [B, C, H, W] -> tokens [B, (H/p)*(W/p), p*p*C], row-major over patches, (p_row, p_col, C) within one."""
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


def rope_2d_angles(grid_h: int, grid_w: int, head_dim: int, theta: float = ROPE_THETA) -> Tensor:
    """Rotation angles [grid_h*grid_w, head_dim/2] of 2D RoPE: the first half of the pairs rotates with the row
    index, the second half with the column index, frequencies theta^(-2i/(head_dim/2)) on each axis."""
    if head_dim % 4:
        raise ValueError(f"2D rotary embeddings need head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # [head_dim/4]
    rows = torch.arange(grid_h, dtype=torch.float64).repeat_interleave(grid_w)  # row of each token, row-major
    cols = torch.arange(grid_w, dtype=torch.float64).repeat(grid_h)
    return torch.cat([rows[:, None] * freqs, cols[:, None] * freqs], dim=1).float()  # [N, head_dim/2]


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i + d/2}) by the angles: x [..., N, d], cos and sin [N, d/2] (rotate-half form)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x [B, N, D] * (1 + scale [B, D]) + shift [B, D]."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ------------------------------------------------------------------------------------------------ layers
class RMSNorm(nn.Module):
    """RMSNorm with an optional learned gain (``affine``)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """SwiGLU MLP (Shazeer 2020): W3 (silu(x W1) * (x W2)), hidden = int(2/3 * mlp_ratio * dim) (LightningDiT)."""

    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(2 / 3 * mlp_ratio * dim)
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class Attention(nn.Module):
    """Multi-head self-attention with QK-norm and rotary embeddings: x [B, N, D], cos and sin [N, head_dim/2]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # [B, h, N, hd]
        q, k = apply_rope(self.q_norm(q), cos, sin), apply_rope(self.k_norm(k), cos, sin)  # QK-norm, then RoPE
        out = F.scaled_dot_product_attention(q, k, v)  # [B, h, N, hd]
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class DiTBlock(nn.Module):
    """adaLN-zero block: x [B, N, D], c [B, D] -> [B, N, D]; the identity at initialization."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(dim, affine=False), RMSNorm(dim, affine=False)
        self.attn = Attention(dim, num_heads)
        self.mlp = SwiGLU(dim, mlp_ratio)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN(c).chunk(6, dim=-1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), cos, sin)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))


class FinalLayer(nn.Module):
    """RMSNorm, adaLN (shift, scale), linear: [B, N, D] -> [B, N, p*p*C]."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, affine=False)
        self.linear = nn.Linear(dim, out_dim)
        self.adaLN = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


# ------------------------------------------------------------------------------------------------ generator
class DiTGenerator(nn.Module):
    """One-step latent DiT. ``z`` [B, *out_shape], ``labels`` [B] int64 (None when num_classes = 0), ``alpha`` [B]
    >= 1 (None: 1, no guidance) -> x [B, *out_shape]. out_shape = [C, H, W] with H and W divisible by ``patch``."""

    def __init__(self, out_shape: list[int] | tuple[int, ...], num_classes: int = 0, hidden: int = 768,
                 depth: int = 12, num_heads: int = 12, patch: int = 2, mlp_ratio: float = 4.0,
                 num_cond_tokens: int = 16, out_init_rms: float = 0.1, checkpointing: str = "none",
                 checkpoint_every: int = 2):
        super().__init__()
        if checkpointing not in CHECKPOINTING or checkpoint_every < 1:
            raise ValueError(f"model.checkpointing must be one of {CHECKPOINTING} (model.checkpoint_every >= 1), got "
                             f"{checkpointing!r} ({checkpoint_every})")
        # Activation checkpointing (the official configs' use_remat): the blocks whose activations are recomputed in
        # the backward pass instead of saved, "blocks": all, "every_k": every checkpoint_every-th one.
        self.remat = [checkpointing == "blocks" or (checkpointing == "every_k" and i % checkpoint_every == 0)
                      for i in range(depth)]
        if len(out_shape) != 3 or out_shape[1] % patch or out_shape[2] % patch:
            raise ValueError(f"the DiT generator takes [C, H, W] with H and W divisible by model.patch={patch}; "
                             f"got out_shape {list(out_shape)}")
        self.out_shape = tuple(int(s) for s in out_shape)
        c, h, w = self.out_shape
        self.num_classes, self.patch, self.hidden = num_classes, patch, hidden
        self.patch_embed = nn.Linear(patch * patch * c, hidden)  # = Conv2d(c, hidden, patch, stride=patch)
        self.class_emb = nn.Embedding(max(num_classes, 1), hidden)  # one learned vector when unconditional
        self.alpha_freqs = AlphaEmbedding(ALPHA_FREQ_DIM)
        self.alpha_mlp = nn.Sequential(nn.Linear(ALPHA_FREQ_DIM, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.cond_to_tokens = nn.Linear(hidden, hidden)
        self.token_emb = nn.Parameter(torch.zeros(num_cond_tokens, hidden))
        self.blocks = nn.ModuleList(DiTBlock(hidden, num_heads, mlp_ratio) for _ in range(depth))
        self.final = FinalLayer(hidden, patch * patch * c)
        # conditioning tokens first, at angle 0 (no position, no rotation), then the patches' 2D angles
        angles = torch.cat([torch.zeros(num_cond_tokens, hidden // num_heads // 2),
                            rope_2d_angles(h // patch, w // patch, hidden // num_heads)])  # [T + N, head_dim/2]
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        self.out_init_rms = out_init_rms
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.patch_embed.weight.is_meta:  # parameter counting on the meta device: nothing to initialize
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.class_emb.weight, std=0.02)
        nn.init.normal_(self.token_emb, std=0.02)
        for m in self.alpha_mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        for block in self.blocks:  # adaLN-zero: every block starts as the identity
            nn.init.zeros_(block.adaLN[-1].weight)
            nn.init.zeros_(block.adaLN[-1].bias)
        nn.init.zeros_(self.final.adaLN[-1].weight)
        nn.init.zeros_(self.final.adaLN[-1].bias)
        # small nonzero output: RMS-normalized tokens times N(0, s^2 / hidden) weights have RMS s
        nn.init.normal_(self.final.linear.weight, std=self.out_init_rms / math.sqrt(self.hidden))
        nn.init.zeros_(self.final.linear.bias)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return self.out_shape

    def condition(self, labels: Tensor | None, alpha: Tensor | None, batch: int, device) -> Tensor:
        """c [B, hidden] = class embedding + alpha embedding."""
        if labels is None:
            if self.num_classes > 0:
                raise ValueError("this generator is class-conditional (num_classes > 0): pass labels")
            labels = torch.zeros(batch, dtype=torch.long, device=device)
        if alpha is None:
            alpha = torch.ones(batch, device=device)
        return self.class_emb(labels) + self.alpha_mlp(self.alpha_freqs(alpha).to(self.class_emb.weight.dtype))

    def forward(self, z: Tensor, labels: Tensor | None = None, alpha: Tensor | None = None) -> Tensor:
        if tuple(z.shape[1:]) != self.out_shape:
            raise ValueError(f"DiTGenerator expects z of shape [B, {', '.join(map(str, self.out_shape))}] (noise "
                             f"of the latent's shape), got {tuple(z.shape)}")
        b, (ch, h, w) = len(z), self.out_shape
        c = self.condition(labels, alpha, b, z.device)  # [B, D]
        cond_tokens = self.cond_to_tokens(c).unsqueeze(1) + self.token_emb  # [B, T, D]
        x = torch.cat([cond_tokens, self.patch_embed(patchify(z, self.patch))], dim=1)  # [B, T + N, D]
        for block, remat in zip(self.blocks, self.remat):
            if remat and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, c, self.rope_cos, self.rope_sin, use_reentrant=False)
            else:
                x = block(x, c, self.rope_cos, self.rope_sin)
        x = self.final(x[:, cond_tokens.shape[1]:], c)  # drop the conditioning tokens: [B, N, p*p*C]
        return unpatchify(x, self.patch, ch, h, w)


# ------------------------------------------------------------------------------------------------ sizes
# The one home of each size's numbers (conf/model/dit_*.yaml name the size and hold the size-free options).
DIT_SIZES: dict[str, dict[str, int]] = {
    "dit_tiny": dict(hidden=128, depth=4, num_heads=4, num_cond_tokens=4),  # ~1.3M parameters: tests and CPU runs
    "dit_b2": dict(hidden=768, depth=12, num_heads=12, num_cond_tokens=16),
    "dit_l2": dict(hidden=1024, depth=24, num_heads=16, num_cond_tokens=16),
    "dit_xl2": dict(hidden=1152, depth=28, num_heads=16, num_cond_tokens=16),
}


def dit(size: str, out_shape, num_classes: int = 0, **options) -> DiTGenerator:
    """The DiT of a named size; ``options`` (patch, mlp_ratio, ...; or a size number, deliberately) go through."""
    return DiTGenerator(out_shape, num_classes, **{**DIT_SIZES[size], **options})


dit_tiny = partial(dit, "dit_tiny")

# Parameter counts reported by [WF] for its generators (1000 ImageNet classes, 4x32x32 latents).
PAPER_PARAMS = {"dit_b2": 133e6, "dit_l2": 463e6, "dit_xl2": 679e6}


def count_parameters(size: str, out_shape=SD_VAE_LATENT_SHAPE, num_classes: int = 1000, **kw) -> int:
    """Parameters of a size, built on the meta device (no memory is allocated)."""
    with torch.device("meta"):
        model = dit(size, out_shape, num_classes, **kw)
    return sum(p.numel() for p in model.parameters())
