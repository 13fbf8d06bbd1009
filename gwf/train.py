"""``gwf-train`` / ``python -m gwf.train``: the Hydra entry point. Hydra stays here; everything below it takes plain
arguments. Run directories are deterministic (``runs/<name>/<overrides or run_id>``), so a relaunched command finds
its ``checkpoints/last.ckpt`` and resumes exactly (gwf/checkpointing.py)."""

from __future__ import annotations

import gwf  # noqa: F401  (first: makes torchvision importable next to a CPU torch)

import json
import logging
import os
import re
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from lightning.pytorch.plugins.environments import SLURMEnvironment
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gwf.callbacks import EvalCallback
from gwf.checkpointing import AtomicCheckpointIO, PreemptibleCheckpoint, resolve_ckpt_path
from gwf.conditioning import ConditioningSampler
from gwf.data.toy2d import make_sampler
from gwf.jko import JKOSchedule
from gwf.loggers import make_loggers
from gwf.models import build_model
from gwf.models.critics import build_critic
from gwf.module import GWFModule, OptimConfig, StepSizes
from gwf.objectives import build_objective

log = logging.getLogger("gwf")

# A Lightning warning that does not apply here: the EMA and frozen JKO copies are in eval mode on purpose.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")

# Keys of the method config that belong to the training loop, not to the objective's constructor.
LOOP_KEYS = ("name", "d_steps", "t_steps", "critic_optim", "critic_out_dim")


def _conf_dir() -> str:
    packaged = Path(__file__).resolve().parent / "conf"  # wheels carry conf/ inside the package
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "conf")


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


if not OmegaConf.has_resolver("gwf_run_name"):
    OmegaConf.register_new_resolver("gwf_run_name", run_name)
if not OmegaConf.has_resolver("gwf_slurm_tasks_per_node"):
    OmegaConf.register_new_resolver("gwf_slurm_tasks_per_node", slurm_tasks_per_node)


def per_rank_batch(batch: dict, world_size: int, conditional: bool) -> dict:
    """Per-rank sizes of one update from ``batch.global_size`` (generated samples per update summed over all
    ranks); null keeps the per-rank sizes as configured. Conditional data splits the labels over ranks
    (labels_per_step = global_size / (world_size * gen_per_label)); unconditional data splits the samples
    (gen_per_label = pos_per_label = global_size / world_size)."""
    out = dict(batch)
    total = out.pop("global_size", None)
    if total is None:
        return out
    if total % world_size:
        raise ValueError(f"batch.global_size={total} is not divisible by the {world_size} ranks (trainer.devices x "
                         "trainer.num_nodes); choose a multiple of the number of ranks")
    per_rank = total // world_size
    if not conditional:
        out["gen_per_label"] = out["pos_per_label"] = per_rank
    elif per_rank % out["gen_per_label"]:
        raise ValueError(f"batch.global_size={total} over {world_size} ranks is {per_rank} samples per rank, not a "
                         f"multiple of batch.gen_per_label={out['gen_per_label']} (conditional data: each rank "
                         "takes whole labels); choose global_size = ranks x labels x gen_per_label")
    else:
        out["labels_per_step"] = per_rank // out["gen_per_label"]
    return out


def build_module(cfg: DictConfig, data_shape, num_classes: int, world_size: int = 1) -> GWFModule:
    """Plain objects from the composed config (no Hydra below this point)."""
    method = OmegaConf.to_container(cfg.method, resolve=True)
    kwargs = {k: v for k, v in method.items() if k not in LOOP_KEYS}
    if isinstance(kwargs.get("critic"), dict):  # critic-based objectives receive their network, built for the data
        spec = dict(kwargs["critic"])
        spec.setdefault("out_dim", method.get("critic_out_dim", 1))  # > 1: an embedding (mmd_gan's phi)
        kwargs["critic"] = build_critic(spec.pop("name"), in_shape=list(data_shape), num_classes=num_classes, **spec)
    objective = build_objective(method["name"], **kwargs)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    generator = build_model(model.pop("name"), out_shape=list(data_shape), num_classes=num_classes, **model)
    b = per_rank_batch(OmegaConf.to_container(cfg.batch, resolve=True), world_size, conditional=num_classes > 0)
    if num_classes and b["labels_per_step"] > num_classes:
        raise ValueError(f"{b['labels_per_step']} labels per rank and update, but the data has {num_classes} classes; "
                         "lower batch.global_size (or batch.labels_per_step)")
    conditioning = ConditioningSampler(
        num_classes=num_classes,
        labels_per_step=b["labels_per_step"] if num_classes else 1,  # > num_classes was refused above
        alpha_max=b["alpha_max"] if num_classes else 1.0,
        alpha_power=b["alpha_power"],
        alpha_one_fraction=b["alpha_one_fraction"],
    )
    sizes = StepSizes(
        gen_per_label=b["gen_per_label"],
        pos_per_label=b["pos_per_label"],
        uncond_per_step=b["uncond_per_step"] if conditioning.guided else 0,
        bank_capacity=b["bank_capacity"],
        d_steps=method.get("d_steps", 1),
        t_steps=method.get("t_steps", 1),
    )
    critic_optim = method.get("critic_optim")
    return GWFModule(
        generator,
        objective,
        data_shape=tuple(data_shape),
        conditioning=conditioning,
        schedule=JKOSchedule(cfg.jko.steps, cfg.jko.inner_first, cfg.jko.inner),
        tau=cfg.jko.tau,
        jko_start=cfg.jko.get("start", "generator"),
        sizes=sizes,
        optim=OptimConfig(**OmegaConf.to_container(cfg.optim, resolve=True)),
        critic_optim=OptimConfig(**critic_optim) if critic_optim else None,
        ema_decay=cfg.ema_decay,
        seed=cfg.seed,
        source=make_sampler(cfg.source) if cfg.get("source") else None,
        config=OmegaConf.to_container(cfg, resolve=True),
    )


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    return make_loggers(OmegaConf.to_container(cfg.logger, resolve=True) or {}, run_dir, cfg.name, run_dir.name,
                        config=OmegaConf.to_container(cfg, resolve=True))


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list, loggers: list) -> L.Trainer:
    """The Trainer of ``cfg.trainer``; a ``strategy`` given as a dict is instantiated (conf/trainer/ddp.yaml).
    Checkpoints go through :class:`AtomicCheckpointIO`; under SLURM, Lightning's auto-requeue is off (gwf stops
    cleanly on the signal and the sbatch script or submitit requeues: gwf/checkpointing.py)."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    strategy = kwargs.pop("strategy", "auto")
    if isinstance(strategy, dict):
        strategy = instantiate(strategy)
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(
        **kwargs, strategy=strategy, plugins=plugins, default_root_dir=str(run_dir), max_epochs=-1, max_steps=-1,
        callbacks=callbacks, logger=loggers, enable_checkpointing=False,
    )


def train(cfg: DictConfig, run_dir: Path, extra_callbacks: tuple = ()) -> dict:
    """Train from a composed config into ``run_dir`` (resuming from its last.ckpt with ``ckpt_path: last``).
    Returns the evaluation summary (first and last) and ``finished``: False when the run stopped early (a signal
    or ``checkpoint.steps_per_job``) and the same command must be run again to continue."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    launch_env = {k: os.environ.get(k) for k in LAUNCH_ENV}  # Lightning sets them when it starts the ranks itself
    L.seed_everything(cfg.seed, workers=True)  # weight init; training noise is seeded per (seed, rank, update)

    datamodule = instantiate(cfg.data, _convert_="all")  # plain containers: checkpoints load with weights_only
    ckpt_dir = run_dir / "checkpoints"
    c = cfg.checkpoint
    checkpointing = PreemptibleCheckpoint(ckpt_dir, every_n_updates=c.every_n_steps, every_minutes=c.get("every_minutes"),
                                          steps_per_job=c.get("steps_per_job"), keep=c.keep)
    callbacks = [
        checkpointing,
        EvalCallback(instantiate(cfg.eval.evaluator), every_n_updates=cfg.eval.every_n_updates,
                     num_samples=cfg.eval.num_samples, alpha=cfg.eval.alpha, grid_per_class=cfg.eval.grid_per_class),
        *extra_callbacks,
    ]
    trainer = build_trainer(cfg, run_dir, callbacks, build_loggers(cfg, run_dir))
    if trainer.is_global_zero:  # only rank 0 writes files (checkpoints, logs, figures, the config)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    module = build_module(cfg, datamodule.shape, datamodule.num_classes, world_size=trainer.world_size)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path", "last"), ckpt_dir)
    if ckpt_path and trainer.is_global_zero:
        log.info("resuming from %s", ckpt_path)
    checkpointing.remember_previous_handlers()
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        checkpointing.restore_signal_handlers()
    summary_file = run_dir / "eval_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    summary["finished"] = module.finished
    if trainer.is_global_zero:
        log.info("run directory: %s", run_dir)
        log.info("evaluation (first -> last): %s", json.dumps(summary))
    _end_job(launch_env)
    checkpointing.hand_over(trainer.is_global_zero)  # after a clean early stop: request the requeue (or submitit's)
    return summary


# Variables Lightning's launcher writes into its own process's environment when it starts the other ranks.
LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


def _end_job(launch_env: dict) -> None:
    """One train() call is one job: the next job of a sweep in this process starts its own process group and, if
    Lightning started the ranks, starts them again (with LOCAL_RANK left set it would wait for ranks that never come)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for k, v in launch_env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def owns_sweep_job(job_num: int, multirun: bool) -> bool:
    """Whether this process runs Hydra sweep job ``job_num``. Lightning starts the other DDP ranks of a local run
    by re-running the command line; for a ``-m`` sweep that re-runs the whole sweep in each child. The parent
    marks its job in the environment (inherited by its children), and a child joins only that job."""
    if not multirun:
        return True
    inherited = os.environ.get(SWEEP_JOB_ENV)
    if inherited is not None and not _SWEEP_JOB_SET_HERE and "LOCAL_RANK" in os.environ:
        return int(inherited) == job_num
    os.environ[SWEEP_JOB_ENV] = str(job_num)
    globals()["_SWEEP_JOB_SET_HERE"] = True
    return True


SWEEP_JOB_ENV = "GWF_SWEEP_JOB"
_SWEEP_JOB_SET_HERE = False


@hydra.main(version_base="1.3", config_path=_conf_dir(), config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    if not owns_sweep_job(int(hydra_cfg.job.get("num", 0) or 0), hydra_cfg.mode == RunMode.MULTIRUN):
        return
    train(cfg, Path(hydra_cfg.runtime.output_dir))


if __name__ == "__main__":
    # `python -m gwf.train`: call the function of the importable module gwf.train, not of __main__. Process-pool
    # launchers (hydra/launcher=joblib) pickle the task function; one defined in __main__ travels by value and its
    # worker imports lightning before gwf (see gwf/_compat.py), which fails next to a CPU torch.
    from gwf.train import main as _main

    _main()
