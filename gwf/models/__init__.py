"""Generator registry: keys mirror the config group ``conf/model/`` one to one. Every entry is called as
``MODELS[name](out_shape=[...], num_classes=..., **model_config)`` and returns an nn.Module with ``noise_shape`` and
``forward(z, labels=None, alpha=None) -> x [B, *out_shape]``."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from functools import partial

from gwf.models.mlp import MLPGenerator
from gwf.models.ncsnpp import NCSNppGenerator
from gwf.models.resnet import ResNetGenerator
from gwf.models.unet import UNetGenerator
from gwf.models.wflow_dit import DIT_SIZES, dit

MODELS: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLPGenerator,
    "resnet": ResNetGenerator,
    "resnet_mmdgan": ResNetGenerator,  # the official resnet_MMDGAN: conf/model/resnet_mmdgan.yaml sets its layout
    "ncsnpp": NCSNppGenerator,  # the official Large-Net (NCSN++ with AdaGN; image noise and a latent)
    "unet": UNetGenerator,  # the official U-Net (image-shaped noise in, image out)
    # the official W-Flow generator (models/generator.py DitGen): dit_tiny, dit_b2, dit_l2, dit_xl2
    **{size: partial(dit, size) for size in DIT_SIZES},
}


def build_model(name: str, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of {sorted(MODELS)} (config group model=...)")
    return MODELS[name](**kwargs)
