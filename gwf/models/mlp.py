"""MLP generator for 2D toys and small images (digits): z [B, noise_dim] -> x [B, *out_shape]."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class AlphaEmbedding(nn.Module):
    """Guidance strength alpha = w + 1 (W-Flow Eq. 16) as Fourier features of log(alpha)."""

    def __init__(self, dim: int):
        super().__init__()
        if dim % 2:
            raise ValueError(f"alpha embedding dim must be even, got {dim}")
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(16.0), dim // 2)), persistent=False)

    def forward(self, alpha: Tensor) -> Tensor:
        a = torch.log(alpha.float()).unsqueeze(-1) * self.freqs  # [B, dim/2]
        return torch.cat([a.sin(), a.cos()], dim=-1)


def conditioning_layers(num_classes: int, class_dim: int,
                        alpha_dim: int) -> tuple[nn.Module | None, nn.Module | None, int]:
    """(class embedding or None, alpha features or None, size of their concatenation) for a generator."""
    class_emb = nn.Embedding(num_classes, class_dim) if num_classes > 0 else None
    alpha_emb = AlphaEmbedding(alpha_dim) if alpha_dim > 0 else None
    return class_emb, alpha_emb, (class_dim if num_classes > 0 else 0) + alpha_dim


def conditioning_vector(class_emb: nn.Module | None, alpha_emb: nn.Module | None, z: Tensor, labels: Tensor | None,
                        alpha: Tensor | None) -> Tensor | None:
    """[B, cond_dim]: the class embedding of ``labels`` and the features of ``alpha`` (1 when None), concatenated;
    None when the generator has neither."""
    parts = []
    if class_emb is not None:
        if labels is None:
            raise ValueError("this generator is class-conditional (num_classes > 0): pass labels")
        parts.append(class_emb(labels))
    if alpha_emb is not None:
        parts.append(alpha_emb(alpha if alpha is not None else torch.ones(len(z), device=z.device)))
    return torch.cat(parts, dim=-1).to(z.dtype) if parts else None


class MLPGenerator(nn.Module):
    """Conditional MLP generator: ``z`` [B, noise_dim], ``labels`` [B] or None, ``alpha`` [B] >= 1 or None. The
    conditioning vector (class embedding, alpha features) is concatenated to z and to every hidden layer's input;
    ``num_classes = 0``: unconditional; ``alpha_dim = 0``: alpha ignored."""

    def __init__(self, out_shape: list[int] | tuple[int, ...], noise_dim: int = 32, hidden: int = 256,
                 depth: int = 3, num_classes: int = 0, class_dim: int = 32, alpha_dim: int = 0):
        super().__init__()
        self.out_shape = tuple(int(s) for s in out_shape)
        self.noise_dim = noise_dim
        self.num_classes = num_classes
        self.class_emb, self.alpha_emb, cond_dim = conditioning_layers(num_classes, class_dim, alpha_dim)
        self.cond_dim = cond_dim
        dims = [noise_dim] + [hidden] * depth
        self.layers = nn.ModuleList(nn.Linear(d + cond_dim, hidden) for d in dims[:-1])
        self.out = nn.Linear(hidden + cond_dim, math.prod(self.out_shape))
        self.act = nn.SiLU()

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (self.noise_dim,)

    def _cond(self, z: Tensor, labels: Tensor | None, alpha: Tensor | None) -> Tensor:
        c = conditioning_vector(self.class_emb, self.alpha_emb, z, labels, alpha)
        return c if c is not None else z.new_zeros(len(z), 0)

    def forward(self, z: Tensor, labels: Tensor | None = None, alpha: Tensor | None = None) -> Tensor:
        if z.ndim != 2 or z.shape[1] != self.noise_dim:
            raise ValueError(f"MLPGenerator expects z of shape [B, {self.noise_dim}], got {tuple(z.shape)}")
        c = self._cond(z, labels, alpha)
        # nothing to join (unconditional): no copy of each layer's input, which the concatenation made contiguous
        join = (lambda h: torch.cat([h, c], dim=-1)) if c.shape[1] else (lambda h: h.contiguous())
        h = z
        for layer in self.layers:
            h = self.act(layer(join(h)))
        return self.out(join(h)).view(len(z), *self.out_shape)
