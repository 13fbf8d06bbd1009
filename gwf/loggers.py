"""Loggers from plain dicts: ``{"csv": {...}, "wandb": {...}}`` (config group ``conf/logger/``)."""

from __future__ import annotations

import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger

from gwf.seeding import derive_seed


def wandb_has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_run_id(run_dir: Path) -> str:
    """Deterministic run id from the run directory: a resumed run continues the same wandb run."""
    return f"{derive_seed('wandb', Path(run_dir).resolve()):016x}"


def make_loggers(spec: dict, run_dir: Path, group: str, name: str) -> list[Logger]:
    loggers: list[Logger] = []
    for kind, kwargs in spec.items():
        kwargs = dict(kwargs or {})
        if kind == "csv":
            loggers.append(CSVLogger(save_dir=str(run_dir), name="", version="", **kwargs))
        elif kind == "wandb":
            # Never hang without credentials: offline unless a key is configured (sync later with `wandb sync`).
            if os.environ.get("WANDB_MODE") is None and not wandb_has_credentials():
                kwargs["offline"] = True
            os.environ.setdefault("WANDB_DIR", str(run_dir))
            os.environ.setdefault("WANDB_CACHE_DIR", str(Path(run_dir) / ".wandb_cache"))
            loggers.append(WandbLogger(save_dir=str(run_dir), id=wandb_run_id(run_dir), name=f"{group}/{name}",
                                       group=group, resume="allow", **kwargs))
        else:
            raise ValueError(f"unknown logger '{kind}'; choose among csv, wandb (config group logger=...)")
    return loggers
