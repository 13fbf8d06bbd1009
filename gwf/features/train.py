"""``gwf-train-encoder``: train the small latent MAE (gwf/features/mae.py) on any shard set, for feature-space drift.

    gwf-train-encoder --out runs/mae paths.data_dir=/data          # conf/data/latents.yaml: /data/imagenet256_latents
    gwf-train-encoder --out runs/mae --data digits data.prepare=null data.train_shards='my-{000000..000009}.tar'
    gwf-train -m ... method.features='{name: mae, path: runs/mae/mae.pt}'

The data are a data config's DataModule (``--data NAME`` = conf/data/NAME.yaml, with ``key=value`` overrides): the
generator's own data, so the encoder sees what the generator produces. ``DIR/mae.pt`` is rewritten atomically every
``--save-every`` steps; rerunning the command resumes from it. Defaults: the official recipe, smaller (one device).
"""

from __future__ import annotations

import gwf  # noqa: F401  (first: makes torchvision importable next to a CPU torch)

import argparse
import itertools
import logging
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from gwf.build import conf_dir
from gwf.constants import MAE_CHECKPOINT_FORMAT
from gwf.ema import EMA
from gwf.features.mae import MaskedAutoencoder, export_encoder, load_checkpoint, save_checkpoint
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
    from hydra.utils import instantiate

    datamodule = instantiate(cfg, _convert_="all")
    datamodule.prepare_data()
    datamodule.setup("fit")
    return datamodule


def batches(datamodule, start_step: int):
    """Endless batches x [B, *shape] of the DataModule's training stream; each pass gets its own epoch seed,
    offset by the starting step so that a resumed run does not replay the stream from its beginning."""
    loader = datamodule.train_dataloader()
    for epoch in itertools.count(start_step):
        if hasattr(getattr(loader, "sampler", None), "set_epoch"):
            loader.sampler.set_epoch(epoch)
        for x, _ in loader:
            yield x


def train_encoder(datamodule, out_dir: str | Path, *, steps: int, base_channels: int = 64,
                  layers: Sequence[int] = (2, 2, 2, 2), mask_patch: int = 2,
                  mask_ratio: tuple[float, float] = (0.5, 0.5),
                  optim: OptimConfig = OptimConfig(name="adamw", lr=1e-3, betas=(0.9, 0.95), weight_decay=0.01,
                                                   warmup_steps=1000, grad_clip=1.0),
                  ema_decay: float = 0.9995, seed: int = 0, device: str | torch.device = "cpu", save_every: int = 1000,
                  resume: bool = True, progress: bool = True,
                  export_dtype: torch.dtype = torch.bfloat16) -> dict:  # fmt: skip
    """Train (or resume) the MAE into ``out_dir/mae.pt``; returns the final checkpoint dict (CPU tensors). The mask
    of step n is seeded by (seed, n), so it does not depend on where a run resumed."""
    out = Path(out_dir) / CHECKPOINT_NAME
    shape = tuple(int(s) for s in datamodule.shape)
    if len(shape) != 3:
        raise ValueError(f"the MAE encodes [C, H, W] latents or images; the data have shape {list(shape)}")
    torch.manual_seed(seed)
    model = MaskedAutoencoder(shape[0], base_channels, layers, mask_patch).to(device)
    opt, sched = optim.build(model.parameters(), torch.device(device).type)
    ema = EMA(model, ema_decay)
    step, history = 0, []
    if resume and out.exists():
        state = load_checkpoint(out)
        if state["config"] != model.config or tuple(state["data_shape"]) != shape:
            raise ValueError(f"{out} holds an MAE with config {state['config']} for data {state['data_shape']}, not "
                             f"{model.config} for {list(shape)}; pass another --out or the same settings")
        model.load_state_dict(state["model"])
        ema.model.load_state_dict(state["ema"])
        ema.set_num_updates(state["ema_updates"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, history = int(state["step"]), list(state["history"])
        log.info("resuming the MAE from %s at step %d", out, step)

    def snapshot() -> dict:
        cpu = lambda sd: {k: v.detach().cpu() for k, v in sd.items()}  # noqa: E731
        return {"format": MAE_CHECKPOINT_FORMAT, "config": model.config, "data_shape": list(shape), "step": step,
                "model": cpu(model.state_dict()), "ema": cpu(ema.model.state_dict()),
                "ema_updates": int(ema.num_updates), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "history": history}

    if step >= steps:
        return snapshot()
    model.train()
    stream = batches(datamodule, step)
    bar = tqdm(range(step, steps), initial=step, total=steps, desc="MAE", unit="step", disable=not progress)
    for n in bar:
        x = next(stream).to(device, non_blocking=True)
        mask = model.random_mask(x, *mask_ratio, make_generator(x.device, "mae-mask", seed, n))
        loss = model.loss(x, mask)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite MAE loss at step {n}; lower --lr or check the data. {out} holds "
                                     "the last good state: rerun to resume from it.")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip or float("inf"))
        opt.step()
        sched.step()
        ema.update(model)
        step = n + 1
        history.append((step, loss.item()))
        bar.set_postfix(loss=f"{history[-1][1]:.4f}")
        if step % save_every == 0 or step == steps:
            state = snapshot()
            save_checkpoint(out, state)
            save_checkpoint(out.with_name(ENCODER_NAME), export_encoder(state, export_dtype))
    return snapshot()


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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--no-resume", action="store_true", help="start over even if DIR/mae.pt exists")
    p.add_argument("--export-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="dtype of the encoder export DIR/encoder.pt (bf16 runs compute in bf16)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="data.key=value / paths.key=value overrides of the data config")
    return p.parse_args(argv)


def main(argv=None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.batch_size is not None:
        overrides.append(f"data.batch_size={args.batch_size}")
    datamodule = build_datamodule(data_config(args.data, overrides, args.seed))
    optim = OptimConfig(name="adamw", lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                        warmup_steps=args.warmup_steps, grad_clip=args.grad_clip)
    state = train_encoder(datamodule, args.out, steps=args.steps, base_channels=args.base_channels, layers=args.layers,
                          mask_patch=args.mask_patch, mask_ratio=tuple(args.mask_ratio), optim=optim,
                          ema_decay=args.ema_decay, seed=args.seed, device=args.device, save_every=args.save_every,
                          resume=not args.no_resume, progress=not args.no_progress,
                          export_dtype=getattr(torch, args.export_dtype))
    last = state["history"][-1][1] if state["history"] else float("nan")
    log.info("MAE checkpoint: %s (step %d, last loss %.4f); train with method.features.path=%s (its encoder export)",
             Path(args.out) / CHECKPOINT_NAME, state["step"], last, Path(args.out) / ENCODER_NAME)


if __name__ == "__main__":
    main()
