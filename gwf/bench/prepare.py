"""Benchmark of the data path: gwf-prepare throughput, and the latent loader against what training consumes.

    gwf-bench-prepare                    # full table
    gwf-bench-prepare --quick            # smoke test
    gwf-bench-prepare --device cuda      # VAE encoding and the training step on the GPU

The loader must deliver at least ``REQUIRED_RATIO`` times what a tiny W-Flow training step consumes.
"""

from __future__ import annotations

import gwf  # noqa: F401  (torchvision workaround before anything else)

import argparse
import itertools
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gwf.constants import SD_VAE_LATENT_SHAPE, SD_VAE_RESOLUTION
from gwf.data.latents import random_vae
from gwf.data.shards import write_shards

REQUIRED_RATIO = 10.0  # loader throughput / training consumption


def make_images(folder: Path, n: int, size=(500, 375), classes: int = 4, seed: int = 0) -> Path:
    """``n`` smooth RGB PNGs of ``size`` in ``classes`` subfolders: upsampled low-resolution noise plus grain."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        (folder / f"c{i % classes}").mkdir(parents=True, exist_ok=True)
        low = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize(size, Image.BICUBIC)
        grain = rng.integers(-8, 9, (*size[::-1], 3))
        image = np.clip(np.asarray(low, int) + grain, 0, 255).astype(np.uint8)
        Image.fromarray(image).save(folder / f"c{i % classes}" / f"{i}.png")
    return folder


def bench_prepare_images(tmp: Path, n: int) -> float:
    from gwf.prepare import prepare_images

    src = make_images(tmp / "images_src", n)
    t0 = time.perf_counter()
    prepare_images(src, tmp / "images_out", size=32, samples_per_shard=max(n // 4, 1))
    return n / (time.perf_counter() - t0)


def bench_prepare_latents(tmp: Path, n: int, vae: str | None, device: str, batch_size: int) -> float:
    from gwf.prepare import prepare_latents

    src = make_images(tmp / "latents_src", n, seed=1)
    if vae is None:
        vae = str(tmp / "sd_vae_random")
        random_vae().save_pretrained(vae)  # the SD-VAE architecture (~84M parameters), random weights
    t0 = time.perf_counter()
    prepare_latents(src, tmp / "latents_out", vae, resolution=SD_VAE_RESOLUTION, batch_size=batch_size,
                    samples_per_shard=n, device=device, workers=1)  # fmt: skip
    return n / (time.perf_counter() - t0)


def bench_loader(tmp: Path, n: int, batch_size: int, workers: int, batches: int) -> float:
    """Latents/s delivered by ShardDataModule (transform latent_moments) after a warm-up pass."""
    from gwf.data import ShardDataModule

    rng = np.random.default_rng(0)
    moments = rng.standard_normal((64, 2, 2, *SD_VAE_LATENT_SHAPE)).astype(np.float16)
    moments[:, :, 1] = np.abs(moments[:, :, 1]) * 0.1  # std > 0
    samples = ((f"s{i:07d}", moments[i % 64], i % 10) for i in range(n))
    shards = write_shards(samples, tmp / "loader", "train", max(n // 8, 1), total=n)
    dm = ShardDataModule([str(p) for p in shards], None, shape=SD_VAE_LATENT_SHAPE, num_classes=10, dtype="float16",
                         transform="latent_moments", batch_size=batch_size, num_workers=workers,
                         epoch_size=batches * batch_size, shuffle_buffer=1000)  # fmt: skip
    dm.setup()
    loader = dm.train_dataloader()
    for _ in loader:  # warm-up pass: worker start, page cache
        pass
    t0 = time.perf_counter()
    count = sum(len(x) for x, _ in loader)
    return count / (time.perf_counter() - t0)


TINY_RUN = ["model.patch=4", "batch.labels_per_update=4", "batch.gen_per_label=32", "batch.pos_per_label=32",
            "batch.uncond_per_update=32", "batch.bank_capacity=64"]  # a tiny W-Flow run: 64 tokens, 4 labels x 32


def bench_step(model: str, batch_size: int, steps: int, device: str, overrides: list[str]) -> float:
    """Seconds per W-Flow update on 4x32x32 latents (median after the class bank is full and 2 warm-up updates)."""
    import lightning as L
    from hydra import compose, initialize_config_dir

    from gwf.build import build_module, conf_dir

    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"model={model}", f"data.batch_size={batch_size}", *overrides])
    module = build_module(cfg, SD_VAE_LATENT_SHAPE, num_classes=10)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(batch_size, *SD_VAE_LATENT_SHAPE, generator=g) * 0.9, torch.arange(batch_size) % 10)
    stamps: list[float] = []

    class Stamp(L.Callback):
        def on_train_batch_end(self, trainer, *args):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            stamps.append((trainer.global_step, time.perf_counter()))

    trainer = L.Trainer(accelerator="gpu" if device.startswith("cuda") else "cpu", devices=1, max_steps=steps + 2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Stamp()])  # fmt: skip
    trainer.fit(module, itertools.repeat(batch))
    updates = [(s, t) for s, t in stamps if s > 0]
    times = np.diff([t for _, t in updates])[2:]  # drop the first updates (warm-up)
    return float(np.median(times))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gwf-bench-prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--device", default="cpu", help="cpu or cuda: VAE encoding and the training step")
    p.add_argument("--vae", default=None, help="a real SD-VAE folder (default: random SD-VAE architecture)")
    p.add_argument("--images", type=int, default=256, help="images for the pixel prepare row")
    p.add_argument("--latent-images", type=int, default=4, help="images for the latent prepare row (~20 s each on CPU)")
    p.add_argument("--vae-batch-size", type=int, default=8)
    p.add_argument("--loader-samples", type=int, default=8192)
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=256, help="loader batch = latents consumed per update")
    p.add_argument("--model", default="dit_tiny", help="generator of the tiny W-Flow run")
    p.add_argument("--steps", type=int, default=8, help="timed training updates")
    p.add_argument("--run", nargs="*", default=TINY_RUN, help="config overrides of the tiny W-Flow run")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.latent_images, args.loader_samples, args.steps = 32, 1, 2048, 4

    rows = []

    def row(name: str, value: str) -> None:
        rows.append((name, value))
        print(f"{name}: {value}", flush=True)

    with tempfile.TemporaryDirectory(prefix="gwf-bench-prepare-") as tmp:
        tmp = Path(tmp)
        pixels = bench_prepare_images(tmp, args.images)
        row("prepare images: 500x375 PNG -> 3x32x32 fp16 shards", f"{pixels:.1f} images/s")
        lat = bench_prepare_latents(tmp, args.latent_images, args.vae, args.device, args.vae_batch_size)
        row(f"prepare latents: 500x375 PNG -> SD-VAE moments at 256 (+ flip, {args.device})", f"{lat:.3f} images/s")
        n_batches = max(args.loader_samples // args.batch_size, 1)
        loader = bench_loader(tmp, args.loader_samples, args.batch_size, args.loader_workers, n_batches)
    row(f"loader: 4x32x32 latents, batch {args.batch_size}, {args.loader_workers} workers", f"{loader:.0f} latents/s")
    step_s = bench_step(args.model, args.batch_size, args.steps, args.device, args.run)
    consumed = args.batch_size / step_s
    print(f"tiny W-Flow run: model={args.model} data.batch_size={args.batch_size} {' '.join(args.run)}")
    row(f"training step: tiny W-Flow ({args.model}), {args.device}",
        f"{step_s:.2f} s/update = {consumed:.0f} latents/s")
    ratio = loader / consumed
    verdict = "OK" if ratio >= REQUIRED_RATIO else f"TOO SLOW (needs >= {REQUIRED_RATIO:g}x)"
    row("loader / training consumption", f"{ratio:.0f}x  {verdict}")
    width = max(len(r[0]) for r in rows)
    print(f"\n| {'measurement'.ljust(width)} | value |\n|{'-' * (width + 2)}|---:|")
    for name, value in rows:
        print(f"| {name.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
