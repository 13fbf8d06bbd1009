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


def patches(fmap: Tensor, size: int) -> Tensor:
    """Non-overlapping size x size patches: [B, C, H, W] -> [B, (H/s)*(W/s), s*s, C] (row-major patches)."""
    b, c, h, w = fmap.shape
    if h % size or w % size:
        raise ValueError(f"a {h}x{w} map does not split into {size}x{size} patches")
    x = fmap.reshape(b, c, h // size, size, w // size, size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // size) * (w // size), size * size, c)


def channel_rms(x: Tensor) -> Tensor:
    """sqrt(mean over locations of x^2 + FEATURE_STD_EPS) of each channel, in at least fp32: [B, C, H, W] -> [B, C].
    The official ``norm_x`` feature set: the input's per-channel root mean square, one token
    (riesz_flow_hudson models/mae_model.py:339, on the BHWC input; the JAX release's get_activations alike)."""
    x = x.to(torch.promote_types(x.dtype, torch.float32))
    return (x.square().mean(dim=(2, 3)) + FEATURE_STD_EPS).sqrt()


def raw_global(x: Tensor) -> Tensor:
    """The raw sample as one vector in the official (h, w, c) order: [B, C, H, W] -> [B, H*W*C], the official "global"
    set (riesz_flow_hudson models/mae_model.py:459, ``x.reshape(B, 1, -1)`` of the BHWC sample)."""
    return x.permute(0, 2, 3, 1).flatten(1)


def map_feature_sets(name: str, fmap: Tensor, patch_mean_sizes: Sequence[int] = (2, 4),
                     patch_std_sizes: Sequence[int] = (2, 4), use_mean: bool = True, use_std: bool = True, *,
                     patch_sizes: Sequence[int] | None = None) -> dict[str, Tensor]:
    """The feature sets of one map [B, C, H, W], in the official ``process_feat``'s order and names
    (riesz_flow_hudson models/mae_model.py:341-358):

    name              [B, H*W, C]     per-location vectors
    name_mean         [B, C]          mean over all locations (``use_mean``)
    name_std          [B, C]          std over all locations (``use_std``)
    name_mean_s       [B, HW/s^2, C]  per s x s patch, for each s in patch_mean_sizes that tiles H and W
    name_std_s        [B, HW/s^2, C]  the same for patch_std_sizes

    use_mean / use_std switch only the global sets, as in the official code. ``patch_sizes`` sets both size lists.
    [B, C] sets are one token each (the official [B, 1, C]; the objectives treat them alike).
    """
    if patch_sizes is not None:
        patch_mean_sizes = patch_std_sizes = patch_sizes
    h, w = fmap.shape[2:]
    tiles = lambda s: h % s == 0 and w % s == 0  # noqa: E731  (sizes that do not tile a map are skipped, as official)
    out = {name: location_tokens(fmap)}
    if use_mean:
        out[f"{name}_mean"] = fmap.mean(dim=(2, 3))
    if use_std:
        out[f"{name}_std"] = safe_std(fmap, dim=(2, 3))
    for s in patch_mean_sizes:
        if tiles(s):
            out[f"{name}_mean_{s}"] = patches(fmap, s).mean(dim=2)
    for s in patch_std_sizes:
        if tiles(s):
            out[f"{name}_std_{s}"] = safe_std(patches(fmap, s), dim=2)
    return out
