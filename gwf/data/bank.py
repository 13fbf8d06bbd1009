"""Per-class ring buffers of real samples, refilled from the data stream every step on each rank: a step solves one
transport problem per label and needs M positives of each, more than a data batch holds. The bank keeps the last
``capacity`` samples of each class (and of the whole stream, for velocity guidance's unconditional batch).

A resumed run sees the same bank, in one of two ways (``persist``): "data" saves the samples in checkpoints (a
side file per rank: 1.05 GB per rank for ImageNet's 1000 classes x 128 fp16 latents); "replay" saves only the
counts and, per slot, the stream position of the batch that wrote it (1 MB), and a resumed run pushes that stream
stretch again before its next update (``start_replay`` / ``finish_replay``), checked slot by slot.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


PERSIST = ("data", "replay")  # checkpoint.bank


class ClassBank(nn.Module):
    """``dtype``: how samples are stored (the data's, e.g. float16 for latents: half the memory of float32);
    ``sample`` returns at least float32. Pushes and draws never synchronize with the host, except a push of more
    than ``capacity`` samples at once."""

    def __init__(self, num_classes: int, capacity: int, shape: list[int] | tuple[int, ...], uncond_capacity: int = 0,
                 dtype: torch.dtype = torch.float32, persist: str = "data"):
        super().__init__()
        if persist not in PERSIST:
            raise ValueError(f"checkpoint.bank must be one of {PERSIST}, got {persist!r}")
        self.persist = persist
        self.num_classes = max(int(num_classes), 1)  # unconditional data = one class, label 0
        self.capacity = int(capacity)
        self.shape = tuple(int(s) for s in shape)
        keep = persist == "data"
        self.register_buffer("data", torch.zeros(self.num_classes, self.capacity, *self.shape, dtype=dtype),
                             persistent=keep)
        self.register_buffer("count", torch.zeros(self.num_classes, dtype=torch.long))  # samples ever pushed
        self.uncond_capacity = int(uncond_capacity)
        self.register_buffer("uncond", torch.zeros(self.uncond_capacity, *self.shape, dtype=dtype), persistent=keep)
        self.register_buffer("uncond_count", torch.zeros((), dtype=torch.long))
        # stream position (batches consumed, this one included) of the push that wrote each slot; -1: empty
        self.register_buffer("pushed_at", torch.full((self.num_classes, self.capacity), -1, dtype=torch.long))
        self.register_buffer("uncond_pushed_at", torch.full((self.uncond_capacity,), -1, dtype=torch.long))
        self._replay: dict | None = None
        self._samples_loaded = False  # loaded from a checkpoint that held the samples (nothing to replay)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Checkpoints of either persistence load under either setting: saved samples are used as they are (nothing
        to replay); a checkpoint without them (written by "replay") leaves the bank to be rebuilt by a replay, whatever
        this bank's setting; checkpoints from before ``pushed_at`` existed mark every filled slot as written at
        position 0 (such slots keep their samples in the checkpoints that follow: ``_save_to_state_dict``)."""
        saved = [state_dict.pop(prefix + name, None) for name in ("data", "uncond")]
        for name, value in zip(("data", "uncond"), saved):
            if value is not None:
                getattr(self, name).copy_(value)
        self._samples_loaded = saved[0] is not None
        for name, count, cap in (("pushed_at", "count", self.capacity),
                                 ("uncond_pushed_at", "uncond_count", self.uncond_capacity)):
            if prefix + name not in state_dict and prefix + count in state_dict:
                filled = state_dict[prefix + count].clamp(max=cap)
                slots = torch.arange(cap)
                state_dict[prefix + name] = torch.where(slots < filled[..., None], 0, -1)  # [C, cap] or [cap]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for name in ("data", "uncond"):  # loaded above, or rebuilt by a replay: never missing
            if prefix + name in missing_keys:
                missing_keys.remove(prefix + name)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """A "replay" bank still saves its samples while a slot comes from a checkpoint without positions (0): those
        samples cannot be replayed."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.persist == "replay" and bool((self.pushed_at == 0).any() or (self.uncond_pushed_at == 0).any()):
            for name in ("data", "uncond"):
                buf = getattr(self, name)
                destination[prefix + name] = buf if keep_vars else buf.detach()

    @torch.no_grad()
    def push(self, x: Tensor, labels: Tensor | None, position: Tensor | int = 0) -> None:
        """x [B, *shape], labels [B] (None or ignored when unconditional); ``position``: the stream position of this
        batch (batches consumed, it included), recorded per slot for ``persist="replay"``."""
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
                self.pushed_at[c, slots] = position
                self.count[c] += len(xc)
        else:  # every sample gets its own slot: its class's count plus its rank among the batch's samples of it
            onehot = labels.new_zeros(len(labels), self.num_classes).scatter_(1, labels[:, None], 1)  # [B, C]
            rank = onehot.cumsum(0).gather(1, labels[:, None])[:, 0] - 1
            slots = (self.count[labels] + rank) % self.capacity
            self.data[labels, slots] = x
            self.pushed_at[labels, slots] = position
            self.count += onehot.sum(0)
        if self.uncond_capacity:
            xu = x[-self.uncond_capacity :]
            slots = (self.uncond_count + torch.arange(len(xu), device=x.device)) % self.uncond_capacity
            self.uncond[slots] = xu
            self.uncond_pushed_at[slots] = position
            self.uncond_count += len(xu)

    @torch.no_grad()
    def reset(self) -> None:
        """Empty every ring buffer: the bank refills from the data stream before the next update (``ready``)."""
        for buf in (self.data, self.count, self.uncond, self.uncond_count):
            buf.zero_()
        self.pushed_at.fill_(-1)
        self.uncond_pushed_at.fill_(-1)

    # ------------------------------------------------------------------------------------------------ replay
    def replay_from(self) -> int | None:
        """The stream position a replay must start after (the oldest slot's batch, minus one), or None when the
        bank's samples are in memory (loaded with the checkpoint, or nothing pushed yet)."""
        if self._samples_loaded:
            return None
        written = torch.cat([self.pushed_at.flatten(), self.uncond_pushed_at])
        written = written[written > 0]  # 0: a checkpoint from before positions were recorded (its samples are lost)
        return int(written.min()) - 1 if len(written) else None

    @torch.no_grad()
    def start_replay(self) -> None:
        """Keep the loaded counts and positions aside and empty the rings: the pushes of the replayed stream stretch
        refill them (``finish_replay`` puts each sample in its slot and checks every slot's position)."""
        self._replay = {name: getattr(self, name).clone()
                        for name in ("count", "uncond_count", "pushed_at", "uncond_pushed_at")}
        self.reset()

    @torch.no_grad()
    def finish_replay(self) -> None:
        """After the replay: each ring rotated so that a sample sits where the uninterrupted run put it (slot = its
        class's global count mod capacity), counts restored; raises unless every filled slot was written by the
        same stream position as saved (then the bank equals the saved one)."""
        saved, self._replay = self._replay, None
        for data, count, pushed, cap in ((self.data, "count", "pushed_at", self.capacity),
                                         (self.uncond, "uncond_count", "uncond_pushed_at", self.uncond_capacity)):
            if cap == 0:
                continue
            replayed = getattr(self, count).clone()
            shift = (saved[count] - replayed).remainder(cap)  # [C] or []
            index = (torch.arange(cap, device=shift.device) - shift[..., None]).remainder(cap)  # new slot j <- old
            if data.dim() == len(self.shape) + 2:  # class rings [C, cap, ...]
                data.copy_(torch.gather(data, 1, index.view(*index.shape, *[1] * len(self.shape)).expand_as(data)))
                getattr(self, pushed).copy_(torch.gather(getattr(self, pushed), 1, index))
            else:  # the unconditional ring [cap, ...]
                data.copy_(data[index])
                getattr(self, pushed).copy_(getattr(self, pushed)[index])
            getattr(self, count).copy_(saved[count])
            now, then = getattr(self, pushed), saved[pushed]
            short = (replayed < saved[count]) & (replayed < cap)  # a class the replay did not refill
            if bool(short.any()) or not torch.equal(now[then >= 0], then[then >= 0]):
                raise RuntimeError("replaying the data stream did not rebuild the class bank as saved (a slot's "
                                   "sample comes from another stream position): the data, their order or the data "
                                   "settings (batch size, shards, seed) changed since the checkpoint; resume with "
                                   "the data and settings the run was trained with, or start over (ckpt_path=null)")

    def filled(self, labels: Tensor | None = None) -> Tensor:
        """Number of valid samples per class (of ``labels`` if given)."""
        n = self.count.clamp(max=self.capacity)
        return n if labels is None else n[labels]

    def ready(self, min_per_class: int, min_uncond: int = 0) -> bool:
        need = min(min_per_class, self.capacity)
        ok = bool((self.filled() >= need).all())
        return ok and int(self.uncond_count.clamp(max=self.uncond_capacity)) >= min(min_uncond, self.uncond_capacity)

    def _draw(self, n_valid: Tensor, m: int, generator: torch.Generator, capacity: int | None = None) -> Tensor:
        """[len(n_valid), m] indices into [0, n_valid): without replacement (random order) where n_valid >= m,
        with replacement where the ring (of ``capacity`` slots, default the class rings') holds fewer than m."""
        capacity = self.capacity if capacity is None else capacity
        dev = n_valid.device
        with_repl = (torch.rand(len(n_valid), m, generator=generator, device=dev) * n_valid[:, None]).long()
        if m > capacity:
            return with_repl
        keys = torch.rand(len(n_valid), capacity, generator=generator, device=dev)
        keys = keys.masked_fill(torch.arange(capacity, device=dev) >= n_valid[:, None], 2.0)
        without_repl = keys.argsort(dim=1)[:, :m]  # the m smallest keys among the valid slots
        return torch.where((n_valid < m)[:, None], with_repl, without_repl)

    def sample(self, labels: Tensor | None, m: int, generator: torch.Generator) -> Tensor:
        """[L, m, *shape] positives for each label (L = 1 when ``labels`` is None); every label must hold a sample
        (``ready``: not checked here, which would synchronize with the host)."""
        if labels is None:
            labels = torch.zeros(1, dtype=torch.long, device=self.data.device)
        idx = self._draw(self.filled(labels), m, generator)
        return _at_least_fp32(self.data[labels[:, None], idx])

    def sample_uncond(self, u: int, generator: torch.Generator, rows: int | None = None) -> Tensor:
        """[u, *shape] from the unconditional ring buffer (which must hold a sample: ``ready``); ``rows`` = L:
        [L, u, *shape], an independent draw for each of L labels (the official W-Flow negatives)."""
        n = self.uncond_count.clamp(max=self.uncond_capacity).view(1)
        idx = self._draw(n.expand(rows or 1), u, generator, self.uncond_capacity)
        return _at_least_fp32(self.uncond[idx if rows else idx[0]])


def _at_least_fp32(x: Tensor) -> Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))
