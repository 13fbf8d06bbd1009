"""Loggers from plain dicts: ``{"csv": {...}, "wandb": {...}}`` (config group ``conf/logger/``)."""

from __future__ import annotations

import csv
import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from gwf.seeding import derive_seed


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv when it starts; a resumed run must keep its history,
    so this one adopts the existing header and appends."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = sorted(next(csv.reader(f), []))


class ResumableCSVLogger(CSVLogger):
    """``metrics.csv`` in the run directory, continued (not overwritten) when the run resumes."""

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


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
            loggers.append(ResumableCSVLogger(save_dir=str(run_dir), name="", version="", **kwargs))
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
