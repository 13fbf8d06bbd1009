"""One LightningModule for every objective: manual optimization of a generator (and an optional critic), the
shared JKO machinery, EMA, a class memory bank, and per-(seed, rank, update) noise. The objective is injected;
nothing here branches on its name."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import lightning as L
import torch
from torch import Tensor, nn

from gwf.conditioning import ConditioningSampler
from gwf.data.bank import ClassBank
from gwf.ema import EMA
from gwf.jko import JKOProximal, JKOSchedule
from gwf.objectives.base import GenBatch, Objective, RealBatch
from gwf.seeding import make_generator


@dataclass(frozen=True)
class OptimConfig:
    """Adam/AdamW with linear LR warm-up then constant LR, and gradient-norm clipping (None: no clipping)."""

    name: str = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = None

    def build(self, params) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
        if self.name not in optimizers:
            raise ValueError(f"unknown optimizer '{self.name}'; choose one of {sorted(optimizers)}")
        opt = optimizers[self.name](params, lr=self.lr, betas=tuple(self.betas), weight_decay=self.weight_decay)
        warm = max(self.warmup_steps, 0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda n: min(1.0, (n + 1) / warm) if warm else 1.0)
        return opt, sched


@dataclass(frozen=True)
class UpdateSizes:
    """Per-rank sizes of one update: ``gen_per_label`` samples for each of the update's labels (plus as many in the
    second batch), ``pos_per_label`` real positives per label, ``uncond_per_update`` unconditional reals (guidance),
    drawn from class banks of ``bank_capacity`` samples per class."""

    gen_per_label: int = 64
    pos_per_label: int = 64
    uncond_per_update: int = 0
    bank_capacity: int = 128


PROGRESS_BAR_KEYS = ("train/gen_loss", "train/v_rms", "train/critic_loss", "train/prox")


class GWFModule(L.LightningModule):
    def __init__(self, generator: nn.Module, objective: Objective, data_shape: tuple[int, ...],
                 conditioning: ConditioningSampler, schedule: JKOSchedule, tau: float | None = None,
                 jko_start: str = "generator", sizes: UpdateSizes = UpdateSizes(), optim: OptimConfig = OptimConfig(),
                 critic_optim: OptimConfig | None = None, critic_steps: int = 1, generator_steps: int = 1,
                 ema_decay: float = 0.999, seed: int = 0,
                 source: Callable[[int, torch.Generator], Tensor] | None = None, config: dict | None = None):
        super().__init__()
        self.automatic_optimization = False
        if config is not None:  # the composed Hydra config travels with every checkpoint
            self.save_hyperparameters({"config": config})
        self.generator, self.objective = generator, objective
        self.data_shape = tuple(int(s) for s in data_shape)
        self.conditioning, self.schedule = conditioning, schedule
        self.jko = JKOProximal(generator, tau, jko_start)
        self.ema = EMA(generator, ema_decay)
        self.sizes, self.optim, self.critic_optim = sizes, optim, critic_optim or optim
        self.critic_steps, self.generator_steps = critic_steps, generator_steps  # optimizer steps per update
        self.seed = seed
        self.source = source  # generator input: None (Gaussian noise) or a CPU sampler (n, Generator) -> [n, *shape]
        self.bank = ClassBank(conditioning.num_classes, sizes.bank_capacity, self.data_shape, sizes.uncond_per_update)
        self.register_buffer("update_count", torch.zeros((), dtype=torch.long))
        # Batches consumed from this rank's data stream: a resumed run replays the stream to here (gwf/checkpointing.py)
        self.register_buffer("data_position", torch.zeros((), dtype=torch.long))

    # ----------------------------------------------------------------------------------------------- sampling
    def rng(self, *stream) -> torch.Generator:
        """Generator for the current update, this rank and a named stream."""
        return make_generator(self.device, self.seed, self.global_rank, int(self.update_count), *stream)

    def generate(self, model: nn.Module, labels: Tensor | None, alpha: Tensor | None, n: int,
                 rng: torch.Generator) -> tuple[Tensor, tuple]:
        """n samples per label: x [L, n, *shape] and the generator inputs (z, labels, alpha), flattened to L*n."""
        num_problems = 1 if labels is None else len(labels)
        z = self.draw_inputs(num_problems * n, model.noise_shape, rng)
        lab = labels.repeat_interleave(n) if labels is not None else None
        alp = alpha.repeat_interleave(n) if alpha is not None else None
        x = model(z, lab, alp)
        return x.view(num_problems, n, *self.data_shape), (z, lab, alp)

    def draw_inputs(self, n: int, noise_shape: tuple[int, ...], rng: torch.Generator) -> Tensor:
        """Generator inputs [n, *noise_shape]: Gaussian noise, or the source distribution's samples."""
        if self.source is None:
            return torch.randn(n, *noise_shape, generator=rng, device=self.device)
        cpu = torch.Generator().manual_seed(rng.initial_seed())  # samplers draw on the CPU
        return self.source(n, cpu).reshape(n, *noise_shape).to(self.device)

    @torch.no_grad()
    def sample(self, n: int, labels: Tensor | None = None, alpha: float | Tensor | None = None, seed: int = 0,
               use_ema: bool = True, return_inputs: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """n samples [n, *shape] for per-sample ``labels`` [n] (or None) and guidance alpha (float or [n]); with
        ``return_inputs`` also the generator inputs z [n, *noise_shape]."""
        model = self.ema.model if use_ema else self.generator
        was_training = model.training
        model.eval()  # batch-norm generators sample with their running statistics
        z = self.draw_inputs(n, model.noise_shape, make_generator(self.device, "sample", seed))
        if alpha is not None and not torch.is_tensor(alpha):
            alpha = torch.full((n,), float(alpha), device=self.device)
        x = model(z, labels, alpha)
        model.train(was_training)
        return (x, z) if return_inputs else x

    # ----------------------------------------------------------------------------------------------- training
    def configure_optimizers(self):
        opt_g, sched_g = self.optim.build(self.generator.parameters())
        if self.objective.critic is None:
            return [opt_g], [sched_g]
        opt_c, sched_c = self.critic_optim.build(self.objective.critic.parameters())
        return [opt_g, opt_c], [sched_g, sched_c]

    def _real_batch(self, labels: Tensor | None, rng: torch.Generator) -> RealBatch:
        uncond = self.bank.sample_uncond(self.sizes.uncond_per_update, rng) if self.sizes.uncond_per_update else None
        return RealBatch(self.bank.sample(labels, self.sizes.pos_per_label, rng), uncond, labels)

    def _optimizer_step(self, opt, sched, loss: Tensor, params, grad_clip: float | None) -> Tensor:
        opt.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else math.inf)
        opt.step()
        sched.step()
        return grad_norm

    def _check_finite(self, what: str, **terms: Tensor) -> None:
        if all(torch.isfinite(t).all() for t in terms.values()):
            return
        values = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
        raise FloatingPointError(
            f"non-finite {what} at update {int(self.update_count)} ({values}); no parameter was updated, so the "
            "last checkpoint (checkpoints/last.ckpt in the run directory) is intact. Lower optim.lr, enable "
            "optim.grad_clip, or check the data for NaN/inf, then resume."
        )

    def training_step(self, batch, batch_idx):
        if self.finished:  # resumed after the last update: nothing left to do
            self.trainer.should_stop = True
            return None
        x_data, y_data = batch
        self.data_position += 1
        self.bank.push(x_data, y_data if self.conditioning.conditional else None)
        ready = self.bank.ready(self.sizes.pos_per_label, self.sizes.uncond_per_update)
        if not self.trainer.strategy.reduce_boolean_decision(ready, all=True):
            return None  # filling the class bank: no update yet, on every rank alike

        update = int(self.update_count)
        labels, alpha = self.conditioning.sample(self.rng("conditioning"), self.device)
        real = self._real_batch(labels, self.rng("real"))
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        logs = {}

        if self.objective.critic is not None:
            for j in range(self.critic_steps):
                with torch.no_grad():
                    x_fake, _ = self.generate(self.generator, labels, alpha, self.sizes.gen_per_label,
                                              self.rng("critic", j))
                loss_c, logs_c = self.objective.critic_loss(x_fake, real, self.rng("penalty", j))
                self._check_finite("critic loss", critic_loss=loss_c)
                logs["train/grad_norm_critic"] = self._optimizer_step(
                    optimizers[1], schedulers[1], loss_c, self.objective.critic.parameters(),
                    self.critic_optim.grad_clip)
                logs.update({"train/critic_loss": loss_c.detach(), **{f"train/{k}": v for k, v in logs_c.items()}})

        for j in range(self.generator_steps):
            x, inputs = self.generate(self.generator, labels, alpha, self.sizes.gen_per_label, self.rng("gen", j))
            second_rng = self.rng("second", j)
            gen = GenBatch(x, labels, alpha, sample=lambda: self._second_batch(labels, alpha, second_rng))
            loss, logs_g = self.objective.generator_loss(gen, real, self.rng("objective", j))
            prox = self.jko(x.flatten(0, 1), *inputs, train_mode=self.generator.training)
            self._check_finite("generator loss", gen_loss=loss, prox=prox)
            logs["train/grad_norm_gen"] = self._optimizer_step(
                optimizers[0], schedulers[0], loss + prox, self.generator.parameters(), self.optim.grad_clip)
            logs.update({"train/gen_loss": loss.detach(), "train/prox": prox.detach(),
                         **{f"train/{k}": v for k, v in logs_g.items()}})

        self.ema.update(self.generator)
        if self.schedule.ends_outer_step(update):
            self.jko.refresh(self.generator)  # G_{theta_k} <- G_theta at the end of outer step k
        self.update_count += 1
        if self._logs_due():
            logs.update({"jko/outer_step": float(self.schedule.locate(update)[0]),
                         "train/lr": schedulers[0].get_last_lr()[0]})
            logs = self._mean_over_ranks(logs)
            self.log_dict(logs, on_step=True, prog_bar=False, sync_dist=False)
            shown = {k.split("/")[1]: logs[k] for k in PROGRESS_BAR_KEYS if k in logs}
            self.log_dict(shown, on_step=True, prog_bar=True, logger=False)
        if self.finished:
            self.trainer.should_stop = True

    def _logs_due(self) -> bool:
        """Whether Lightning writes this batch's step metrics: self.log is costly, so values are only handed over
        when they will be written (every trainer.log_every_n_steps)."""
        connector = getattr(self.trainer, "_logger_connector", None)  # private, stable in Lightning 2.x
        return bool(getattr(connector, "should_update_logs", True))

    def _mean_over_ranks(self, logs: dict) -> dict:
        """Step metrics averaged over DDP ranks with one all-reduce (every rank logs the same keys)."""
        if self.trainer.world_size <= 1:
            return logs
        keys = sorted(logs)
        values = torch.stack([torch.as_tensor(logs[k], dtype=torch.float32, device=self.device).detach().reshape(())
                              for k in keys])
        values = self.trainer.strategy.reduce(values, reduce_op="mean")
        return dict(zip(keys, values.unbind()))

    @torch.no_grad()
    def _second_batch(self, labels, alpha, rng) -> Tensor:
        return self.generate(self.generator, labels, alpha, self.sizes.gen_per_label, rng)[0]

    @property
    def finished(self) -> bool:
        return int(self.update_count) >= self.schedule.total_updates

    # ----------------------------------------------------------------------------------------------- checkpoint hooks
    def rank_local_state(self) -> dict[str, Tensor]:
        """CPU copies of the state that may differ across DDP ranks, every persistent buffer (class bank, stream
        position, batch-norm statistics), for the per-rank side file of gwf/checkpointing.py."""
        keys = self._rank_local_keys()
        return {k: v.detach().cpu().clone() for k, v in self.state_dict().items() if k in keys}

    def _rank_local_keys(self) -> set[str]:
        buffers = {name for name, _ in self.named_buffers()}
        return {k for k in self.state_dict(keep_vars=True) if k in buffers}  # persistent buffers only

    def load_rank_local_state(self, state: dict[str, Tensor]) -> None:
        """Inverse of :meth:`rank_local_state` (same keys and shapes, or a clear error)."""
        expected = self._rank_local_keys()
        if set(state) != expected:
            raise KeyError(f"rank-local state does not match this model: missing {sorted(expected - set(state))}, "
                           f"unexpected {sorted(set(state) - expected)}; it was written by a different configuration")
        self.load_state_dict(state, strict=False)

    def refill_bank(self) -> None:
        """Empty the class bank: it refills from this rank's stream before the next update, on every rank alike."""
        self.bank.reset()
