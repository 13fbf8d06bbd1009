"""Config keys that were renamed so that each word means one unit (docs/conventions.md, "Units"): "update" = one
generator update of the training loop, "step" = a JKO step or an optimizer step. Old keys are refused with the new
name; configs stored by older runs (checkpoints, run directories) are upgraded. Plain dicts: no Hydra here."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable


def conf_dir() -> str:
    """The training configs: packaged in wheels (gwf/conf), else the repository's conf/."""
    packaged = Path(__file__).resolve().parent / "conf"
    return str(packaged if packaged.is_dir() else Path(__file__).resolve().parents[1] / "conf")

RENAMED = {
    "checkpoint.every_n_steps": "checkpoint.every_n_updates",
    "checkpoint.steps_per_job": "checkpoint.updates_per_job",
    "jko.inner_first": "jko.updates_first_step",
    "jko.inner": "jko.updates_per_step",
    "batch.labels_per_step": "batch.labels_per_update",
    "batch.uncond_per_step": "batch.uncond_per_update",
    "method.d_steps": "loop.critic_steps",
    "method.t_steps": "loop.generator_steps",
    "method.critic_optim": "critic_optim",
    "method.critic_out_dim": "method.embedding_dim",
}


# Trainer arguments gwf sets itself (gwf.build.build_trainer): a user's value would clash with ours (a TypeError
# after the run directory exists) or be silently overridden; each names what to set instead.
OWNED_BY_GWF = {
    "trainer.max_steps": "the run's length is in updates: jko.steps x jko.updates_per_step (jko.updates_first_step "
                         "for the first JKO step); checkpoint.updates_per_job stops a job early",
    "trainer.max_epochs": "the run's length is in updates: jko.steps x jko.updates_per_step (the data stream has no "
                          "epochs)",
    "trainer.default_root_dir": "the run directory is paths.root / name / run_id (set run_id or paths.root)",
    "trainer.enable_checkpointing": "checkpoints are set by checkpoint.every_n_updates, checkpoint.every_minutes and "
                                    "checkpoint.keep",
    "trainer.callbacks": "extra callbacks are the callbacks group: +callbacks.<name>._target_=<class> (conf/"
                         "callbacks/none.yaml)",
    "trainer.logger": "loggers are the logger group (logger=csv, logger=wandb, ...)",
    "trainer.plugins": "gwf sets the checkpoint IO and SLURM plugins itself",
}


def refuse_owned(keys: Iterable[str]) -> None:
    """A clear error for Trainer arguments that gwf sets (OWNED_BY_GWF), naming what to set instead."""
    owned = sorted({k for k in keys if k in OWNED_BY_GWF})
    if owned:
        raise ValueError("; ".join(f"{k} is set by gwf: {OWNED_BY_GWF[k]}" for k in owned))


def refuse_renamed(keys: Iterable[str]) -> None:
    """A clear error naming the new keys, for command-line overrides or the keys a composed config sets."""
    old = sorted({k for k in keys if k in RENAMED})
    if old:
        raise ValueError("renamed config keys: " + ", ".join(f"{k} -> {RENAMED[k]}" for k in old)
                         + " (docs/conventions.md, 'Units'); use the new names")


def set_keys(config: dict, keys: Iterable[str] = RENAMED) -> list[str]:
    """The ``keys`` (dotted; default: the renamed ones) that ``config`` (nested dicts) sets to something other than
    null."""
    def get(node, dotted: str):
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    return [k for k in keys if get(config, k) is not None]


def upgrade_config(config: dict) -> dict:
    """A copy of a config stored by an older run, with its renamed keys moved to the new names."""
    import copy

    config = copy.deepcopy(config)
    for old, new in RENAMED.items():
        (old_parent, old_leaf), (new_parent, new_leaf) = old.rpartition(".")[::2], new.rpartition(".")[::2]
        source = config.get(old_parent) if isinstance(config.get(old_parent), dict) else None
        if source is not None and old_leaf in source:
            target = config.setdefault(new_parent, {}) if new_parent else config
            target[new_leaf] = source.pop(old_leaf)
    return config


def refuse_set_keys(config: dict) -> None:
    """Refuse a composed config (nested dicts) that still sets renamed keys or Trainer arguments gwf sets itself."""
    refuse_renamed(set_keys(config))
    refuse_owned(set_keys(config, OWNED_BY_GWF))
