"""W-Flow: the Sinkhorn-divergence Wasserstein gradient flow ([WF] Sec. 3; docs/wflow.md)."""

from __future__ import annotations

from torch import Tensor

from gwf.constants import DEFAULT_EPS_REL, DEFAULT_N_ITERS, ESTIMATORS
from gwf.features import FeatureSpec
from gwf.objectives.base import GenBatch, RealBatch
from gwf.objectives.field import FieldObjective
from gwf.ot.velocity import sinkhorn_velocity


class WFlow(FieldObjective):
    """The field loss of gwf.objectives.field with the W-Flow velocity (gwf.ot.sinkhorn_velocity), guided with
    w = alpha - 1 ([WF] Eq. 16) when ``guidance`` and the batch has alpha and unconditional reals."""

    def __init__(self, eta: float = 1.0, eps_rel: float = DEFAULT_EPS_REL, engine: str = "own",
                 n_iters: int = DEFAULT_N_ITERS, estimator: str = "two_batch", rms_normalize: bool = True,
                 guidance: bool = True, features: FeatureSpec = None, feature_normalize: bool = True):
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown W-Flow estimator '{estimator}'; choose one of {ESTIMATORS}")
        if not eps_rel > 0:
            raise ValueError(f"method.eps_rel must be > 0, got {eps_rel}")
        super().__init__(eta, features, feature_normalize)
        self.eps_rel, self.engine, self.n_iters = eps_rel, engine, n_iters
        self.estimator, self.rms_normalize, self.guidance = estimator, rms_normalize, guidance

    def _guided(self, gen: GenBatch, real: RealBatch) -> bool:
        return self.guidance and gen.alpha is not None and real.uncond is not None

    def references(self, gen: GenBatch, real: RealBatch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        grouped = {"pos": real.pos, **({"neg": gen.sample()} if self.estimator == "two_batch" else {})}
        return grouped, {"uncond": real.uncond} if self._guided(gen, real) else {}

    def field(self, f: Tensor, refs: dict[str, Tensor], gen: GenBatch, tokens: int):
        guided = "uncond" in refs
        velocity, info = sinkhorn_velocity(
            f, refs["pos"], refs.get("neg"), eps_rel=self.eps_rel, engine=self.engine, n_iters=self.n_iters,
            estimator=self.estimator, uncond=refs["uncond"] if guided else None,
            guidance_w=(gen.alpha - 1.0).repeat_interleave(tokens) if guided else None,  # per (label, token)
            rms_normalize=self.rms_normalize)
        targets = [f, refs["pos"]] if "neg" not in refs else [f, refs["neg"], refs["pos"]]  # the eps target set
        return velocity, {"v_rms": info["v_rms"].mean(), "eps": info["eps"].mean()}, targets
