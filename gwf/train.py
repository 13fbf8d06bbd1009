"""``gwf-train`` / ``python -m gwf.train``: the Hydra entry point. Hydra stays here; everything below it takes plain
arguments. Run directories are deterministic (``runs/<name>/<overrides or run_id>``), so a relaunched command finds
its ``checkpoints/last.ckpt`` and resumes."""

from __future__ import annotations

import gwf  # noqa: F401  (first: makes torchvision importable next to a CPU torch)

import json
import logging
import re
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from gwf.callbacks import EvalCallback
from gwf.conditioning import ConditioningSampler
from gwf.data.toy2d import make_sampler
from gwf.jko import JKOSchedule
from gwf.loggers import make_loggers
from gwf.models import build_model
from gwf.models.critics import build_critic
from gwf.module import GWFModule, OptimConfig, StepSizes
from gwf.objectives import build_objective

log = logging.getLogger("gwf")

# Two Lightning warnings that do not apply here: the EMA and frozen JKO copies are in eval mode on purpose, and
# with manual optimization our checkpoints are meant to hold the state after the update.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
warnings.filterwarnings("ignore", message=r"Using ModelCheckpoint with manual optimization")

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


if not OmegaConf.has_resolver("gwf_run_name"):
    OmegaConf.register_new_resolver("gwf_run_name", run_name)


def build_module(cfg: DictConfig, data_shape, num_classes: int) -> GWFModule:
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
    b = cfg.batch
    conditioning = ConditioningSampler(
        num_classes=num_classes,
        labels_per_step=min(b.labels_per_step, num_classes) if num_classes else 1,
        alpha_max=b.alpha_max if num_classes else 1.0,
        alpha_power=b.alpha_power,
        alpha_one_fraction=b.alpha_one_fraction,
    )
    sizes = StepSizes(
        gen_per_label=b.gen_per_label,
        pos_per_label=b.pos_per_label,
        uncond_per_step=b.uncond_per_step if conditioning.guided else 0,
        bank_capacity=b.bank_capacity,
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
    return make_loggers(OmegaConf.to_container(cfg.logger, resolve=True) or {}, run_dir, cfg.name, run_dir.name)


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train from a composed config into ``run_dir``; returns the evaluation summary (first and last)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.get("threads"):
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, workers=True)  # weight init; training noise is seeded per (seed, rank, update)

    datamodule = instantiate(cfg.data, _convert_="all")  # plain containers: checkpoints load with weights_only
    module = build_module(cfg, datamodule.shape, datamodule.num_classes)
    ckpt_dir = run_dir / "checkpoints"
    callbacks = [
        L.pytorch.callbacks.ModelCheckpoint(
            dirpath=ckpt_dir, filename="update{step:07d}", auto_insert_metric_name=False, save_last=True,
            save_top_k=cfg.checkpoint.keep, every_n_train_steps=cfg.checkpoint.every_n_steps,
        ),
        EvalCallback(instantiate(cfg.eval.evaluator), every_n_updates=cfg.eval.every_n_updates,
                     num_samples=cfg.eval.num_samples, alpha=cfg.eval.alpha, grid_per_class=cfg.eval.grid_per_class),
    ]
    trainer = L.Trainer(
        **OmegaConf.to_container(cfg.trainer, resolve=True),
        default_root_dir=str(run_dir), max_epochs=-1, max_steps=-1, callbacks=callbacks,
        logger=build_loggers(cfg, run_dir),
    )
    last = ckpt_dir / "last.ckpt"
    ckpt_path = str(last) if cfg.resume and last.exists() else None
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    trainer.save_checkpoint(last)
    summary_file = run_dir / "eval_summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    if trainer.is_global_zero:
        log.info("run directory: %s", run_dir)
        log.info("evaluation (first -> last): %s", json.dumps(summary))
    return summary


@hydra.main(version_base="1.3", config_path=_conf_dir(), config_name="config")
def main(cfg: DictConfig) -> None:
    train(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
