"""In-training evaluation of the EMA generator on a fixed noise set: metrics, pictures and a summary."""

from __future__ import annotations

import csv
import math
from collections import abc
import json
import logging
import sys
import time
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm
from gwf.loggers import run_meta, tau_label
from gwf.viz import save_image_grid, save_metric_curves, save_scatter, save_trajectories

log = logging.getLogger("gwf")


class EvalCallback(L.Callback):
    """Every ``every_n_updates`` updates (or every ``every_n_jko_steps`` JKO steps), and at the start and end of
    training, scores ``num_samples`` EMA samples
    of fixed noise (labels balanced over classes) with ``evaluator().evaluate(x, labels) -> dict``, logs the metrics
    and writes eval.csv, eval_summary.json and pictures into the run directory (docs/evaluation.md). Rank 0 only,
    while the other ranks wait at their next collective: each evaluation's time is logged (``eval/seconds``) and
    one longer than ``max_seconds`` (None: half the DDP collective timeout under DDP, else no limit) warns."""

    def __init__(self, evaluator: Callable[[], object], every_n_updates: int = 1000, num_samples: int = 1000,
                 alpha: float | None = None, grid_per_class: int = 10, seed: int = 12345,
                 max_seconds: float | None = None, every_n_jko_steps: int | None = None,
                 redraw_seconds: float = 30.0):
        if every_n_jko_steps is not None and every_n_jko_steps < 1:
            raise ValueError(f"eval.every_n_jko_steps must be a positive integer or null, got {every_n_jko_steps}")
        self.make_evaluator = evaluator
        self.every_n_updates = every_n_updates
        alphas = [float(a) for a in alpha] if isinstance(alpha, abc.Sequence) else [alpha]
        if not alphas or any(a is not None and a < 1 for a in alphas):
            raise ValueError(f"eval.alpha must be a guidance strength >= 1 or a non-empty list of them, got {alpha}")
        self.alphas = alphas  # several: each scored on the same noise; the best logged as <metric>_best, alpha_best
        self.every_n_jko_steps = every_n_jko_steps
        self.num_samples = num_samples
        self.grid_per_class = grid_per_class
        self.seed = seed
        self.max_seconds = max_seconds
        self.evaluator = None
        self.rows: list[dict] = []
        self.particles: list = []  # 2D data: positions of the first num_trajectories samples at each evaluation
        self.num_trajectories = 64
        # the run's pictures (eval_curves.png, trajectories.png) are redrawn at an evaluation at most every
        # redraw_seconds, and always when training ends: a 2D run evaluating every few seconds drew them six times
        # (0.23 s each) for the one that is kept; each evaluation's own samples picture is always written
        self.redraw_seconds = redraw_seconds
        self._drawn_at = -math.inf
        self._real_2d = None  # the held-out points drawn under the 2D particles

    def on_fit_start(self, trainer, module):
        if trainer.is_global_zero:
            self.evaluator = self.make_evaluator()  # after prepare_data: the evaluator may read prepared files
            previous = Path(trainer.default_root_dir) / "eval.csv"
            if previous.exists() and module.update > 0:  # a resumed run continues its history
                with open(previous) as f:
                    self.rows = [{k: float(v) if k != "update" else int(v) for k, v in r.items()}
                                 for r in csv.DictReader(f) if int(r["update"]) <= module.update]

    def _labels(self, module) -> torch.Tensor | None:
        num_classes = module.conditioning.num_classes
        if num_classes == 0:
            return None
        per_class = max(self.num_samples // num_classes, 1)
        return torch.arange(num_classes, device=module.device).repeat_interleave(per_class)

    def _mode_samples(self, module, n: int, labels, alpha) -> dict:
        """``{"mode_x": samples}`` when the evaluator counts its mode metrics on more samples than the ``n`` it scores
        (Toy2DEvaluator's ``mode_samples``; unconditional data): drawn apart, from the same fixed-noise seed, so the
        scored samples stay those of ``n`` alone; else ``{}``."""
        wanted = getattr(self.evaluator, "mode_samples", None)
        if labels is not None or not wanted or wanted <= n:
            return {}
        return {"mode_x": module.sample(wanted, None, alpha, seed=self.seed)}  # restores the model's mode itself

    def evaluate(self, trainer, module) -> dict | None:
        if not trainer.is_global_zero:
            return None
        update = module.update
        if self.rows and self.rows[-1]["update"] == update:  # already evaluated at this update
            return self.rows[-1]
        t0 = time.monotonic()
        labels = self._labels(module)
        n = len(labels) if labels is not None else self.num_samples
        alphas = self.alphas if module.conditioning.guided else [None]
        metrics, x, z = {}, None, None
        for alpha in alphas:  # the same noise at every alpha
            was_training = module.training
            x_a, z = module.sample(n, labels, alpha, seed=self.seed, return_inputs=True)
            module.train(was_training)
            # metrics that do not apply (None: class accuracy of unconditional samples) are left out
            found = {k: float(v) for k, v in self.evaluator.evaluate(x_a, labels, **self._mode_samples(
                module, n, labels, alpha)).items() if v is not None}
            if len(alphas) == 1:
                metrics, x = found, x_a
                break
            metrics.update({f"{k}@{alpha:g}": v for k, v in found.items()})
            key = next(iter(found), None)  # the evaluator's first metric (fid, fd, sinkhorn_div) picks the best alpha
            if key is not None and math.isfinite(found[key]) and (
                    f"{key}_best" not in metrics or self._better(key, found[key], metrics[f"{key}_best"])):
                metrics[f"{key}_best"], metrics["alpha_best"], x = found[key], float(alpha), x_a
            x = x_a if x is None else x
        if module.source is not None:  # domain transfer: how far the generator moves its inputs, E ||G(z) - z||
            metrics["mean_transport"] = float((x - z.reshape(x.shape)).flatten(1).norm(dim=1).mean())
        out = Path(trainer.default_root_dir)
        if x.ndim == 2 and module.source is not None and not self.particles:  # transfer: paths start at the inputs
            self.particles.append(z.reshape(x.shape)[: self.num_trajectories].cpu())
        picture = out / "samples" / f"update_{update:07d}.png"
        self._picture(trainer, x, labels, picture, update)
        row = {"update": update, **metrics}
        self.rows.append(row)
        seconds = time.monotonic() - t0
        log.info("evaluation at update %d (%.1f s): %s", update, seconds,
                 ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        self._check_budget(trainer, seconds, n)
        for logger in trainer.loggers:
            logger.log_metrics({"update": update, "eval/update": update, "eval/seconds": seconds,
                                **{f"eval/{k}": v for k, v in metrics.items()}}, step=trainer.global_step)
        self._write(out)
        self._run_pictures(out, force=False)
        self._log_images(trainer, picture, update)
        return row

    def _run_pictures(self, out: Path, force: bool) -> None:
        """eval_curves.png and (2D) trajectories.png, when ``redraw_seconds`` have passed since they were drawn, or
        ``force`` (the end of training)."""
        now = time.monotonic()
        if not force and now - self._drawn_at < self.redraw_seconds:
            return
        self._drawn_at = now
        if len(self.rows) > 1 and len(self.rows[0]) > 1:  # some metric besides the update
            save_metric_curves(self.rows, out / "eval_curves.png")
        if self._real_2d is not None and len(self.particles) > 1:
            save_trajectories(self.particles, self._real_2d, out / "trajectories.png",
                              title=f"particles, updates 0-{self.rows[-1]['update']}")

    @staticmethod
    def _better(metric: str, value: float, than: float) -> bool:
        from gwf.report import HIGHER_IS_BETTER

        return value > than if metric in HIGHER_IS_BETTER else value < than

    def budget(self, trainer) -> float | None:
        """Seconds one evaluation may take: ``max_seconds``, else half the DDP collective timeout under DDP (the
        other ranks wait that long at most), else None (no limit)."""
        if self.max_seconds is not None:
            return float(self.max_seconds)
        timeout = getattr(trainer.strategy, "_timeout", None) if trainer.world_size > 1 else None
        return 0.5 * timeout.total_seconds() if timeout is not None else None

    def _check_budget(self, trainer, seconds: float, n: int) -> None:
        limit = self.budget(trainer)
        if limit is not None and seconds > limit:
            log.warning("the evaluation of %d samples took %.1f s, over eval.max_seconds=%.0f s: while rank 0 "
                        "evaluates, the other ranks wait in their next collective, which fails after the DDP "
                        "timeout. Lower eval.num_samples, evaluate on the training device (eval.evaluator.device="
                        "auto), or evaluate less often (eval.every_n_updates); raise eval.max_seconds if this is "
                        "intended", n, seconds, limit)

    def _log_images(self, trainer, picture: Path, update: int) -> None:
        """The evaluation's pictures to every logger that takes images (wandb media)."""
        trajectories = picture.parent.parent / "trajectories.png"
        images = {"eval/samples": picture} if picture.exists() else {}
        if trajectories.exists() and len(self.particles) > 1:
            images["eval/trajectories"] = trajectories
        for logger in trainer.loggers:
            if callable(getattr(logger, "log_image", None)):
                for key, path in images.items():
                    logger.log_image(key=key, images=[str(path)], step=trainer.global_step,
                                     caption=[f"update {update}"])

    def _log_summary(self, trainer, module) -> None:
        """A one-row table (run, objective, tau, seed, final metrics) for loggers with ``log_table``; wandb also
        gets ``final/*`` summary keys (what gwf-report --wandb-project reads)."""
        config = (getattr(module, "hparams", {}) or {}).get("config") or {}
        last = self.rows[-1]
        meta = {"run": Path(trainer.default_root_dir).name, **run_meta(config),
                "total_updates": int(module.schedule.total_updates)}
        row = {**meta, **last}
        for logger in trainer.loggers:
            if callable(getattr(logger, "log_table", None)):
                table_row = {**row, "tau": tau_label(row["tau"])}  # one column type across runs
                logger.log_table(key="summary", columns=list(table_row), data=[list(table_row.values())])
            summary = getattr(getattr(logger, "experiment", None), "summary", None)
            if summary is not None and hasattr(summary, "update"):
                summary.update({f"final/{k}": v for k, v in row.items() if k != "run"})

    def _picture(self, trainer, x, labels, path: Path, update: int):
        if x.ndim == 2 and x.shape[1] == 2:
            real, _ = trainer.datamodule.load_split("val", len(x))
            save_scatter(x, real, path, title=f"update {update}")
            # the same (fixed-noise) particles at every evaluation: their paths through the flow (_run_pictures)
            self.particles.append(x[: self.num_trajectories].cpu())
            self._real_2d = real
            return
        k = self.grid_per_class
        if labels is not None:  # one row per class, at most k rows (1000 classes) and k columns
            per_class = len(labels) // int(labels.max() + 1)
            idx = torch.cat([torch.arange(c * per_class, c * per_class + min(k, per_class))
                             for c in range(min(int(labels.max()) + 1, k))])
            x, nrow = x[idx.to(x.device)], min(k, per_class)
        else:
            x, nrow = x[: k**2], k
        to_images = getattr(self.evaluator, "to_images", None)  # e.g. latents decoded by a VAE: only the grid's
        x = to_images(x) if callable(to_images) else x
        if x is None or x.ndim != 4 or x.shape[1] not in (1, 3):
            return  # not drawable (latents without a decoder)
        save_image_grid(x, nrow=nrow, path=path)

    def _write(self, out: Path):
        with open(out / "eval.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)
        (out / "eval_summary.json").write_text(json.dumps({"first": self.rows[0], "last": self.rows[-1]}, indent=2))

    def on_train_start(self, trainer, module):
        self.evaluate(trainer, module)

    def due(self, module) -> bool:
        """Whether the update just done ends an evaluation period: every ``every_n_updates`` updates, or, with
        ``every_n_jko_steps`` = n, the end of every JKO step k with k % n == 0 (k from 0: the official GWF
        ``--evaluate_every``)."""
        update = module.update
        if update == 0:
            return False
        if self.every_n_jko_steps is None:
            return update % self.every_n_updates == 0
        schedule = module.schedule
        return schedule.ends_outer_step(update - 1) and schedule.locate(update - 1)[0] % self.every_n_jko_steps == 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.due(module):
            self.evaluate(trainer, module)

    def on_train_end(self, trainer, module):
        if not trainer.is_global_zero:
            return
        self.evaluate(trainer, module)
        self._run_pictures(Path(trainer.default_root_dir), force=True)
        final = Path(trainer.default_root_dir) / "samples" / f"update_{module.update:07d}.png"
        if final.exists():
            (final.parent / "final.png").write_bytes(final.read_bytes())
        self._log_summary(trainer, module)


class UpdateProgress(TQDMProgressBar):
    """Lightning's bar in the run's unit: total = the run's updates (a resumed run starts where it stands), the JKO
    step in its description, the loss metrics as postfix. The data stream's virtual epochs, and the batches that
    fill the class bank before the first update, do not move it. With the bar off (sweeps, SLURM logs), one log line
    ``1 / lines`` of the run instead (update, JKO step, updates/s)."""

    def __init__(self, refresh_rate: int = 1, enabled: bool = True, lines: int = 10, min_interval: float = 0.1):
        super().__init__(refresh_rate=refresh_rate)
        self.lines = lines
        # the bar is redrawn at most every min_interval seconds (tqdm's own default), at a new JKO step and at the
        # end: a redraw per update (its postfix, Lightning's metrics) was 3% of a 2D run's updates on one thread
        self.min_interval = min_interval
        self._last_line, self._clock, self._drawn = 0, (time.monotonic(), 0), (-math.inf, "")
        if not enabled:
            self.disable()

    def redraw_due(self, update: int, total: int, description: str, now: float) -> bool:
        """Whether the bar is redrawn after ``update``: the last update, a new description (JKO step), or
        ``min_interval`` seconds since the last redraw."""
        last_time, last_description = self._drawn
        return update == total or description != last_description or now - last_time >= self.min_interval

    def _describe(self, module) -> str:
        step, _ = module.schedule.locate(min(module.update, module.schedule.total_updates - 1))
        return f"JKO step {step + 1}/{module.schedule.steps}"

    def on_train_start(self, trainer, module):
        self.train_progress_bar = Tqdm(desc=self._describe(module), total=module.schedule.total_updates,
                                       initial=module.update, unit="update", position=2 * self.process_position,
                                       disable=self.is_disabled, leave=True, dynamic_ncols=True, file=sys.stdout,
                                       smoothing=0, bar_format=self.BAR_FORMAT)
        self._clock = (time.monotonic(), module.update)
        self._last_line = module.update
        self._drawn = (-math.inf, self._describe(module))

    def on_train_epoch_start(self, trainer, *_):
        pass  # the stream's virtual epochs are not the user's unit

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        update, total = module.update, module.schedule.total_updates
        if self.is_enabled:
            bar = self.train_progress_bar
            if update != bar.n and self._should_update(update, total):
                bar.n = update
                description, now = self._describe(module), time.monotonic()
                if self.redraw_due(update, total, description, now):
                    self._drawn = (now, description)
                    bar.set_description(description, refresh=False)
                    bar.set_postfix(self.get_metrics(trainer, module))
        elif trainer.is_global_zero and update > self._last_line and (
                update - self._last_line >= max(1, total // self.lines) or update == total):
            self._last_line = update
            t0, u0 = self._clock
            rate = (update - u0) / max(time.monotonic() - t0, 1e-9)
            log.info("update %d/%d (%s), %.1f updates/s", update, total, self._describe(module), rate)

    def on_train_epoch_end(self, trainer, module):
        pass

    def get_metrics(self, trainer, module):
        metrics = super().get_metrics(trainer, module)
        metrics.pop("v_num", None)
        return metrics
