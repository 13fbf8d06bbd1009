"""W-Flow: the Sinkhorn-divergence Wasserstein gradient flow ([WF] Sec. 3)."""

from __future__ import annotations

from torch import Tensor

from gwf.constants import DEFAULT_EPS_REL, DEFAULT_N_ITERS
from gwf.objectives.base import GenBatch, Objective, RealBatch
from gwf.ot.velocity import sinkhorn_velocity

ESTIMATORS = ("two_batch", "single", "masked")


class WFlow(Objective):
    """Generator loss  mean_{i,d} || x - stopgrad(x + eta V(x)) ||^2  with the two-batch Sinkhorn velocity

        V(x) = T_{q->p}(x) - T_{q->q'}(x)                                   ([WF] Sec. 3.3)
        V~(x) = V(x) + w (T_{q->p(.|c)}(x) - T_{q->p(.|empty)}(x)),  w = alpha - 1   ([WF] Eq. 16)

    so that one gradient step moves each sample by (2 eta / (N D)) V: an explicit Euler step of the flow.
    ``estimator``: "two_batch" (q' is a second batch from the current model, no gradient), "single" (q' = q, no mask:
    the self plan is near-diagonal and the repulsion is lost; [WF] ablation) or "masked" (q' = q with the self-pair
    masked, Drifting-style).
    """

    def __init__(
        self,
        eta: float = 1.0,
        eps_rel: float = DEFAULT_EPS_REL,
        engine: str = "own",
        n_iters: int = DEFAULT_N_ITERS,
        estimator: str = "two_batch",
        rms_normalize: bool = True,
        guidance: bool = True,
    ):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown W-Flow estimator '{estimator}'; choose one of {ESTIMATORS}")
        if not eps_rel > 0:
            raise ValueError(f"method.eps_rel must be > 0, got {eps_rel}")
        self.eta, self.eps_rel, self.engine, self.n_iters = eta, eps_rel, engine, n_iters
        self.estimator, self.rms_normalize, self.guidance = estimator, rms_normalize, guidance

    def generator_loss(self, gen: GenBatch, real: RealBatch) -> tuple[Tensor, dict[str, Tensor]]:
        x = gen.x.flatten(2)  # [L, N, D]
        neg = gen.sample().flatten(2) if self.estimator == "two_batch" else None
        guided = self.guidance and gen.alpha is not None and real.uncond is not None
        velocity, info = sinkhorn_velocity(
            x,
            real.pos.flatten(2),
            neg,
            eps_rel=self.eps_rel,
            engine=self.engine,
            n_iters=self.n_iters,
            estimator=self.estimator,
            uncond=real.uncond.flatten(1) if guided else None,
            guidance_w=(gen.alpha - 1.0) if guided else None,
            rms_normalize=self.rms_normalize,
        )
        target = (x + self.eta * velocity.to(x.dtype)).detach()
        loss = (x - target).pow(2).mean()
        return loss, {"v_rms": info["v_rms"].mean(), "eps": info["eps"].mean()}
