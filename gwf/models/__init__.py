"""Generator registry: keys mirror the config group ``conf/model/`` one to one."""

from __future__ import annotations

from torch import nn

from gwf.models.mlp import MLPGenerator

MODELS: dict[str, type[nn.Module]] = {
    "mlp": MLPGenerator,
}


def build_model(name: str, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model '{name}'; choose one of {sorted(MODELS)} (config group model=...)")
    return MODELS[name](**kwargs)
