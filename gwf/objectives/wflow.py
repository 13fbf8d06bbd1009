"""W-Flow: the Sinkhorn-divergence Wasserstein gradient flow ([WF] Sec. 3)."""

from __future__ import annotations

import torch
from torch import Tensor

from gwf.constants import DEFAULT_EPS_REL, DEFAULT_N_ITERS
from gwf.features import FeatureSpec
from gwf.features.drift import attach_features, drift_loss, encode_problems, feature_scale
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

    ``features``: None or "identity" (the field in data space, as above), or an encoder spec for
    ``gwf.features.build_features`` (e.g. {"name": "mae", "path": ...}): the field is then computed per feature set
    and per token of a frozen encoder and the loss averaged over feature sets (gwf/features/drift.py), with each
    set rescaled by its mean pairwise distance when ``feature_normalize`` (the official code's convention).
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
        features: FeatureSpec = None,
        feature_normalize: bool = True,
    ):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"unknown W-Flow estimator '{estimator}'; choose one of {ESTIMATORS}")
        if not eps_rel > 0:
            raise ValueError(f"method.eps_rel must be > 0, got {eps_rel}")
        self.eta, self.eps_rel, self.engine, self.n_iters = eta, eps_rel, engine, n_iters
        self.estimator, self.rms_normalize, self.guidance = estimator, rms_normalize, guidance
        attach_features(self, features)  # self.features: the frozen encoder or None (data space)
        self.feature_normalize = feature_normalize

    def generator_loss(self, gen: GenBatch, real: RealBatch) -> tuple[Tensor, dict[str, Tensor]]:
        if self.features is not None:
            return self.feature_loss(gen, real)
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

    def feature_loss(self, gen: GenBatch, real: RealBatch) -> tuple[Tensor, dict[str, Tensor]]:
        """The same field and loss per feature set k of the frozen encoder, one problem per (label, token) with
        that label's guidance weight; loss = mean over k (gwf/features/drift.py)."""
        num_problems = gen.x.shape[0]
        guided = self.guidance and gen.alpha is not None and real.uncond is not None
        grouped = {"pos": real.pos}
        if self.estimator == "two_batch":
            grouped["neg"] = gen.sample()
        f_gen, refs = encode_problems(self.features, gen.x, grouped, {"uncond": real.uncond} if guided else {})
        losses, v_rms, eps = [], [], []
        for k, f in f_gen.items():
            tokens = f.shape[0] // num_problems
            pos, neg = refs["pos"][k], refs["neg"][k] if "neg" in refs else None
            velocity, info = sinkhorn_velocity(
                f, pos, neg, eps_rel=self.eps_rel, engine=self.engine, n_iters=self.n_iters,
                estimator=self.estimator,
                uncond=refs["uncond"][k] if guided else None,
                guidance_w=(gen.alpha - 1.0).repeat_interleave(tokens) if guided else None,  # per (label, token)
                rms_normalize=self.rms_normalize,
            )
            targets = [f, pos] if neg is None else [f, neg, pos]  # W-Flow's eps target set
            scale = feature_scale(f, targets) if self.feature_normalize else None
            losses.append(drift_loss(f, velocity, self.eta, scale))
            v_rms.append(info["v_rms"].mean())
            eps.append(info["eps"].mean())
        loss = torch.stack(losses).mean()
        return loss, {"v_rms": torch.stack(v_rms).mean(), "eps": torch.stack(eps).mean()}
