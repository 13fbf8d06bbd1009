"""``gwf-train`` / ``python -m gwf.train``: the Hydra entry point. Run directories are deterministic
(``runs/<name>/<run_id or overrides>``), so a relaunched command finds its ``checkpoints/last.ckpt`` and resumes
exactly (docs/resume.md)."""

from __future__ import annotations

import gwf  # noqa: F401  (first: makes torchvision importable next to a CPU torch)

import contextlib
import gc
import json
import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from gwf import launch
from gwf.config import conf_dir, refuse_owned, refuse_renamed, refuse_set_keys
from gwf.schedule import JKOSchedule

# Torch, Lightning and the model code are imported inside train(): `gwf-train --help` and the relaunch of a finished
# run need none of them (3.6 s of imports).
log = logging.getLogger("gwf")
# At import, not in main(): Hydra's launchers resolve the run directory in worker processes that import this module
# to unpickle the task function, before calling it.
launch.register_resolvers()


def train(cfg: DictConfig, run_dir: Path, extra_callbacks: tuple = ()) -> dict:
    """Train from a composed config into ``run_dir`` (resuming from its last.ckpt with ``ckpt_path: last``).
    Returns the evaluation summary (first and last) and ``finished``: False when the run stopped early (a signal
    or ``checkpoint.updates_per_job``) and the same command must be run again to continue."""
    refuse_set_keys(OmegaConf.to_container(cfg))
    done = finished_summary(cfg, run_dir)
    if done is not None:
        log.info("run directory: %s", run_dir)
        log.info("this run is complete (%d updates); evaluation (first -> last): %s", done["total_updates"],
                 json.dumps(done["summary"]))
        return done["summary"]
    with imports_without_gc():
        import lightning as L
        import torch
        from hydra.utils import instantiate
        from tqdm.contrib.logging import logging_redirect_tqdm

        from gwf import build
        from gwf.checkpointing import archive_previous_run, resolve_ckpt_path

    launch.quiet_known_warnings()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "checkpoints" / FINISHED).unlink(missing_ok=True)  # written again when this launch completes
    if cfg.get("ckpt_path", "last") in (None, "", "null") and launch.is_launching_process():
        archived = archive_previous_run(run_dir)
        if archived is not None:
            log.info("ckpt_path=null: a fresh start; the earlier run's files moved to %s", archived)
    threads, why = launch.choose_threads(cfg.get("threads"), int(cfg.data.get("num_workers", 0) or 0),
                                         local_ranks(cfg))
    if threads is not None:
        torch.set_num_threads(threads)
        os.environ[launch.THREADS_ENV] = str(threads)  # the ranks Lightning starts from here inherit the choice
        log.info("torch threads: %d (%s)", threads, why)
    with launch.one_job():
        L.seed_everything(cfg.seed, workers=True)  # weight init; training noise is seeded per (seed, rank, update)
        datamodule = build.build_datamodule(cfg)
        cadence, preemption, evaluation = build.build_callbacks(cfg, run_dir)
        configured = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]  # the callbacks group
        callbacks = [cadence, preemption, evaluation, *configured, *extra_callbacks]
        trainer = build.build_trainer(cfg, run_dir, callbacks, build.build_loggers(cfg, run_dir))
        if trainer.is_global_zero:  # only rank 0 writes files (checkpoints, logs, figures, the config)
            (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        module = build.build_module(cfg, datamodule.shape, datamodule.num_classes, world_size=trainer.world_size)
        ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path", "last"), run_dir / "checkpoints")
        if trainer.is_global_zero:
            log.info("run directory: %s", run_dir)
            if ckpt_path:
                log.info("resuming from %s", ckpt_path)
        with logging_redirect_tqdm(loggers=[logging.root]):  # log lines above the progress bar, not through it
            trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        summary_file = run_dir / "eval_summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
        summary["finished"] = module.finished
        if trainer.is_global_zero:
            log.info("run directory: %s", run_dir)
            log.info("evaluation (first -> last): %s", json.dumps(summary))
            if module.finished:
                mark_finished(run_dir, module.schedule.total_updates, summary)
    preemption.hand_over(trainer.is_global_zero, cadence.stopped_early)  # after a clean early stop: the requeue
    return summary


@contextlib.contextmanager
def imports_without_gc():
    """The garbage collector off while torch, Lightning and the model code are imported: their millions of module
    objects would set off collections that find nothing to free (0.3 s of the 3.8 s of imports on one thread).
    After, the objects made so far are frozen (the interpreter's later collections skip them) and it is on again.
    Only the first time in a process (Lightning not yet imported): a later call, e.g. the next job of an in-process
    sweep or test, would freeze the earlier run's uncollected garbage for good."""
    if "lightning" in sys.modules:
        yield
        return
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


FINISHED = "finished.json"  # in checkpoints/: the run completed, with the last.ckpt it ended with


def mark_finished(run_dir: Path, total_updates: int, summary: dict) -> None:
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        record = {"total_updates": total_updates, "last_ckpt_mtime_ns": last.stat().st_mtime_ns, "summary": summary}
        (run_dir / "checkpoints" / FINISHED).write_text(json.dumps(record, indent=1) + "\n")


def finished_summary(cfg: DictConfig, run_dir: Path) -> dict | None:
    """The record of a run that already completed this config's schedule from ``checkpoints/last.ckpt`` (unchanged
    since), when the config resumes (ckpt_path=last): relaunching it returns at once. None otherwise (a longer
    schedule, a fresh start, another checkpoint, or no record)."""
    if cfg.get("ckpt_path", "last") != "last":
        return None
    marker, last = run_dir / "checkpoints" / FINISHED, run_dir / "checkpoints" / "last.ckpt"
    try:
        record = json.loads(marker.read_text())
        total = JKOSchedule.from_config(cfg.jko).total_updates
        if record["total_updates"] == total and record["last_ckpt_mtime_ns"] == last.stat().st_mtime_ns:
            return record
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def local_ranks(cfg: DictConfig) -> int:
    """Processes of this run on this node: a launcher's count (torchrun, SLURM tasks) or the Trainer's devices."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    devices = cfg.trainer.get("devices", 1)
    return devices if isinstance(devices, int) and devices > 0 else 1


@hydra.main(version_base="1.3", config_path=conf_dir(), config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    if launch.SweepJobs.owns(int(hydra_cfg.job.get("num", 0) or 0), hydra_cfg.mode == RunMode.MULTIRUN):
        train(cfg, Path(hydra_cfg.runtime.output_dir))


def cli() -> None:
    """The console script: renamed keys (Hydra would only say "not in struct") and the Trainer arguments gwf sets are
    refused before Hydra composes and makes the run directory."""
    keys = [arg.lstrip("+~").split("=", 1)[0] for arg in sys.argv[1:] if "=" in arg]
    try:
        refuse_renamed(keys)
        refuse_owned(keys)
    except ValueError as e:
        sys.exit(f"gwf-train: {e}")
    main()
    # The process exits next: its last garbage collection would walk the millions of objects torch and lightning
    # made at import (0.8 s of a 2D run on one thread); frozen, they are simply freed.
    gc.freeze()


if __name__ == "__main__":
    # `python -m gwf.train`: call the function of the importable module gwf.train, not of __main__. Process-pool
    # launchers (hydra/launcher=joblib) pickle the task function; one defined in __main__ travels by value and its
    # worker imports lightning before gwf (see gwf/_compat.py), which fails next to a CPU torch.
    from gwf.train import cli as _cli

    _cli()
