"""``gwf-train-encoder``: train the small latent MAE (gwf/features/mae.py) on any shard set, for feature-space drift.

    gwf-train-encoder --out runs/mae paths.data_dir=/data          # conf/data/latents.yaml: /data/imagenet256_latents
    gwf-train-encoder --out runs/mae --data digits data.prepare=null data.train_shards='my-{000000..000009}.tar'
    torchrun --nproc_per_node 8 -m gwf.features.train --out runs/mae_latent_640 --base-channels 640 paths.data_dir=/data
    gwf-train -m ... method.features='{name: mae, path: runs/mae/encoder.pt}'

The data are a data config's DataModule (``--data NAME`` = conf/data/NAME.yaml, with ``key=value`` overrides): the
generator's own data, so the encoder sees what the generator produces. ``DIR/mae.pt`` is rewritten atomically every
``--save-every`` steps; rerunning the command resumes from it. Defaults: the official recipe, smaller. Under
torchrun or srun the ranks train one model with DDP (bf16 autocast on GPUs: ``--precision``).

The official recipe's classification fine-tune (configs/mae/latent_640.yaml: finetune_last_steps 3000, warmup_finetune
1000, finetune_cls 0.1; latent_ablation_256.yaml: none) is ``--finetune-last-steps 3000 --warmup-finetune 1000
--finetune-cls 0.1``: a linear classifier on the mean of the last map (the data's classes), and the loss
lambda * cross-entropy + (1 - lambda) * reconstruction with lambda ramped from 0 to finetune_cls over the warm-up of
the last steps (``finetune_weight``).

The official recipe's pixel augmentation path (dataset/dataset.py with ``use_aug: true``: RandomResizedCrop scale
(0.2, 1), bicubic, and a horizontal flip, then the SD-VAE's encoding) is ``--augment pixel``, with ``--vae DIR`` for
the latent MAE: latent shards are decoded to pixels, augmented and encoded again; pixel shards are augmented and
encoded (or, without ``--vae``, augmented and fed to the MAE as pixels). gwf/features/augment.py.
"""

from __future__ import annotations

import gwf  # noqa: F401  (first: makes torchvision importable next to a CPU torch)

import argparse
import itertools
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from gwf.build import conf_dir
from gwf.constants import MAE_CHECKPOINT_FORMAT
from gwf.ema import EMA
from gwf.features.augment import AUGMENTATIONS, CROP_RATIO, CROP_SCALE, FLIP_PROB, PixelAugmentation, PixelPath
from gwf.features.mae import GN_EPS, MaskedAutoencoder, export_encoder, load_checkpoint, mae_config, save_checkpoint
from gwf.module import OptimConfig
from gwf.seeding import make_generator

log = logging.getLogger("gwf")

CHECKPOINT_NAME = "mae.pt"
ENCODER_NAME = "encoder.pt"  # the encoder-only export that training runs load (method.features.path)


def data_config(name: str, overrides: Sequence[str] = (), seed: int = 0) -> DictConfig:
    """The ``data`` node of conf/data/<name>.yaml (or of a .yaml file), resolved against the training config's
    ``paths`` and ``seed``, with ``data.key=value`` / ``paths.key=value`` overrides applied."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else Path(conf_dir()) / "data" / f"{name}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in (Path(conf_dir()) / "data").glob("*.yaml"))
        raise FileNotFoundError(f"no data config {path}; pass --data with one of {options} or a .yaml file")
    data = OmegaConf.load(path)
    data.pop("defaults", None)
    paths = OmegaConf.load(Path(conf_dir()) / "config.yaml").paths
    root = OmegaConf.create({"paths": paths, "seed": seed, "data": data})
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith(("data.", "paths."))]
    if bad:
        raise ValueError(f"overrides must set data.* or paths.* keys (e.g. paths.data_dir=/data or "
                         f"data.train_shards=...), got {bad}")
    root.merge_with_dotlist(list(overrides))
    return root.data


def build_datamodule(cfg: DictConfig):
    """The data config's DataModule, prepared (by rank 0 alone inside a process group, the others waiting) and
    set up."""
    from hydra.utils import instantiate

    datamodule = instantiate(cfg, _convert_="all")
    if not dist.is_initialized() or dist.get_rank() == 0:
        datamodule.prepare_data()  # may write the data (digits) into a folder every rank reads
    if dist.is_initialized():
        dist.barrier()
    datamodule.setup("fit")
    return datamodule


def batches(datamodule, start_step: int):
    """Endless batches (x [B, *shape], labels [B]) of the DataModule's training stream; each pass gets its own epoch
    seed, offset by the starting step so that a resumed run does not replay the stream from its beginning."""
    loader = datamodule.train_dataloader()
    for epoch in itertools.count(start_step):
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        yield from loader


def finetune_weight(step: int, steps: int, last_steps: int, warmup: int, target: float) -> float:
    """lambda_cls of (0-based) step ``step`` of ``steps``: 0, then over the last ``last_steps`` steps
    target * min(1, (step - start) / max(1, warmup)) with start = steps - last_steps (the official train_mae.py's
    ramp: lambda is 0 at the first fine-tune step)."""
    start = steps - last_steps
    if last_steps <= 0 or step < start:
        return 0.0
    return target * min(1.0, (step - start) / max(1, warmup))


def init_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, this rank's device). Several processes started by torchrun (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR/PORT) or by srun (SLURM_PROCID, SLURM_NTASKS, ...: Lightning's SLURMEnvironment finds the main node and
    port) form one process group: nccl on GPUs (one per rank, cuda:LOCAL_RANK), gloo on CPUs."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    step_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1"))  # an srun step's tasks (the batch step has 1)
    if "WORLD_SIZE" not in os.environ and SLURMEnvironment.detect() and step_tasks > 1:
        env = SLURMEnvironment()
        os.environ.update(RANK=str(env.global_rank()), WORLD_SIZE=str(env.world_size()),
                          LOCAL_RANK=str(env.local_rank()), MASTER_ADDR=env.main_address,
                          MASTER_PORT=str(env.main_port))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, device
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


class _MaskedLoss(torch.nn.Module):
    """The MAE's masked loss as a module's forward, so that DDP (which syncs through its wrapper's forward) wraps it."""

    def __init__(self, mae: MaskedAutoencoder):
        super().__init__()
        self.mae = mae

    def forward(self, x, mask, labels, lambda_cls):
        return self.mae.loss(x, mask, labels, lambda_cls)


def train_encoder(datamodule, out_dir: str | Path, *, steps: int, base_channels: int = 64,
                  layers: Sequence[int] = (2, 2, 2, 2), mask_patch: int = 2,
                  mask_ratio: tuple[float, float] = (0.5, 0.5),
                  optim: OptimConfig = OptimConfig(name="adamw", lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01,
                                                   warmup_steps=1000, grad_clip=1.0),
                  ema_decay: float = 0.9995, seed: int = 0, device: str | torch.device = "cpu", save_every: int = 1000,
                  resume: bool = True, progress: bool = True,
                  export_dtype: torch.dtype = torch.bfloat16, precision: str = "32", gn_eps: float = GN_EPS,
                  finetune_last_steps: int = 0, warmup_finetune: int = 1000,
                  finetune_cls: float = 0.1, augment: PixelPath | None = None) -> dict:  # fmt: skip
    """Train (or resume) the MAE into ``out_dir/mae.pt``; returns the final checkpoint dict (CPU tensors). The mask
    of step n is seeded by (seed, n), so it does not depend on where a run resumed. ``precision`` "bf16": the
    forward and backward under bf16 autocast (weights, optimizer and EMA in fp32). Inside a process group
    (init_distributed) the model is wrapped in DDP: every rank draws its own data stream and masks (seeded by its
    rank too), gradients are averaged, the loss is averaged for the log and the non-finite check (all ranks stop
    together), rank 0 writes the files, and the ranks' weights are checked equal at the end.
    ``finetune_last_steps`` > 0: the MAE gets a classifier over ``datamodule.num_classes`` classes, trained with
    weight ``finetune_weight`` in the loss (the official fine-tune). ``augment``: each batch goes through this pixel
    path (gwf/features/augment.py) before the mask, its draws seeded by (seed, step[, rank]); the MAE's input shape
    is the path's output shape."""
    out = Path(out_dir) / CHECKPOINT_NAME
    shape = tuple(int(s) for s in (datamodule.shape if augment is None else augment.shape))
    if len(shape) != 3:
        raise ValueError(f"the MAE encodes [C, H, W] latents or images; the data have shape {list(shape)}")
    if precision not in ("32", "bf16"):
        raise ValueError(f"precision must be 32 or bf16, got {precision!r}")
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    torch.manual_seed(seed)
    num_classes = int(datamodule.num_classes) if finetune_last_steps > 0 else 0
    if finetune_last_steps > 0 and num_classes < 2:
        raise ValueError(f"the classification fine-tune needs labelled data (num_classes >= 2), got {num_classes}")
    model = MaskedAutoencoder(shape[0], base_channels, layers, mask_patch, num_classes, gn_eps).to(device)
    opt, sched = optim.build(model.parameters(), torch.device(device).type)
    ema = EMA(model, ema_decay)
    step, history = 0, []
    if resume and out.exists():
        state = load_checkpoint(out)
        if mae_config(state["config"]) != model.config or tuple(state["data_shape"]) != shape:
            raise ValueError(f"{out} holds an MAE with config {state['config']} for data {state['data_shape']}, not "
                             f"{model.config} for {list(shape)}; pass another --out or the same settings")
        augment_settings = augment.settings() if augment is not None else None
        if state.get("augment") != augment_settings:
            raise ValueError(f"{out} was trained with augmentation {state.get('augment')}, this run asks for "
                             f"{augment_settings}; pass another --out or the same --augment options")
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        ema.set_num_updates(state["ema_updates"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), list(state["history"])
        log.info("resuming the MAE from %s at step %d", out, step)
    if world > 1:  # every rank must have read the same checkpoint (or none): --out on storage every rank sees
        steps_seen = [torch.zeros((), dtype=torch.long, device=device) for _ in range(world)]
        dist.all_gather(steps_seen, torch.tensor(step, device=device))
        if len({int(v) for v in steps_seen}) > 1:
            raise RuntimeError(f"the ranks resume {out} at different steps {[int(v) for v in steps_seen]}: --out must "
                               "be on a filesystem every rank sees, with the same mae.pt")

    def snapshot() -> dict:
        cpu = lambda sd: {k: v.detach().cpu() for k, v in sd.items()}  # noqa: E731
        return {"format": MAE_CHECKPOINT_FORMAT, "config": model.config, "data_shape": list(shape), "step": step,
                "model": cpu(model.state_dict()), "ema": cpu(ema.model.state_dict()),
                "ema_updates": int(ema.num_updates), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "history": history, "augment": augment.settings() if augment is not None else None}

    if step >= steps:
        return snapshot()
    model.train()
    masked_loss = _MaskedLoss(model)
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        masked_loss = DistributedDataParallel(masked_loss, device_ids=[torch.device(device).index]
                                              if torch.device(device).type == "cuda" else None)
    device_type = torch.device(device).type
    stream = batches(datamodule, step)
    bar = tqdm(range(step, steps), initial=step, total=steps, desc="MAE", unit="step",
               disable=not progress or rank != 0)
    for n in bar:
        x, labels = next(stream)
        x, labels = x.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        stream_key = (n,) if world == 1 else (n, rank)  # one process: the masks of earlier versions
        if augment is not None:  # CPU draws (crop boxes, flips, posterior noise): the same on any device
            x = augment(x, make_generator("cpu", "mae-augment", seed, *stream_key))
        mask = model.random_mask(x, *mask_ratio, make_generator(x.device, "mae-mask", seed, *stream_key))
        lambda_cls = finetune_weight(n, steps, finetune_last_steps, warmup_finetune, finetune_cls)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = masked_loss(x, mask, labels, lambda_cls).float()
        shown = loss.detach().clone()
        if world > 1:
            dist.all_reduce(shown)
            shown /= world
        if not torch.isfinite(shown):
            raise FloatingPointError(f"non-finite MAE loss at step {n}; lower --lr or check the data. {out} holds "
                                     "the last good state: rerun to resume from it.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip or float("inf"))
        if not torch.isfinite(norm):  # the same on every rank (gradients averaged): all stop together
            raise FloatingPointError(f"non-finite MAE gradient at step {n} (loss {shown.item():.4g}); lower --lr "
                                     f"or train in fp32 (--precision 32). {out} holds the last good state: rerun "
                                     "to resume from it.")
        opt.step()
        sched.step()
        ema.update(model)
        step = n + 1
        history.append((step, shown.item()))
        bar.set_postfix(loss=f"{history[-1][1]:.4f}")
        if (step % save_every == 0 or step == steps) and rank == 0:
            state = snapshot()
            save_checkpoint(out, state)
            save_checkpoint(out.with_name(ENCODER_NAME), export_encoder(state, export_dtype))
    if world > 1:
        check_ranks_agree(model)
        dist.barrier()  # rank 0's files are written
    return snapshot()


def check_ranks_agree(model: torch.nn.Module) -> None:
    """Raise unless every rank holds the same weights (a sum and a weighted sum of all parameters, gathered)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().double().flatten() for p in model.parameters()])
        probe = torch.stack([flat.sum(), (flat * torch.arange(1, len(flat) + 1, dtype=flat.dtype,
                                                              device=flat.device).remainder_(97)).sum()])
    parts = [torch.empty_like(probe) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, probe)
    if any(not torch.equal(parts[0], p) for p in parts[1:]):
        raise RuntimeError(f"the ranks' MAE weights differ after training ({[p.tolist() for p in parts]})")
    if dist.get_rank() == 0:
        log.info("the %d ranks hold identical weights", dist.get_world_size())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gwf-train-encoder", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output directory: DIR/mae.pt (resumed when present)")
    p.add_argument("--data", default="latents", help="data config: conf/data/<NAME>.yaml or a .yaml file")
    p.add_argument("--steps", type=int, default=30_000, help="total optimizer steps")
    p.add_argument("--batch-size", type=int, default=None, help="sets data.batch_size")
    p.add_argument("--base-channels", type=int, default=64, help="width of the first stage (doubles per stage)")
    p.add_argument("--layers", type=int, nargs="+", default=[2, 2, 2, 2], help="blocks per stage")
    p.add_argument("--mask-patch", type=int, default=2, help="side of the masked latent patches")
    p.add_argument("--mask-ratio", type=float, nargs=2, default=[0.5, 0.5], metavar=("MIN", "MAX"),
                   help="fraction of masked patches, drawn per sample on [MIN, MAX]")
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW (0.9, 0.95) learning rate after warm-up")
    p.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    p.add_argument("--warmup-steps", type=int, default=1000, help="linear warm-up, then constant")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clipping")
    p.add_argument("--ema-decay", type=float, default=0.9995, help="EMA of the weights (the features use it)")
    p.add_argument("--seed", type=int, default=0, help="initialization, masks and data stream")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (under torchrun or srun: cuda = this rank's GPU)")
    p.add_argument("--precision", default="auto", choices=["auto", "32", "bf16"],
                   help="bf16: forward and backward under bf16 autocast; auto = bf16 on CUDA, 32 elsewhere")
    p.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--no-resume", action="store_true", help="start over even if DIR/mae.pt exists")
    p.add_argument("--export-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="dtype of the encoder export DIR/encoder.pt (bf16 runs compute in bf16)")
    p.add_argument("--gn-eps", type=float, default=GN_EPS, help="GroupNorm epsilon (the official MAEs': flax's 1e-6)")
    p.add_argument("--finetune-last-steps", type=int, default=0,
                   help="classification fine-tune over the last N steps (official MAE-640: 3000; 0: none)")
    p.add_argument("--warmup-finetune", type=int, default=1000, help="steps of the fine-tune weight's linear ramp")
    p.add_argument("--finetune-cls", type=float, default=0.1,
                   help="weight of the cross-entropy at the end of the ramp (the reconstruction gets 1 - it)")
    p.add_argument("--augment", default="none", choices=AUGMENTATIONS,
                   help="pixel: the official MAE recipe's pixel augmentation (random resized crop, flip; then --vae's "
                        "encoding); latent data are decoded by --vae first")
    p.add_argument("--vae", default=None,
                   help="SD-VAE folder (diffusers) for --augment pixel: decodes latent data, encodes the augmented "
                        "pixels (the latent MAE); unset: pixel data train a pixel MAE")
    p.add_argument("--vae-subfolder", default=None, help="the VAE's subfolder (vae for a Stable Diffusion folder)")
    p.add_argument("--vae-batch-size", type=int, default=64, help="images per VAE decode / encode call")
    p.add_argument("--crop-scale", type=float, nargs=2, default=list(CROP_SCALE), metavar=("MIN", "MAX"),
                   help="area fraction of the random resized crop")
    p.add_argument("--crop-ratio", type=float, nargs=2, default=list(CROP_RATIO), metavar=("MIN", "MAX"),
                   help="aspect ratio range of the random resized crop")
    p.add_argument("--crop-size", type=int, default=None, help="side of the resized crop in pixels (unset: the "
                                                                  "data's, decoded latents' for latent data)")
    p.add_argument("--flip-prob", type=float, default=FLIP_PROB, help="probability of the horizontal flip")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="data.key=value / paths.key=value overrides of the data config")
    return p.parse_args(argv)


def pixel_path(args: argparse.Namespace, data_shape, device: str) -> PixelPath | None:
    """The --augment pixel path of the parsed options (None for --augment none); the VAE loaded onto ``device``."""
    aug_options = ("--vae", args.vae), ("--vae-subfolder", args.vae_subfolder), ("--crop-size", args.crop_size)
    if args.augment == "none":
        given = [name for name, value in aug_options if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)} only apply with --augment pixel")
        return None
    augmentation = PixelAugmentation(tuple(args.crop_scale), tuple(args.crop_ratio), args.flip_prob, args.crop_size)
    vae = None
    if args.vae is not None:
        from gwf.data.latents import load_vae

        vae = load_vae(args.vae, args.vae_subfolder).to(device).requires_grad_(False)
    elif int(data_shape[0]) != 3 and int(data_shape[0]) != 1:
        raise ValueError(f"--augment pixel augments images; the data have {int(data_shape[0])} channels (latents?): "
                         "pass --vae /path/sd-vae-ft-mse to decode them to pixels and encode the crops again")
    return PixelPath(augmentation, data_shape, vae, vae_batch_size=args.vae_batch_size)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.batch_size is not None:
        overrides.append(f"data.batch_size={args.batch_size}")
    rank, world, device = init_distributed(args.device)  # before the data: each rank gets its own stream
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    precision = args.precision if args.precision != "auto" else "bf16" if device.startswith("cuda") else "32"
    datamodule = build_datamodule(data_config(args.data, overrides, args.seed))
    augment = pixel_path(args, datamodule.shape, device)
    optim = OptimConfig(name="adamw", lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                        warmup_steps=args.warmup_steps, grad_clip=args.grad_clip)
    state = train_encoder(datamodule, args.out, steps=args.steps, base_channels=args.base_channels, layers=args.layers,
                          mask_patch=args.mask_patch, mask_ratio=tuple(args.mask_ratio), optim=optim,
                          ema_decay=args.ema_decay, seed=args.seed, device=device, save_every=args.save_every,
                          resume=not args.no_resume, progress=not args.no_progress,
                          export_dtype=getattr(torch, args.export_dtype), precision=precision, gn_eps=args.gn_eps,
                          finetune_last_steps=args.finetune_last_steps, warmup_finetune=args.warmup_finetune,
                          finetune_cls=args.finetune_cls, augment=augment)
    last = state["history"][-1][1] if state["history"] else float("nan")
    if world > 1:
        dist.destroy_process_group()
    log.info("MAE checkpoint: %s (step %d, last loss %.4f); train with method.features.path=%s (its encoder export)",
             Path(args.out) / CHECKPOINT_NAME, state["step"], last, Path(args.out) / ENCODER_NAME)


if __name__ == "__main__":
    main()
