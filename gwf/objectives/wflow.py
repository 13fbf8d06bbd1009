"""W-Flow: the Sinkhorn-divergence Wasserstein gradient flow ([WF] Sec. 3; docs/wflow.md)."""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

import gwf.ot as _ot
from gwf.constants import COMPILE_MODES, DEFAULT_EPS_REL, DEFAULT_N_ITERS, ESTIMATORS
from gwf.features import FeatureSpec
from gwf.objectives.base import GenBatch, RealBatch
from gwf.objectives.field import FieldObjective
from gwf.ot.velocity import check_n_iters, sinkhorn_velocities


class WFlow(FieldObjective):
    """The field loss of gwf.objectives.field with the W-Flow velocity (gwf.ot.sinkhorn_velocities), guided with
    w = alpha - 1 ([WF] Eq. 16) when ``guidance`` and the batch has alpha and unconditional reals. The fields of all
    feature sets are solved together: one Sinkhorn loop per target (positives, second batch, unconditional reals).
    ``compile``: the own engine's fixed-iteration loop through torch.compile: true, false or auto (on CUDA only).
    ``eps_rel``: one relative eps, or a list: the sum of the unit-RMS fields of each (the official ``R_list``,
    drift_loss_ot.py ``_compute_V_all_R``: each R's field divided by its RMS, then summed)."""

    def __init__(self, eta: float = 1.0, eps_rel: float | Sequence[float] = DEFAULT_EPS_REL, engine: str = "own",
                 n_iters: float = DEFAULT_N_ITERS, estimator: str = "two_batch", rms_normalize: bool = True,
                 guidance: bool = True, features: FeatureSpec = None, feature_normalize: bool = True,
                 compile: bool | str = False):
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
        self.estimator, self.rms_normalize, self.guidance = estimator, rms_normalize, guidance

    def _guided(self, gen: GenBatch, real: RealBatch) -> bool:
        return self.guidance and gen.alpha is not None and real.uncond is not None

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
            rms_normalize=self.rms_normalize, compile=self.compile) for eps in self.eps_list]
        out = []
        for w in range(len(f_gen)):  # several eps: the sum of their (unit-RMS) fields, their logs averaged
            v = sum(velocities[w] for velocities, _ in per_eps)
            infos = [infos[w] for _, infos in per_eps]
            logs = {k: sum(i[k] for i in infos) / len(infos) for k in ("v_rms", "eps")}
            # the scale's targets are eps's: [f, neg, pos] (two_batch) or [f, pos], the same for every eps
            out.append((v, logs, infos[0]["msd"]))
        return out
