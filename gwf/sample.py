"""``gwf-sample``: N samples from a checkpoint (EMA generator by default) as ``samples.npz`` and a PNG grid.

    gwf-sample --ckpt runs/digits_wflow/default/checkpoints/last.ckpt --num-samples 1000 --classes 0,3,7 --alpha 2
    torchrun --nproc_per_node 8 -m gwf.sample --ckpt last.ckpt --num-samples 50000 --vae sd-vae-ft-mse   # sharded

Sample i uses noise seeded by (seed, i) and label classes[i % len(classes)]: the samples do not depend on the number
of ranks. Each rank writes its share to per-rank files under --out (a filesystem every rank sees); rank 0 merges
them into samples.npz block by block, so no rank holds all N samples. samples.npz: x float32 [N, *data shape],
labels int64 [N] (-1: unconditional), alpha float32 [N] (nan: not guided), arr_0 uint8 [N, H, W, C] for images (ADM's
layout); grid.png (a row for each of the first 10 classes); sample.json.
"""

from __future__ import annotations

import gwf  # first: makes torchvision importable next to a CPU torch

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from tqdm import tqdm

from gwf.data.images import to_unit
from gwf.seeding import make_generator


# ---------------------------------------------------------------------------------------------- loading
def run_dir_of(ckpt: Path) -> Path:
    """<run_dir>/checkpoints/last.ckpt -> <run_dir>."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def load_module(ckpt: str | Path, device: str | torch.device = "cpu"):
    """The GWFModule of a checkpoint and its composed config (gwf.build.module_from_checkpoint)."""
    from gwf.build import module_from_checkpoint

    return module_from_checkpoint(ckpt, device)


# ---------------------------------------------------------------------------------------------- sampling
def index_labels(indices: Tensor, classes: Tensor | None) -> Tensor | None:
    """label of sample i = classes[i % len(classes)] (balanced, and the same whatever the sharding)."""
    return None if classes is None else classes[indices % len(classes)]


def index_inputs(module, indices: Tensor, model: torch.nn.Module, seed: int) -> Tensor:
    """Inputs [n, *noise_shape] of ``model``, input i drawn from its own generator seeded by (seed, i)."""
    return torch.cat([module.model_inputs(model, 1, make_generator(module.device, "gwf-sample", seed, int(i)))
                      for i in indices.tolist()])


@torch.no_grad()
def generate(module, indices: Tensor, classes: Tensor | None, alpha: float | None, seed: int, use_ema: bool = True,
             batch_size: int = 500) -> tuple[Tensor, Tensor | None]:
    """Samples x [n, *shape] (on CPU) of the given sample indices [n], and their labels [n] (or None)."""
    model = module.ema.model if use_ema else module.generator
    xs = []
    for chunk in indices.split(batch_size):
        if len(chunk) == 0:  # torch splits an empty tensor into one empty chunk
            continue
        z = index_inputs(module, chunk, model, seed)
        labels = index_labels(chunk.to(module.device), classes)
        a = None if alpha is None else torch.full((len(chunk),), float(alpha), device=module.device)
        xs.append(model(z, labels, a).float().cpu())
    x = torch.cat(xs) if xs else torch.empty(0, *module.data_shape)
    return x, index_labels(indices, None if classes is None else classes.cpu())


def to_uint8_nhwc(images: Tensor) -> np.ndarray:
    """float [N, C, H, W] in [-1, 1] -> uint8 [N, H, W, C] (C = 1 or 3)."""
    from gwf.viz import to_uint8

    return to_uint8(images).permute(0, 2, 3, 1).numpy()


# ---------------------------------------------------------------------------------------------- distributed
def init_distributed(device: str) -> tuple[int, int]:
    """(rank, world size); starts the process group from torchrun-style env vars when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


PARTS_DIR = ".parts"  # per-rank sample files under --out, merged by rank 0 and removed
MERGE_ROWS = 1024  # samples merged at once (rounded to a multiple of the ranks): what rank 0 holds, whatever N


class NpyWriter:
    """An .npy file of known ``shape`` and ``dtype`` written row block by row block (never held whole in memory)."""

    def __init__(self, f, shape: tuple[int, ...], dtype):
        self.f, self.dtype, self.rows, self.written = f, np.dtype(dtype), int(shape[0]), 0
        np.lib.format.write_array_header_2_0(
            f, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": tuple(shape)})

    def write(self, rows: np.ndarray) -> None:
        self.f.write(np.ascontiguousarray(rows, dtype=self.dtype).data)  # the array's own bytes, no copy
        self.written += len(rows)

    def close(self) -> None:
        if self.written != self.rows:
            raise RuntimeError(f"wrote {self.written} rows of {self.rows}")


def _npy_header(f) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of the .npy file ``f``, left positioned at its data."""
    version = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read(f)
    return shape, dtype


class RankParts:
    """The per-rank files of one sampling run: rank r holds samples r, r + W, r + 2W, ... (W ranks) of each array
    in ``<out>/.parts/<name>.rank<r>.npy``; read back by sample index without loading a whole file."""

    def __init__(self, out: Path, world: int, num_samples: int):
        self.dir, self.world, self.n = Path(out) / PARTS_DIR, world, num_samples

    def path(self, name: str, rank: int) -> Path:
        return self.dir / f"{name}.rank{rank:05d}.npy"

    def count(self, rank: int) -> int:
        return len(range(rank, self.n, self.world))

    def open_writer(self, name: str, rank: int, row_shape, dtype):
        self.dir.mkdir(parents=True, exist_ok=True)
        f = open(self.path(name, rank), "wb")
        return f, NpyWriter(f, (self.count(rank), *row_shape), dtype)

    def names(self) -> list[str]:
        return sorted({p.name.split(".rank")[0] for p in self.dir.glob("*.rank*.npy")})

    def _rows(self, name: str, rank: int, start: int, count: int) -> np.ndarray:
        """Rows ``start .. start + count`` of rank ``rank``'s file, read from disk (no memory map kept)."""
        path = self.path(name, rank)
        with open(path, "rb") as f:
            shape, dtype = _npy_header(f)
            row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
            f.seek(f.tell() + start * row)
            return np.frombuffer(f.read(count * row), dtype=dtype).reshape(count, *shape[1:])

    def info(self, name: str) -> tuple[tuple[int, ...], np.dtype]:
        with open(self.path(name, 0), "rb") as f:
            shape, dtype = _npy_header(f)
        return tuple(shape[1:]), dtype

    def block(self, name: str, a: int, b: int) -> np.ndarray:
        """Samples a .. b - 1 in index order, ``a`` a multiple of the world size."""
        row_shape, dtype = self.info(name)
        out = np.empty((b - a, *row_shape), dtype)
        for r in range(min(self.world, b - a)):
            count = len(range(a + r, b, self.world))
            out[r :: self.world] = self._rows(name, r, a // self.world, count)
        return out

    def take(self, name: str, indices) -> np.ndarray:
        """The samples at ``indices`` (a few: grids), one read each."""
        return np.stack([self._rows(name, int(i) % self.world, int(i) // self.world, 1)[0] for i in indices])

    def merge(self, path: Path, extra: dict[str, np.ndarray], rows: int = MERGE_ROWS) -> None:
        """``path`` (.npz, uncompressed, as np.savez writes it) with every part array in index order plus ``extra``,
        streamed block by block: the memory held is about ``rows`` samples (a multiple of the ranks), whatever N."""
        import zipfile

        step = max(rows // self.world, 1) * self.world
        with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            for name in self.names():
                row_shape, dtype = self.info(name)
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    writer = NpyWriter(member, (self.n, *row_shape), dtype)
                    for a in range(0, self.n, step):
                        writer.write(self.block(name, a, min(a + step, self.n)))
                    writer.close()
            for name, array in extra.items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)

    def remove(self) -> None:
        for p in self.dir.glob("*.rank*.npy"):
            p.unlink(missing_ok=True)
        try:
            self.dir.rmdir()
        except OSError:
            pass


def generate_parts(module, parts: RankParts, rank: int, classes, alpha, seed, use_ema, batch_size, decode=None,
                   progress: bool = False) -> None:
    """This rank's strided share, batch by batch, appended to its part files: x (float32) and, with ``decode`` (or
    for image data), arr_0 (uint8 [n, H, W, C]). No samples travel between ranks."""
    mine = torch.arange(rank, parts.n, parts.world)
    files, writers = [], {}
    bar = tqdm(total=parts.n, unit="sample", desc="gwf-sample", disable=not progress or rank != 0)
    try:
        for start in range(0, len(mine), batch_size):
            chunk = mine[start: start + batch_size]
            x, _ = generate(module, chunk, classes, alpha, seed, use_ema, batch_size)
            img = decode(x) if decode is not None else x if x.ndim == 4 and x.shape[1] in (1, 3) else None
            arrays = {"x": x.numpy().astype(np.float32), **({"arr_0": to_uint8_nhwc(img)} if img is not None else {})}
            for name, array in arrays.items():
                if name not in writers:
                    f, writers[name] = parts.open_writer(name, rank, array.shape[1:], array.dtype)
                    files.append(f)
                writers[name].write(array)
            bar.update(min(parts.n, (start + len(chunk)) * parts.world) - bar.n)  # all ranks together (estimate)
        for w in writers.values():
            w.close()
    finally:
        for f in files:
            f.close()
        bar.close()


# ---------------------------------------------------------------------------------------------- outputs
def grid_indices(labels: Tensor | None, n: int, per_class: int = 10) -> Tensor:
    """The samples a grid shows: the first ``per_class`` of each of the first ``per_class`` classes (by label), or
    the first k x k (k <= per_class) when unconditional; read alone from the parts."""
    if labels is None:
        k = max(1, min(per_class, int(n ** 0.5)))
        return torch.arange(min(n, k * k))
    shown = labels.unique(sorted=True)[:per_class]
    return torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in shown])


def save_grid(x: Tensor, labels: Tensor | None, path: Path, per_class: int = 10,
              target: Tensor | None = None) -> Path:
    """Rows = classes (the first ``per_class`` samples of each), or a square grid; 2D points as a scatter plot over
    ``target`` points (the data's held-out samples, when it has them)."""
    from gwf.viz import save_image_grid, save_scatter

    if x.ndim == 2 and x.shape[1] == 2:
        title = f"{len(x)} samples" + (f" over {len(target)} target points" if target is not None else "")
        return save_scatter(x, target if target is not None else torch.empty(0, 2), path, title=title)
    if labels is None:
        k = max(1, min(per_class, int(len(x) ** 0.5)))
        return save_image_grid(x[: k * k], nrow=k, path=path)
    rows = [torch.nonzero(labels == c).flatten()[:per_class] for c in labels.unique(sorted=False)]
    rows = sorted(rows, key=lambda r: int(labels[r[0]]))
    width = max(len(r) for r in rows)
    idx = torch.cat([torch.cat([r, r[-1:].repeat(width - len(r))]) for r in rows])  # ragged rows: repeat last
    return save_image_grid(x[idx], nrow=width, path=path)


def target_points(cfg, n: int) -> Tensor | None:
    """``n`` held-out samples of the checkpoint's data (its datamodule's ``load_split``; 2D toys make them, files
    are not read), or None when the data has none to give."""
    from gwf.build import build_datamodule

    data = build_datamodule(cfg)
    if not hasattr(data, "load_split") or tuple(getattr(data, "shape", ())) != (2,):
        return None
    return data.load_split("val", max_samples=n)[0]


def default_out(ckpt: Path, num_samples: int, use_ema: bool, alpha: float | None) -> Path:
    tag = f"{ckpt.stem}_{'ema' if use_ema else 'raw'}_n{num_samples}" + (f"_alpha{alpha:g}" if alpha else "")
    return run_dir_of(ckpt) / "generated" / tag


def parse_classes(text: str | None, num_classes: int) -> Tensor | None:
    if num_classes == 0:
        if text:
            raise ValueError(f"--classes {text}: this checkpoint's generator is unconditional")
        return None
    classes = torch.arange(num_classes) if not text else torch.tensor([int(c) for c in text.split(",")])
    bad = classes[(classes < 0) | (classes >= num_classes)]
    if len(bad):
        raise ValueError(f"--classes: {bad.tolist()} outside [0, {num_classes}) for this checkpoint")
    return classes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint (e.g. <run_dir>/checkpoints/last.ckpt)")
    p.add_argument("--num-samples", type=int, required=True)
    p.add_argument("--classes", help="comma-separated labels, used in turn (default: all classes)")
    p.add_argument("--alpha", type=float, help="guidance strength alpha = w + 1 (guided generators; default 1)")
    p.add_argument("--out", help="output directory (default: <run_dir>/generated/<ckpt>_<ema|raw>_n<N>)")
    ema = p.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="use_ema", action="store_true", default=True, help="EMA weights (default)")
    ema.add_argument("--raw", dest="use_ema", action="store_false", help="raw (non-EMA) weights")
    p.add_argument("--batch-size", type=int, default=500, help="samples per forward pass, per rank")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae", help="SD-VAE directory/file to decode latent samples to images (gwf.data.latents)")
    p.add_argument("--grid-per-class", type=int, default=10)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def make_decoder(vae: str | None, data_shape: tuple[int, ...], device):
    """Latent data (channels other than 1 or 3, e.g. SD-VAE's [4, 32, 32]): the VAE decoder, latents [B, C, h, w]
    -> images [B, 3, H, W] in [-1, 1] (gwf.data.latents.LatentDecoder); None for image or 2D data."""
    if len(data_shape) != 3 or data_shape[0] in (1, 3):
        if vae is not None:
            raise ValueError(f"--vae: this checkpoint's data are not latents (shape {list(data_shape)})")
        return None
    if vae is None:
        print(f"note: the samples are latents {list(data_shape)}; pass --vae PATH to decode them to images "
              "(arr_0, grid.png), e.g. the SD-VAE the latents were made with")
        return None
    from gwf.data.latents import LatentDecoder  # lazy: diffusers is only needed here

    return LatentDecoder(vae, device=device).decode


def run(argv=None) -> Path | None:
    """The command with its result returned (tests, scripts); ``main`` is the console entry point."""
    args = parse_args(argv)
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local_rank}" if args.device == "cuda" else args.device
    rank, world = init_distributed(args.device)
    if device.startswith("cuda"):
        torch.cuda.set_device(device)
    module, cfg = load_module(args.ckpt, device)
    classes = parse_classes(args.classes, module.conditioning.num_classes)
    classes = None if classes is None else classes.to(device)
    alpha = args.alpha
    if alpha is not None and not module.conditioning.guided:
        raise ValueError(f"--alpha {alpha}: this checkpoint's generator is not conditioned on a guidance strength")
    if alpha is None and module.conditioning.guided:
        alpha = 1.0
    decode = make_decoder(args.vae, module.data_shape, device)
    out = Path(args.out) if args.out else default_out(Path(args.ckpt), args.num_samples, args.use_ema, args.alpha)
    parts = RankParts(out, world, args.num_samples)  # --out must be on a filesystem every rank sees
    if rank == 0:
        parts.remove()  # an interrupted earlier run's parts
    if world > 1:
        dist.barrier()
    generate_parts(module, parts, rank, classes, alpha, args.seed, args.use_ema, args.batch_size, decode,
                   progress=not args.quiet)
    if world > 1:
        dist.barrier()  # every part is complete
    if rank != 0:
        dist.barrier()  # wait until rank 0 has merged
        dist.destroy_process_group()
        return None
    idx = torch.arange(args.num_samples)
    labels = index_labels(idx, None if classes is None else classes.cpu())
    parts.merge(out / "samples.npz", {
        "labels": (labels if labels is not None else torch.full_like(idx, -1)).numpy(),
        "alpha": np.full(len(idx), np.nan if alpha is None else alpha, dtype=np.float32)})
    if "arr_0" in parts.names():  # the grid's images alone, read back from the parts
        shown = grid_indices(labels, args.num_samples, args.grid_per_class)
        pictures = torch.from_numpy(to_unit(parts.take("arr_0", shown))).permute(0, 3, 1, 2)
        save_grid(pictures, None if labels is None else labels[shown], out / "grid.png", args.grid_per_class)
    elif module.data_shape == (2,):  # every 2D sample over the data's target points
        target = target_points(cfg, min(max(args.num_samples, 2000), 10_000))
        save_grid(torch.from_numpy(parts.block("x", 0, args.num_samples)), None, out / "grid.png",
                  args.grid_per_class, target)
    parts.remove()
    meta = dict(ckpt=str(args.ckpt), num_samples=len(idx), seed=args.seed, weights="ema" if args.use_ema else "raw",
                classes=None if classes is None else classes.tolist(), alpha=alpha, world_size=world,
                update=int(module.update_count), experiment=cfg.get("name"))
    (out / "sample.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"wrote {len(idx)} samples to {out / 'samples.npz'}")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return out


def main(argv=None) -> None:
    """Console entry. A distributed run ends with ``os._exit``: gloo's worker thread can free the last collective's
    work (holding Python-owned tensors) after the main thread has begun interpreter finalization, and taking the
    GIL then aborts the rank (``terminate called without an active exception``, seen about once in 30 loaded
    2-rank runs; pytorch PR 179291 describes it). Everything is written and closed by then."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    run(argv)
    if distributed:
        exit_now()


def exit_now(code: int = 0) -> None:
    """Flush the logs and streams, then leave without interpreter finalization."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
