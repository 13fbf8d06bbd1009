"""Frozen feature encoders for feature-space drift. ``FEATURES`` maps the ``name`` of a ``method.features`` spec to
a builder; ``build_features(spec)`` returns the frozen encoder, or None for data space (spec None).

    method.features: null                                   # data space (default)
    method.features: identity                               # the same: the raw sample as the only feature set
    method.features: {name: mae, path: runs/mae/encoder.pt} # a gwf-train-encoder export, or an official MAE converted
                                                            #  by gwf.features.convert.convert_mae (+ MAEFeatures
                                                            #  options, official defaults: patch_mean_size,
                                                            #  patch_std_size, use_mean, use_std, every_k_block,
                                                            #  include_raw_global, use_norm_x; use_ema for mae.pt)
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Union

from gwf.features.base import FeatureEncoder, IdentityFeatures
from gwf.features.mae import MAEFeatures, load_mae_features

FeatureSpec = Union[None, str, Mapping[str, Any]]

FEATURES: dict[str, Callable[..., FeatureEncoder]] = {"identity": IdentityFeatures, "mae": load_mae_features}


def build_features(spec: FeatureSpec) -> FeatureEncoder | None:
    """None -> None (data space); "name" or {"name": ..., **kwargs} -> a frozen FeatureEncoder."""
    if spec is None:
        return None
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("name", None)
    if name not in FEATURES:
        raise ValueError(f"unknown feature encoder {name!r} in method.features; choose one of {sorted(FEATURES)} "
                         "(or null for data space), e.g. method.features={name: mae, path: DIR/mae.pt}")
    encoder = FEATURES[name](**spec)
    if any(p.requires_grad for p in encoder.parameters()):  # DDP and the optimizers must never see these
        raise RuntimeError(f"feature encoder {name!r} has trainable parameters; call .freeze() in its builder")
    return encoder


__all__ = ["FEATURES", "FeatureEncoder", "FeatureSpec", "IdentityFeatures", "MAEFeatures", "build_features"]
