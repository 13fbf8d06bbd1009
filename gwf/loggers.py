"""Loggers from plain dicts: ``{"csv": {...}, "wandb": {...}}`` (config group ``conf/logger/``)."""

from __future__ import annotations

import csv
import netrc
import os
from pathlib import Path

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from gwf._compat import require
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
    """Deterministic run id from the run directory and its fresh starts (``ckpt_path=null`` archives the previous
    files, gwf.checkpointing.archive_previous_run): a resumed run continues the same wandb run, a fresh start in the
    same directory begins a new one."""
    generation = archived_runs(run_dir)
    key = Path(run_dir).resolve() if generation == 0 else f"{Path(run_dir).resolve()}#{generation}"
    return f"{derive_seed('wandb', key):016x}"


def archived_runs(run_dir: Path) -> int:
    """Earlier runs archived in ``run_dir/archive/<n>`` by fresh starts."""
    archive = Path(run_dir) / "archive"
    return sum(1 for p in archive.iterdir() if p.is_dir() and p.name.isdigit()) if archive.is_dir() else 0


def flatten_config(config: dict, prefix: str = "") -> dict:
    """{"jko": {"tau": 1.0}} -> {"jko.tau": 1.0}: wandb's run table and filters read flat keys."""
    flat = {}
    for k, v in (config or {}).items():
        key = f"{prefix}{k}"
        flat.update(flatten_config(v, f"{key}.") if isinstance(v, dict) else {key: v})
    return flat


def run_meta(config: dict) -> dict:
    """What a comparison groups runs by: objective, JKO step size (tau, None = no JKO term) and seed."""
    return {"objective": (config.get("method") or {}).get("name"), "tau": (config.get("jko") or {}).get("tau"),
            "seed": config.get("seed")}


def tau_label(tau) -> str:
    """tau as one string type across runs: "none" (no JKO term) or the number."""
    return "none" if tau is None else f"{float(tau):g}"


def run_tags(config: dict) -> list[str]:
    """Tags that the wandb UI filters and groups by: objective, JKO step size and seed."""
    meta = run_meta(config)
    return [f"method={meta['objective']}", f"tau={tau_label(meta['tau'])}", f"seed={meta['seed']}"]


def wandb_group(experiment: str, run_dir: Path) -> str:
    """The experiment name; runs of a Hydra sweep (runs/<name>/multirun/<overrides>) get "<name>-sweep"."""
    return f"{experiment}-sweep" if Path(run_dir).parent.name == "multirun" else experiment


class GWFWandbLogger(WandbLogger):
    """WandbLogger whose hyperparameters are the flattened composed config ("jko.tau", "method.name", ...) rather
    than one nested "config" entry, and which finishes its wandb run when training ends: Lightning leaves it open,
    so the next job of a Hydra sweep in the same process would otherwise log into this run."""

    @property
    def experiment(self):
        """The wandb run, with ``update`` (generator updates) as the x-axis of every metric: Lightning's axis is
        trainer/global_step, optimizer steps, two per update with a critic, which stretches critic-based objectives
        2x against the others in one panel."""
        run = WandbLogger.experiment.fget(self)
        if not getattr(self, "_update_axis", False) and callable(getattr(run, "define_metric", None)):
            run.define_metric("update")
            run.define_metric("*", step_metric="update", step_sync=True)
            self._update_axis = True
        return run

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        if self._experiment is not None and getattr(self._experiment, "finish", None) is not None:
            self._experiment.finish(exit_code=0 if status == "success" else 1)

    def log_hyperparams(self, params) -> None:
        params = dict(params) if not isinstance(params, dict) else params
        if isinstance(params.get("config"), dict):
            params = {**{k: v for k, v in params.items() if k != "config"}, **flatten_config(params["config"])}
        super().log_hyperparams(params)


def make_wandb_logger(kwargs: dict, run_dir: Path, group: str, name: str, config: dict) -> WandbLogger:
    require("wandb", "logger=wandb")
    # Never hang without credentials: offline unless a key is configured (sync later with `wandb sync`).
    if os.environ.get("WANDB_MODE") is None and not wandb_has_credentials():
        kwargs["offline"] = True
    os.environ.setdefault("WANDB_DIR", str(run_dir))
    os.environ.setdefault("WANDB_CACHE_DIR", str(Path(run_dir) / ".wandb_cache"))
    kwargs.setdefault("group", wandb_group(group, run_dir))
    kwargs.setdefault("tags", run_tags(config) if config else None)
    if kwargs.get("entity") is None:
        kwargs.pop("entity", None)
    config = {**(config or {}), "run": {"dir": str(run_dir), "overrides": name}}
    return GWFWandbLogger(save_dir=str(run_dir), id=wandb_run_id(run_dir), name=short_run_name(group, name),
                          resume="allow", config=flatten_config(config), **kwargs)


def short_run_name(group: str, name: str, limit: int = 48) -> str:
    """``<experiment>/<overrides>``, its overrides cut to ``limit`` characters with a 6-hex digest of the whole (the
    full overrides are in the config as ``run.overrides``): long sweep names stay readable and distinct in wandb."""
    if len(name) <= limit:
        return f"{group}/{name}"
    return f"{group}/{name[: limit - 8]}..{derive_seed('run-name', name) % 16**6:06x}"


def make_loggers(spec: dict, run_dir: Path, group: str, name: str, config: dict) -> list[Logger]:
    """Loggers of the config group ``logger``; ``config`` (the resolved composed config) feeds wandb's config
    and tags."""
    loggers: list[Logger] = []
    for kind, kwargs in spec.items():
        kwargs = dict(kwargs or {})
        if kind == "csv":
            loggers.append(ResumableCSVLogger(save_dir=str(run_dir), name="", version="", **kwargs))
        elif kind == "wandb":
            loggers.append(make_wandb_logger(kwargs, run_dir, group, name, config))
        else:
            raise ValueError(f"unknown logger '{kind}'; choose among csv, wandb (config group logger=...)")
    return loggers
