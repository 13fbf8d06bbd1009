"""One DataModule for every shard set: WebDataset tars of (x, label) samples (format: data/README.md).

Training is an endless stream: shards drawn with replacement, a shuffle buffer, batches made in the workers, and
virtual epochs of ``epoch_size // batch_size`` batches per rank. Each (rank, worker, epoch) stream has its own seed,
so DDP ranks need no shard splitting and a resumed run reads what an uninterrupted run reads (docs/resume.md).
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch import Tensor
from torch.utils.data import IterableDataset, get_worker_info

from gwf.constants import LABEL_KEY, TENSOR_KEY
from gwf.data.stream import SeekableDataModule
from gwf.data.shards import (Sample, collate, decode_sample, expand_urls, is_local, iter_raw_samples, iter_shard_samples,
                             missing_shards)
from gwf.seeding import derive_seed

Batch = tuple[Tensor, Tensor]  # x float32 [B, *shape], y int64 [B]


class SampleChecker:
    """Decode a raw tar sample and check it against the configured shape/dtype/classes (cheap, every sample).
    ``shape`` is the stored shape (that of the model's tensor unless a transform maps one to the other)."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, num_classes: int, tensor_key: str, label_key: str,
                 hint: str = ""):  # fmt: skip
        self.shape, self.dtype, self.num_classes = shape, dtype, num_classes
        self.tensor_key, self.label_key, self.hint = tensor_key, label_key, hint

    def __call__(self, raw: dict) -> Sample:
        key, x, label = decode_sample(raw, self.tensor_key, self.label_key)
        if x.shape != self.shape or x.dtype != self.dtype:
            raise ValueError(
                f"sample {key!r} in shard {raw.get('__url__', '?')} has shape {list(x.shape)} dtype {x.dtype}, "
                f"expected shape {list(self.shape)} dtype {self.dtype}{self.hint}. Set data.shape / data.dtype in the "
                "config to what the shards hold (their manifest.json says), or point data.train_shards / "
                "data.val_shards at the right shards."
            )
        if not 0 <= label < self.num_classes:
            raise ValueError(f"sample {key!r} in shard {raw.get('__url__', '?')} has label {label}, outside "
                             f"[0, {self.num_classes}); set data.num_classes to the number of classes of the shards")
        return key, x, label


def _transformed(samples: Iterator[Sample], transform, *seed_parts) -> Iterator[Sample]:
    """Apply a per-sample transform (stored x -> model x) with a numpy generator seeded by ``seed_parts``."""
    if transform is None:
        return samples
    rng = np.random.default_rng(derive_seed("transform", *seed_parts))
    return ((key, transform(x, rng, key=key), label) for key, x, label in samples)


def _to_float32(batches: Iterator[Batch]) -> Iterator[Batch]:
    for x, y in batches:
        yield x.float(), y


# Not wds.WebDataset(urls, resampled=True): its shard resampler ignores ``seed`` (webdataset 1.0.2) and its default
# nodesplitter raises under DDP. This is the same pipeline with the seed under our control.
class ResampledStream(IterableDataset):
    """Endless stream of batches seeded by (seed, rank, worker, epoch); ``epoch`` is set in the main process
    (EpochLoader) before a pass starts its workers.

    ``cache_bytes``: local shards are drawn again and again; each process (worker, or the main process with
    num_workers 0) keeps the decoded, checked samples of the shards it has read, up to this many bytes of shard
    files, so a shard is parsed once instead of at every draw (the embedded digits: most of an update's time went to
    tar parsing). The stream is the same sample for sample; cached arrays are read-only. 0 turns it off."""

    def __init__(self, urls: list[str], check: SampleChecker, batch_size: int, shuffle_buffer: int, seed: int,
                 rank: int, transform=None, cache_bytes: int = 0):  # fmt: skip
        self.urls, self.check, self.batch_size, self.transform = urls, check, batch_size, transform
        self.shuffle_buffer, self.seed, self.rank = shuffle_buffer, seed, rank
        self.epoch, self.epoch_was_set = 0, False
        self.skip = 0  # batches of this pass consumed before a resume: replayed and dropped (EpochLoader.seek)
        self.cache_bytes = int(cache_bytes)
        self._cache: dict[str, list[Sample]] = {}
        self._cached_bytes = 0

    def __getstate__(self) -> dict:  # workers start with an empty cache: never pickle the main process's
        return {**self.__dict__, "_cache": {}, "_cached_bytes": 0}

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.epoch_was_set = int(epoch), True

    def _samples(self, urls: Iterator[str]) -> Iterator[Sample]:
        """Checked samples of the shards ``urls``, in order: from the cache, or decoded (and cached if it fits)."""
        for url in urls:
            if url in self._cache:
                yield from self._cache[url]
                continue
            size = os.path.getsize(url) if is_local(url) else None
            if size is None or self._cached_bytes + size > self.cache_bytes:
                yield from map(self.check, iter_shard_samples(url))
                continue
            samples = [self.check(raw) for raw in iter_shard_samples(url)]  # the whole shard, checked to its end
            for _, x, _ in samples:
                x.setflags(write=False)  # shared by every later draw of the shard
            self._cache[url], self._cached_bytes = samples, self._cached_bytes + size
            yield from samples

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        num_workers = 1 if info is None else info.num_workers  # the loader takes batches round-robin from workers
        # Batch i of a pass comes from stream i % num_workers. After dropping ``skip`` batches the loader asks worker
        # 0 first, so worker w plays stream (w + skip) % num_workers.
        worker = (0 if info is None else info.id + self.skip) % num_workers
        rng = random.Random(derive_seed("shards", self.seed, self.rank, worker, self.epoch))
        shards = (rng.choice(self.urls) for _ in itertools.count())
        samples = self._samples(shards)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(samples)
        samples = _transformed(samples, self.transform, self.seed, self.rank, worker, self.epoch)
        batches = wds.batched(self.batch_size, collation_fn=collate, partial=False)(samples)
        return itertools.islice(batches, len(range(worker, self.skip, num_workers)), None)


class OrderedStream(IterableDataset):
    """One deterministic pass over ``urls``: shards in order (dealt round-robin to workers), file order inside."""

    def __init__(self, urls: list[str], check: SampleChecker, batch_size: int, transform=None, seed: int = 0):
        self.urls, self.check, self.batch_size, self.transform, self.seed = urls, check, batch_size, transform, seed

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        urls = self.urls if info is None else self.urls[worker :: info.num_workers]
        samples = _transformed(map(self.check, iter_raw_samples(urls)), self.transform, "val", self.seed, worker)
        return wds.batched(self.batch_size, collation_fn=collate, partial=True)(samples)


class EpochLoader(wds.WebLoader):
    """WebLoader of a ResampledStream. ``sampler`` is the stream: Lightning calls ``loader.sampler.set_epoch(e)``
    before each epoch (also after a resume); without a trainer, pass k is epoch k. Workers are not persistent, so
    each pass pickles the stream with its epoch."""

    def __init__(self, stream: ResampledStream, num_batches: int, **kwargs):
        super().__init__(stream, batch_size=None, persistent_workers=False, **kwargs)
        self.stream = self.sampler = stream
        self.num_batches, self.passes, self.pending_skip = num_batches, 0, 0
        self.append(_to_float32)  # runs in the main process, after the workers
        self.with_epoch(num_batches)

    def seek(self, epoch: int, skip: int) -> None:
        """The next pass replays ``epoch`` and drops its first ``skip`` batches (SeekableDataModule)."""
        self.pending_skip = skip
        self.stream.set_epoch(epoch)

    def __iter__(self):
        if not self.stream.epoch_was_set:
            self.stream.epoch = self.passes
        self.passes += 1
        self.stream.skip = self.pending_skip
        self.nsamples = self.num_batches - self.pending_skip  # the pass ends at the virtual epoch's end
        return self._skip_done_on_first_batch(super().__iter__())

    def _skip_done_on_first_batch(self, batches):
        """The skip belongs to the first pass that yields a batch (Lightning may call iter() without iterating);
        workers have their copy of the stream by then."""
        for i, batch in enumerate(batches):
            if i == 0:
                self.pending_skip = 0
            yield batch

    def __len__(self) -> int:
        return self.num_batches


class ShardDataModule(SeekableDataModule):
    """Batches ``(x float32 [B, *shape], y int64 [B])`` from WebDataset shards.

    Args:
        train_shards / val_shards: brace pattern ("data/digits/train-{000000..000003}.tar") or list of them;
            val_shards may be None (no validation).
        shape: the model's x; dtype: the stored x's numpy dtype ("float16"); both checked on every sample.
        num_classes: labels lie in [0, num_classes).
        batch_size: per rank. epoch_size: samples per virtual epoch per rank.
        shuffle_buffer: samples in the shuffle buffer of each worker (0: no shuffle).
        prepare: a name in ``gwf.data.PREPARERS`` run by ``prepare_data`` when shards are missing (or None);
            root: the directory given to it.
        seed: seeds every (rank, worker, epoch) stream.
        transform: None, or a name in ``gwf.data.TRANSFORMS`` applied per sample in the workers (stored x -> model
            x, e.g. ``latent_moments``: SD-VAE moments [2, 2, *shape] -> z [*shape]); transform_args: its kwargs.
        conditional: False trains unconditionally on labelled shards (labels still checked): 0 classes for the model.
        cache_mb: decoded training samples kept in memory, per process, in MB of shard files (ResampledStream): small
            sets such as the digits are parsed once; shards that do not fit stream as before. 0: no cache.
    """

    def __init__(self, train_shards: str | Sequence[str], val_shards: str | Sequence[str] | None, shape: Sequence[int],
                 num_classes: int, dtype: str = "float32", batch_size: int = 256, num_workers: int = 2,
                 shuffle_buffer: int = 2000, epoch_size: int = 50_000, prepare: str | None = None,
                 root: str | Path | None = None, seed: int = 0, tensor_key: str = TENSOR_KEY,
                 label_key: str = LABEL_KEY, transform: str | None = None, transform_args: dict | None = None,
                 conditional: bool = True, cache_mb: float = 256):  # fmt: skip
        super().__init__()
        self.save_hyperparameters()
        self.train_shards = _plain(train_shards)
        self.val_shards = None if val_shards is None else _plain(val_shards)
        self._shape = tuple(int(s) for s in shape)
        self._num_classes = int(num_classes)
        self.conditional = bool(conditional)
        self.dtype = np.dtype(dtype)
        self.batch_size, self.num_workers = int(batch_size), int(num_workers)
        self.shuffle_buffer, self.epoch_size, self.seed = int(shuffle_buffer), int(epoch_size), int(seed)
        self.prepare, self.root = prepare, root
        if cache_mb < 0:
            raise ValueError(f"data.cache_mb must be >= 0 (0: no cache), got {cache_mb}")
        self.cache_bytes = int(cache_mb * 2**20)
        if self.epoch_size < self.batch_size:
            raise ValueError(f"epoch_size ({self.epoch_size}) must be >= batch_size ({self.batch_size}), per rank")
        if prepare is not None:
            from gwf.data import PREPARERS

            if prepare not in PREPARERS:
                raise ValueError(f"data.prepare={prepare!r} is not one of {sorted(PREPARERS)} (or null)")
            if root is None:
                raise ValueError(f"data.prepare={prepare!r} needs data.root, the directory it writes to")
        self.transform = _build_transform(transform, transform_args)
        stored = self._shape if self.transform is None else tuple(self.transform.stored_shape(self._shape))
        hint = "" if self.transform is None else f" (data.transform={transform} for data.shape {list(self._shape)})"
        self.checker = SampleChecker(stored, self.dtype, self._num_classes, tensor_key, label_key, hint)

    @property
    def batches_per_epoch(self) -> int:
        return self.epoch_size // self.batch_size

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def num_classes(self) -> int:
        """Classes the model is conditioned on: 0 when ``conditional`` is False."""
        return self._num_classes if self.conditional else 0

    def urls(self, split: str) -> list[str]:
        patterns = {"train": self.train_shards, "val": self.val_shards}[split]
        if patterns is None:
            raise ValueError(f"no {split} shards configured (data.{split}_shards is null)")
        return expand_urls(patterns)

    def _missing(self) -> list[tuple[str, list[str]]]:
        """[(pattern, missing urls)] for each configured split with missing local shards."""
        out = []
        for patterns in (self.train_shards, self.val_shards):
            if patterns is not None and (missing := missing_shards(expand_urls(patterns))):
                out.append((patterns, missing))
        return out

    def _raise_missing(self, missing: list[tuple[str, list[str]]]) -> None:
        patterns, urls = missing[0]
        raise FileNotFoundError(
            f"{len(urls)} shard(s) of {patterns!r} missing, first: {Path(urls[0]).absolute()}. "
            "Create them with gwf-prepare (`gwf-prepare images|latents --src IMAGES --out DIR`, or "
            "data.prepare=digits and data.root=<dir> for the digits), or write your own with "
            "gwf.data.shards.write_shards (see data/README.md), or point data.train_shards / data.val_shards at "
            "existing shards."
        )

    def prepare_data(self) -> None:
        """Lightning runs this on one process per node before setup: create missing shards if we can."""
        if self._missing() and self.prepare is not None:
            from gwf.data import PREPARERS

            PREPARERS[self.prepare](Path(self.root))
        if missing := self._missing():
            self._raise_missing(missing)

    def setup(self, stage: str | None = None) -> None:
        if missing := self._missing():
            self._raise_missing(missing)
        # Fail before training starts, not in a worker minutes later: the first sample of each split must match
        # data.shape / data.dtype (every sample is checked again as it streams).
        for split, patterns in (("train", self.train_shards), ("val", self.val_shards)):
            if patterns is not None:
                first = next(iter_raw_samples(self.urls(split)[:1]), None)
                if first is not None:
                    self.checker(first)

    def _rank(self) -> int:
        if self.trainer is not None:
            return self.trainer.global_rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank()
        return 0

    def train_dataloader(self) -> EpochLoader:
        stream = ResampledStream(self.urls("train"), self.checker, self.batch_size, self.shuffle_buffer, self.seed,
                                 self._rank(), self.transform, self.cache_bytes)
        loader = EpochLoader(stream, self.batches_per_epoch, num_workers=self.num_workers)
        if self.position:
            loader.seek(*self.replay_point())
        return loader

    def val_dataloader(self):
        if self.val_shards is None:
            return []
        urls = self.urls("val")
        stream = OrderedStream(urls, self.checker, self.batch_size, self.transform, self.seed)
        loader = wds.WebLoader(stream, batch_size=None, num_workers=min(self.num_workers, len(urls)))
        loader.append(_to_float32)
        return loader

    def load_split(self, split: str, max_samples: int | None = None) -> Batch:
        """The whole split (or its first ``max_samples``) in memory, in shard then file order:
        x float32 [N, *shape], y int64 [N]."""
        samples = map(self.checker, iter_raw_samples(self.urls(split)))
        samples = _transformed(samples, self.transform, split, self.seed, 0)
        batch = list(itertools.islice(samples, max_samples))
        if not batch:
            raise ValueError(f"the {split} shards {self.urls(split)[:3]}... hold no samples")
        x, y = collate(batch)
        return x.float(), y


def _build_transform(name: str | None, args: dict | None):
    if name is None:
        return None
    from gwf.data import TRANSFORMS

    if name not in TRANSFORMS:
        raise ValueError(f"data.transform={name!r} is not one of {sorted(TRANSFORMS)} (or null)")
    return TRANSFORMS[name](**(args or {}))


def _plain(patterns):
    """Hydra ListConfig -> list of str; a str stays a str."""
    return str(patterns) if isinstance(patterns, (str, Path)) else [str(p) for p in patterns]
