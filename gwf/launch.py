"""How a training process is launched: Hydra resolvers for run directories and SLURM, and the workarounds that
Hydra sweeps and Lightning's own DDP launcher need (docs/clusters.md). Nothing here runs at import."""

from __future__ import annotations

import os
import re
import warnings
from contextlib import contextmanager

import torch
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


def quiet_known_warnings() -> None:
    # The EMA and frozen JKO copies are in eval mode on purpose.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")


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
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
