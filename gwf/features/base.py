"""Frozen feature encoders for feature-space drift ([DRIFT] Sec. 3.5, App. A.5; [WF] Sec. 4).

An encoder maps x [B, *shape] to named feature sets, each [B, T, C] (T tokens, each its own transport problem in
R^C) or [B, C] (T = 1). Gradients flow through the encoder into the generator, which alone is updated. The helpers
below turn feature maps into feature sets as the official MAE feature code does.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from gwf.constants import FEATURE_STD_EPS


class FeatureEncoder(nn.Module):
    """Base class: ``forward(x [B, *shape]) -> dict[str, Tensor]`` of feature sets [B, T, C] or [B, C].

    Frozen: ``freeze()`` drops requires_grad (DDP and the optimizers never see these parameters) and ``train()``
    always stays in eval mode. ``is_identity``: the features are the raw sample (objectives take their data path).
    """

    is_identity = False

    def freeze(self) -> "FeatureEncoder":
        self.requires_grad_(False)
        return self.train(False)

    def train(self, mode: bool = True) -> "FeatureEncoder":
        return super().train(False)  # frozen encoder: eval mode whatever the caller asks

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        raise NotImplementedError


class IdentityFeatures(FeatureEncoder):
    """The raw sample as its only feature set: {"x": x.flatten(1)} [B, D] (the data-space drift)."""

    is_identity = True

    def __init__(self):
        super().__init__()
        self.freeze()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {"x": x.flatten(1)}


def location_tokens(fmap: Tensor) -> Tensor:
    """Per-location feature vectors: [B, C, H, W] -> [B, H*W, C] (row-major locations)."""
    return fmap.flatten(2).transpose(1, 2)


def safe_std(x: Tensor, dim) -> Tensor:
    """sqrt(Var(x) + FEATURE_STD_EPS) over ``dim`` (biased variance), in at least fp32: finite gradient at Var = 0."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return (x.var(dim=dim, unbiased=False) + FEATURE_STD_EPS).sqrt()


def global_mean_std(fmap: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std of each channel over all locations: [B, C, H, W] -> ([B, C], [B, C])."""
    return fmap.mean(dim=(2, 3)), safe_std(fmap, dim=(2, 3))


def patches(fmap: Tensor, size: int) -> Tensor:
    """Non-overlapping size x size patches: [B, C, H, W] -> [B, (H/s)*(W/s), s*s, C] (row-major patches)."""
    b, c, h, w = fmap.shape
    if h % size or w % size:
        raise ValueError(f"a {h}x{w} map does not split into {size}x{size} patches")
    x = fmap.reshape(b, c, h // size, size, w // size, size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // size) * (w // size), size * size, c)


def patch_mean_std(fmap: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Mean and std of each channel over each size x size patch: [B, C, H, W] -> 2 x [B, (H/s)*(W/s), C]."""
    p = patches(fmap, size)
    return p.mean(dim=2), safe_std(p, dim=2)


def map_feature_sets(name: str, fmap: Tensor, patch_sizes: Sequence[int] = (2, 4), use_mean: bool = True,
                     use_std: bool = True) -> dict[str, Tensor]:
    """The feature sets of one map [B, C, H, W] (official MAE feature code, ``process_feat``):

    name            [B, H*W, C]   per-location vectors
    name_mean/_std  [B, C]        over all locations
    name_mean_s     [B, HW/s^2, C]  per s x s patch (for each s in patch_sizes dividing H and W), and name_std_s
    """
    h, w = fmap.shape[2:]
    stats = {"": global_mean_std(fmap)}
    # patch sizes that do not tile the map are skipped, as in the official code
    stats.update({f"_{s}": patch_mean_std(fmap, s) for s in patch_sizes if h % s == 0 and w % s == 0})
    out = {name: location_tokens(fmap)}
    for suffix, (mean, std) in stats.items():
        if use_mean:
            out[f"{name}_mean{suffix}"] = mean
        if use_std:
            out[f"{name}_std{suffix}"] = std
    return out
