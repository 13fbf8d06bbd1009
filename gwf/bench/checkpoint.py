"""What one checkpoint of a recipe writes on a cluster, and how long one rank's share takes to save here.

    gwf-bench-checkpoint --recipe imagenet_b2 --ranks 64 [--json] [--dir /shared/scratch] [overrides...]

It builds the recipe's real module (generator, EMA, class bank, JKO copy; the frozen encoder is never saved) at full
size, gives it the optimizer state an update leaves (Adam moments), and writes, as gwf.checkpointing does under DDP
(atomic writes with fsync), rank 0's share of a checkpoint: its per-rank side file and last.ckpt, for both class-bank
persistences (``checkpoint.bank``): ``data`` (every rank saves its bank's samples) and ``replay`` (only counts and
each slot's stream position; a resumed rank pushes that stretch of its stream again). Bytes for R ranks: one main
checkpoint plus R side files. The replay a resume then runs is estimated by pushing uniformly drawn labels until
every class holds a full ring (the data's own labels are what a run replays). With ``--json`` one JSON object: the
keys ``total_gb``, ``per_rank_gb``, ``save_s`` (the recipe's own ``checkpoint.bank``) and ``designs`` (both).
"""

from __future__ import annotations

import gwf  # noqa: F401  (torchvision workaround before anything else)

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

GB = 1e9


def compose(recipe: str, overrides=()):
    from gwf.bench.step import compose as compose_recipe

    return compose_recipe(recipe, overrides)


def build(cfg, persist: str):
    """The recipe's module with ``checkpoint.bank=persist``, full size, without the frozen encoder, with Adam's
    moments as after an update (zeros of the parameters' shapes: the bytes are what matter)."""
    from omegaconf import OmegaConf, open_dict

    from gwf.build import build_module

    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    with open_dict(cfg):
        cfg.checkpoint.bank = persist
    module = build_module(cfg, tuple(cfg.data.shape), int(cfg.data.num_classes), with_encoder=False)
    params = list(module.generator.parameters())
    optimizer = {"state": {i: {"step": torch.tensor(1.0), "exp_avg": torch.zeros_like(p),
                               "exp_avg_sq": torch.zeros_like(p)} for i, p in enumerate(params)},
                 "param_groups": [{"params": list(range(len(params)))}]}
    return module, optimizer


def save_share(module, optimizer, out: Path) -> tuple[int, int, float]:
    """Rank 0's share of a checkpoint (side file, then last.ckpt), written as gwf.checkpointing writes them:
    (side file bytes, main checkpoint bytes, seconds)."""
    from gwf.checkpointing import RANK_STATE_KEY, rank_state_path
    from gwf.data.shards import atomic_write

    side_path, main_path = rank_state_path(out, 0, 1), out / "last.ckpt"
    t0 = time.perf_counter()
    blob = {"rank": 0, "update": 1, "state": module.rank_local_state()}
    atomic_write(lambda f: torch.save(blob, f), side_path)
    checkpoint = {"state_dict": module.state_dict(), "optimizer_states": [optimizer], RANK_STATE_KEY: {"world_size": 2},
                  "hyper_parameters": dict(module.hparams)}
    atomic_write(lambda f: torch.save(checkpoint, f), main_path)
    seconds = time.perf_counter() - t0
    return side_path.stat().st_size, main_path.stat().st_size, seconds


def replay_batches(num_classes: int, capacity: int, batch: int, seed: int = 0, steady: int = 3) -> int:
    """Batches a resumed "replay" bank pushes again in the steady state: labels drawn uniformly, ``batch`` per push;
    after every ring is full, the window from the oldest slot's batch to the last one (the largest of ``steady``
    windows, a few pushes apart)."""
    g = torch.Generator().manual_seed(seed)
    pushed = torch.full((num_classes, capacity), -1, dtype=torch.long)
    count = torch.zeros(num_classes, dtype=torch.long)
    position, windows = 0, []
    while len(windows) < steady:
        position += 1
        labels = torch.randint(num_classes, (batch,), generator=g)
        for c, n in zip(*labels.unique(return_counts=True)):
            slots = (count[c] + torch.arange(int(n))) % capacity
            pushed[c, slots] = position
            count[c] += n
        if bool((count >= capacity).all()) and position % 10 == 0:
            windows.append(position - int(pushed.min()) + 1)
    return max(windows)


def measure(recipe: str, ranks: int, overrides=(), directory: str | None = None) -> dict:
    cfg = compose(recipe, overrides)
    designs = {}
    for persist in ("data", "replay"):
        module, optimizer = build(cfg, persist)
        with tempfile.TemporaryDirectory(prefix="gwf-bench-checkpoint-", dir=directory) as tmp:
            side, main, seconds = save_share(module, optimizer, Path(tmp))
        designs[persist] = {"total_gb": (main + ranks * side) / GB, "per_rank_gb": side / GB,
                            "rank0_gb": (main + side) / GB, "main_gb": main / GB, "save_s": seconds}
        del module, optimizer
    classes, capacity = max(int(cfg.data.num_classes), 1), int(cfg.batch.bank_capacity)
    batch = int(cfg.data.batch_size)
    window = replay_batches(classes, capacity, batch)
    designs["replay"].update(replay_batches=window, replay_samples=window * batch)
    chosen = str(cfg.checkpoint.get("bank", "data"))
    return {"recipe": recipe, "ranks": ranks, "bank": chosen, **{k: designs[chosen][k] for k in
                                                                 ("total_gb", "per_rank_gb", "save_s")},
            "designs": designs, "bank_shape": [classes, capacity, *cfg.data.shape], "data_batch_size": batch}


def report(r: dict) -> str:
    lines = [f"{r['recipe']}, {r['ranks']} ranks: one checkpoint = last.ckpt (rank 0) + a side file per rank; class "
             f"bank {r['bank_shape']} per rank, {r['data_batch_size']} samples pushed per batch",
             "| checkpoint.bank | last.ckpt GB | side file GB per rank | total GB | rank 0's share GB | rank 0's save "
             "s (here) |", "|---|---:|---:|---:|---:|---:|"]
    for name, d in r["designs"].items():
        mark = " (recipe)" if name == r["bank"] else ""
        lines.append(f"| {name}{mark} | {d['main_gb']:.2f} | {d['per_rank_gb']:.3f} | {d['total_gb']:.2f} | "
                     f"{d['rank0_gb']:.2f} | {d['save_s']:.1f} |")
    rp = r["designs"]["replay"]
    lines.append(f"replay on resume: about {rp['replay_batches']:,} batches ({rp['replay_samples']:,} samples) of each "
                 "rank's stream pushed again before the first update (uniform labels, steady state)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gwf-bench-checkpoint", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="imagenet_b2")
    p.add_argument("--ranks", type=int, default=64)
    p.add_argument("--dir", help="where to write the measured share (default: the system's temporary directory)")
    p.add_argument("--json", action="store_true")
    p.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
    args = p.parse_args(argv)
    r = measure(args.recipe, args.ranks, args.overrides, args.dir)
    print(json.dumps(r) if args.json else report(r))


if __name__ == "__main__":
    main()
