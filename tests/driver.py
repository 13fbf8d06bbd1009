"""A training process for the tests that need a real one (DDP ranks started from outside, SIGKILL, signals):

    python -m tests.driver RUN_DIR [--pause-at U] [--record] [--nan-at U R] [OVERRIDES...]

``--pause-at U`` blocks after update U (checkpoint callbacks have run) until RUN_DIR/go exists, after writing
RUN_DIR/paused-rank<r>: the test then kills or signals the process at a known point. ``--record`` writes
RUN_DIR/rank<r>.pt at the end of training: the module state and 8 draws of the rank's generator noise stream.
``--nan-at U R`` makes rank R's generator loss NaN at update U (its first parameter set to NaN).
``--slow-save S`` stalls every checkpoint write S seconds before its rename (after writing RUN_DIR/saving-<n>).
``--ignore-rank-state`` resumes without the per-rank side files (every rank keeps rank 0's buffers from the main
checkpoint, the behaviour before side files existed): the negative control of tests/test_ddp_resume.py."""

import gwf  # noqa: F401  (first: torchvision shim)

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch

from gwf.train import train
from tests.conftest import compose_config


class PauseAt(L.Callback):
    def __init__(self, update: int, run_dir: Path):
        self.update, self.run_dir = update, run_dir

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if int(module.update_count) != self.update:
            return
        (self.run_dir / f"paused-rank{trainer.global_rank}").write_text(str(self.update))
        while not (self.run_dir / "go").exists():
            time.sleep(0.05)


class PoisonAt(L.Callback):
    """Sets this rank's first generator parameter to NaN before update U (only on rank R): one rank's loss becomes
    non-finite while the others' stay finite."""

    def __init__(self, update: int, rank: int):
        self.update, self.rank = update, rank

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if trainer.global_rank == self.rank and module.update == self.update:
            with torch.no_grad():
                next(module.generator.parameters()).fill_(float("nan"))


def slow_saves(run_dir: Path, seconds: float) -> None:
    """Every checkpoint write stalls ``seconds`` after its bytes are written, before the atomic rename, having written
    RUN_DIR/saving-<n> (n = 1, 2, ... writes): the test signals or kills the process in the middle of a save."""
    import gwf.checkpointing as checkpointing

    atomic_write, writes = checkpointing.atomic_write, [0]

    def slow(write, path):
        def stalled(f):
            write(f)
            writes[0] += 1
            (run_dir / f"saving-{writes[0]}").write_text(str(path))
            time.sleep(seconds)
        atomic_write(stalled, path)

    checkpointing.atomic_write = slow


class Record(L.Callback):
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_train_end(self, trainer, module):
        noise = torch.randn(8, generator=module.rng("gen", 0))  # this rank's stream at the final update
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        state["bank.samples"] = module.bank.data.detach().cpu().clone()  # also when checkpoints leave them out
        torch.save({"noise": noise, "state": state, "world_size": trainer.world_size,
                    "rank": trainer.global_rank}, self.run_dir / f"rank{trainer.global_rank}.pt")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run_dir", type=Path)
    p.add_argument("--pause-at", type=int)
    p.add_argument("--record", action="store_true")
    p.add_argument("--ignore-rank-state", action="store_true")
    p.add_argument("--nan-at", type=int, nargs=2, metavar=("UPDATE", "RANK"))
    p.add_argument("--slow-save", type=float, metavar="SECONDS")
    args, overrides = p.parse_known_args()
    args.run_dir.mkdir(parents=True, exist_ok=True)
    callbacks = [PauseAt(args.pause_at, args.run_dir)] if args.pause_at is not None else []
    if args.ignore_rank_state:
        from gwf.checkpointing import CheckpointCadence

        CheckpointCadence.load_rank_state = lambda self, trainer, module, checkpoint: None
    if args.record:
        callbacks.append(Record(args.run_dir))
    if args.nan_at:
        callbacks.append(PoisonAt(*args.nan_at))
    if args.slow_save:
        slow_saves(args.run_dir, args.slow_save)
    summary = train(compose_config(overrides), args.run_dir, extra_callbacks=tuple(callbacks))
    print("SUMMARY " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
