"""2D toy targets: samplers, not files. A DataModule streams fresh batches from a sampler, seeded per
(seed, rank, worker), in the same (x, y) format as the shard DataModule."""

from __future__ import annotations

import math
from typing import Callable

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from gwf.seeding import make_generator

Sampler = Callable[[int, torch.Generator], Tensor]  # (n, generator) -> [n, 2]


def gaussian_mixture(centers: Tensor, std: float) -> Sampler:
    def sample(n: int, g: torch.Generator) -> Tensor:
        idx = torch.randint(len(centers), (n,), generator=g)
        return centers[idx] + std * torch.randn(n, 2, generator=g)

    return sample


def eight_gaussians(radius: float = 2.0, std: float = 0.02 ** 0.5) -> Sampler:
    angles = torch.arange(8) * (2 * math.pi / 8)
    return gaussian_mixture(radius * torch.stack([angles.cos(), angles.sin()], 1), std)


def twenty_five_gaussians(spacing: float = 1.0, std: float = 0.05) -> Sampler:
    grid = torch.arange(-2, 3, dtype=torch.float32) * spacing
    return gaussian_mixture(torch.cartesian_prod(grid, grid), std)


def checkerboard(scale: float = 1.0) -> Sampler:
    def sample(n: int, g: torch.Generator) -> Tensor:
        x1 = torch.rand(n, generator=g) * 4 - 2
        x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g) * 2.0
        x2 = x2 + (torch.floor(x1) % 2)
        return scale * torch.stack([x1, x2], 1)

    return sample


TARGETS: dict[str, Callable[..., Sampler]] = {
    "8gaussians": eight_gaussians,
    "25gaussians": twenty_five_gaussians,
    "checkerboard": checkerboard,
}


def make_sampler(target: str, **kwargs) -> Sampler:
    if target not in TARGETS:
        raise ValueError(f"unknown 2D target '{target}'; choose one of {sorted(TARGETS)} (data.target=...)")
    return TARGETS[target](**kwargs)


class _SamplerStream(IterableDataset):
    """Sampled in the main process (microseconds per batch); each pass over the stream is a new virtual epoch
    with its own seed, so epochs never repeat data."""

    def __init__(self, target: str, batch_size: int, seed: int, rank: int, num_batches: int):
        self.target, self.batch_size, self.seed, self.rank, self.num_batches = target, batch_size, seed, rank, num_batches
        self.epoch = 0

    def __iter__(self):
        sampler = make_sampler(self.target)
        g = make_generator("cpu", "toy2d", self.seed, self.rank, self.epoch)
        self.epoch += 1
        for _ in range(self.num_batches):
            yield sampler(self.batch_size, g), torch.zeros(self.batch_size, dtype=torch.long)

    def __len__(self):
        return self.num_batches


class Toy2DDataModule(L.LightningDataModule):
    """Streams ``(x [B, 2], y [B] = 0)`` batches of a 2D target; ``epoch_size`` samples per virtual epoch."""

    def __init__(self, target: str = "8gaussians", batch_size: int = 256, epoch_size: int = 256_000, seed: int = 0):
        super().__init__()
        make_sampler(target)  # fail early on an unknown name
        self.target, self.batch_size, self.epoch_size, self.seed = target, batch_size, epoch_size, seed
        self.shape, self.num_classes = (2,), 0

    def train_dataloader(self):
        rank = self.trainer.global_rank if self.trainer is not None else 0
        stream = _SamplerStream(self.target, self.batch_size, self.seed, rank, max(self.epoch_size // self.batch_size, 1))
        return DataLoader(stream, batch_size=None, num_workers=0)

    def load_split(self, split: str = "val", max_samples: int | None = None) -> tuple[Tensor, Tensor]:
        """Held-out target samples (a seed stream distinct from training's)."""
        n = max_samples or 10_000
        x = make_sampler(self.target)(n, make_generator("cpu", "toy2d-heldout", split, self.seed))
        return x, torch.zeros(n, dtype=torch.long)
