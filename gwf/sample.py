"""``gwf-sample``: N samples from a checkpoint (EMA generator by default) as ``samples.npz`` and a PNG grid.

    gwf-sample --ckpt runs/digits_wflow/default/checkpoints/last.ckpt --num-samples 1000 --classes 0,3,7 --alpha 2
    torchrun --nproc_per_node 8 -m gwf.sample --ckpt last.ckpt --num-samples 50000 --vae sd-vae-ft-ema   # sharded

Sample i uses noise seeded by (seed, i) and label classes[i % len(classes)]: the samples do not depend on the number
of ranks. samples.npz: x float32 [N, *data shape], labels int64 [N] (-1: unconditional), alpha float32 [N] (nan: not
guided), arr_0 uint8 [N, H, W, C] for images (ADM's layout); grid.png (a row per class); sample.json.
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


def index_inputs(module, indices: Tensor, noise_shape: tuple[int, ...], seed: int) -> Tensor:
    """Generator inputs [n, *noise_shape], input i drawn from its own generator seeded by (seed, i)."""
    return torch.cat([module.draw_inputs(1, noise_shape, make_generator(module.device, "gwf-sample", seed, int(i)))
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
        z = index_inputs(module, chunk, model.noise_shape, seed)
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


def gather_to_rank0(tensors: dict[str, Tensor], device) -> dict[str, Tensor] | None:
    """all_gather of equally shaped per-rank tensors; rank 0 gets them concatenated in rank order, others None."""
    out = {}
    for key, t in tensors.items():
        t = t.to(device).contiguous()
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        out[key] = torch.cat(parts).cpu()
    return out if dist.get_rank() == 0 else None


def sharded_generate(module, num_samples: int, classes, alpha, seed, use_ema, batch_size, decode=None,
                     progress: bool = False):
    """All ranks generate their strided share batch by batch; rank 0 returns (indices, x, images) sorted by index,
    the others (None, None, None). ``decode`` maps a batch of x to images in [-1, 1] (latents) or is None."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    mine = torch.arange(rank, num_samples, world)
    per_rank = -(-num_samples // world)  # every rank runs the same number of gathers
    kept = {"idx": [], "x": [], "img": []}
    bar = tqdm(total=num_samples, unit="sample", desc="gwf-sample", disable=not progress or rank != 0)
    for start in range(0, per_rank, batch_size):
        chunk = mine[start: start + batch_size]
        x, _ = generate(module, chunk, classes, alpha, seed, use_ema, batch_size)
        img = decode(x) if decode is not None else None
        bar.update(min(num_samples, (start + batch_size) * world) - bar.n)  # this round, all ranks together
        if world > 1:  # pad to the common batch shape; index -1 marks padding
            n_pad = min(batch_size, per_rank - start) - len(chunk)
            chunk = torch.cat([chunk, torch.full((n_pad,), -1, dtype=torch.long)])
            x = torch.cat([x, x.new_zeros(n_pad, *x.shape[1:])])
            img = None if img is None else torch.cat([img, img.new_zeros(n_pad, *img.shape[1:])])
            parts = {"idx": chunk, "x": x, **({"img": img} if img is not None else {})}
            gathered = gather_to_rank0(parts, module.device)
            if gathered is None:
                continue
            chunk, x, img = gathered["idx"], gathered["x"], gathered.get("img")
        kept["idx"].append(chunk)
        kept["x"].append(x)
        if img is not None:
            kept["img"].append(img)
    bar.close()
    if rank != 0:
        return None, None, None
    idx = torch.cat(kept["idx"])
    order = idx.argsort()
    order = order[idx[order] >= 0]  # drop padding
    images = torch.cat(kept["img"])[order] if kept["img"] else None
    return idx[order], torch.cat(kept["x"])[order], images


# ---------------------------------------------------------------------------------------------- outputs
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
    idx, x, images = sharded_generate(module, args.num_samples, classes, alpha, args.seed, args.use_ema,
                                      args.batch_size, decode, progress=not args.quiet)
    if rank != 0:
        dist.barrier()  # wait until rank 0 has written
        dist.destroy_process_group()
        return None
    out = Path(args.out) if args.out else default_out(Path(args.ckpt), args.num_samples, args.use_ema, args.alpha)
    out.mkdir(parents=True, exist_ok=True)
    labels = index_labels(idx, None if classes is None else classes.cpu())
    arrays = {"x": x.numpy().astype(np.float32),
              "labels": (labels if labels is not None else torch.full_like(idx, -1)).numpy(),
              "alpha": np.full(len(idx), np.nan if alpha is None else alpha, dtype=np.float32)}
    pictures = images if images is not None else (x if x.ndim == 4 and x.shape[1] in (1, 3) else None)
    if pictures is not None:
        arrays["arr_0"] = to_uint8_nhwc(pictures)
    np.savez(out / "samples.npz", **arrays)
    if pictures is not None or x.ndim == 2:
        target = target_points(cfg, min(max(len(x), 2000), 10_000)) if x.ndim == 2 else None
        save_grid(pictures if pictures is not None else x, labels, out / "grid.png", args.grid_per_class, target)
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
