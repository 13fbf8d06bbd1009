"""Writing and reading shards: WebDataset tars of (key, x, label) samples, each two members ``<key>.x.npy`` and
``<key>.cls`` (format: data/README.md). Keys hold no "." (WebDataset splits member names at the first dot) or "/".
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import secrets
import shutil
import socket
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from gwf.constants import LABEL_KEY, TENSOR_KEY

Sample = tuple[str, np.ndarray, int]  # (key, x, label)

_TAR_BLOCK = 512
_TAR_END_MARKER = 2 * _TAR_BLOCK  # a complete tar ends with two zero blocks


class ShardReadError(OSError):
    """A shard that cannot be read: truncated (killed writer, partial copy) or corrupt."""


def shard_name(prefix: str, index: int) -> str:
    return f"{prefix}-{index:06d}.tar"


def shard_pattern(prefix: str, num_shards: int) -> str:
    """Brace pattern of the shards ``write_shards`` names, e.g. ``train-{000000..000003}.tar``."""
    if num_shards == 1:
        return shard_name(prefix, 0)
    return f"{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar"


def expand_urls(urls: str | Path | Sequence[str | Path]) -> list[str]:
    """A brace pattern ("a-{000000..000003}.tar", "::"-separated lists) or a list of them -> list of urls."""
    if isinstance(urls, (str, Path)):
        urls = [urls]
    return [url for pattern in urls for url in wds.shardlists.expand_urls(str(pattern))]


def is_local(url: str) -> bool:
    """Local file paths can be checked before reading; "pipe:", "http://", "s3://" ... urls cannot."""
    return "://" not in url and not url.startswith("pipe:")


def missing_shards(urls: Sequence[str]) -> list[str]:
    return [url for url in urls if is_local(url) and not os.path.isfile(url)]


def check_shard_complete(url: str) -> None:
    """Raise ShardReadError unless the local tar at ``url`` ends with its two zero blocks: Python's streaming tar
    reader stops silently when a file is cut at a member boundary."""
    if not is_local(url):
        return
    size = os.path.getsize(url)
    with open(url, "rb") as f:
        f.seek(max(size - _TAR_END_MARKER, 0))
        tail = f.read()
    if size < _TAR_END_MARKER or size % _TAR_BLOCK or tail.strip(b"\0"):
        raise ShardReadError(f"shard {url} is truncated or not a tar file ({size} bytes, no end-of-archive marker). "
                             "Delete it and re-create the shard set (see data/README.md).")


def encode_sample(key: str, x: np.ndarray, label: int, tensor_key: str = TENSOR_KEY,
                  label_key: str = LABEL_KEY) -> dict:
    if not key or "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} must be non-empty and hold no '.' or '/'")
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(x), allow_pickle=False)
    return {"__key__": key, tensor_key: buf.getvalue(), label_key: str(int(label)).encode()}


_NPY_MAGIC = b"\x93NUMPY"
_npy_headers: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}  # header bytes -> (dtype, shape, fortran)


def load_npy(data: bytes) -> np.ndarray:
    """np.load of .npy bytes, with the header parse cached: every sample of a shard set has the same header, and
    numpy parses it with ast.literal_eval (most of the decoding time of a small sample)."""
    if data[:6] != _NPY_MAGIC:
        raise ValueError("not a .npy payload (bad magic bytes)")
    size_bytes = 2 if data[6] == 1 else 4  # header length field: 2 bytes in format 1.0, 4 in 2.0/3.0
    start = 8 + size_bytes
    end = start + int.from_bytes(data[8:start], "little")
    header = data[:end]
    if header not in _npy_headers:
        fp = io.BytesIO(data)
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:  # format 3.0 (utf8 field names): rare, take numpy's slow path
            return np.load(io.BytesIO(data), allow_pickle=False)
        if dtype.hasobject:
            raise ValueError("object arrays (pickles) are not allowed in shards")
        _npy_headers[header] = (dtype, shape, fortran)
    dtype, shape, fortran = _npy_headers[header]
    count = math.prod(shape)
    if len(data) - end != count * dtype.itemsize:
        raise ValueError(f"truncated .npy payload ({len(data) - end} bytes for shape {list(shape)} {dtype})")
    x = np.frombuffer(data, dtype=dtype, count=count, offset=end).copy()  # copy: writable, owns its memory
    return x.reshape(shape[::-1]).T if fortran else x.reshape(shape)


def decode_sample(sample: dict, tensor_key: str = TENSOR_KEY, label_key: str = LABEL_KEY) -> Sample:
    """Raw tar sample (bytes) -> (key, x, label); errors name the shard and the key."""
    key, url = sample["__key__"], sample.get("__url__", "?")
    try:
        x = load_npy(sample[tensor_key])
        label = int(sample[label_key])
    except KeyError as e:
        raise ValueError(f"sample {key!r} in shard {url} has no {e.args[0]!r} member (it has {sorted(sample)}); "
                         "check data.tensor_key / data.label_key") from None
    except ValueError as e:
        raise ShardReadError(f"cannot decode sample {key!r} in shard {url}: {e}") from e
    return key, x, label


def collate(samples: list[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, *shape] in the stored dtype (fp16 latents cross the worker pipe at half size), y int64 [N]."""
    x = torch.from_numpy(np.stack([s[1] for s in samples]))
    y = torch.tensor([s[2] for s in samples], dtype=torch.int64)
    return x, y


def write_shards(samples: Iterable[Sample], out_dir: str | Path, prefix: str, samples_per_shard: int, *,
                 total: int | None = None, tensor_key: str = TENSOR_KEY, label_key: str = LABEL_KEY) -> list[Path]:
    """Write (key, x, label) samples into ``out_dir/prefix-000000.tar``, ``prefix-000001.tar``, ...; returns the
    paths. Each shard is renamed into place when complete (a killed run leaves no finished-looking file); fixed
    mtimes make equal samples give identical bytes. ``total`` sizes the progress bar."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    writer = tmp = path = None
    try:
        for i, (key, x, label) in enumerate(tqdm(samples, total=total, desc=f"writing {prefix} shards", unit="sample")):
            if i % samples_per_shard == 0:
                if writer is not None:
                    paths.append(_finish(writer, tmp, path))
                path = out_dir / shard_name(prefix, i // samples_per_shard)
                tmp = temporary_path(path)
                # mtime=0, an int: a float mtime costs an extra pax header per member (and slower reads)
                writer = wds.TarWriter(open(tmp, "wb"), encoder=False, mtime=0)
            writer.write(encode_sample(key, x, label, tensor_key, label_key))
        if writer is not None:
            paths.append(_finish(writer, tmp, path))
            writer = None
    finally:
        if writer is not None:  # interrupted: drop the partial shard
            writer.close()
            writer.stream.close()
            tmp.unlink(missing_ok=True)
    return paths


def temporary_path(path: Path) -> Path:
    """A hidden sibling name, unique across processes and hosts (several nodes may prepare one shared folder)."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")


def temporary_owner(tmp: Path, path: Path) -> tuple[str, int] | None:
    """(host, pid) that made ``tmp``, a ``temporary_path(path)``; None for another file."""
    prefix = f".{path.name}.tmp-"
    if not tmp.name.startswith(prefix):
        return None
    host, _, pid = tmp.name[len(prefix):].rpartition("-")[0].rpartition("-")
    return (host, int(pid)) if host and pid.isdigit() else None


def atomic_write(write, path: str | Path) -> None:
    """``write(file)`` into a temporary sibling, fsync, then rename over ``path`` (atomic on POSIX): a reader sees the
    old file or the new one, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def link_or_copy(src: str | Path, dst: str | Path) -> str:
    """``dst`` becomes a copy of ``src`` without reading it into memory: a hard link (no bytes written; safe for files
    only ever replaced by rename, as atomic_write does, never modified in place), else a streamed copy where the
    filesystem has no hard links. Atomic like atomic_write. Returns "link" or "copy"."""
    src, dst = Path(src), Path(dst)
    tmp = temporary_path(dst)
    try:
        try:
            os.link(src, tmp)
            how = "link"
        except OSError:  # no hard links here (some network or FUSE filesystems), or another device
            with open(src, "rb") as fin, open(tmp, "wb") as fout:
                shutil.copyfileobj(fin, fout, 16 << 20)
                fout.flush()
                os.fsync(fout.fileno())
            how = "copy"
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return how


def read_json(path: str | Path) -> dict | None:
    """A JSON file's content, or None when it is missing or unreadable (e.g. a manifest not written yet)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_json(path: str | Path, data: dict) -> None:
    """Indented JSON, written atomically."""
    atomic_write(lambda f: f.write((json.dumps(data, indent=2) + "\n").encode()), path)


def _finish(writer: wds.TarWriter, tmp: Path, path: Path) -> Path:
    writer.close()
    writer.stream.flush()
    os.fsync(writer.stream.fileno())
    writer.stream.close()
    os.replace(tmp, path)  # atomic on POSIX
    return path


def iter_shard_samples(url: str) -> Iterator[dict]:
    """Raw samples ({"__key__", "__url__", member suffix: bytes}) of one shard, in file order. Local shards are
    checked to their end: the streaming tar reader also stops silently at a corrupt member header."""
    if not is_local(url):
        yield from wds.tarfile_samples([{"url": url}])
        return
    check_shard_complete(url)
    try:
        with open(url, "rb") as f:
            files = wds.tariterators.tar_file_expander([{"url": url, "stream": f}])
            yield from wds.tariterators.group_by_keys(files)
            stopped_at = f.tell()
            for chunk in iter(lambda: f.read(1 << 16), b""):
                if chunk.strip(b"\0"):
                    raise ShardReadError(
                        f"shard {url} is corrupt: the tar reader stopped near byte {stopped_at} of "
                        f"{os.path.getsize(url)} (bad member header). Delete it and re-create the shard set."
                    )
    except ShardReadError:
        raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ShardReadError(f"cannot read shard {url}: {e.args[0] if e.args else e!r} (truncated or corrupt)") from e


def iter_raw_samples(urls: Iterable[str]) -> Iterator[dict]:
    for url in urls:
        yield from iter_shard_samples(url)


def read_samples(urls: str | Path | Sequence[str | Path], tensor_key: str = TENSOR_KEY,
                 label_key: str = LABEL_KEY) -> Iterator[Sample]:
    """(key, x, label) of every sample of ``urls`` (pattern or list), in shard order then file order."""
    for sample in iter_raw_samples(expand_urls(urls)):
        yield decode_sample(sample, tensor_key, label_key)


def sha256_files(paths: Iterable[str | Path]) -> str:
    """Hex sha256 of the files' bytes, one after another, read in 1 MiB chunks (manifests, records, encoder ids)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of one file."""
    return sha256_files([path])
