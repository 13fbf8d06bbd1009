"""Checkpoints that survive preemption. What a checkpoint holds, where, and who writes it: docs/resume.md.

- ``CheckpointCadence``: when to save and when to stop early (every N updates, every T minutes, a per-job update
  budget, a stop request), per-rank side files under DDP, and on load: this rank's state and the data position.
- ``Preemption``: stop signals become a stop request; after a clean early stop it hands the job to its one requeue
  owner (slurm/train.sbatch through GWF_REQUEUE_FILE, or the handler submitit installed).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from gwf.constants import RUN_ARCHIVE
from gwf.data.shards import atomic_write, link_or_copy

log = logging.getLogger("gwf")

LAST = "last.ckpt"
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT")
                     if hasattr(signal, name))
REQUEUE_FILE_ENV = "GWF_REQUEUE_FILE"  # set by slurm/train.sbatch: rank 0 touches it to ask for a requeue
RANK_STATE_DIR = "rank_state"  # per-rank side files next to the checkpoints (DDP only)
RANK_STATE_KEY = "gwf_rank_state"  # in the main checkpoint: {"world_size": number of ranks that wrote it}


def rank_state_path(ckpt_dir: Path, rank: int, update: int) -> Path:
    """Side file of ``rank`` for the checkpoint taken after ``update`` updates."""
    return Path(ckpt_dir) / RANK_STATE_DIR / f"rank{rank:05d}-update{update:07d}.pt"


def _update_of(path: Path) -> int:
    """The update number in ``update0000040.ckpt`` or ``rank00001-update0000040.pt``."""
    return int(path.stem.rsplit("update", 1)[1])


def remove_stale_temporaries(ckpt_dir: Path) -> list[Path]:
    """Temporary files left by a process killed while writing (the real checkpoints are intact)."""
    dirs = [d for d in (Path(ckpt_dir), Path(ckpt_dir) / RANK_STATE_DIR) if d.is_dir()]
    stale = sorted(p for d in dirs for p in d.glob(".*.tmp-*"))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch.save checkpoint IO, written through :func:`atomic_write` (the stock one writes in place)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options, got {storage_options!r}")
        atomic_write(lambda f: torch.save(checkpoint, f), Path(path))


def resolve_ckpt_path(ckpt_path, ckpt_dir: Path) -> str | None:
    """``ckpt_path``: "last" = <run_dir>/checkpoints/last.ckpt when it exists (else a fresh start), null = always a
    fresh start, or an explicit file (which must exist)."""
    if ckpt_path in (None, "", "null", False):
        return None
    if ckpt_path == "last":
        last = Path(ckpt_dir) / LAST
        return str(last) if last.exists() else None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist; use ckpt_path=last (resume the run directory's "
                                "last.ckpt if any) or ckpt_path=null (start fresh)")
    return str(ckpt_path)


def archive_previous_run(run_dir: Path) -> Path | None:
    """A fresh start (``ckpt_path=null``) in a run directory that holds an earlier run: its files (checkpoints,
    metrics, evaluations, pictures, wandb files) move to ``run_dir/archive/<n>/`` (n = 1, 2, ...), so that the new
    run's logs do not continue the old ones, and the new run gets its own wandb run (gwf.loggers.wandb_run_id).
    Hydra's files of this launch (``.hydra/``, the job log) stay. Returns the archive, or None when there was
    nothing to move. Called by the launching process only (rank 0 before the other ranks start)."""
    run_dir = Path(run_dir)
    keep = {RUN_ARCHIVE, ".hydra"}
    old = [p for p in run_dir.iterdir() if p.name not in keep and p.suffix != ".log"] if run_dir.is_dir() else []
    if not any(p.name in ("checkpoints", "metrics.csv", "eval.csv") for p in old):
        return None
    n = 1 + max((int(p.name) for p in (run_dir / RUN_ARCHIVE).glob("*") if p.name.isdigit()), default=0)
    target = run_dir / RUN_ARCHIVE / str(n)
    target.mkdir(parents=True)
    for p in old:
        p.rename(target / p.name)
    return target


class Preemption(L.Callback):
    """SIGUSR1, SIGUSR2, SIGTERM and SIGINT (Ctrl-C) become a flag (``requested``): the save happens at an update
    boundary, on every rank alike (CheckpointCadence). A second Ctrl-C stops at once without saving (Lightning's
    KeyboardInterrupt path; last.ckpt keeps the previous save). Installed at train start, after Lightning's signal
    connector recorded the handlers from before fit; the connector puts those back at teardown (also after an
    exception)."""

    def __init__(self, signals=STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: int | None = None

    @property
    def requested(self) -> bool:
        return self.received is not None

    def on_train_start(self, trainer, module) -> None:
        for sig in self.signals:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:  # Ctrl-C twice: stop now
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if self.received is None:
            log.warning("received %s: saving at the end of this update, then stopping%s", signal.Signals(signum).name,
                        " (Ctrl-C again: stop now, without saving)" if signum == signal.SIGINT else "")
        self.received = signum

    def hand_over(self, is_global_zero: bool, stopped_early: bool) -> bool:
        """After fit, on a clean early stop (signal or update budget): ask the requeue owner. sbatch path: rank 0
        touches GWF_REQUEUE_FILE; submitit path: the handler submitit installed (restored by then) runs now and
        requeues. SIGTERM (scancel, preemption) asks for nothing: SLURM requeues preempted jobs itself; nor does
        SIGINT (a user's Ctrl-C). Returns
        whether a requeue was requested."""
        if not stopped_early or self.received in (signal.SIGTERM, signal.SIGINT):
            return False
        requested = False
        requeue_file = os.environ.get(REQUEUE_FILE_ENV)
        if requeue_file and is_global_zero:
            Path(requeue_file).parent.mkdir(parents=True, exist_ok=True)
            Path(requeue_file).touch()
            requested = True
        previous = signal.getsignal(self.received) if self.received is not None else None
        if callable(previous) and previous != self._on_signal:  # submitit's checkpoint_and_try_requeue
            previous(self.received, None)
            requested = True
        return requested


class CheckpointCadence(L.Callback):
    """Writes ``<ckpt_dir>/last.ckpt`` every ``every_n_updates`` updates (also keeping ``keep`` numbered copies
    ``updateXXXXXXX.ckpt``, -1 = all), every ``every_minutes`` minutes, at the end of training, and on an early
    stop: after ``updates_per_job`` updates in this process, or when ``stop_requested()``. The time and stop
    decisions are made on every rank and combined with one all-reduce, so all ranks save and stop together."""

    def __init__(self, ckpt_dir: Path, every_n_updates: int | None = None, every_minutes: float | None = None,
                 updates_per_job: int | None = None, keep: int = 1, stop_requested: Callable[[], bool] = bool):
        for name, value in (("every_n_updates", every_n_updates), ("every_minutes", every_minutes),
                            ("updates_per_job", updates_per_job)):
            if value is not None and not value > 0:
                raise ValueError(f"checkpoint.{name} must be > 0 or null, got {value}")
        self.ckpt_dir = Path(ckpt_dir)
        self.every_n_updates, self.every_minutes, self.updates_per_job = every_n_updates, every_minutes, updates_per_job
        self.keep, self.stop_requested = keep, stop_requested
        self.stopped_early = False
        self._start_update = 0
        self._last_saved_update = -1
        self._last_save_time = time.monotonic()

    # ------------------------------------------------------------------------------------------------ loading
    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        checkpoint[RANK_STATE_KEY] = {"world_size": trainer.world_size}

    def on_load_checkpoint(self, trainer, module, checkpoint) -> None:
        """After the main checkpoint is loaded, before the first batch: this rank's own state, then the data
        module's stream position (gwf.data.stream.SeekableDataModule)."""
        self.load_rank_state(trainer, module, checkpoint)
        position = int(checkpoint["state_dict"].get("data_position", 0))
        seek = getattr(trainer.datamodule, "seek", None)
        if position and seek is None:
            raise TypeError(f"{type(trainer.datamodule).__name__} cannot resume its stream exactly: derive it from "
                            "gwf.data.stream.SeekableDataModule")
        bank = getattr(module, "bank", None)
        start = bank.replay_from() if bank is not None else None
        if start is not None and seek is not None:  # checkpoint.bank=replay: push this rank's stream stretch again
            t0 = time.monotonic()
            n = module.replay_bank(stream_batches(trainer.datamodule, start, position - start), start)
            log.info("rank %d rebuilt its class bank from %d batches of its data stream in %.1f s "
                     "(checkpoint.bank=replay)", trainer.global_rank, n, time.monotonic() - t0)
        if seek is not None:
            seek(position)

    def load_rank_state(self, trainer, module, checkpoint) -> None:
        """This rank's side file for the checkpoint's update, or, for another number of ranks than saved: warn and
        refill the class banks from the streams (not an exact continuation)."""
        saved_world = checkpoint.get(RANK_STATE_KEY, {}).get("world_size")  # None: written before side files
        world = trainer.world_size
        if world == 1 and saved_world in (None, 1):
            return  # single process: the main checkpoint holds this rank's state
        ckpt_path = Path(trainer.ckpt_path)
        if saved_world != world:
            if trainer.is_global_zero:
                written = f"was written by {saved_world} ranks" if saved_world else "does not record its ranks"
                log.warning("%s %s, this run has %d: parameters, optimizers, EMA and the JKO state are restored, but "
                            "the class banks are emptied and refill from each rank's data stream (and buffers such as "
                            "batch-norm statistics are rank 0's), so this is not an exact continuation; resume with "
                            "%s ranks for that", ckpt_path, written, world, saved_world or "the saved number of")
            module.refill_bank()
            return
        update = int(checkpoint["state_dict"]["update_count"])
        # every rank checks every rank's file, so all ranks fail together (no rank left waiting in a collective)
        missing = [str(p) for r in range(world) if not (p := rank_state_path(ckpt_path.parent, r, update)).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{', '.join(missing)} missing: {ckpt_path} was written by {world} ranks and each rank resumes from "
                f"its own side file in {ckpt_path.parent / RANK_STATE_DIR}/. Copy that folder along with the "
                "checkpoint, or resume from a checkpoint whose side files exist "
                "(ckpt_path=<run_dir>/checkpoints/updateXXXXXXX.ckpt)")
        path = rank_state_path(ckpt_path.parent, trainer.global_rank, update)
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if (blob["rank"], blob["update"]) != (trainer.global_rank, update):
            raise ValueError(f"{path} holds rank {blob['rank']} at update {blob['update']}, expected rank "
                             f"{trainer.global_rank} at update {update}; the rank_state folder was mixed up")
        module.load_rank_local_state(blob["state"])

    # ------------------------------------------------------------------------------------------------ cadence
    def on_train_start(self, trainer, module) -> None:
        if trainer.is_global_zero:
            for stale in remove_stale_temporaries(self.ckpt_dir):
                log.info("removed %s, left by a process killed while writing", stale)
        self._start_update = self._last_saved_update = module.update
        self._last_save_time = time.monotonic()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        update = module.update
        if update == self._last_saved_update:  # no update this batch (bank filling) or already saved
            return
        periodic = bool(self.every_n_updates) and update % self.every_n_updates == 0
        budget = bool(self.updates_per_job) and update - self._start_update >= self.updates_per_job
        timed = bool(self.every_minutes) and time.monotonic() - self._last_save_time >= 60.0 * self.every_minutes
        timed, stop = _any_rank(trainer, timed, self.stop_requested() or budget)
        if module.finished:  # on_train_end saves the final state (numbered too when it falls on the period)
            if periodic:
                self.save(trainer, module, numbered=True)
            return
        if periodic or timed or stop:
            self.save(trainer, module, numbered=periodic)
        if stop:
            self.stopped_early = True
            trainer.should_stop = True
            if trainer.is_global_zero:
                why = f"checkpoint.updates_per_job={self.updates_per_job}" if budget else "a signal"
                log.warning("stopped at update %d of %d on %s; relaunch the same command to resume", update,
                            module.schedule.total_updates, why)

    def on_train_end(self, trainer, module) -> None:
        if module.update != self._last_saved_update:
            self.save(trainer, module, numbered=False)

    def save(self, trainer, module, numbered: bool) -> None:
        """last.ckpt on every call (all ranks take part; rank 0 writes), plus a numbered copy when ``numbered``.
        Under DDP each rank first writes its side file; the barrier makes them all exist before last.ckpt moves."""
        update = module.update
        module.raise_if_nonfinite()  # never save a state reached through a non-finite loss
        if trainer.world_size > 1:
            blob = {"rank": trainer.global_rank, "update": update, "state": module.rank_local_state()}
            atomic_write(lambda f: torch.save(blob, f), rank_state_path(self.ckpt_dir, trainer.global_rank, update))
            trainer.strategy.barrier("gwf.rank_state")
        last = self.ckpt_dir / LAST
        trainer.save_checkpoint(last)
        if trainer.is_global_zero:
            if numbered:
                copy = self.ckpt_dir / f"update{update:07d}.ckpt"
                link_or_copy(last, copy)  # a hard link: no second write of the checkpoint, nothing in memory
                self._prune()
            self._prune_rank_state(update)
        self._last_saved_update = update
        self._last_save_time = time.monotonic()

    def _prune(self) -> None:
        if self.keep is None or self.keep < 0:
            return
        numbered = sorted(self.ckpt_dir.glob("update*.ckpt"))
        for old in numbered[: max(len(numbered) - self.keep, 0)]:
            old.unlink(missing_ok=True)

    def _prune_rank_state(self, last_update: int) -> None:
        """Side files of checkpoints that no longer exist (kept: last.ckpt's update and the numbered ones')."""
        kept = {last_update, *(_update_of(p) for p in self.ckpt_dir.glob("update*.ckpt"))}
        for side in (self.ckpt_dir / RANK_STATE_DIR).glob("rank*-update*.pt"):
            if _update_of(side) not in kept:
                side.unlink(missing_ok=True)


def stream_batches(datamodule, start: int, count: int):
    """``count`` batches of a SeekableDataModule's training stream from position ``start`` (batches consumed), as
    the training loop read them, across virtual epochs: each epoch's stretch from a fresh loader sought to it."""
    position, end = start, start + count
    while position < end:
        datamodule.seek(position)
        _, skip = datamodule.replay_point()
        take = min(end - position, datamodule.batches_per_epoch - skip)
        loader = iter(datamodule.train_dataloader())
        for _ in range(take):
            yield next(loader)
        del loader  # its workers stop
        position += take


def _any_rank(trainer, *flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over the ranks (one all-reduce; nothing to do on one process)."""
    if trainer.world_size <= 1:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([float(f) for f in flags], device=trainer.strategy.root_device)
    t = trainer.strategy.reduce(t, reduce_op="max")
    return tuple(bool(v) for v in t.tolist())
