"""Cluster launch paths: slurm/train.sbatch and hydra/launcher=slurm rendered for a 2-node x 4-GPU job (srun and
submitit task counts agree with the Trainer's devices x nodes, as Lightning's SLURM environment checks), the
script's requeue, and a local Hydra -m sweep with DDP that creates exactly one run directory per sweep point."""

import os
import shlex
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import OmegaConf

from gwf.launch import SWEEP_RECORDS, register_resolvers
from tests.conftest import CONF_DIR, compose_config

REPO = Path(__file__).resolve().parents[1]
SBATCH = REPO / "slurm" / "train.sbatch"
NODES, GPUS = 2, 4


def _slurm_job_env(monkeypatch_env: dict) -> dict:
    """What SLURM sets in the batch script of `sbatch --nodes=2 --gpus-per-node=4 --ntasks-per-node=4`."""
    return {**monkeypatch_env, "SLURM_JOB_ID": "777", "SLURM_NNODES": str(NODES), "SLURM_NTASKS": str(NODES * GPUS),
            "SLURM_NTASKS_PER_NODE": str(GPUS), "SLURM_GPUS_PER_NODE": f"a100:{GPUS}",
            "SLURM_JOB_NAME": "gwf"}


def _fake_tools(bin_dir: Path, log: Path, touch_requeue: bool) -> None:
    """srun and scontrol do not exist here: stand-ins that record their arguments (srun also plays rank 0 asking for
    a requeue when ``touch_requeue``)."""
    bin_dir.mkdir()
    srun = f'#!/bin/bash\necho "srun $*" >> {log}\n' + ('touch "$GWF_REQUEUE_FILE"\n' if touch_requeue else "")
    scontrol = f'#!/bin/bash\necho "scontrol $*" >> {log}\n'
    for name, text in (("srun", srun), ("scontrol", scontrol)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)


def _run_sbatch(tmp_path: Path, touch_requeue: bool) -> list[str]:
    log = tmp_path / "calls.log"
    _fake_tools(tmp_path / "bin", log, touch_requeue)
    env = _slurm_job_env({"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_SUBMIT_DIR": str(tmp_path)})
    res = subprocess.run(["bash", str(SBATCH), "experiment=gwf_2d", "run_id=demo"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return log.read_text().splitlines()


def _sbatch_directives() -> dict:
    out = {}
    for line in SBATCH.read_text().splitlines():
        if line.startswith("#SBATCH --"):
            key, _, value = line[len("#SBATCH --"):].split("#")[0].strip().partition("=")
            out[key] = value
    return out


def test_sbatch_script_rendered_for_2_nodes_x_4_gpus_agrees_with_the_trainer(tmp_path, monkeypatch):
    directives = _sbatch_directives()
    assert directives["signal"] == "SIGUSR1@300" and "requeue" in directives
    calls = _run_sbatch(tmp_path, touch_requeue=False)
    assert len(calls) == 1 and calls[0].startswith("srun ")  # no requeue when the run did not ask for one
    argv = shlex.split(calls[0])
    assert "--kill-on-bad-exit=1" in argv
    overrides = argv[argv.index("gwf-train") + 1:]
    assert overrides == ["trainer=slurm", "experiment=gwf_2d", "run_id=demo"]
    # what one of the 8 tasks sees: the Trainer config resolves devices x nodes from the allocation
    task_env = {"SLURM_NNODES": str(NODES), "SLURM_NTASKS": str(NODES * GPUS), "SLURM_NTASKS_PER_NODE": str(GPUS),
                "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1", "SLURM_JOB_NAME": "gwf",
                "SLURM_NODELIST": "node[01-02]", "SLURM_JOB_ID": "777"}
    for k, v in task_env.items():
        monkeypatch.setenv(k, v)
    trainer = OmegaConf.to_container(compose_config(overrides).trainer, resolve=True)
    assert (trainer["devices"], trainer["num_nodes"]) == (GPUS, NODES)
    env = SLURMEnvironment()
    env.validate_settings(num_devices=trainer["devices"], num_nodes=trainer["num_nodes"])  # Lightning's own check
    assert (env.world_size(), env.global_rank(), env.local_rank(), env.node_rank()) == (8, 5, 1, 1)
    assert env.main_address == "node01"
    with pytest.raises(ValueError, match="does not match"):  # a mismatch would be caught at start
        env.validate_settings(num_devices=GPUS, num_nodes=1)


def test_sbatch_script_requeues_when_rank_0_asks(tmp_path):
    calls = _run_sbatch(tmp_path, touch_requeue=True)
    assert calls[-1] == "scontrol requeue 777"
    assert not list(tmp_path.glob(".gwf-requeue-*"))  # the request is consumed


def test_sbatch_script_refuses_tasks_that_do_not_match_gpus(tmp_path):
    _fake_tools(tmp_path / "bin", tmp_path / "calls.log", False)
    env = {**_slurm_job_env({"PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}"}), "SLURM_NTASKS_PER_NODE": "1"}
    res = subprocess.run(["bash", str(SBATCH)], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "one task per GPU" in res.stderr


def test_submitit_launcher_config_rendered_for_2_nodes_x_4_gpus(tmp_path, monkeypatch):
    import submitit

    _fake_tools(tmp_path / "bin", tmp_path / "calls.log", False)  # submitit looks for srun before rendering
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", f"hydra.launcher.nodes={NODES}",
                                           f"hydra.launcher.gpus_per_node={GPUS}", "trainer=slurm",
                                           f"hydra.launcher.submitit_folder={tmp_path / 'submitit'}"],
                      return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert params.pop("_target_").endswith("SlurmLauncher")
    assert params["tasks_per_node"] == params["gpus_per_node"] == GPUS  # one task (one DDP rank) per GPU
    # the launcher's own mapping (hydra_submitit_launcher.SlurmLauncher.launch), then submitit renders the script
    executor = submitit.AutoExecutor(folder=params.pop("submitit_folder"), cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -u -m submitit.core._submit", "uid")
    assert f"#SBATCH --nodes={NODES}" in script and f"#SBATCH --ntasks-per-node={GPUS}" in script
    assert f"#SBATCH --gpus-per-node={GPUS}" in script and "#SBATCH --signal=USR2@120" in script
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in script and "srun" in script
    # each of the 2 x 4 tasks submitit starts resolves trainer=slurm to the same numbers
    env = {"SLURM_NNODES": str(NODES), "SLURM_NTASKS_PER_NODE": str(GPUS)}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        trainer = OmegaConf.to_container(compose_config(["trainer=slurm"]).trainer, resolve=True)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    assert (trainer["devices"], trainer["num_nodes"]) == (params["tasks_per_node"], params["nodes"])


def test_local_multirun_with_ddp_creates_exactly_one_run_dir_per_point(tmp_path):
    """Lightning starts rank 1 by re-running the command line, which for `-m` is the whole sweep: the child joins
    only its parent's job (gwf.launch.SweepJobs), so 2 sweep points give 2 run directories and finish."""
    runs = tmp_path / "runs"
    overrides = ["experiment=gwf_2d", "method=kl", "jko.steps=1", "jko.updates_first_step=6", "batch.gen_per_label=32",
                 "batch.pos_per_label=32", "batch.bank_capacity=64", "data.batch_size=32", "eval.num_samples=100",
                 "logger=none", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                 "trainer.enable_progress_bar=false", "threads=1", f"paths.root={runs}"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT",
                        "GWF_SWEEP_JOB") and not k.startswith("SLURM_")}
    res = subprocess.run([sys.executable, "-m", "gwf.train", "-m", "seed=0,1", *overrides], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no stray outputs/ or multirun/ trees
    assert [p.relative_to(runs).as_posix() for p in runs.glob("*/*")] == ["gwf_2d/multirun"]
    sweep_dir = runs / "gwf_2d" / "multirun"
    points = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name != SWEEP_RECORDS)
    assert [p.name.split("seed=")[1].split(",")[0] for p in points] == ["0", "1"]
    # one launch record, written by the parent only (the DDP child re-runs the sweep's command line)
    (record,) = (sweep_dir / SWEEP_RECORDS).iterdir()
    assert sorted((record / "jobs" / n).read_text().strip() for n in ("0", "1")) == [p.name for p in points]
    for p in points:
        import torch

        ckpt = torch.load(p / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
        assert int(ckpt["state_dict"]["update_count"]) == 6
