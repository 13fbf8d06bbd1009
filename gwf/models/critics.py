"""Critic networks: x [B, *in_shape] (and labels) -> [B] scores, or [B, out_dim] embeddings (learned MMD kernels)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gwf.models.ncsnpp_critic import NCSNppCritic
from gwf.models.resnet import ResNetCritic
from gwf.models.unet import UNetCritic


class MLPCritic(nn.Module):
    """MLP critic for 2D toys and small images. ``out_dim = 1`` returns a score per sample [B]; a larger
    ``out_dim`` returns an embedding [B, out_dim]. Class-conditional (projection-free: the class embedding is
    concatenated to the input) when ``num_classes > 0``."""

    def __init__(self, in_shape: list[int] | tuple[int, ...], hidden: int = 256, depth: int = 3, out_dim: int = 1,
                 num_classes: int = 0, class_dim: int = 32):
        super().__init__()
        self.in_dim = math.prod(int(s) for s in in_shape)
        self.class_emb = nn.Embedding(num_classes, class_dim) if num_classes > 0 else None
        dims = [self.in_dim + (class_dim if num_classes > 0 else 0)] + [hidden] * depth
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(hidden, out_dim)
        self.out_dim = out_dim

    def forward(self, x: Tensor, labels: Tensor | None = None) -> Tensor:
        h = x.flatten(1)
        if h.shape[1] != self.in_dim:
            raise ValueError(f"MLPCritic expects inputs with {self.in_dim} values each, got shape {tuple(x.shape)}")
        if self.class_emb is not None:
            if labels is None:
                raise ValueError("this critic is class-conditional (num_classes > 0): pass labels")
            h = torch.cat([h, self.class_emb(labels)], dim=1)
        out = self.head(self.body(h))
        return out.squeeze(-1) if self.out_dim == 1 else out


# Keys mirror the config group conf/critic/: critic=mlp for 2D toys and flat data, critic=resnet (ndf 256) for images
# ([GWF] Small-Net critic, gwf/models/resnet.py).
CRITICS: dict[str, type[nn.Module]] = {
    "mlp": MLPCritic, "resnet": ResNetCritic,
    "resnet_mmdgan": ResNetCritic,  # the official resnet_MMDGAN critic: conf/critic/resnet_mmdgan.yaml sets its layout
    "ncsnpp": NCSNppCritic,  # the official Large-Net critic (Discriminator_small / _small_embed)
    "unet": UNetCritic,  # the official U-Net's critic (Discriminator_unet), spectrally normalized by construction
}


def build_critic(name: str, spectral_norm: bool = False, **kwargs) -> nn.Module:
    """The critic ``name``; ``spectral_norm``: every linear and convolution weight spectrally normalized (torch's
    parametrization, one power iteration per forward in training), as the official GWF ``--use_sn`` does to its
    discriminator's layers (networks/__init__.py ``maybe_sn``)."""
    if name not in CRITICS:
        raise ValueError(f"unknown critic '{name}'; choose one of {sorted(CRITICS)} (method.critic.name=...)")
    critic = CRITICS[name](**kwargs)
    if spectral_norm:
        from torch.nn.utils.parametrizations import spectral_norm as normalize

        from torch.nn.utils import parametrize

        for module in list(critic.modules()):  # layers already normalized (critic=unet) are not normalized twice
            if (isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))
                    and not parametrize.is_parametrized(module, "weight")):
                normalize(module)
    return critic
