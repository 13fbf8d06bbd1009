"""gwf-prepare: image folders -> WebDataset shards (pixels, or SD-VAE latent moments), resumable, several processes.

    gwf-prepare images  --src DIR --out DIR [--size 32] [--samples-per-shard N] [--val-fraction F] [--workers P]
    gwf-prepare latents --src DIR --out DIR --vae PATH_OR_HUB_ID [--subfolder vae] [--resolution 256]
                        [--batch-size 32] [--workers P] [--device auto]
    gwf-prepare digits  --out data/digits

Several hosts prepare one folder with ``--part i/n`` (part i of n: a deterministic, disjoint range of the shards);
the part that finds every shard complete writes the manifest.
A rerun skips the shards that match their record in .records/, redoes the missing ones, and refuses to overwrite a
complete shard made from other inputs or settings (--overwrite redoes it). Formats and protocol: data/README.md.
"""

from __future__ import annotations

import gwf  # noqa: F401  (torchvision workaround before anything else)

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import socket
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from tqdm import tqdm

from gwf.constants import (IMAGES_SAMPLES_PER_SHARD, LABEL_KEY, LATENTS_SAMPLES_PER_SHARD, SD_VAE_RESOLUTION,
                           TENSOR_KEY)  # fmt: skip
from gwf.data.images import Item, PixelShards, sample_key, scan_image_folder
from gwf.data.shards import (encode_sample, read_json, sha256_file, shard_name, shard_pattern, temporary_owner,
                             temporary_path, write_json)

MANIFEST_FILE = "manifest.json"
RECORDS_DIR = ".records"


@dataclass(frozen=True)
class ShardJob:
    name: str  # "train-000003.tar"
    split: str
    items: tuple[Item, ...]  # (image path, class index)
    keys: tuple[str, ...]


def split_indices(labels: list[int], val_fraction: float, seed: int) -> dict[str, list[int]]:
    """Stratified split: in each class, round(val_fraction * n_c) images drawn at random (seeded) go to val."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    labels, rng = np.asarray(labels), np.random.default_rng(seed)
    val = np.zeros(len(labels), bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        val[rng.permutation(idx)[: round(val_fraction * len(idx))]] = True
    return {"train": np.flatnonzero(~val).tolist(), "val": np.flatnonzero(val).tolist()}


def plan_jobs(items: list[Item], samples_per_shard: int, val_fraction: float = 0.0, seed: int = 0) -> list[ShardJob]:
    """Shards of ``samples_per_shard`` source images per split, named <split>-000000.tar, ... in item order."""
    if samples_per_shard < 1:
        raise ValueError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    keys = [sample_key(i, path) for i, (path, _) in enumerate(items)]
    jobs = []
    for split, idx in split_indices([label for _, label in items], val_fraction, seed).items():
        for s, start in enumerate(range(0, len(idx), samples_per_shard)):
            chunk = idx[start : start + samples_per_shard]
            chunk_items, chunk_keys = tuple(items[i] for i in chunk), tuple(keys[i] for i in chunk)
            jobs.append(ShardJob(shard_name(split, s), split, chunk_items, chunk_keys))
    return jobs


def fingerprint(job: ShardJob, src: Path, settings: dict) -> str:
    """sha256 of what determines a shard's bytes: its source files (relative to src), labels, keys and the settings."""
    items = [(os.path.relpath(path, src), label) for path, label in job.items]
    return hashlib.sha256(json.dumps([job.name, items, job.keys, settings], sort_keys=True).encode()).hexdigest()


def is_complete(out: Path, job: ShardJob, fp: str, overwrite: bool = False) -> bool:
    """True when the shard exists and matches its record; False when it must be (re)written; raises rather than let a
    complete shard be overwritten (unless ``overwrite``)."""
    path, record = out / job.name, read_json(out / RECORDS_DIR / f"{job.name}.json")
    if not path.exists():
        return False
    if record is not None and record["fingerprint"] == fp and record["sha256"] == sha256_file(path):
        return True
    if overwrite:
        return False
    why = ("has no record in .records/" if record is None else "was made from other images or settings"
           if record["fingerprint"] != fp else "does not match its recorded sha256 (modified or corrupt)")  # fmt: skip
    raise FileExistsError(
        f"shard {path} {why}; refusing to overwrite a complete shard. Use another --out, delete the shard, or pass "
        "--overwrite to redo such shards."
    )


def parse_part(part: str | None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n) with 0 <= i < n; None -> (0, 1)."""
    if part is None:
        return 0, 1
    try:
        i, n = (int(v) for v in str(part).split("/"))
    except ValueError:
        i = n = -1
    if not 0 <= i < n:
        raise ValueError(f"--part must be i/n with 0 <= i < n (e.g. 0/4 on the first of 4 hosts), got {part!r}")
    return i, n


def part_of(jobs: list[ShardJob], part: int, parts: int) -> list[ShardJob]:
    """Part ``part`` of ``parts``: a contiguous range of the plan's shards, disjoint from the other parts' and the
    same on every host (the plan is)."""
    return jobs[part * len(jobs) // parts : (part + 1) * len(jobs) // parts]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_own_stale_temporaries(out: Path, name: str) -> list[Path]:
    """Partial files of shard ``name`` left by dead processes of this host (temporary names carry host and pid:
    gwf.data.shards.temporary_path). Other hosts' temporaries are theirs to clean: never touched here."""
    host, removed = socket.gethostname(), []
    for tmp in out.glob(f".{name}.tmp-*"):
        owner = temporary_owner(tmp, out / name)
        if owner is not None and owner[0] == host and owner[1] != os.getpid() and not _pid_alive(owner[1]):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def write_shard(out: Path, job: ShardJob, maker, fp: str, on_item=lambda n: None) -> dict:
    """Write one shard: temporary file -> record -> rename. Returns the record."""
    path = out / job.name
    remove_own_stale_temporaries(out, job.name)  # partial shards of this host's interrupted runs
    tmp, counts = temporary_path(path), Counter()
    samples, corrupt = maker.samples(list(job.items), list(job.keys), on_item)
    try:
        with open(tmp, "wb") as f:
            writer = wds.TarWriter(f, encoder=False, mtime=0)  # fixed mtimes: equal samples give equal bytes
            try:
                for key, x, label in samples:
                    writer.write(encode_sample(key, x, label))
                    counts[label] += 1
            finally:
                writer.close()  # also when interrupted: flush the tar stream while the file is open
            f.flush()
            os.fsync(f.fileno())
        record = dict(name=job.name, split=job.split, fingerprint=fp, sha256=sha256_file(tmp),
                      count=sum(counts.values()), class_counts={str(c): n for c, n in sorted(counts.items())},
                      corrupt=corrupt)  # fmt: skip
        write_json(out / RECORDS_DIR / f"{job.name}.json", record)
        os.replace(tmp, path)  # atomic: the shard appears complete, or not at all
    finally:
        tmp.unlink(missing_ok=True)
    return record


_WORKER_MAKER = None


def _init_worker(maker, devices, threads: int) -> None:
    global _WORKER_MAKER
    torch.set_num_threads(threads)
    maker.setup(devices.get())  # one device per process (one per GPU)
    _WORKER_MAKER = maker


def _worker_job(out: str, job: ShardJob, fp: str) -> dict:
    return write_shard(Path(out), job, _WORKER_MAKER, fp)


def resolve_devices(device: str, workers: int | None) -> list[str]:
    """One device per worker process: "auto" = every GPU (one worker each) when there is one, else 1 CPU worker."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
    devices = [f"cuda:{i}" for i in range(torch.cuda.device_count())] if device == "cuda" else [device]
    workers = workers or len(devices)
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    return [devices[i % len(devices)] for i in range(workers)]


def run_jobs(out: Path, todo: list[ShardJob], maker, fps: dict, devices: list[str]) -> None:
    """Write the ``todo`` shards: in this process (one worker), else in spawned processes, one shard per task."""
    if not todo:
        return
    bar = tqdm(total=sum(len(j.items) for j in todo), unit="image", desc=f"gwf-prepare {maker.kind}")
    with bar:
        if len(devices) == 1:
            maker.setup(devices[0])
            for job in todo:
                write_shard(out, job, maker, fps[job.name], bar.update)
            return
        ctx = mp.get_context("spawn")  # fork is unsafe with torch (threads, CUDA)
        queue = ctx.Queue()
        for d in devices:
            queue.put(d)
        threads = max(1, (os.cpu_count() or 1) // len(devices))
        with ProcessPoolExecutor(len(devices), mp_context=ctx, initializer=_init_worker,
                                 initargs=(maker, queue, threads)) as pool:  # fmt: skip
            futures = {pool.submit(_worker_job, str(out), job, fps[job.name]): job for job in todo}
            try:
                for future in as_completed(futures):
                    future.result()
                    bar.update(len(futures[future].items))
            except BaseException:
                pool.shutdown(cancel_futures=True)
                raise


def write_manifest(out: Path, src: Path, classes: list[str], jobs: list[ShardJob], maker, options: dict) -> dict:
    records = [read_json(out / RECORDS_DIR / f"{job.name}.json") for job in jobs]
    splits = {}
    for split in dict.fromkeys(job.split for job in jobs):
        recs = [r for r in records if r["split"] == split]
        splits[split] = dict(
            count=sum(r["count"] for r in recs),
            class_counts=[sum(r["class_counts"].get(str(c), 0) for r in recs) for c in range(len(classes))],
            pattern=shard_pattern(split, len(recs)), shards=[r["name"] for r in recs],
            corrupt=sum(len(r["corrupt"]) for r in recs),
        )  # fmt: skip
    corrupt = [path for r in records for path in r["corrupt"]]
    manifest = dict(
        kind=maker.kind, source=str(src.absolute()), classes=classes, num_classes=len(classes),
        format=dict(**maker.describe(), tensor_key=TENSOR_KEY, label_key=LABEL_KEY),
        settings=maker.settings(), options=options, splits=splits,
        corrupt=dict(count=len(corrupt), files=corrupt), sha256={r["name"]: r["sha256"] for r in records},
    )  # fmt: skip
    write_json(out / MANIFEST_FILE, manifest)
    return manifest


def prepare(maker, src, out, *, samples_per_shard: int, val_fraction: float = 0.0, seed: int = 0,
            device: str = "cpu", workers: int | None = 1, overwrite: bool = False,
            part: str | None = None) -> dict | None:  # fmt: skip
    """Scan ``src``, plan the shards, write the missing ones of this ``part`` ("i/n"; None: all) with ``maker``
    (PixelShards or LatentShards), then, when every shard of the plan is complete, the manifest, which is returned
    (None while other parts are missing)."""
    src, out, t0 = Path(src), Path(out), time.perf_counter()
    index, parts = parse_part(part)
    items, classes = scan_image_folder(src)
    jobs = plan_jobs(items, samples_per_shard, val_fraction, seed)
    mine = part_of(jobs, index, parts)
    devices = resolve_devices(device, workers)
    (out / RECORDS_DIR).mkdir(parents=True, exist_ok=True)
    fps = {job.name: fingerprint(job, src, maker.settings()) for job in jobs}
    todo = [job for job in mine if not is_complete(out, job, fps[job.name], overwrite)]
    which = f", part {index}/{parts}: {len(mine)} of them ({mine[0].name} .. {mine[-1].name})" if parts > 1 and mine \
        else f", part {index}/{parts}: none of them" if parts > 1 else ""
    print(f"gwf-prepare {maker.kind}: {len(items)} images, {len(classes)} classes, {len(jobs)} shards{which} "
          f"({len(mine) - len(todo)} already complete), {len(devices)} worker(s) on {', '.join(sorted(set(devices)))}")
    run_jobs(out, todo, maker, fps, devices)
    options = dict(samples_per_shard=samples_per_shard, val_fraction=val_fraction, seed=seed)
    mine_names = {job.name for job in mine}
    others = [job for job in jobs if job.name not in mine_names]
    missing = [job.name for job in others if not is_complete(out, job, fps[job.name])]  # raises on a foreign shard
    if missing:
        print(f"part {index}/{parts} done in {time.perf_counter() - t0:.1f} s; {len(missing)} shard(s) of other parts "
              f"are not complete yet (first: {missing[0]}): the part that completes the plan writes "
              f"{out / MANIFEST_FILE} (or rerun any part once all are done)")
        return None
    manifest = write_manifest(out, src, classes, jobs, maker, options)
    seconds = time.perf_counter() - t0
    written = sum(len(job.items) for job in todo)
    print(f"done in {seconds:.1f} s ({written / seconds:.1f} images/s written); "
          + "; ".join(f"{k}: {v['count']} samples in {out / v['pattern']}" for k, v in manifest["splits"].items()))
    if manifest["corrupt"]["count"]:
        print(f"skipped {manifest['corrupt']['count']} undecodable image(s), listed in {out / MANIFEST_FILE} "
              f"(first: {manifest['corrupt']['files'][0]})")
    return manifest


def prepare_images(src, out, size: int = 32, samples_per_shard: int = IMAGES_SAMPLES_PER_SHARD, **kwargs) -> dict:
    """Pixel shards: x float16 [3, size, size] in [-1, 1] (gwf.data.images), what ``gwf-prepare images`` runs."""
    return prepare(PixelShards(size), src, out, samples_per_shard=samples_per_shard, **kwargs)


def prepare_latents(src, out, vae, subfolder: str | None = None, resolution: int = SD_VAE_RESOLUTION,
                    batch_size: int = 32, samples_per_shard: int = LATENTS_SAMPLES_PER_SHARD,
                    allow_download: bool = False, device: str = "auto", **kwargs) -> dict:  # fmt: skip
    """SD-VAE latent moment shards (gwf.data.latents), what ``gwf-prepare latents`` runs."""
    from gwf.data.latents import LatentShards

    maker = LatentShards(vae, subfolder, resolution, batch_size, allow_download)
    return prepare(maker, src, out, samples_per_shard=samples_per_shard, device=device, **kwargs)


def _common_args(p: argparse.ArgumentParser, samples_per_shard: int) -> None:
    p.add_argument("--src", required=True, help="image folder: one subfolder per class, or a flat folder (1 class)")
    p.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
    p.add_argument("--samples-per-shard", type=int, default=samples_per_shard)
    p.add_argument("--val-fraction", type=float, default=0.0, help="stratified validation split (default 0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    p.add_argument("--overwrite", action="store_true", help="redo complete shards that differ from the plan")
    p.add_argument("--part", default=None, metavar="I/N",
                   help="write part I of N (0-based) of the shards: one per host preparing the same --out")


def _images_args(p: argparse.ArgumentParser) -> None:
    _common_args(p, IMAGES_SAMPLES_PER_SHARD)
    p.add_argument("--size", type=int, default=32, help="side after the ADM center crop (default 32)")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards (default 1)")


def _latents_args(p: argparse.ArgumentParser) -> None:
    _common_args(p, LATENTS_SAMPLES_PER_SHARD)
    p.add_argument("--vae", required=True, help="local AutoencoderKL folder (or a cached hub id)")
    p.add_argument("--subfolder", default=None, help="e.g. vae, for a full Stable Diffusion folder")
    p.add_argument("--resolution", type=int, default=SD_VAE_RESOLUTION, help="ADM center crop side (default 256)")
    p.add_argument("--batch-size", type=int, default=32, help="images per VAE call")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per GPU, else 1)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (every GPU) | cuda:N")
    p.add_argument("--allow-download", action="store_true", help="let diffusers fetch a hub id (needs internet)")


def _digits_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="data/digits", help="output folder (default data/digits)")


def _run_images(a) -> None:
    prepare_images(a.src, a.out, a.size, a.samples_per_shard, val_fraction=a.val_fraction, seed=a.seed,
                   workers=a.workers, overwrite=a.overwrite, part=a.part)  # fmt: skip


def _run_latents(a) -> None:
    prepare_latents(a.src, a.out, a.vae, a.subfolder, a.resolution, a.batch_size, a.samples_per_shard,
                    a.allow_download, a.device, val_fraction=a.val_fraction, seed=a.seed, workers=a.workers,
                    overwrite=a.overwrite, part=a.part)  # fmt: skip


def _run_digits(a) -> None:
    from gwf.data.digits import prepare_digits

    prepare_digits(a.out)
    print(f"digits ready in {a.out}")


# name -> (help, arguments, run)
SUBCOMMANDS = {
    "images": ("image folder -> pixel shards (e.g. CIFAR-10 3x32x32)", _images_args, _run_images),
    "latents": ("image folder -> SD-VAE latent moment shards (ImageNet 256 -> 4x32x32)", _latents_args, _run_latents),
    "digits": ("scikit-learn digits -> shards + classifier", _digits_args, _run_digits),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gwf-prepare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (help_, add_args, run) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name, help=help_, description=help_))
        sub.choices[name].set_defaults(run=run)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        parser.exit(2, f"gwf-prepare {args.command}: error: {e}\n")


if __name__ == "__main__":
    main()
