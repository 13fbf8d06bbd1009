"""Every object of a run, built from a composed config: the one place where config keys meet constructors.
Used by gwf-train, gwf-sample, the benchmarks and gwf-train-encoder; nothing happens at import."""

from __future__ import annotations

import os
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.plugins.environments import SLURMEnvironment
from omegaconf import DictConfig, OmegaConf

from gwf.callbacks import EvalCallback, UpdateProgress
from gwf.checkpointing import AtomicCheckpointIO, CheckpointCadence, Preemption
from gwf.conditioning import ConditioningSampler
from gwf.config import conf_dir, upgrade_config  # noqa: F401  (conf_dir: imported from here)
from gwf.data.toy2d import make_sampler
from gwf.jko import JKOSchedule
from gwf.loggers import make_loggers
from gwf.models import build_model
from gwf.models.critics import build_critic
from gwf.module import GWFModule, OptimConfig, UpdateSizes
from gwf.objectives import Objective, build_objective as _objective

def per_rank_batch(batch: dict, world_size: int, conditional: bool) -> dict:
    """Per-rank sizes of one update from ``batch.global_size`` (generated samples per update summed over all
    ranks); null keeps the per-rank sizes as configured. Conditional data splits the labels over ranks
    (labels_per_update = global_size / (world_size * gen_per_label)); unconditional data splits the samples."""
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
        out["labels_per_update"] = per_rank // out["gen_per_label"]
    return out


def build_objective(method: dict, data_shape, num_classes: int, with_encoder: bool = True) -> Objective:
    """The objective of ``method`` (its constructor arguments). A ``critic`` given as a dict (the critic group) is
    built for the data, with ``method.embedding_dim`` outputs when set (an MMD GAN's embedding), else 1.
    ``with_encoder=False`` skips the frozen feature encoder, which shapes the training loss only (sampling)."""
    kwargs = dict(method)
    name = kwargs.pop("name")
    if isinstance(kwargs.get("critic"), dict):
        spec = dict(kwargs["critic"])
        kwargs["critic"] = build_critic(spec.pop("name"), in_shape=list(data_shape), num_classes=num_classes,
                                        out_dim=kwargs.get("embedding_dim") or 1, **spec)
    if not with_encoder and "features" in kwargs:
        kwargs["features"] = None
    return _objective(name, **kwargs)


def build_module(cfg: DictConfig, data_shape, num_classes: int, world_size: int = 1,
                 with_encoder: bool = True) -> GWFModule:
    """The GWFModule of a composed config, for data of ``data_shape`` with ``num_classes`` (0: unconditional)."""
    c = OmegaConf.to_container(cfg, resolve=True)
    objective = build_objective(c["method"], data_shape, num_classes, with_encoder)
    if str(c["trainer"].get("precision", "")).startswith("bf16") and getattr(objective, "features", None) is not None:
        objective.features.to(torch.bfloat16)  # the frozen encoder: weights and feature maps in bf16
    model = dict(c["model"])
    compile_mode = model.pop("compile", False)
    generator = build_model(model.pop("name"), out_shape=list(data_shape), num_classes=num_classes, **model)
    b = per_rank_batch(c["batch"], world_size, conditional=num_classes > 0)
    if num_classes and b["labels_per_update"] > num_classes:
        raise ValueError(f"{b['labels_per_update']} labels per rank and update, but the data has {num_classes} "
                         "classes; lower batch.global_size (or batch.labels_per_update)")
    conditioning = ConditioningSampler(
        num_classes=num_classes, labels_per_update=b["labels_per_update"] if num_classes else 1,
        alpha_max=b["alpha_max"] if num_classes else 1.0, alpha_power=b["alpha_power"],
        alpha_one_fraction=b["alpha_one_fraction"])
    jko, loop = c["jko"], c.get("loop", {})
    return GWFModule(
        generator, objective, data_shape=tuple(data_shape), conditioning=conditioning,
        schedule=JKOSchedule.from_config(jko),
        tau=jko["tau"], jko_start=jko.get("start", "generator"),
        jko_previous_mode=jko.get("previous_mode", "generator"),
        sizes=UpdateSizes(b["gen_per_label"], b["pos_per_label"], b["uncond_per_update"] if conditioning.guided else 0,
                          b["bank_capacity"], b.get("label_chunks", 1), bank_dtype(c["data"]),
                          c.get("checkpoint", {}).get("bank", "data"), b.get("uncond_bank"),
                          bool(b.get("uncond_per_label", False))),
        optim=OptimConfig(**c["optim"]),
        critic_optim=OptimConfig(**c["critic_optim"]) if objective.critic is not None else None,
        critic_steps=loop.get("critic_steps", 1), generator_steps=loop.get("generator_steps", 1),
        ema_decay=c["ema_decay"], ema_warmup=c.get("ema_warmup", True), seed=c["seed"],
        source=make_sampler(c["source"]) if c.get("source") else None,
        config=c, compile=compile_mode, noise=c.get("noise", "normal"), reals=loop.get("reals", "shared"),
    )


def bank_dtype(data: dict) -> torch.dtype:
    """The class bank stores samples in the data's dtype (float16 latents, pixels and digits: half of float32)."""
    return torch.float16 if data.get("dtype") == "float16" else torch.float32


def module_from_checkpoint(ckpt: str | Path, device: str | torch.device = "cpu") -> tuple[GWFModule, DictConfig]:
    """The GWFModule of a gwf-train checkpoint, rebuilt from the composed config stored in it, without the frozen
    feature encoder (not in the checkpoint, not needed to sample)."""
    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt} not found (runs keep theirs in <run_dir>/checkpoints/last.ckpt)")
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    config = state.get("hyper_parameters", {}).get("config")
    if config is None:
        raise ValueError(f"{ckpt} has no hyper_parameters.config: it was not written by gwf-train")
    cfg = OmegaConf.create(upgrade_config(config))
    data = instantiate(cfg.data, _convert_="all")  # only for shape / num_classes; reads no files
    module = build_module(cfg, data.shape, data.num_classes, with_encoder=False)
    module.load_state_dict(state["state_dict"])
    return module.to(device).eval(), cfg


def build_datamodule(cfg: DictConfig):
    return instantiate(cfg.data, _convert_="all")  # plain containers: checkpoints load with weights_only


def build_callbacks(cfg: DictConfig, run_dir: Path) -> tuple[CheckpointCadence, Preemption, EvalCallback]:
    c, e = cfg.checkpoint, cfg.eval
    preemption = Preemption()
    cadence = CheckpointCadence(run_dir / "checkpoints", every_n_updates=c.every_n_updates,
                                every_minutes=every_minutes(c.get("every_minutes")),
                                updates_per_job=c.get("updates_per_job"),
                                keep=c.keep, stop_requested=lambda: preemption.requested)
    evaluation = EvalCallback(instantiate(e.evaluator), every_n_updates=e.every_n_updates,
                              num_samples=e.num_samples, alpha=e.alpha, grid_per_class=e.grid_per_class,
                              max_seconds=e.get("max_seconds"), every_n_jko_steps=e.get("every_n_jko_steps"),
                              redraw_seconds=e.get("redraw_seconds", 30.0))
    return cadence, preemption, evaluation


SLURM_EVERY_MINUTES = 30  # checkpoint.every_minutes=auto under SLURM


def every_minutes(value) -> float | None:
    """checkpoint.every_minutes: "auto" = 30 in a SLURM job (a preemption then loses at most 30 minutes), else off."""
    if value == "auto":
        return SLURM_EVERY_MINUTES if os.environ.get("SLURM_JOB_ID") else None
    return value


def build_loggers(cfg: DictConfig, run_dir: Path) -> list:
    return make_loggers(OmegaConf.to_container(cfg.logger, resolve=True) or {}, run_dir, cfg.name, run_dir.name,
                        config=OmegaConf.to_container(cfg, resolve=True))


def build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list, loggers: list) -> L.Trainer:
    """The Trainer of ``cfg.trainer`` (a ``strategy`` given as a dict is instantiated). Checkpoints go through
    AtomicCheckpointIO; under SLURM, Lightning's auto-requeue is off (docs/resume.md: one requeue owner)."""
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    # The bar counts updates (gwf.callbacks.UpdateProgress); switched off, it logs a line every tenth of the run.
    callbacks = [*callbacks, UpdateProgress(enabled=kwargs.pop("enable_progress_bar", True))]
    strategy = kwargs.pop("strategy", "auto")
    if isinstance(strategy, dict):
        if strategy.get("find_unused_parameters", False) is None:  # only a critic's passes leave parameters unused
            strategy["find_unused_parameters"] = "critic" in cfg.method
        strategy = instantiate(strategy)
    plugins = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():
        plugins.append(SLURMEnvironment(auto_requeue=False))
    return L.Trainer(**kwargs, strategy=strategy, plugins=plugins, default_root_dir=str(run_dir), max_epochs=-1,
                     max_steps=-1, callbacks=callbacks, logger=loggers, enable_checkpointing=False,
                     enable_progress_bar=True)
