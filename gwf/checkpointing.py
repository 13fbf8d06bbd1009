"""Checkpoints that survive preemption: atomic files, saves every N updates and every T minutes, a per-invocation
update budget (EDM2's "relaunch blindly"), and a clean stop on the signals SLURM and submitit send.

What a checkpoint holds (a resumed run equals the uninterrupted one, tests/test_resume.py): generator, critic,
EMA, the frozen previous generator G_theta_k and the JKO position (``update_count``: outer step and inner index
follow from it), the class bank, optimizers and LR schedules (Lightning), and the data stream position
(``data_position``: batches consumed on this rank). Noise needs no saved RNG state: every draw is seeded by
(seed, rank, update, stream) (gwf/seeding.py). The stream is replayed to its position: the data module starts the
virtual epoch ``position // batches_per_epoch`` again and drops the batches already consumed (exact, and costs at
most one virtual epoch of reading, no training).

Under DDP the main checkpoint (written by rank 0) holds what is replicated: parameters, optimizers, EMA, the JKO
copy. What differs across ranks (every buffer: the class bank filled from the rank's own stream, the stream
position, batch-norm statistics; ``GWFModule.rank_local_state``) goes in one side file per rank and checkpoint,
``<ckpt_dir>/rank_state/rank{r:05d}-update{u:07d}.pt``, written atomically by each rank before rank 0 writes the
main file (a barrier in between: a main checkpoint never refers to missing side files). On resume each rank loads
its own file for the checkpoint's update. Side files are kept for last.ckpt and the kept numbered checkpoints only.
Single-process runs write none (the main checkpoint holds everything). A resume with a different number of ranks
than saved restores everything replicated, warns, and empties the class banks, which refill from each rank's
stream before the next update (not an exact continuation; resume with the saved number of ranks for that).

Who does what on a preemption:
- gwf (this file) turns SIGUSR1, SIGUSR2 and SIGTERM into a flag; at the next update boundary every rank agrees
  (one all-reduce), last.ckpt is written and fit returns. Lightning's own SLURM requeue handler is switched off
  (``SLURMEnvironment(auto_requeue=False)``): it would save from inside the signal handler, in the middle of an
  update, and call collectives from there.
- requeue has exactly one owner per path: in the sbatch path, slurm/train.sbatch (it exports GWF_REQUEUE_FILE;
  rank 0 touches that file when the run stopped early on SIGUSR1 or on ``checkpoint.steps_per_job``, and the script
  runs ``scontrol requeue``); in the Hydra submitit path, submitit (after the clean save, ``hand_over`` calls the
  signal handler submitit had installed, which pickles the job and requeues it). SIGTERM (scancel, preemption)
  saves and stops without asking for a requeue: SLURM requeues preempted ``--requeue`` jobs itself.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from gwf.data.shards import atomic_write  # noqa: F401  (also gwf.checkpointing.atomic_write)

log = logging.getLogger("gwf")

LAST = "last.ckpt"
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2", "SIGTERM") if hasattr(signal, name))
REQUEUE_SIGNALS = tuple(getattr(signal, name) for name in ("SIGUSR1", "SIGUSR2") if hasattr(signal, name))
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


class PreemptibleCheckpoint(L.Callback):
    """Writes ``<ckpt_dir>/last.ckpt`` (atomically, through the trainer's checkpoint IO) every ``every_n_updates``
    updates (also keeping ``keep`` numbered copies ``updateXXXXXXX.ckpt``, -1 = all), every ``every_minutes`` minutes
    of training, at the end of training, and when stopping early: after ``steps_per_job`` updates in this process
    or on a stop signal. Also hands the checkpoint's data position to the data module (``seek``) before the first
    batch is drawn.

    Under DDP every rank calls this at the same update; the time and signal decisions are made on every rank and
    combined with one all-reduce (max), so all ranks save and stop together; only rank 0 writes files."""

    def __init__(self, ckpt_dir: Path, every_n_updates: int | None = None, every_minutes: float | None = None,
                 steps_per_job: int | None = None, keep: int = 1, signals=STOP_SIGNALS):
        for name, value in (("every_n_steps", every_n_updates), ("every_minutes", every_minutes),
                            ("steps_per_job", steps_per_job)):
            if value is not None and not value > 0:
                raise ValueError(f"checkpoint.{name} must be > 0 or null, got {value}")
        self.ckpt_dir = Path(ckpt_dir)
        self.every_n_updates, self.every_minutes, self.steps_per_job = every_n_updates, every_minutes, steps_per_job
        self.keep = keep
        self.signals = tuple(signals)
        self.received: int | None = None  # the stop signal caught, if any
        self.stopped_early = False
        self.requeue_requested = False
        self._previous_handlers: dict = {}  # the handlers before training (submitit's, SIG_DFL, ...)
        self._start_update = 0
        self._last_saved_update = -1
        self._last_save_time = time.monotonic()

    # ------------------------------------------------------------------------------------------------ signals
    def install_signal_handlers(self) -> None:
        """Remember the handlers installed before fit (submitit's) and put ours in place. Called at train start,
        after Lightning registered its own (its SIGTERM handler raises at the next batch without saving)."""
        for sig in self.signals:
            self._previous_handlers.setdefault(sig, signal.getsignal(sig))
            signal.signal(sig, self._on_signal)

    def remember_previous_handlers(self) -> None:
        """Call before ``trainer.fit``: the handlers to hand over to afterwards are the ones from before Lightning."""
        self._previous_handlers = {sig: signal.getsignal(sig) for sig in self.signals}

    def restore_signal_handlers(self) -> None:
        for sig, handler in self._previous_handlers.items():
            if handler is not None:
                signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        if self.received is None:
            log.warning("received %s: saving at the end of this update, then stopping",
                        signal.Signals(signum).name)
        self.received = signum  # only a flag: the save happens at an update boundary, on every rank alike

    def hand_over(self, is_global_zero: bool) -> None:
        """After a clean early stop: ask for a requeue. In the sbatch path (GWF_REQUEUE_FILE set), rank 0 touches
        the file and the script requeues; in the submitit path, the handler submitit had installed for the signal
        runs now (it requeues the job and exits)."""
        self.restore_signal_handlers()
        if not self.stopped_early or self.received == signal.SIGTERM:
            return
        requeue_file = os.environ.get(REQUEUE_FILE_ENV)
        if requeue_file and is_global_zero:
            Path(requeue_file).parent.mkdir(parents=True, exist_ok=True)
            Path(requeue_file).touch()
            self.requeue_requested = True
        previous = self._previous_handlers.get(self.received) if self.received is not None else None
        if callable(previous):  # submitit's checkpoint_and_try_requeue (rank 0 requeues; the others return)
            self.requeue_requested = True
            previous(self.received, None)

    # ------------------------------------------------------------------------------------------------ hooks
    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        checkpoint[RANK_STATE_KEY] = {"world_size": trainer.world_size}

    def on_load_checkpoint(self, trainer, module, checkpoint) -> None:
        """After the main checkpoint is loaded, before the first batch is drawn: each rank restores its own
        rank-local state, then the data module replays this rank's stream up to its position."""
        self.load_rank_state(trainer, module, checkpoint)
        position = int(getattr(module, "data_position", checkpoint["state_dict"].get("data_position", 0)))
        seek = getattr(trainer.datamodule, "seek", None)
        if position and seek is None:
            raise TypeError(f"{type(trainer.datamodule).__name__} has no seek(position): it cannot resume its "
                            "stream exactly; add one (see gwf.data.toy2d.Toy2DDataModule.seek)")
        if seek is not None:
            seek(position)

    def load_rank_state(self, trainer, module, checkpoint) -> None:
        """This rank's side file for the checkpoint's update (same number of ranks as saved), or the documented
        fallback for a different number of ranks: warn and refill the class banks from the streams."""
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
        missing = [rank_state_path(ckpt_path.parent, r, update) for r in range(world)]
        missing = [str(m) for m in missing if not m.is_file()]
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

    def on_train_start(self, trainer, module) -> None:
        if trainer.is_global_zero:
            for stale in remove_stale_temporaries(self.ckpt_dir):
                log.info("removed %s, left by a process killed while writing", stale)
        self._start_update = self._last_saved_update = int(module.update_count)
        self._last_save_time = time.monotonic()
        self.install_signal_handlers()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        update = int(module.update_count)
        if update == self._last_saved_update:  # no update this batch (bank filling) or already saved
            return
        periodic = bool(self.every_n_updates) and update % self.every_n_updates == 0
        budget = bool(self.steps_per_job) and update - self._start_update >= self.steps_per_job
        timed = bool(self.every_minutes) and time.monotonic() - self._last_save_time >= 60.0 * self.every_minutes
        timed, stop = _any_rank(trainer, timed, self.received is not None or budget)
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
                why = "a signal" if self.received is not None else f"checkpoint.steps_per_job={self.steps_per_job}"
                log.warning("stopped at update %d of %d on %s; relaunch the same command to resume", update,
                            module.schedule.total_updates, why)

    def on_train_end(self, trainer, module) -> None:
        if int(module.update_count) != self._last_saved_update:
            self.save(trainer, module, numbered=False)

    def on_exception(self, trainer, module, exception) -> None:
        self.restore_signal_handlers()

    # ------------------------------------------------------------------------------------------------ saving
    def save(self, trainer, module, numbered: bool) -> None:
        """last.ckpt on every call (all ranks take part; rank 0 writes), plus a numbered copy when ``numbered``.
        Under DDP each rank first writes its side file; the barrier makes them all exist before last.ckpt moves."""
        update = int(module.update_count)
        if trainer.world_size > 1:
            blob = {"rank": trainer.global_rank, "update": update, "state": module.rank_local_state()}
            atomic_write(lambda f: torch.save(blob, f), rank_state_path(self.ckpt_dir, trainer.global_rank, update))
            trainer.strategy.barrier("gwf.rank_state")
        last = self.ckpt_dir / LAST
        trainer.save_checkpoint(last)
        if trainer.is_global_zero:
            if numbered:
                copy = self.ckpt_dir / f"update{update:07d}.ckpt"
                atomic_write(lambda f: f.write(last.read_bytes()), copy)
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


def _any_rank(trainer, *flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over the ranks (one all-reduce; nothing to do on one process)."""
    if trainer.world_size <= 1:
        return tuple(bool(f) for f in flags)
    t = torch.tensor([float(f) for f in flags], device=trainer.strategy.root_device)
    t = trainer.strategy.reduce(t, reduce_op="max")
    return tuple(bool(v) for v in t.tolist())

