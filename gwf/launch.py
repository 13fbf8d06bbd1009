"""How a training process is launched: Hydra resolvers for run directories and SLURM, and the workarounds that
Hydra sweeps and Lightning's own DDP launcher need (docs/clusters.md). Nothing here runs at import."""

from __future__ import annotations

import logging
import math
import os
import re
import time
import warnings
from contextlib import contextmanager

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

# Variables Lightning's launcher writes into its own process's environment when it starts the other ranks.
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
SWEEP_JOB_ENV = "GWF_SWEEP_JOB"  # the Hydra sweep job a process runs, inherited by the DDP ranks it starts


def run_name(run_id, override_dirname: str) -> str:
    """Run sub-directory: the explicit run id, else the command-line overrides, else "default". Never a time."""
    if run_id not in (None, "", "null"):
        return str(run_id)
    name = re.sub(r"[^A-Za-z0-9_.,=+-]", "_", override_dirname or "")
    return name or "default"


def slurm_tasks_per_node(value: str | None = None) -> int:
    """Tasks per node of the SLURM allocation (``SLURM_NTASKS_PER_NODE``, e.g. "4" or "4(x2)"); 1 outside SLURM."""
    value = os.environ.get("SLURM_NTASKS_PER_NODE", "1") if value in (None, "") else value
    return int(str(value).split("(")[0].split(",")[0])


def register_resolvers() -> None:
    """The ``gwf_*`` resolvers the configs use (run directories, SLURM task counts); idempotent."""
    for name, fn in (("gwf_run_name", run_name), ("gwf_slurm_tasks_per_node", slurm_tasks_per_node)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


THREADS_ENV = "GWF_THREADS"  # the thread count the launching process chose, inherited by the ranks it starts


def is_launching_process() -> bool:
    """This process is the one the user started: not a rank that Lightning, torchrun or SLURM started beside it
    (global rank 0, or no launcher)."""
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(var, "0") not in ("", "0"):
            return False
    return True


def allowed_cores() -> list[int]:
    """The CPUs this process may run on (its affinity: a SLURM allocation, taskset), else all of them."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def busy_cores(cores: list[int], window_s: float = 0.25) -> float | None:
    """Cores of ``cores`` kept busy by other processes: the non-idle share of each, summed, over ``window_s`` (Linux
    /proc/stat; this process sleeps meanwhile). None where it cannot be read."""
    def ticks():
        out = {}
        with open("/proc/stat") as fh:
            for line in fh:
                name, *vals = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cores:
                    v = [int(x) for x in vals[:8]]  # user nice system idle iowait irq softirq steal
                    out[name] = (v[3] + v[4], sum(v))
        return out

    try:
        before = ticks()
        time.sleep(window_s)
        after = ticks()
    except (OSError, ValueError, IndexError):
        return None
    busy = 0.0
    for name, (idle1, total1) in after.items():
        idle0, total0 = before.get(name, (idle1, total1))
        if total1 > total0:
            busy += 1.0 - (idle1 - idle0) / (total1 - total0)
    return busy if after else None


def choose_threads(setting, data_workers: int = 0, local_ranks: int = 1) -> tuple[int | None, str]:
    """(torch intra-op threads, why) for the ``threads`` key: an int is kept; null leaves torch's default (None);
    "auto" takes the cores that are free now. A single process measures which of its allowed cores other processes
    keep busy (a core counts as busy above 25% use) and leaves one per data worker: on a busy box two threads
    contending with another job for two cores run 3-7x slower than one, on an idle one 1.1-1.4x faster (docs/
    benchmarks.md). Several ranks per node share the allowed cores equally (siblings still starting up would look
    busy, so nothing is measured; a SLURM task takes SLURM_CPUS_PER_TASK); ranks started by the launching process
    inherit its choice (``GWF_THREADS``), and so do the later jobs of a sequential sweep."""
    if setting is None:
        return None, "torch's default"
    if setting != "auto":
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 1:
            raise ValueError(f"threads must be a positive integer, auto or null, got {setting!r}")
        return setting, "threads"
    if os.environ.get(THREADS_ENV, "").isdigit():
        return int(os.environ[THREADS_ENV]), "chosen by the process that started this rank"
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():  # a SLURM task's own allocation
        return int(os.environ["SLURM_CPUS_PER_TASK"]), "auto: SLURM_CPUS_PER_TASK"
    cores = allowed_cores()
    if local_ranks > 1:
        return max(1, len(cores) // local_ranks), f"auto: {len(cores)} cores shared by {local_ranks} ranks"
    busy = busy_cores(cores)
    free = len(cores) if busy is None else len(cores) - max(0, math.ceil(busy - 0.25))
    n = max(1, free - data_workers)
    load = "" if busy is None else f", {busy:.1f} kept busy by other processes"
    return n, f"auto: {len(cores)} cores{load}, {data_workers} data worker(s)"


# Console lines of Lightning that say nothing about a gwf run (logger name -> message patterns): the hardware
# summary (gwf logs its threads and the run directory), an advertisement, the seed (it is in the config), the
# weights_only default of its own checkpoints (gwf writes them).
QUIET_MESSAGES = {
    "lightning.pytorch.utilities.rank_zero": (r"GPU available: ", r"TPU available: ", r"HPU available: ",
                                              r"💡 Tip: "),
    "lightning.fabric.utilities.seed": (r"(\[rank: \d+\] )?Seed set to ",),
    "lightning.pytorch.trainer.connectors.checkpoint_connector": (r"`weights_only` was not set",),
}
# Warnings that are known and answered (docs/conventions.md, "Console").
QUIET_WARNINGS = (
    r"Found \d+ module\(s\) in eval mode",  # the EMA and frozen JKO copies are in eval mode on purpose
    r"Your `IterableDataset` has `__len__` defined",  # our streams size each rank's share themselves
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",  # inside Lightning, with torch 2.13
    # Lightning cannot see it, but our streams resume exactly: SeekableDataModule.seek replays them (docs/resume.md)
    r"You're resuming from a checkpoint that ended before the epoch ended and your dataloader is not resumable",
)


class _DropMessages(logging.Filter):
    def __init__(self, patterns):
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def quiet_known_warnings() -> None:
    """Only gwf's lines and real warnings on the console: Lightning's known messages and warnings dropped."""
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    for name, patterns in QUIET_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))


class SweepJobs:
    """Lightning starts the other DDP ranks of a local run by re-running the command line, which for a ``-m`` sweep
    re-runs the whole sweep in each child. The parent marks the job it runs in the environment (inherited by the
    ranks it starts), and a child joins only that job."""

    claimed_here = False  # this process set SWEEP_JOB_ENV itself (it is a sweep parent, not a rank it started)

    @classmethod
    def owns(cls, job_num: int, multirun: bool) -> bool:
        if not multirun:
            return True
        inherited = os.environ.get(SWEEP_JOB_ENV)
        if inherited is not None and not cls.claimed_here and "LOCAL_RANK" in os.environ:
            return int(inherited) == job_num
        os.environ[SWEEP_JOB_ENV] = str(job_num)
        cls.claimed_here = True
        return True


@contextmanager
def one_job():
    """One train() call is one job: afterwards the process group is destroyed and the launch variables are put
    back, so the next job of a sweep in this process starts its own group (with LOCAL_RANK left set, it would wait
    for ranks that never come)."""
    saved = {k: os.environ.get(k) for k in LAUNCH_ENV}
    try:
        yield
    finally:
        import torch

        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


SWEEP_ID_ENV = "GWF_SWEEP_ID"  # the sweep a launching process started, inherited by its jobs (submitit, sbatch)
SWEEP_RECORDS = "sweeps"  # <hydra.sweep.dir>/sweeps/<id>/: one folder per `-m` launch


class SweepRecord(Callback):
    """A Hydra callback that keeps one record per ``-m`` launch. Sweeps of the same name share one directory (a
    relaunch continues its points), and Hydra's ``multirun.yaml`` there holds only the last launch. So each launch
    gets ``<sweep dir>/sweeps/<id>/``: its composed config (``multirun.yaml``), its command-line overrides
    (``sweep.yaml``), and ``jobs/<n>`` naming the run directory of job n. ``gwf-report <dir> --sweep <id>|latest``
    reports one launch. Only the launching process records (never a rank started beside it)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        if not is_launching_process():
            return
        records = os.path.join(str(config.hydra.sweep.dir), SWEEP_RECORDS)
        os.makedirs(records, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
        sweep_id, n = stamp, 1
        while True:
            try:
                os.mkdir(os.path.join(records, sweep_id))
                break
            except FileExistsError:  # two launches within a second
                n += 1
                sweep_id = f"{stamp}_{n}"
        folder = os.path.join(records, sweep_id)
        OmegaConf.save(config, os.path.join(folder, "multirun.yaml"))
        OmegaConf.save(OmegaConf.create({"id": sweep_id, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                                         "overrides": list(config.hydra.overrides.task)}),
                       os.path.join(folder, "sweep.yaml"))
        os.environ[SWEEP_ID_ENV] = sweep_id

    def on_job_start(self, config, **kwargs) -> None:
        from hydra.types import RunMode

        sweep_id = os.environ.get(SWEEP_ID_ENV)
        if sweep_id is None or config.hydra.mode != RunMode.MULTIRUN or not is_launching_process():
            return
        sweep_dir = os.path.abspath(str(config.hydra.sweep.dir))
        jobs = os.path.join(sweep_dir, SWEEP_RECORDS, sweep_id, "jobs")
        os.makedirs(jobs, exist_ok=True)
        run_dir = os.path.relpath(os.path.abspath(str(config.hydra.runtime.output_dir)), sweep_dir)
        with open(os.path.join(jobs, str(config.hydra.job.num)), "w") as f:
            f.write(run_dir + "\n")
