"""Per-class ring buffers of real samples, refilled from the data stream every step on each rank: a step solves one
transport problem per label and needs M positives of each, more than a data batch holds. The bank keeps the last
``capacity`` samples of each class (and of the whole stream, for velocity guidance's unconditional batch); its
buffers are saved in checkpoints, so a resumed run sees the same bank.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class ClassBank(nn.Module):
    """``dtype``: how samples are stored (the data's, e.g. float16 for latents: half the memory of float32);
    ``sample`` returns at least float32. Pushes and draws never synchronize with the host, except a push of more
    than ``capacity`` samples at once."""

    def __init__(self, num_classes: int, capacity: int, shape: list[int] | tuple[int, ...], uncond_capacity: int = 0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_classes = max(int(num_classes), 1)  # unconditional data = one class, label 0
        self.capacity = int(capacity)
        self.shape = tuple(int(s) for s in shape)
        self.register_buffer("data", torch.zeros(self.num_classes, self.capacity, *self.shape, dtype=dtype))
        self.register_buffer("count", torch.zeros(self.num_classes, dtype=torch.long))  # samples ever pushed
        self.uncond_capacity = int(uncond_capacity)
        self.register_buffer("uncond", torch.zeros(self.uncond_capacity, *self.shape, dtype=dtype))
        self.register_buffer("uncond_count", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, x: Tensor, labels: Tensor | None) -> None:
        """x [B, *shape], labels [B] (None or ignored when unconditional)."""
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"bank expects samples of shape {self.shape}, got {tuple(x.shape[1:])}")
        x = x.to(self.data.dtype)
        if labels is None or self.num_classes == 1:
            labels = torch.zeros(len(x), dtype=torch.long, device=x.device)
        if len(x) > self.capacity:  # a class may overflow its ring in one push: keep its last samples (host loop)
            for c in labels.unique().tolist():
                xc = x[labels == c][-self.capacity :]
                slots = (self.count[c] + torch.arange(len(xc), device=x.device)) % self.capacity
                self.data[c, slots] = xc
                self.count[c] += len(xc)
        else:  # every sample gets its own slot: its class's count plus its rank among the batch's samples of it
            onehot = labels.new_zeros(len(labels), self.num_classes).scatter_(1, labels[:, None], 1)  # [B, C]
            rank = onehot.cumsum(0).gather(1, labels[:, None])[:, 0] - 1
            self.data[labels, (self.count[labels] + rank) % self.capacity] = x
            self.count += onehot.sum(0)
        if self.uncond_capacity:
            xu = x[-self.uncond_capacity :]
            slots = (self.uncond_count + torch.arange(len(xu), device=x.device)) % self.uncond_capacity
            self.uncond[slots] = xu
            self.uncond_count += len(xu)

    @torch.no_grad()
    def reset(self) -> None:
        """Empty every ring buffer: the bank refills from the data stream before the next update (``ready``)."""
        for buf in (self.data, self.count, self.uncond, self.uncond_count):
            buf.zero_()

    def filled(self, labels: Tensor | None = None) -> Tensor:
        """Number of valid samples per class (of ``labels`` if given)."""
        n = self.count.clamp(max=self.capacity)
        return n if labels is None else n[labels]

    def ready(self, min_per_class: int, min_uncond: int = 0) -> bool:
        need = min(min_per_class, self.capacity)
        ok = bool((self.filled() >= need).all())
        return ok and int(self.uncond_count.clamp(max=self.uncond_capacity)) >= min(min_uncond, self.uncond_capacity)

    def _draw(self, n_valid: Tensor, m: int, generator: torch.Generator) -> Tensor:
        """[len(n_valid), m] indices into [0, n_valid): without replacement (random order) where n_valid >= m,
        with replacement where the class holds fewer than m samples."""
        dev = n_valid.device
        with_repl = (torch.rand(len(n_valid), m, generator=generator, device=dev) * n_valid[:, None]).long()
        if m > self.capacity:
            return with_repl
        keys = torch.rand(len(n_valid), self.capacity, generator=generator, device=dev)
        keys = keys.masked_fill(torch.arange(self.capacity, device=dev) >= n_valid[:, None], 2.0)
        without_repl = keys.argsort(dim=1)[:, :m]  # the m smallest keys among the valid slots
        return torch.where((n_valid < m)[:, None], with_repl, without_repl)

    def sample(self, labels: Tensor | None, m: int, generator: torch.Generator) -> Tensor:
        """[L, m, *shape] positives for each label (L = 1 when ``labels`` is None); every label must hold a sample
        (``ready``: not checked here, which would synchronize with the host)."""
        if labels is None:
            labels = torch.zeros(1, dtype=torch.long, device=self.data.device)
        idx = self._draw(self.filled(labels), m, generator)
        return _at_least_fp32(self.data[labels[:, None], idx])

    def sample_uncond(self, u: int, generator: torch.Generator) -> Tensor:
        """[u, *shape] from the unconditional ring buffer (which must hold a sample: ``ready``)."""
        n = self.uncond_count.clamp(max=self.uncond_capacity).view(1)
        return _at_least_fp32(self.uncond[self._draw(n, u, generator)[0]])


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))
