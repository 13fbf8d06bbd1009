"""W-Flow: the Sinkhorn-divergence Wasserstein gradient flow ([WF] Sec. 3; docs/wflow.md)."""

from __future__ import annotations

import math
from typing import Sequence

from torch import Tensor

import gwf.ot as _ot
from gwf.constants import COMPILE_MODES, COSTS, DEFAULT_EPS_REL, DEFAULT_N_ITERS, ESTIMATORS, GUIDANCE_MODES
from gwf.features import FeatureSpec
from gwf.objectives.base import GenBatch, RealBatch
from gwf.objectives.field import FieldObjective, SetMeans
from gwf.ot.velocity import check_n_iters, sinkhorn_velocities


def guidance_mode(guidance: bool | str | None) -> str:
    """method.guidance as one of GUIDANCE_MODES: true -> velocity, false / null -> none (the keys before the
    distribution ablation existed)."""
    if guidance is True:
        return "velocity"
    if guidance is False or guidance is None:
        return "none"
    if guidance not in GUIDANCE_MODES:
        raise ValueError(f"method.guidance must be one of {list(GUIDANCE_MODES)} (or true = velocity, false = none), "
                         f"got {guidance!r}")
    return guidance


class WFlow(FieldObjective):
    """The field loss of gwf.objectives.field with the W-Flow velocity (gwf.ot.sinkhorn_velocities), guided with
    w = alpha - 1 when ``guidance`` is not "none" and the batch has alpha and unconditional reals: "velocity" ([WF]
    Eq. 16, a third transport term) or "distribution" ([WF] Table 2b: the unconditional reals as targets of the self
    term, of weight w (N - 1) / U each). The fields of all feature sets are solved together: one Sinkhorn loop per
    target (positives, second batch, unconditional reals).
    ``compile``: the own engine's fixed-iteration loop through torch.compile: true, false or auto (on CUDA only).
    ``eps_rel``: one relative eps, or a list: the sum of the unit-RMS fields of each (the official ``R_list``,
    drift_loss_ot.py ``_compute_V_all_R``: each R's field divided by its RMS, then summed).
    ``cost``: "sq" (||x - y||^2 / 2) or "l2" (||x - y||, [WF] Table 2c: eps relative to the mean distance and the
    feature scale s_k the mean distance / sqrt(C), as the official use_quadratic_cost=False; own engine only)."""

    def __init__(self, eta: float = 1.0, eps_rel: float | Sequence[float] = DEFAULT_EPS_REL, engine: str = "own",
                 n_iters: float = DEFAULT_N_ITERS, estimator: str = "two_batch", rms_normalize: bool = True,
                 guidance: bool | str = "velocity", features: FeatureSpec = None, feature_normalize: bool = True,
                 compile: bool | str = False, cost: str = "sq"):
        if cost not in COSTS:
            raise ValueError(f"method.cost must be one of {list(COSTS)} (sq: ||x - y||^2 / 2, l2: ||x - y||), "
                             f"got {cost!r}")
        if cost != "sq" and engine != "own":
            raise ValueError(f"method.cost={cost} needs method.engine=own (the {engine} engine has the quadratic "
                             f"cost only: under ||x - y|| its gradient is not a barycentric projection)")
        guidance = guidance_mode(guidance)
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown W-Flow estimator '{estimator}'; choose one of {ESTIMATORS}")
        eps_list = tuple(float(e) for e in eps_rel) if isinstance(eps_rel, (list, tuple)) else (float(eps_rel),)
        if not eps_list or not all(e > 0 for e in eps_list):
            raise ValueError(f"method.eps_rel must be > 0 (or a non-empty list of such values), got {eps_rel}")
        if len(eps_list) > 1 and not rms_normalize:
            raise ValueError("a list of method.eps_rel sums unit-RMS fields: it needs method.rms_normalize=true")
        if engine not in _ot.ENGINES:
            raise ValueError(f"unknown method.engine {engine!r}; valid engines: {sorted(_ot.ENGINES)}")
        check_n_iters(n_iters)
        if compile not in COMPILE_MODES:
            raise ValueError(f"method.compile must be false, true or auto (auto: on CUDA only), got {compile!r}")
        if compile is True and engine != "own":
            raise ValueError(f"method.compile compiles the own engine's loop; method.engine is {engine!r}")
        super().__init__(eta, features, feature_normalize)
        self.eps_rel = eps_list[0] if len(eps_list) == 1 else eps_list
        self.eps_list, self.engine, self.n_iters = eps_list, engine, n_iters
        self.compile = compile if engine == "own" else False  # auto with another engine: nothing to compile
        self.estimator, self.rms_normalize, self.guidance, self.cost = estimator, rms_normalize, guidance, cost

    def _guided(self, gen: GenBatch, real: RealBatch) -> bool:
        return self.guidance != "none" and gen.alpha is not None and real.uncond is not None

    def set_scale(self, stat: Tensor, sets: SetMeans, width: int) -> Tensor:
        """cost l2: s_k = the mean distance over set k's problems / sqrt(C) (the official scale for that cost)."""
        return super().set_scale(stat, sets, width) if self.cost == "sq" else sets.means(stat) / math.sqrt(width)

    def references(self, gen: GenBatch, real: RealBatch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        grouped = {"pos": real.pos, **({"neg": gen.sample()} if self.estimator == "two_batch" else {})}
        return self.with_uncond(grouped, real) if self._guided(gen, real) else (grouped, {})

    def fields(self, f_gen: list[Tensor], refs: dict[str, list[Tensor]], gen: GenBatch):
        return self._fields(f_gen, refs, gen)

    def field(self, f: Tensor, refs: dict[str, Tensor], gen: GenBatch, tokens: int):
        return self._fields([f], {name: [r] for name, r in refs.items()}, gen)[0]

    def _fields(self, f_gen: list[Tensor], refs: dict[str, list[Tensor]], gen: GenBatch):
        """All widths in one sinkhorn_velocities call (one Sinkhorn loop per target)."""
        guided = "uncond" in refs
        weights = [(gen.alpha - 1.0).repeat_interleave(f.shape[0] // len(gen.x)) for f in f_gen] if guided else None
        per_eps = [sinkhorn_velocities(
            f_gen, refs["pos"], refs.get("neg"), eps_rel=eps, engine=self.engine, n_iters=self.n_iters,
            estimator=self.estimator, uncond=refs["uncond"] if guided else None, guidance_w=weights,
            rms_normalize=self.rms_normalize, compile=self.compile, cost=self.cost,
            guidance="velocity" if self.guidance == "none" else self.guidance) for eps in self.eps_list]
        scale_key = "msd" if self.cost == "sq" else "mean_dist"
        out = []
        for w in range(len(f_gen)):  # several eps: the sum of their (unit-RMS) fields, their logs averaged
            v = sum(velocities[w] for velocities, _ in per_eps)
            infos = [infos[w] for _, infos in per_eps]
            logs = {k: sum(i[k] for i in infos) / len(infos) for k in ("v_rms", "eps")}
            # the scale's targets are eps's: [f, neg, pos] (two_batch) or [f, pos] (+ the unconditional reals,
            # weighted, under distribution guidance), the same for every eps
            out.append((v, logs, infos[0][scale_key]))
        return out
