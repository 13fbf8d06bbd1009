"""2D toy targets: samplers, not files. A DataModule streams fresh batches from a sampler, seeded per
(seed, rank, worker), in the same (x, y) format as the shard DataModule."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from gwf.data.stream import SeekableDataModule
from gwf.seeding import make_generator

Sampler = Callable[[int, torch.Generator], Tensor]  # (n, generator) -> [n, 2]


class GaussianMixture:
    """Isotropic Gaussian mixture; exposes its modes (centers, std, weights) for mode recall and quality rate."""

    def __init__(self, centers: Tensor, std: float, weights: Tensor | None = None):
        self.centers = centers.float()
        self.std = float(std)
        w = torch.ones(len(centers)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        self.weights = w / w.sum()

    def __call__(self, n: int, g: torch.Generator) -> Tensor:
        idx = torch.multinomial(self.weights, n, replacement=True, generator=g)
        return self.centers[idx] + self.std * torch.randn(n, 2, generator=g)


def _circle(k: int, radius: float) -> Tensor:
    angles = torch.arange(k) * (2 * math.pi / k)
    return radius * torch.stack([angles.cos(), angles.sin()], 1)


def eight_gaussians(radius: float = 2.0, std: float = 0.02 ** 0.5) -> GaussianMixture:
    return GaussianMixture(_circle(8, radius), std)


def twenty_five_gaussians(spacing: float = 1.0, std: float = 0.05) -> GaussianMixture:
    grid = torch.arange(-2, 3, dtype=torch.float32) * spacing
    return GaussianMixture(torch.cartesian_prod(grid, grid), std)


def imbalanced(std: float = 0.1, minor_weight: float = 0.02) -> GaussianMixture:
    """W-Flow's mode-coverage target: six large concentrated modes on a circle of radius 1.5 and two small modes
    far away at (+-4, 4), each holding ``minor_weight`` of the mass."""
    centers = torch.cat([_circle(6, 1.5), torch.tensor([[-4.0, 4.0], [4.0, 4.0]])])
    major = (1 - 2 * minor_weight) / 6
    return GaussianMixture(centers, std, torch.tensor([major] * 6 + [minor_weight] * 2))


def checkerboard(scale: float = 1.0) -> Sampler:
    def sample(n: int, g: torch.Generator) -> Tensor:
        x1 = torch.rand(n, generator=g) * 4 - 2
        x2 = torch.rand(n, generator=g) - torch.randint(0, 2, (n,), generator=g) * 2.0
        x2 = x2 + (torch.floor(x1) % 2)
        return scale * torch.stack([x1, x2], 1)

    return sample


def two_moons(noise: float = 0.05, scale: float = 1.5) -> Sampler:
    """Two interleaving half circles (as scikit-learn's make_moons), centred, with Gaussian noise."""

    def sample(n: int, g: torch.Generator) -> Tensor:
        t = torch.rand(n, generator=g) * math.pi
        upper = torch.rand(n, generator=g) < 0.5
        x = torch.where(upper, t.cos(), 1 - t.cos()) - 0.5
        y = torch.where(upper, t.sin(), 0.5 - t.sin()) - 0.25
        return scale * torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=g)

    return sample


def rings(radii: tuple[float, ...] = (1.0, 2.0, 3.0), noise: float = 0.05) -> Sampler:
    """Concentric rings, mass proportional to the circumference."""
    r = torch.tensor(radii)

    def sample(n: int, g: torch.Generator) -> Tensor:
        idx = torch.multinomial(r / r.sum(), n, replacement=True, generator=g)
        angle = torch.rand(n, generator=g) * 2 * math.pi
        return r[idx, None] * torch.stack([angle.cos(), angle.sin()], 1) + noise * torch.randn(n, 2, generator=g)

    return sample


def swiss_roll(noise: float = 0.05, scale: float = 0.25) -> Sampler:
    """2D swiss roll: t in [1.5 pi, 4.5 pi], (t cos t, t sin t) scaled."""

    def sample(n: int, g: torch.Generator) -> Tensor:
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
        return scale * torch.stack([t * t.cos(), t * t.sin()], 1) + noise * torch.randn(n, 2, generator=g)

    return sample


def oval(a: float = 3.0, b: float = 1.0, noise: float = 0.05) -> Sampler:
    """Ellipse with semi-axes (a, b), uniform in angle, with Gaussian noise (the domain-transfer source)."""

    def sample(n: int, g: torch.Generator) -> Tensor:
        t = torch.rand(n, generator=g) * 2 * math.pi
        return torch.stack([a * t.cos(), b * t.sin()], 1) + noise * torch.randn(n, 2, generator=g)

    return sample


def circle(radius: float = 2.0, noise: float = 0.05) -> Sampler:
    """Circle of the given radius with Gaussian noise (the domain-transfer target)."""
    return rings(radii=(radius,), noise=noise)


# ---- the official GWF 2D targets ([GWF] dataset.py, --dataset eight_gaussians | circles | three_rings | moons) ----

def eight_gaussians_gwf() -> GaussianMixture:
    """``EightGaussians``: 8 modes on the unit circle (every 45 degrees), variance 0.01 (std 0.1)."""
    return eight_gaussians(radius=1.0, std=0.1)


def circles_gwf(radii: tuple[float, float] = (4.0, 8.0), noise: float = 0.2) -> Sampler:
    """``Circles``: two concentric circles of radius 4 and 8 around 0, Gaussian noise 0.2; a batch alternates
    between them (sample i on circle i mod 2, as the official tiled centers), directions uniform."""
    r = torch.tensor(radii)

    def sample(n: int, g: torch.Generator) -> Tensor:
        noise_ = torch.randn(n, 2, generator=g)
        direction = torch.randn(n, 2, generator=g)
        direction = direction / direction.norm(dim=1, keepdim=True)
        return r[torch.arange(n) % 2, None] * direction + noise * noise_

    return sample


def three_rings(radius: float = 0.3, gap: float = 0.5, points_per_ring: int = 1000) -> Sampler:
    """``ThreeRings``: 3 x 1,000 fixed points, equally spaced on three circles of radius 0.3 stacked downwards
    (centers (0, 0), (0, -0.75), (0, -1.5)), no noise; a batch draws points uniformly with replacement."""
    angle = torch.arange(points_per_ring, dtype=torch.float64) * (2 * math.pi / points_per_ring)
    ring = radius * torch.stack([angle.cos(), angle.sin()], 1)
    offset = torch.tensor([0.0, (2 + gap) * radius], dtype=torch.float64)
    points = torch.cat([ring - k * offset for k in range(3)]).float()

    def sample(n: int, g: torch.Generator) -> Tensor:
        return points[torch.randint(0, len(points), (n,), generator=g)]

    return sample


def moons_gwf(noise: float = 0.2) -> Sampler:
    """``Moons``: n // 2 points on the upper half circle (cos t, sin t) and the rest on (1 - cos t, 0.5 - sin t),
    t ~ U[0, pi], Gaussian noise 0.2, shuffled, then x 3 - 1 (about [-4, 6] x [-3, 3])."""

    def sample(n: int, g: torch.Generator) -> Tensor:
        half = n // 2
        t = torch.rand(n, generator=g) * math.pi
        upper = torch.arange(n) < half
        x = torch.where(upper, t.cos(), 1 - t.cos())
        y = torch.where(upper, t.sin(), 0.5 - t.sin())
        data = torch.stack([x, y], 1) + noise * torch.randn(n, 2, generator=g)
        return data[torch.randperm(n, generator=g)] * 3 - 1

    return sample


TARGETS: dict[str, Callable[..., Sampler]] = {
    "oval": oval, "circle": circle, "8gaussians": eight_gaussians, "25gaussians": twenty_five_gaussians,
    "imbalanced": imbalanced, "checkerboard": checkerboard, "moons": two_moons, "rings": rings, "swissroll": swiss_roll,
    "8gaussians_gwf": eight_gaussians_gwf, "circles_gwf": circles_gwf, "three_rings": three_rings,
    "moons_gwf": moons_gwf,
}


def make_sampler(target: str, **kwargs) -> Sampler:
    if target not in TARGETS:
        raise ValueError(f"unknown 2D target '{target}'; choose one of {sorted(TARGETS)} (data.target=...)")
    return TARGETS[target](**kwargs)


class _SamplerStream(IterableDataset):
    """Sampled in the main process (microseconds per batch); each pass over the stream is a new virtual epoch
    with its own seed, so epochs never repeat data. Starts at ``epoch``, dropping its first ``skip`` batches."""

    def __init__(self, target: str, batch_size: int, seed: int, rank: int, num_batches: int, epoch: int, skip: int):
        self.target, self.batch_size, self.seed, self.rank = target, batch_size, seed, rank
        self.num_batches, self.epoch, self.skip = num_batches, epoch, skip

    def __iter__(self):
        sampler = make_sampler(self.target)
        g = make_generator("cpu", "toy2d", self.seed, self.rank, self.epoch)
        skip, self.skip = self.skip, 0
        self.epoch += 1
        for i in range(self.num_batches):
            x = sampler(self.batch_size, g)  # drawn even when skipped: the generator advances as it did before
            if i >= skip:
                yield x, torch.zeros(self.batch_size, dtype=torch.long)

    def __len__(self):
        return self.num_batches


class Toy2DDataModule(SeekableDataModule):
    """Streams ``(x [B, 2], y [B] = 0)`` batches of a 2D target; ``epoch_size`` samples per virtual epoch."""

    def __init__(self, target: str = "8gaussians", batch_size: int = 256, epoch_size: int = 256_000, seed: int = 0):
        super().__init__()
        make_sampler(target)  # fail early on an unknown name
        self.target, self.batch_size, self.epoch_size, self.seed = target, batch_size, epoch_size, seed
        self.shape, self.num_classes = (2,), 0
        self.batches_per_epoch = max(epoch_size // batch_size, 1)

    def train_dataloader(self):
        rank = self.trainer.global_rank if self.trainer is not None else 0
        stream = _SamplerStream(self.target, self.batch_size, self.seed, rank, self.batches_per_epoch,
                                *self.replay_point())
        return DataLoader(stream, batch_size=None, num_workers=0)

    def load_split(self, split: str = "val", max_samples: int | None = None) -> tuple[Tensor, Tensor]:
        """Held-out target samples (a seed stream distinct from training's)."""
        n = max_samples or 10_000
        x = make_sampler(self.target)(n, make_generator("cpu", "toy2d-heldout", split, self.seed))
        return x, torch.zeros(n, dtype=torch.long)
