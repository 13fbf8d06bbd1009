"""Evaluation of 2D toys against held-out target samples: Sinkhorn divergence, and for Gaussian-mixture
targets, mode recall and high-quality rate."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gwf.data.toy2d import GaussianMixture, make_sampler
from gwf.objectives.kernels import make_kernel
from gwf.objectives.learned_kernel import LearnedKernel
from gwf.objectives.mmd_gan import mmd2
from gwf.objectives.mmd import mmd2_unbiased
from gwf.seeding import make_generator


# fp32 exp(t) is subnormal or 0 below about -87.3, and torch's CPU exp is 20-50x slower on such inputs (measured:
# 2.6 ms for 4M values in [-80, 0], 76 ms in [-200, 0]). Clamping there changes no sum of a log-sum-exp: its largest
# term is 1 and all clamped terms together stay below 1e-34.
EXP_FLOOR = -87.0


def _softmin(eps: float, c: Tensor, h: Tensor) -> Tensor:
    """-eps log sum_j exp(h_j - c_ij / eps) for each row i (geomloss's softmin_tensorized)."""
    t = torch.add(h.view(1, -1), c, alpha=-1.0 / eps)
    m = t.amax(1, keepdim=True)
    return -eps * (t.sub_(m).clamp_min_(EXP_FLOOR).exp_().sum(1).log_() + m.view(-1))


def _half_sq_dist(x: Tensor, y: Tensor) -> Tensor:
    """|x_i - y_j|^2 / 2 as geomloss forms it: |x_i|^2 - 2 x_i.y_j + |y_j|^2, halved."""
    return ((x * x).sum(1, keepdim=True) - 2 * x @ y.T + (y * y).sum(1)) / 2


def eps_schedule(diameter: float, blur: float, scaling: float) -> list[float]:
    """geomloss's annealing for p = 2: diameter^2, then blur^2 divided by scaling^2 at each step, down to blur^2."""
    return ([diameter ** 2] + [float(np.exp(e)) for e in np.arange(2 * np.log(diameter), 2 * np.log(blur),
                                                                   2 * np.log(scaling))] + [blur ** 2])


def _self_potential(c: Tensor, h: Tensor, schedule: list[float]) -> Tensor:
    """The symmetric potential of one cloud with itself (OT_eps(x, x) of the debiased divergence) after the
    annealing ``schedule`` and the last full update: it depends on that cloud and the schedule only."""
    eps = schedule[0]
    f = _softmin(eps, c, h)
    for eps in schedule:
        f = 0.5 * (f + _softmin(eps, c, h + f / eps))
    return _softmin(eps, c, h + f / eps)


class SelfPotentials:
    """The self potentials (and cost matrix) of one fixed cloud ``y``, memoized per annealing schedule: an
    evaluator scores every sample set against the same reference, and the schedule (which starts from the squared
    diameter of both clouds) is the reference's own as long as the samples stay inside its bounding box, so that
    quarter of the Sinkhorn divergence's work is done once. The values are the ones computed inline, bit for
    bit. ``size``: how many schedules are remembered (the latest ones)."""

    def __init__(self, y: Tensor, size: int = 4):
        self.y = y.detach().float().cpu()
        self.size = size
        self.cost = _half_sq_dist(self.y, self.y)
        self.log_weights = torch.full((len(self.y),), float(np.log(np.float32(1.0 / len(self.y)))))
        self._memo: dict[tuple[float, ...], Tensor] = {}

    def __call__(self, schedule: list[float]) -> Tensor:
        key = tuple(schedule)
        if key not in self._memo:
            if len(self._memo) >= self.size:
                self._memo.pop(next(iter(self._memo)))
            self._memo[key] = _self_potential(self.cost, self.log_weights, schedule)
        return self._memo[key]


def sinkhorn_divergence(x: Tensor, y: Tensor, blur: float = 0.05, scaling: float = 0.9,
                        y_potentials: SelfPotentials | None = None) -> float:
    """Debiased Sinkhorn divergence S_eps(x, y) = OT_eps(x, y) - OT_eps(x, x) / 2 - OT_eps(y, y) / 2 between
    uniform clouds [N, D] and [M, D], cost |x - y|^2 / 2, eps = blur^2, in fp32. The algorithm of geomloss's
    SamplesLoss("sinkhorn", p=2, debias=True, backend="tensorized"): symmetric updates annealed from the squared
    diameter of the two clouds, then one last full update (tests/test_toy2d.py checks agreement). Its
    log-sum-exp clamps exponents that would underflow, which makes it 10-20x faster on a CPU. ``y_potentials``:
    the memo of y's self term (``SelfPotentials(y)``, for a y scored against many x; the same value)."""
    x, y = x.detach().float().cpu(), y.detach().float().cpu()
    if y_potentials is not None and not torch.equal(y_potentials.y, y):
        raise ValueError("y_potentials belong to another cloud than y: build SelfPotentials(y) for this y")
    n, m = len(x), len(y)
    log_a, log_b = float(np.log(np.float32(1.0 / n))), float(np.log(np.float32(1.0 / m)))
    ha, hb = torch.full((n,), log_a), torch.full((m,), log_b)
    c_xy, c_yx, c_xx = _half_sq_dist(x, y), _half_sq_dist(y, x), _half_sq_dist(x, x)
    lo, hi = torch.minimum(x.min(0).values, y.min(0).values), torch.maximum(x.max(0).values, y.max(0).values)
    schedule = eps_schedule(float((hi - lo).norm()), blur, scaling)
    # The self terms OT(x, x) and OT(y, y) run apart from the cross term: each is its own fixed-point iteration.
    f_aa = _self_potential(c_xx, ha, schedule)
    g_bb = y_potentials(schedule) if y_potentials is not None else _self_potential(_half_sq_dist(y, y), hb, schedule)
    eps = schedule[0]
    f_ba, g_ab = _softmin(eps, c_xy, hb), _softmin(eps, c_yx, ha)
    for eps in schedule:  # both from the previous pair
        new_f, new_g = _softmin(eps, c_xy, hb + g_ab / eps), _softmin(eps, c_yx, ha + f_ba / eps)
        f_ba, g_ab = 0.5 * (f_ba + new_f), 0.5 * (g_ab + new_g)
    f_ba, g_ab = _softmin(eps, c_xy, hb + g_ab / eps), _softmin(eps, c_yx, ha + f_ba / eps)
    return float((f_ba - f_aa).mean() + (g_ab - g_bb).mean())


def mode_metrics(x: Tensor, mixture: GaussianMixture, k_sigma: float = 3.0, recall_fraction: float = 0.25) -> dict:
    """hq_rate: fraction of samples within k_sigma * std of a mode center. mode_recall: fraction of modes that
    receive (as high-quality samples) at least ``recall_fraction`` of their expected mass weight * N."""
    x = x.detach().float().cpu()
    dist = torch.cdist(x, mixture.centers)  # [N, K]
    nearest, dmin = dist.argmin(1), dist.min(1).values
    hq = dmin <= k_sigma * mixture.std
    counts = torch.bincount(nearest[hq], minlength=len(mixture.centers)).float()
    covered = counts >= recall_fraction * mixture.weights * len(x)
    return {"hq_rate": float(hq.float().mean()), "mode_recall": float(covered.float().mean())}


class Toy2DEvaluator:
    """``evaluate(x [N, 2], labels) -> dict`` against held-out samples of the target: ``sinkhorn_div`` and
    ``mmd2`` (unbiased, Gaussian kernel with a FIXED bandwidth ``mmd_sigma``, so values compare across runs)
    always, ``hq_rate`` and ``mode_recall`` for Gaussian-mixture targets. ``official_mmd``: also ``mmd2_gwf``, the
    official GWF ``--compute_MMD`` value, the unbiased MMD^2 on the raw points under the learned kernel's uniform
    mixture of its 7 families (gwf.objectives.learned_kernel; train.py evaluates with ``get_kernel(args)``, untrained
    for every objective but the MMD rows, whose trained weights make their value run-specific).

    ``mode_samples``: hq_rate and mode_recall are counted on this many generated samples (``mode_x``, drawn by the
    evaluation callback from the same fixed-noise seed) instead of the scored ones when it is larger. They cost a
    distance to each mode per sample, where the divergences cost a transport problem: at 1,000 samples an hq_rate
    near 0.93 has a binomial error of 0.008, at 20,000 of 0.002."""

    def __init__(self, target: str, num_samples: int = 2000, blur: float = 0.05, mmd_sigma: float = 0.5,
                 seed: int = 0, official_mmd: bool = False, mode_samples: int | None = None):
        if mode_samples is not None and mode_samples < 1:
            raise ValueError(f"eval.evaluator.mode_samples must be a positive number of samples or null, got "
                             f"{mode_samples}")
        self.sampler = make_sampler(target)
        # only a Gaussian mixture has modes to count: no extra samples are drawn for the other targets
        self.mode_samples = mode_samples if isinstance(self.sampler, GaussianMixture) else None
        self.reference = self.sampler(num_samples, make_generator("cpu", "toy2d-eval", target, seed))
        self.blur = blur
        self.reference_potentials = SelfPotentials(self.reference)  # the reference's self term, once per schedule
        self.kernel = make_kernel("gaussian", sigma=mmd_sigma)
        self.official_kernel = LearnedKernel().requires_grad_(False) if official_mmd else None

    def evaluate(self, x: Tensor, labels: Tensor | None = None, mode_x: Tensor | None = None) -> dict[str, float]:
        """The metrics of samples x [N, 2]; ``mode_x`` [M, 2] (more samples of the same model): hq_rate and
        mode_recall on them instead of on x."""
        x = x.detach().float().cpu()
        out = {"sinkhorn_div": sinkhorn_divergence(x, self.reference, self.blur,
                                                   y_potentials=self.reference_potentials),
               "mmd2": float(mmd2_unbiased(x, self.reference, self.kernel))}
        if isinstance(self.sampler, GaussianMixture):
            out.update(mode_metrics(x if mode_x is None else mode_x, self.sampler))
        if self.official_kernel is not None:
            x64, ref = x.double()[None], self.reference.double()[None]
            gram = self.official_kernel.double().gram
            out["mmd2_gwf"] = float(mmd2(gram(ref, ref), gram(x64, x64), gram(ref, x64), unbiased=True)[0])
        return out
