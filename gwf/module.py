"""One LightningModule for every objective: manual optimization of a generator (and an optional critic), the
shared JKO machinery, EMA, a class memory bank, and per-(seed, rank, update) noise. The objective is injected;
nothing here branches on its name."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable

import lightning as L
import torch
from torch import Tensor, nn

from gwf.conditioning import ConditioningSampler
from gwf.constants import COMPILE_MODES
from gwf.data.bank import ClassBank
from gwf.ema import EMA
from gwf.jko import JKOProximal, JKOSchedule, check_identity_start
from gwf.objectives.base import GenBatch, Objective, RealBatch
from gwf.seeding import make_generator


@dataclass(frozen=True)
class OptimConfig:
    """Adam, AdamW or RMSprop, gradient-norm clipping (None: no clipping), and the learning rate per optimizer step:
    a linear warm-up over ``warmup_steps``, times a ``schedule``: ``constant``, or ``cosine`` from ``lr`` down to
    ``eta_min`` over the run's optimizer steps (``eta_min + (lr - eta_min) (1 + cos(pi n / T)) / 2``, torch's
    CosineAnnealingLR, as the official GWF ``--lr_scheduler``; T is given to ``build``)."""

    name: str = "adam"
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = None
    impl: str = "auto"  # auto: fused on CUDA (one kernel for all parameters), foreach elsewhere | fused | foreach
    alpha: float = 0.99  # RMSprop's smoothing constant (the official --rms_alpha); unused by Adam
    schedule: str = "constant"  # constant | cosine
    eta_min: float = 0.0  # cosine: the last optimizer step's learning rate

    def build(self, params, device_type: str = "cpu", total_steps: int | None = None) -> tuple[
            torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimizer and its per-optimizer-step LR schedule; ``total_steps``: the optimizer steps of the run
        (the cosine's period; required by ``schedule: cosine``)."""
        optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "rmsprop": torch.optim.RMSprop}
        if self.name not in optimizers:
            raise ValueError(f"unknown optimizer '{self.name}'; choose one of {sorted(optimizers)}")
        fused = {"foreach": True} if self.name == "rmsprop" else {"fused": True}  # torch's RMSprop has no fused form
        # auto off CUDA: foreach, the values of torch's per-parameter loop bit for bit (tests/test_scale.py) in a
        # few calls over all parameters instead of a dozen per parameter (a 2D update: 0.35 ms of 7.7 ms, one thread)
        impls = {"auto": fused if device_type == "cuda" else {"foreach": True}, "fused": fused,
                 "foreach": {"foreach": True}}
        if self.impl not in impls:
            raise ValueError(f"optim.impl must be one of {sorted(impls)}, got {self.impl!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"optim.schedule must be constant or cosine, got {self.schedule!r}")
        if self.schedule == "cosine" and not (total_steps and total_steps > 0):
            raise ValueError("optim.schedule=cosine needs the run's number of optimizer steps (total_steps)")
        hyper = {"alpha": self.alpha} if self.name == "rmsprop" else {"betas": tuple(self.betas)}
        opt = optimizers[self.name](params, lr=self.lr, weight_decay=self.weight_decay, **hyper, **impls[self.impl])
        warm, floor = max(self.warmup_steps, 0), self.eta_min / self.lr if self.lr else 0.0

        def factor(n: int) -> float:
            ramp = min(1.0, (n + 1) / warm) if warm else 1.0
            if self.schedule == "constant":
                return ramp
            return ramp * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(n, total_steps) / total_steps)))

        return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


@dataclass(frozen=True)
class UpdateSizes:
    """Per-rank sizes of one update: ``gen_per_label`` samples for each of the update's labels (plus as many in the
    second batch), ``pos_per_label`` real positives per label, ``uncond_per_update`` unconditional reals (guidance),
    drawn from class banks of ``bank_capacity`` samples per class."""

    gen_per_label: int = 64
    pos_per_label: int = 64
    uncond_per_update: int = 0
    bank_capacity: int = 128
    label_chunks: int = 1  # generator steps run the labels in this many chunks, gradients accumulated
    bank_dtype: torch.dtype = torch.float32
    bank_persist: str = "data"  # checkpoint.bank: the samples in checkpoints ("data") or replayed on resume ("replay")
    uncond_bank: int | None = None  # unconditional ring's capacity (None: uncond_per_update)
    uncond_per_label: bool = False  # each label its own unconditional draw [L, U] (official), else one shared [U]


NOISES = ("normal", "uniform")  # generator input noise: N(0, I), or U[-1, 1]^d (the official GWF default)
REALS = ("shared", "fresh")
SAMPLE_CHUNK = 4096  # samples per generator forward in GWFModule.sample (evaluation)  # one real batch per update for all its steps, or one per optimizer step (official GWF)
PROGRESS_BAR_KEYS = ("train/gen_loss", "train/v_rms", "train/critic_loss", "train/prox")


class GWFModule(L.LightningModule):
    def __init__(self, generator: nn.Module, objective: Objective, data_shape: tuple[int, ...],
                 conditioning: ConditioningSampler, schedule: JKOSchedule, tau: float | None = None,
                 jko_start: str = "generator", jko_previous_mode: str = "generator",
                 sizes: UpdateSizes = UpdateSizes(), optim: OptimConfig = OptimConfig(),
                 critic_optim: OptimConfig | None = None, critic_steps: int = 1, generator_steps: int = 1,
                 ema_decay: float = 0.999, ema_warmup: bool = True, seed: int = 0,
                 source: Callable[[int, torch.Generator], Tensor] | None = None, config: dict | None = None,
                 compile: bool | str = False, noise: str = "normal", reals: str = "shared"):
        super().__init__()
        if noise not in NOISES:
            raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")
        self.noise = noise
        if reals not in REALS:
            raise ValueError(f"loop.reals must be one of {REALS}, got {reals!r}")
        self.reals = reals
        if compile not in COMPILE_MODES:
            raise ValueError(f"model.compile must be false, true or auto (auto: on CUDA only), got {compile!r}")
        self.compile_mode, self.compiled = compile, False
        self.automatic_optimization = False
        if config is not None:  # the composed Hydra config travels with every checkpoint
            self.save_hyperparameters({"config": config})
        self.generator, self.objective = generator, objective
        self.data_shape = tuple(int(s) for s in data_shape)
        self.conditioning, self.schedule = conditioning, schedule
        self.jko = JKOProximal(generator, tau, jko_start, jko_previous_mode)
        self.ema = EMA(generator, ema_decay, ema_warmup)
        self.sizes, self.optim, self.critic_optim = sizes, optim, critic_optim or optim
        self.critic_steps, self.generator_steps = critic_steps, generator_steps  # optimizer steps per update
        steps = (critic_steps if objective.critic is not None else 0) + generator_steps
        # reals a class ring must hold before the first update: the update's disjoint draws with fresh reals
        self.min_reals = sizes.pos_per_label * (steps if reals == "fresh" else 1)
        if reals == "fresh" and sizes.bank_capacity < steps * sizes.pos_per_label:
            raise ValueError(
                f"loop.reals=fresh gives each of the update's {steps} optimizer steps its own "
                f"{sizes.pos_per_label} reals, disjoint draws from the bank: set batch.bank_capacity (and, for data "
                f"never seen before, data.batch_size) to at least {steps * sizes.pos_per_label}, or loop.reals=shared")
        self.seed = seed
        self.source = source  # generator input: None (Gaussian noise) or a CPU sampler (n, Generator) -> [n, *shape]
        if tau is not None and jko_start == "noise" and source is None:  # at build time, not at the first update
            z = torch.zeros(1, *generator.noise_shape)
            z = generator.identity_input(z) if hasattr(generator, "identity_input") else z
            check_identity_start(tuple(z.shape[1:]), self.data_shape)
        labels = conditioning.labels_per_update if conditioning.conditional else 1
        if not 1 <= sizes.label_chunks <= labels or labels % sizes.label_chunks:
            raise ValueError(f"batch.label_chunks={sizes.label_chunks} must divide the {labels} label(s) per rank and "
                             "update (batch.labels_per_update; 1 for unconditional data)")
        uncond_ring = (sizes.uncond_bank or sizes.uncond_per_update) if sizes.uncond_per_update else 0
        self.bank = ClassBank(conditioning.num_classes, sizes.bank_capacity, self.data_shape, uncond_ring,
                              dtype=sizes.bank_dtype, persist=sizes.bank_persist)
        self.register_buffer("update_count", torch.zeros((), dtype=torch.long))
        # Batches consumed from this rank's data stream: a resumed run replays the stream to here (gwf/checkpointing.py)
        self.register_buffer("data_position", torch.zeros((), dtype=torch.long))
        # First update with a non-finite loss and which loss (0 critic, 1 generator), -1: none; read on the host only
        # at logs and checkpoints on accelerators (docs/resume.md), at once on CPU.
        self.register_buffer("_nonfinite", torch.full((2,), -1, dtype=torch.long), persistent=False)
        # Host copies, so that an update never reads the device: None means "read the buffer again" (after a load).
        self._host_update: int | None = 0
        self._bank_ready = False  # every rank's bank can serve an update (it stays so until refill_bank)
        self.defer_finite_check: bool | None = None  # None: defer on accelerators, check at once on CPU

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_update, self._bank_ready = None, False

    @property
    def update(self) -> int:
        """Updates done (``update_count``), from a host copy."""
        if self._host_update is None:
            self._host_update = int(self.update_count)
        return self._host_update

    def compile_networks(self, device_type: str) -> bool:
        """``model.compile``: the generator (and the JKO frozen copy) through torch.compile, in place (parameter names
        and state dicts unchanged), when true, or auto on CUDA (where an eager update is launch-bound). The EMA copy
        stays eager (it only samples). Returns whether the networks are compiled."""
        if not self.compiled and (self.compile_mode is True or (self.compile_mode == "auto" and device_type == "cuda")):
            self.generator.compile()
            if self.jko.previous is not None:
                self.jko.previous.compile()
            self.compiled = True
        return self.compiled

    def on_fit_start(self) -> None:
        self.compile_networks(self.device.type)

    # ----------------------------------------------------------------------------------------------- sampling
    def rng(self, *stream) -> torch.Generator:
        """Generator for the current update, this rank and a named stream."""
        return make_generator(self.device, self.seed, self.global_rank, self.update, *stream)

    def generate(self, model: nn.Module, labels: Tensor | None, alpha: Tensor | None, n: int,
                 rng: torch.Generator) -> tuple[Tensor, tuple]:
        """n samples per label: x [L, n, *shape] and the generator inputs (z, labels, alpha), flattened to L*n."""
        num_problems = 1 if labels is None else len(labels)
        return self._forward(model, self.model_inputs(model, num_problems * n, rng), labels, alpha, n)

    def _forward(self, model: nn.Module, z: Tensor, labels: Tensor | None, alpha: Tensor | None,
                 n: int) -> tuple[Tensor, tuple]:
        """model on inputs z [L*n, *noise_shape] for n samples per label: x [L, n, *shape] and (z, labels, alpha)."""
        lab = labels.repeat_interleave(n) if labels is not None else None
        alp = alpha.repeat_interleave(n) if alpha is not None else None
        x = model(z, lab, alp)
        return x.view(len(z) // n, n, *self.data_shape), (z, lab, alp)

    def model_inputs(self, model: nn.Module, n: int, rng: torch.Generator) -> Tensor:
        """n inputs of ``model``: its ``noise_shape``, and its ``normal_tail`` (0 when it has none)."""
        return self.draw_inputs(n, model.noise_shape, rng, getattr(model, "normal_tail", 0))

    def draw_inputs(self, n: int, noise_shape: tuple[int, ...], rng: torch.Generator, normal_tail: int = 0) -> Tensor:
        """Generator inputs [n, *noise_shape]: noise (``noise``: standard normal, or uniform on [-1, 1] as the
        official GWF's default ``--type_noise unif``), or the source distribution's samples. ``normal_tail`` = k:
        the last k coordinates of flat noise are standard normal whatever ``noise`` (a generator's latent next to
        its image-shaped noise, as the official NCSN++'s ``zz = torch.randn``)."""
        if self.source is None:
            if self.noise == "uniform":
                u = torch.rand(n, *noise_shape, generator=rng, device=self.device, dtype=self.dtype)
                u = u.mul_(2.0).sub_(1.0)
                if normal_tail:
                    if len(noise_shape) != 1 or not 0 < normal_tail <= noise_shape[0]:
                        raise ValueError(f"normal_tail={normal_tail} needs flat noise of at least that size, got "
                                         f"noise_shape {tuple(noise_shape)}")
                    u[:, -normal_tail:] = torch.randn(n, normal_tail, generator=rng, device=self.device,
                                                      dtype=self.dtype)
                return u
            return torch.randn(n, *noise_shape, generator=rng, device=self.device, dtype=self.dtype)
        cpu = torch.Generator().manual_seed(rng.initial_seed())  # samplers draw on the CPU
        return self.source(n, cpu).reshape(n, *noise_shape).to(self.device)

    @torch.no_grad()
    def sample(self, n: int, labels: Tensor | None = None, alpha: float | Tensor | None = None, seed: int = 0,
               use_ema: bool = True, return_inputs: bool = False,
               chunk: int = SAMPLE_CHUNK) -> Tensor | tuple[Tensor, Tensor]:
        """n samples [n, *shape] for per-sample ``labels`` [n] (or None) and guidance alpha (float or [n]); with
        ``return_inputs`` also the generator inputs z [n, *noise_shape]. The noise is drawn for all n at once; the
        generator runs on ``chunk`` samples at a time (49,920 CIFAR samples in one forward would not fit a GPU)."""
        model = self.ema.model if use_ema else self.generator
        was_training = model.training
        model.eval()  # batch-norm generators sample with their running statistics
        z = self.model_inputs(model, n, make_generator(self.device, "sample", seed))
        if alpha is not None and not torch.is_tensor(alpha):
            alpha = torch.full((n,), float(alpha), device=self.device)
        parts = [slice(i, i + chunk) for i in range(0, n, chunk)]
        x = torch.cat([model(z[p], None if labels is None else labels[p], None if alpha is None else alpha[p])
                       for p in parts]) if len(parts) > 1 else model(z, labels, alpha)
        model.train(was_training)
        return (x, z) if return_inputs else x

    # ----------------------------------------------------------------------------------------------- training
    def configure_optimizers(self):
        updates = self.schedule.total_updates  # each network's optimizer steps over the run set a cosine's period
        opt_g, sched_g = self.optim.build(self.generator_parameters(), self.device.type,
                                          updates * self.generator_steps)
        if self.objective.critic is None:
            return [opt_g], [sched_g]
        opt_c, sched_c = self.critic_optim.build(self.objective.critic.parameters(), self.device.type,
                                                 updates * self.critic_steps)
        return [opt_g, opt_c], [sched_g, sched_c]

    def generator_parameters(self) -> list[nn.Parameter]:
        """What the generator's optimizer updates: the generator and the objective's parameters trained by both
        players (the official MMD GAN's kernel weights)."""
        return [*self.generator.parameters(), *self.objective.generator_parameters()]

    def _real_batches(self, labels: Tensor | None, steps: int, rng: torch.Generator) -> list[RealBatch]:
        """The reals of each of the update's ``steps`` optimizer steps: one batch for all (``reals: shared``), or
        ``steps`` disjoint batches drawn together without replacement (``fresh``; the guidance reals are shared)."""
        rows = (1 if labels is None else len(labels)) if self.sizes.uncond_per_label else None
        uncond = (self.bank.sample_uncond(self.sizes.uncond_per_update, rng, rows) if self.sizes.uncond_per_update
                  else None)
        m = self.sizes.pos_per_label
        if self.reals == "shared":
            return [RealBatch(self.bank.sample(labels, m, rng), uncond, labels)] * steps
        return [RealBatch(pos, uncond, labels) for pos in self.bank.sample(labels, steps * m, rng).split(m, dim=1)]

    def _optimizer_step(self, opt, sched, params, grad_clip: float | None, measure: bool = True) -> Tensor | None:
        """One optimizer step after clipping the gradients' global norm to ``grad_clip`` (None: no clipping).
        Returns that norm (for the logs), or None without clipping when not ``measure``: a norm that no log writes
        is not computed (clipping at an infinite norm multiplies by exactly 1)."""
        grad_norm = None
        if grad_clip or measure:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip else math.inf, foreach=True)
        opt.step()
        sched.step()
        return grad_norm

    _LOSSES = ("critic loss", "generator loss")
    _ADVICE = ("Lower optim.lr, enable optim.grad_clip, or check the data for NaN/inf, then resume.")

    def _check_finite(self, what: str, **terms: Tensor) -> None:
        """Stop on a non-finite loss. On CPU at once, before any parameter changes, on every rank of a DDP run alike
        (the terms are gathered from all ranks: one small all_gather per check); on an accelerator the first such
        update is recorded on the device and reported by ``raise_if_nonfinite`` (at logs and checkpoints, so a
        non-finite state is never saved, combined over the ranks) instead of reading the device at every update."""
        if not (self.device.type != "cpu" if self.defer_finite_check is None else self.defer_finite_check):
            one_process = self._trainer is None or self.trainer.world_size <= 1
            if one_process and all(math.isfinite(float(t.detach())) for t in terms.values()):
                return  # the common case on one CPU process: a host read per term, no tensor ops
            values = torch.stack([t.detach().float().reshape(()) for t in terms.values()])
            if self._trainer is not None and self.trainer.world_size > 1:  # every rank learns every rank's values
                values = self.trainer.strategy.all_gather(values).reshape(self.trainer.world_size, -1)
            else:
                values = values[None]
            ranks = [r for r in range(len(values)) if not bool(torch.isfinite(values[r]).all())]
            if ranks:  # the same message on every rank, before any backward pass (no rank left in a collective)
                where = f" on rank {', '.join(map(str, ranks))} of {len(values)}" if len(values) > 1 else ""
                shown = ", ".join(f"{k}={float(v):.4g}" for k, v in zip(terms, values[ranks[0]]))
                raise FloatingPointError(
                    f"non-finite {what} at update {self.update}{where} ({shown}); no parameter was updated, so the "
                    f"last checkpoint (checkpoints/last.ckpt in the run directory) is intact. {self._ADVICE}")
            return
        bad = ~torch.stack([torch.isfinite(t.detach()).all() for t in terms.values()]).all()
        found = torch.stack([self.update_count, self.update_count * 0 + self._LOSSES.index(what)])  # no host copy
        self._nonfinite.copy_(torch.where(bad & (self._nonfinite[0] < 0), found, self._nonfinite))

    def raise_if_nonfinite(self) -> None:
        """Report a non-finite loss recorded on the device (one read of the device). Under DDP the record is
        combined over the ranks first (every rank calls this at the same update), so all ranks stop together."""
        record = self._nonfinite
        if self._trainer is not None and self.trainer.world_size > 1:
            record = self.trainer.strategy.reduce(record.float(), reduce_op="max").long()  # the latest if several
        update, which = record.tolist()
        if update >= 0:
            raise FloatingPointError(
                f"non-finite {self._LOSSES[which]} at update {update} (found at update {self.update}); the last "
                f"checkpoint (checkpoints/last.ckpt in the run directory) is from before it and intact. {self._ADVICE}")

    def training_step(self, batch, batch_idx):
        if self.finished:  # resumed after the last update: nothing left to do
            self.trainer.should_stop = True
            return None
        x_data, y_data = batch
        self.data_position += 1
        self.push_to_bank(x_data, y_data, self.data_position)
        if not self._bank_ready:  # while the banks fill: one host decision per batch, on every rank alike
            ready = self.bank.ready(self.min_reals, self.sizes.uncond_per_update)
            self._bank_ready = self.trainer.strategy.reduce_boolean_decision(ready, all=True)
            if not self._bank_ready:
                return None

        update = self.update
        labels, alpha = self.conditioning.sample(self.rng("conditioning"), self.device)
        critic_steps = self.critic_steps if self.objective.critic is not None else 0
        reals = self._real_batches(labels, critic_steps + self.generator_steps, self.rng("real"))
        optimizers, schedulers = self.optimizers(), self.lr_schedulers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        logs, logs_due = {}, self._logs_due()  # constant during the step (Lightning advances it after the batch)

        if self.objective.critic is not None:
            for j in range(self.critic_steps):
                with torch.no_grad():
                    x_fake, inputs = self.generate(self.generator, labels, alpha, self.sizes.gen_per_label,
                                                   self.rng("critic", j))
                noise = {"z": inputs[0]} if self.objective.uses_noise else {}
                loss_c, logs_c = self.objective.critic_loss(x_fake, reals[j], self.rng("penalty", j), **noise)
                self._check_finite("critic loss", critic_loss=loss_c)
                optimizers[1].zero_grad(set_to_none=True)
                self.manual_backward(loss_c)
                norm = self._optimizer_step(optimizers[1], schedulers[1], self.objective.critic.parameters(),
                                            self.critic_optim.grad_clip, measure=logs_due)
                if norm is not None:
                    logs["train/grad_norm_critic"] = norm
                logs.update({"train/critic_loss": loss_c.detach(), **{f"train/{k}": v for k, v in logs_c.items()}})

        # The generator's steps leave the critic's parameters out of autograd (Lightning's toggled_optimizer): their
        # gradients would be discarded by the next critic step's zero_grad; the generator's are the same.
        with self.toggled_optimizer(optimizers[0]) if len(optimizers) > 1 else contextlib.nullcontext():
            for j in range(self.generator_steps):
                logs.update(self._generator_step(optimizers[0], schedulers[0], labels, alpha, reals[critic_steps + j],
                                                 j, measure=logs_due))

        self.ema.update(self.generator)
        if self.schedule.ends_outer_step(update):
            self.jko.refresh(self.generator)  # G_{theta_k} <- G_theta at the end of outer step k
        self.update_count += 1
        self._host_update += 1
        if logs_due:
            self.raise_if_nonfinite()
            logs.update({"jko/outer_step": float(self.schedule.locate(update)[0]),
                         "train/lr": schedulers[0].get_last_lr()[0], "update": float(update + 1)})
            logs = self._mean_over_ranks(logs)
            self.log_dict(logs, on_step=True, prog_bar=False, sync_dist=False)
            shown = {k.split("/")[1]: logs[k] for k in PROGRESS_BAR_KEYS if k in logs}
            self.log_dict(shown, on_step=True, prog_bar=True, logger=False)
        if self.finished:
            self.trainer.should_stop = True

    def _generator_step(self, opt, sched, labels: Tensor | None, alpha: Tensor | None, real: RealBatch,
                        j: int, measure: bool = True) -> dict:
        """One generator optimizer step. With ``label_chunks`` > 1 the labels go through the network (with their
        second batch, positives and the shared guidance reals) in chunks, each chunk's loss weighted by its share
        of the labels and its gradients accumulated without a DDP all-reduce but for the last chunk: the same
        update as one pass (objectives whose loss is a mean over problems; batch-norm generators and
        feature_normalize see per-chunk statistics). The noise of all labels is drawn first, as in one pass."""
        n, num = self.sizes.gen_per_label, 1 if labels is None else len(labels)
        z = self.model_inputs(self.generator, num * n, self.rng("gen", j))
        second_rng, second_z = self.rng("second", j), []
        size = num // self.sizes.label_chunks
        opt.zero_grad(set_to_none=True)
        for start in range(0, num, size):
            chunk = slice(start, start + size)
            lab, alp = (None if labels is None else labels[chunk]), (None if alpha is None else alpha[chunk])
            rows = slice(chunk.start * n, chunk.stop * n)

            @torch.no_grad()
            def second_batch(lab=lab, alp=alp, rows=rows) -> Tensor:  # W-Flow's q', drawn for all labels once
                if not second_z:
                    second_z.append(self.model_inputs(self.generator, num * n, second_rng))
                return self._forward(self.generator, second_z[0][rows], lab, alp, n)[0]

            with self._gradient_sync(start + size == num):
                x, inputs = self._forward(self.generator, z[rows], lab, alp, n)
                uncond = real.uncond[chunk] if self.sizes.uncond_per_label and real.uncond is not None else real.uncond
                chunk_real = real if size == num else RealBatch(real.pos[chunk], uncond, lab)
                loss, logs_g = self.objective.generator_loss(GenBatch(x, lab, alp, second_batch, inputs[0]),
                                                             chunk_real, self.rng("objective", j))
                prox = self.jko(x.flatten(0, 1), *inputs, train_mode=self.generator.training,
                                rng=self.rng("jko", j, start))
                self._check_finite("generator loss", gen_loss=loss, prox=prox)
                self.manual_backward(loss + prox if size == num else (loss + prox) * (size / num))
        grad_norm = self._optimizer_step(opt, sched, self.generator_parameters(), self.optim.grad_clip, measure)
        norm = {} if grad_norm is None else {"train/grad_norm_gen": grad_norm}
        return {**norm, "train/gen_loss": loss.detach(), "train/prox": prox.detach(),
                **{f"train/{k}": v for k, v in logs_g.items()}}

    def _gradient_sync(self, sync: bool):
        """A no-op, or DDP's no_sync: the gradients of a chunk accumulate locally until the last chunk."""
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return contextlib.nullcontext() if sync or block is None else block()

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

    @property
    def finished(self) -> bool:
        return self.update >= self.schedule.total_updates

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
        optional = {"bank.data", "bank.uncond", "bank.pushed_at", "bank.uncond_pushed_at"}  # either bank persistence
        if set(state) - optional != expected - optional:
            raise KeyError(f"rank-local state does not match this model: missing {sorted(expected - set(state))}, "
                           f"unexpected {sorted(set(state) - expected)}; it was written by a different configuration")
        self.load_state_dict(state, strict=False)

    def push_to_bank(self, x: Tensor, y: Tensor, position: Tensor | int) -> None:
        """A data batch into the class bank (training_step, and the replay of a resumed "replay" bank)."""
        self.bank.push(x, y if self.conditioning.conditional else None, position)

    def replay_bank(self, batches, start: int) -> int:
        """Rebuild a "replay" bank (checkpoint.bank) from ``batches``, the data stream from position ``start`` on,
        pushed as training_step pushed them; checked slot by slot against the loaded positions. Returns the
        number of batches pushed."""
        self.bank.start_replay()
        n = 0
        for n, (x, y) in enumerate(batches, 1):
            self.push_to_bank(x.to(self.device), y.to(self.device), start + n)
        self.bank.finish_replay()
        return n

    def refill_bank(self) -> None:
        """Empty the class bank: it refills from this rank's stream before the next update, on every rank alike."""
        self.bank.reset()
        self._bank_ready = False
