"""Shard format round trip, ShardDataModule streams, and the errors a user meets (wrong shape, missing or
truncated shards)."""

import os
import tarfile

import numpy as np
import pytest
import torch

import gwf  # noqa: F401
import lightning as L
from gwf.data import PREPARERS, ShardDataModule, read_samples, write_shards
from gwf.data.shards import ShardReadError, atomic_write, link_or_copy, shard_pattern

SHAPE = (2, 3, 4)
NUM_CLASSES = 5


def _samples(split, n, shape=SHAPE, dtype=np.float16):
    rng = np.random.default_rng(len(split) + n)
    return [(f"{split}-{i:06d}", rng.standard_normal(shape).astype(dtype), i % NUM_CLASSES) for i in range(n)]


@pytest.fixture
def shard_dir(tmp_path):
    """3 train shards (10 + 10 + 10 samples) and 1 val shard (7 samples) of [2, 3, 4] float16."""
    write_shards(_samples("train", 30), tmp_path, "train", 10)
    write_shards(_samples("val", 7), tmp_path, "val", 10)
    return tmp_path


def _datamodule(shard_root, **overrides):
    kwargs = dict(
        train_shards=str(shard_root / shard_pattern("train", 3)),
        val_shards=str(shard_root / "val-000000.tar"),
        shape=list(SHAPE),
        dtype="float16",
        num_classes=NUM_CLASSES,
        batch_size=4,
        num_workers=0,
        shuffle_buffer=8,
        epoch_size=48,
        seed=0,
    )
    return ShardDataModule(**(kwargs | overrides))


def _stream(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


def test_round_trip_exact(tmp_path):
    samples = _samples("train", 25)
    paths = write_shards(samples, tmp_path, "train", 10)
    assert [p.name for p in paths] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert sorted(os.listdir(tmp_path)) == [p.name for p in paths]  # no temporary files left
    back = list(read_samples(str(tmp_path / shard_pattern("train", 3))))
    assert [k for k, _, _ in back] == [k for k, _, _ in samples]
    assert [y for _, _, y in back] == [y for _, _, y in samples]
    for (_, x, _), (_, x_back, _) in zip(samples, back):
        assert x_back.dtype == np.float16 and np.array_equal(x_back, x)
    # fixed mtimes: the same samples give the same bytes
    again = write_shards(samples, tmp_path / "again", "train", 10)
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(paths, again))


def test_interrupted_writer_leaves_only_complete_shards(tmp_path):
    def broken():
        yield from _samples("train", 15)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(broken(), tmp_path, "train", 10)
    assert os.listdir(tmp_path) == ["train-000000.tar"]
    assert len(list(read_samples(str(tmp_path / "train-000000.tar")))) == 10


@pytest.mark.parametrize("num_workers", [0, 1])
def test_train_batches(shard_dir, num_workers):
    dm = _datamodule(shard_dir, num_workers=num_workers)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    batches = _stream(loader)
    assert len(loader) == len(batches) == 48 // 4  # virtual epoch: epoch_size // batch_size batches
    for x, y in batches:
        assert x.shape == (4, *SHAPE) and x.dtype == torch.float32
        assert y.shape == (4,) and y.dtype == torch.int64 and 0 <= y.min() and y.max() < NUM_CLASSES
    assert dm.shape == SHAPE and dm.num_classes == NUM_CLASSES


def test_train_stream_seeding(shard_dir):
    # 48 samples per epoch from 30: resampled with replacement, so an epoch is not a permutation of the data
    first = _stream(_datamodule(shard_dir, seed=0).train_dataloader())
    assert _same(first, _stream(_datamodule(shard_dir, seed=0).train_dataloader()))  # reproducible
    assert not _same(first, _stream(_datamodule(shard_dir, seed=1).train_dataloader()))  # per seed
    loader = _datamodule(shard_dir, seed=0).train_dataloader()
    epoch0, epoch1 = _stream(loader), _stream(loader)
    assert _same(epoch0, first) and not _same(epoch0, epoch1)  # each epoch draws a new stream
    loader = _datamodule(shard_dir, seed=0).train_dataloader()
    loader.sampler.set_epoch(1)  # what Lightning calls before each epoch (also after a resume)
    assert _same(_stream(loader), epoch1)
    # worker 0 of 1 draws what the main process draws: the stream depends on (seed, rank, worker, epoch) only
    assert _same(first, _stream(_datamodule(shard_dir, seed=0, num_workers=1).train_dataloader()))


@pytest.mark.parametrize("num_workers", [0, 1])
def test_decoded_shard_cache_gives_the_same_stream(shard_dir, num_workers):
    """data.cache_mb: shards parsed once per process give the batches of an uncached stream, epoch after epoch; a
    budget below one shard caches nothing; cached samples are read-only (no later draw can see a change)."""
    uncached = _datamodule(shard_dir, cache_mb=0, num_workers=num_workers).train_dataloader()
    cached = _datamodule(shard_dir, num_workers=num_workers).train_dataloader()
    tiny = _datamodule(shard_dir, cache_mb=1e-4, num_workers=num_workers).train_dataloader()  # 105 bytes
    for _ in range(3):  # 48 samples from 30 per epoch: every shard is drawn several times
        expected = _stream(uncached)
        assert _same(_stream(cached), expected) and _same(_stream(tiny), expected)
    if num_workers == 0:  # the main process holds the cache; workers hold their own and start empty each pass
        assert sorted(cached.stream._cache) == sorted(cached.stream.urls) and not tiny.stream._cache
        _, x, _ = cached.stream._cache[cached.stream.urls[0]][0]
        assert not x.flags.writeable
    else:
        assert not cached.stream._cache
    with pytest.raises(ValueError, match="cache_mb"):
        _datamodule(shard_dir, cache_mb=-1)


def test_val_stream_deterministic_and_complete(shard_dir):
    dm = _datamodule(shard_dir)
    loader = dm.val_dataloader()
    first, second = _stream(loader), _stream(loader)
    assert _same(first, second)
    assert [len(y) for _, y in first] == [4, 3]  # last batch partial: every sample exactly once
    expected = read_samples(str(shard_dir / "val-000000.tar"))
    x_exp = torch.from_numpy(np.stack([x for _, x, _ in expected])).float()
    assert torch.equal(torch.cat([x for x, _ in first]), x_exp)


def test_load_split(shard_dir):
    dm = _datamodule(shard_dir)
    x, y = dm.load_split("train")
    assert x.shape == (30, *SHAPE) and x.dtype == torch.float32 and y.dtype == torch.int64
    written = _samples("train", 30)
    assert torch.equal(x, torch.from_numpy(np.stack([s[1] for s in written])).float())
    assert y.tolist() == [s[2] for s in written]
    assert dm.load_split("val", max_samples=5)[0].shape == (5, *SHAPE)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_wrong_shape_names_shard_and_shapes(tmp_path, num_workers):
    write_shards(_samples("train", 6, shape=(2, 3, 5)), tmp_path, "train", 10)
    train_shards = str(tmp_path / "train-000000.tar")
    dm = _datamodule(tmp_path, train_shards=train_shards, val_shards=None, num_workers=num_workers)
    with pytest.raises(ValueError) as err:
        next(iter(dm.train_dataloader()))
    msg = str(err.value)
    assert str(tmp_path / "train-000000.tar") in msg and "[2, 3, 5]" in msg and "[2, 3, 4]" in msg
    assert "data.shape" in msg


def test_wrong_dtype(shard_dir):
    with pytest.raises(ValueError, match="dtype float16, expected shape .* dtype float32"):
        _datamodule(shard_dir, dtype="float32").load_split("val")


def test_missing_shards(tmp_path):
    dm = _datamodule(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"train-\{000000..000002\}.tar"):
        dm.prepare_data()
    with pytest.raises(FileNotFoundError, match="write_shards"):
        dm.setup("fit")


def test_prepare_data_runs_the_preparer(tmp_path, monkeypatch):
    calls = []

    def fake_prepare(root):
        calls.append(root)
        write_shards(_samples("train", 30), root, "train", 10)
        write_shards(_samples("val", 7), root, "val", 10)

    monkeypatch.setitem(PREPARERS, "fake", fake_prepare)
    dm = _datamodule(tmp_path, prepare="fake", root=str(tmp_path))
    dm.prepare_data()
    dm.prepare_data()  # shards now present: the preparer is not called again
    dm.setup("fit")
    assert calls == [tmp_path]
    with pytest.raises(ValueError, match="not one of"):
        _datamodule(tmp_path, prepare="nope", root=str(tmp_path))


def _member_offsets(path):
    with tarfile.open(path) as tar:
        return [m.offset for m in tar.getmembers()]


@pytest.mark.parametrize("cut", ["middle", "member_boundary"])
def test_truncated_shard_is_an_error(shard_dir, cut):
    path = shard_dir / "train-000001.tar"
    size = _member_offsets(path)[6] if cut == "member_boundary" else path.stat().st_size // 2
    os.truncate(path, size)
    with pytest.raises(ShardReadError, match="train-000001.tar"):
        list(read_samples(str(path)))
    with pytest.raises(ShardReadError, match="train-000001.tar"):
        _datamodule(shard_dir).load_split("train")


def test_corrupt_member_header_is_an_error(shard_dir):
    # Python's streaming tar reader ends the archive silently at a bad header; we must not lose samples quietly
    path = shard_dir / "val-000000.tar"
    offset = _member_offsets(path)[4]
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"garbage!" * 64)
    with pytest.raises(ShardReadError, match="val-000000.tar"):
        list(read_samples(str(path)))


class _RecordBatches(L.LightningModule):
    """Records a fingerprint of every training batch per epoch."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(int(np.prod(SHAPE)), NUM_CLASSES)
        self.seen = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        self.seen.setdefault(self.current_epoch, []).append((x.sum().item(), y.tolist()))
        return torch.nn.functional.cross_entropy(self.lin(x.flatten(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(shard_dir, max_epochs, ckpt_dir, ckpt_path=None):
    module = _RecordBatches()
    trainer = L.Trainer(
        max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True)],
    )  # fmt: skip
    trainer.fit(module, _datamodule(shard_dir, val_shards=None), ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.filterwarnings("ignore:Checkpoint directory")
def test_lightning_epochs_and_resume(shard_dir, tmp_path):
    straight = _fit(shard_dir, 2, tmp_path / "a")
    assert len(straight[0]) == len(straight[1]) == 48 // 4 and straight[0] != straight[1]
    _fit(shard_dir, 1, tmp_path / "b")
    resumed = _fit(shard_dir, 2, tmp_path / "b", ckpt_path=str(tmp_path / "b" / "last.ckpt"))
    assert list(resumed) == [1] and resumed[1] == straight[1]  # the resumed epoch reads what the straight run read


def test_link_or_copy_makes_numbered_checkpoints_without_rewriting_them(tmp_path, monkeypatch):
    """A hard link (the same inode: no bytes written, nothing read into memory) that keeps the old content when the
    source is later replaced by atomic_write (as last.ckpt is); a streamed copy where hard links fail."""
    last, numbered = tmp_path / "last.ckpt", tmp_path / "update0000010.ckpt"
    atomic_write(lambda f: f.write(b"state at 10"), last)
    assert link_or_copy(last, numbered) == "link"
    assert numbered.stat().st_ino == last.stat().st_ino and numbered.read_bytes() == b"state at 10"
    atomic_write(lambda f: f.write(b"state at 20"), last)
    assert numbered.read_bytes() == b"state at 10" and last.read_bytes() == b"state at 20"

    def no_links(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr("os.link", no_links)
    assert link_or_copy(last, tmp_path / "update0000020.ckpt") == "copy"
    copy = tmp_path / "update0000020.ckpt"
    assert copy.read_bytes() == b"state at 20" and copy.stat().st_ino != last.stat().st_ino
    assert not list(tmp_path.glob(".*.tmp-*"))  # no temporary left
