"""Drifting ([DRIFT] Deng et al. 2026, Algorithm 2) as a baseline field (docs/wflow.md): per temperature T,

    A = sqrt(softmax_j(logits) * softmax_i(logits)),  logits = -||x_i - y_j|| / (T s),  y in [y+, y-]
    V_T(x_i) = sum_j A+_ij (sum_k A-_ik) y+_j - sum_k A-_ik (sum_j A+_ij) y-_k

and V = sum_T V_T / RMS(V_T); s is the mean distance over the unmasked pairs of the problem, detached.

Guidance (the official CFG, hudsonchen/riesz_flow_hudson train.py with drift_loss.py): unconditional reals join the
negatives with the column weight (alpha - 1)(N - 1)/U, applied to A after the softmaxes (drift_loss.py: ``affinity *
targets_w``); the softmaxes run over every target, and s is the weighted mean distance.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from gwf.constants import DRIFT_TEMPERATURES, RMS_FLOOR_REL
from gwf.features import FeatureSpec
from gwf.objectives.base import GenBatch, RealBatch
from gwf.objectives.field import FieldObjective
from gwf.objectives.kernels import squared_distances
from gwf.ot.sinkhorn import check_point_clouds, fp32_island
from gwf.ot.velocity import _mean_squared_distance


def drifting_field_single(dist: Tensor, pos: Tensor, neg: Tensor, temperature: float, scale: Tensor,
                          mask_self: bool, weights: Tensor | None = None) -> Tensor:
    """One temperature of the field, unnormalized: V_T [B, N, D]. dist: [B, N, M + K] distances from x to
    [pos, neg]; pos: [B, M, D]; neg: [B, K, D] (starting with x when ``mask_self``); scale: [B]; weights: [B, M + K]
    column weights of A, or None."""
    m = pos.shape[1]
    logits = -dist / (temperature * scale[:, None, None])
    if mask_self:  # the self pairs (i, m + i): a diagonal view, filled in place (no index tensor)
        logits.diagonal(offset=m, dim1=1, dim2=2).fill_(float("-inf"))
    # geometric mean of the row and column softmaxes, in the log domain (masked entries -> exactly 0)
    a = (0.5 * (logits.log_softmax(dim=2) + logits.log_softmax(dim=1))).exp()
    if weights is not None:
        a = a * weights[:, None, :]
    a_pos, a_neg = a[:, :, :m], a[:, :, m:]
    w_pos = a_pos * a_neg.sum(2, keepdim=True)
    w_neg = a_neg * a_pos.sum(2, keepdim=True)
    return torch.bmm(w_pos, pos) - torch.bmm(w_neg, neg)


def drifting_field(x: Tensor, pos: Tensor, neg: Tensor | None = None,
                   temperatures: Sequence[float] = DRIFT_TEMPERATURES, rms_normalize: bool = True,
                   uncond: Tensor | None = None, uncond_weight: Tensor | None = None) -> Tensor:
    """Multi-temperature Drifting field V [B, N, D], detached fp32 (2-D inputs give [N, D]).

    x: [B, N, D]; pos: [B, M, D]; neg: [B, K, D], or None for x itself with the self pair masked (the [DRIFT]
    default). ``rms_normalize``: each temperature's field has unit RMS per problem before the sum. ``uncond``
    [B, U, D] with ``uncond_weight`` [B]: extra negatives of that column weight (guidance; 3-D inputs only).
    """
    if not temperatures or min(temperatures) <= 0:
        raise ValueError(f"Drifting temperatures must be a non-empty list of positive numbers, got {temperatures}")
    unbatched = x.dim() == 2
    if unbatched:
        x, pos, neg = x[None], pos[None], None if neg is None else neg[None]
    mask_self = neg is None
    check_point_clouds(x, pos, "x", "pos")
    if not mask_self:
        check_point_clouds(x, neg, "x", "neg")
    elif x.shape[1] < 2:
        raise ValueError("the Drifting field with the self-pair masked needs at least 2 generated samples")
    if (uncond is None) != (uncond_weight is None):
        raise ValueError("Drifting guidance needs both uncond and uncond_weight (or neither)")
    if uncond is not None:
        check_point_clouds(x, uncond, "x", "uncond")
    with fp32_island(x.device):
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x, pos = x.detach().to(dtype), pos.detach().to(dtype)
        neg = x if mask_self else neg.detach().to(dtype)
        weights = None
        if uncond is not None:  # [pos, neg, uncond] with column weights [1, 1, w]
            uncond = uncond.detach().to(dtype)
            w = uncond_weight.detach().to(dtype).reshape(-1, 1).expand(-1, uncond.shape[1])
            weights = torch.cat([w.new_ones(w.shape[0], pos.shape[1] + neg.shape[1]), w], dim=1)
            neg = torch.cat([neg, uncond], dim=1)
        # distance scale s: mean ||x_i - y_j|| over the unmasked pairs (weighted by the columns), per problem
        dist = squared_distances(x, torch.cat([pos, neg], dim=1)).sqrt()  # [B, N, M + K (+ U)]
        masked = x.shape[1] if mask_self else 0
        if weights is None:
            n_pairs = dist.shape[1] * dist.shape[2] - masked
            scale = dist.sum((1, 2)) / n_pairs  # self pairs are 0: sum unchanged
        else:
            scale = (dist * weights[:, None, :]).sum((1, 2)) / (dist.shape[1] * weights.sum(1) - masked)
        scale = scale.clamp_min(torch.finfo(dtype).tiny)
        floor = RMS_FLOOR_REL * scale / x.shape[2] ** 0.5
        velocity = torch.zeros_like(x)
        for t in temperatures:
            v = drifting_field_single(dist, pos, neg, float(t), scale, mask_self, weights)
            if rms_normalize:
                rms = v.square().mean((1, 2)).sqrt()
                v = v / torch.maximum(rms, floor)[:, None, None]
            velocity += v
    return velocity[0] if unbatched else velocity


class Drifting(FieldObjective):
    """Drifting baseline: the field loss of gwf.objectives.field with the Drifting field, negatives = the generated
    batch with the self pair masked and, with ``guidance`` (the batch has alpha and unconditional reals), the
    unconditional reals weighted (alpha - 1)(N - 1)/U (the official CFG)."""

    def __init__(self, eta: float = 1.0, temperatures: Sequence[float] = DRIFT_TEMPERATURES,
                 rms_normalize: bool = True, features: FeatureSpec = None, feature_normalize: bool = True,
                 guidance: bool = True):
        if not temperatures or min(temperatures) <= 0:
            raise ValueError(f"method.temperatures must be positive numbers, got {temperatures}")
        super().__init__(eta, features, feature_normalize)
        self.temperatures, self.rms_normalize = tuple(float(t) for t in temperatures), rms_normalize
        self.guidance = guidance

    def references(self, gen: GenBatch, real: RealBatch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        if not (self.guidance and gen.alpha is not None and real.uncond is not None):
            return {"pos": real.pos}, {}
        return self.with_uncond({"pos": real.pos}, real)

    def field(self, f: Tensor, refs: dict[str, Tensor], gen: GenBatch, tokens: int):
        uncond, weight = refs.get("uncond"), None
        if uncond is not None:  # official train.py: uncond_w = (cfg - 1) * (n_gen - 1) / n_uncond
            weight = ((gen.alpha.float() - 1.0) * (f.shape[1] - 1) / uncond.shape[1]).repeat_interleave(tokens)
        velocity = drifting_field(f, refs["pos"], None, self.temperatures, self.rms_normalize, uncond, weight)
        msd = _mean_squared_distance(f, [f, refs["pos"]])  # the targets of the scale s_k
        return velocity, {"v_rms": velocity.square().mean((1, 2)).sqrt()}, msd
