"""Exponential moving average of a generator's weights, used for evaluation and sampling."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA(nn.Module):
    """``ema = decay_n * ema + (1 - decay_n) * raw`` after each generator update, with the usual warm-up
    ``decay_n = min(decay, (1 + n) / (10 + n))`` so that short runs are not dominated by the initialization; without
    ``warmup``, as the official GWF EMA (utils.py: the shadow starts as the weights after the first optimizer step,
    then a constant decay), ``decay_0 = 0`` and ``decay_n = decay`` after."""

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self._host_updates: int | None = 0  # host copy of num_updates (no device read per update); None: re-read

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_updates = None

    def set_num_updates(self, n: int) -> None:
        self.num_updates.fill_(n)
        self._host_updates = int(n)

    def current_decay(self) -> float:
        if self._host_updates is None:
            self._host_updates = int(self.num_updates)
        n = self._host_updates
        if not self.warmup:
            return self.decay if n else 0.0
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        torch._foreach_lerp_(list(self.model.parameters()), list(model.parameters()), 1.0 - decay)  # no_grad: no detach
        buffers = list(self.model.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(model.buffers()))
        self.num_updates += 1
        self._host_updates += 1

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)
