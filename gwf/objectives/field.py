"""Field objectives (W-Flow, Drifting): the generator moves its samples along a velocity field V_k computed in each
feature set k of a frozen encoder phi (data space: the identity encoder), one transport problem per (label, token):

    loss = 1/K sum_k  mean || phi_k(x) / s_k - stopgrad(phi_k(x) / s_k + eta V_k) ||^2     ([DRIFT] Sec. 3.5)

s_k (detached) puts the sets on one scale (docs/wflow.md).
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from gwf.features import FeatureSpec, build_features
from gwf.features.base import FeatureEncoder, IdentityFeatures
from gwf.objectives.base import GenBatch, Objective, RealBatch
from gwf.ot.velocity import _mean_squared_distance


def attach_encoder(objective: nn.Module, encoder: FeatureEncoder | None) -> None:
    """``objective.features`` = the frozen encoder (None: the identity). Held outside the module tree: never
    trained, never seen by DDP or the optimizers, never in checkpoints (rebuilt from method.features)."""
    object.__setattr__(objective, "features", IdentityFeatures() if encoder is None else encoder)


def grouped_problems(f: Tensor, num_problems: int) -> Tensor:
    """Features of L*N samples grouped by label, [L*N, T, C] or [L*N, C] -> [L*T, N, C]: problem l*T + t holds
    token t of label l's N samples."""
    f = f[:, None] if f.dim() == 2 else f
    ln, t, c = f.shape
    return f.reshape(num_problems, ln // num_problems, t, c).transpose(1, 2).reshape(num_problems * t, -1, c)


def shared_problems(f: Tensor, num_problems: int) -> Tensor:
    """Features of U samples shared by every label, [U, T, C] or [U, C] -> [L*T, U, C] (``grouped_problems``
    layout)."""
    f = f[:, None] if f.dim() == 2 else f
    u, t, c = f.shape
    return f.transpose(0, 1)[None].expand(num_problems, t, u, c).reshape(num_problems * t, u, c)


def encode_problems(encoder: FeatureEncoder, x: Tensor, grouped: Mapping[str, Tensor],
                    shared: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, dict[str, Tensor]]]:
    """Feature sets of an update's samples as transport problems: ({k: [L*T_k, N, C_k]}, {name: {k: [L*T_k, M,
    C_k]}}). x: [L, N, *shape] (gradient kept); grouped: name -> [L, M, *shape]; shared: name -> [U, *shape]. The
    references are encoded in one call without gradient."""
    num_problems = x.shape[0]
    encoder = encoder.to(x.device)  # no-op once there (the encoder is outside the module tree)
    param = next(encoder.parameters(), None)
    cast = (lambda t: t) if param is None else (lambda t: t.to(param.dtype))  # e.g. fp32 weights, bf16 samples
    gen = {k: grouped_problems(f, num_problems) for k, f in encoder(cast(x.flatten(0, 1))).items()}
    parts = [(name, t.flatten(0, 1), grouped_problems) for name, t in grouped.items()]
    parts += [(name, t, shared_problems) for name, t in shared.items()]
    refs: dict[str, dict[str, Tensor]] = {}
    if parts:
        with torch.no_grad():
            feats = encoder(cast(torch.cat([p[1] for p in parts])))
        start = 0
        for name, flat, to_problems in parts:
            rows = slice(start, start + flat.shape[0])
            refs[name] = {k: to_problems(f[rows], num_problems) for k, f in feats.items()}
            start += flat.shape[0]
    return gen, refs


def feature_scale(f_gen: Tensor, targets: list[Tensor]) -> Tensor:
    """s_k = sqrt(mean over problems of mean_{i, j} ||f_i - t_j||^2 / C), a detached fp32 scalar (>= tiny).
    f_gen: [B, N, C]; targets: list of [B, M, C], already checked by the field."""
    msd = _mean_squared_distance(f_gen, targets)  # [B]
    return (msd.mean() / f_gen.shape[-1]).sqrt().clamp_min(torch.finfo(torch.float32).tiny)


def drift_loss(f_gen: Tensor, velocity: Tensor, eta: float, scale: Tensor | None = None) -> Tensor:
    """mean || f / s - stopgrad(f / s + eta V) ||^2 in fp32 (gradient -2 eta V / (s * numel) w.r.t. f).
    f_gen, velocity: [B, N, C]; scale: scalar s or None (s = 1)."""
    f = f_gen.float()
    if scale is not None:
        f = f / scale
    target = (f + eta * velocity.float()).detach()
    return (f - target).pow(2).mean()


class FieldObjective(Objective):
    """Base of W-Flow and Drifting: subclasses name the reals to encode (``references``) and compute the fields of
    the feature sets (``fields``, all sets at once, or ``field``, one set). ``features``: a spec for
    ``gwf.features.build_features`` (None: data space); ``feature_normalize``: rescale each set by s_k (ignored in
    data space)."""

    def __init__(self, eta: float = 1.0, features: FeatureSpec = None, feature_normalize: bool = True):
        super().__init__()
        self.eta, self.feature_normalize = eta, feature_normalize
        attach_encoder(self, build_features(features))  # at construction: a wrong path fails before training

    def references(self, gen: GenBatch, real: RealBatch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The samples the field needs besides x: ({name: [L, M, *shape]} per label, {name: [U, *shape]} shared)."""
        raise NotImplementedError

    def field(self, f: Tensor, refs: dict[str, Tensor], gen: GenBatch, tokens: int
              ) -> tuple[Tensor, dict[str, Tensor], list[Tensor]]:
        """One feature set: f [L*T, N, C], refs name -> [L*T, M, C]; returns V [L*T, N, C] (detached fp32), logs
        (one value each) and the target sets of the scale s_k."""
        raise NotImplementedError

    def fields(self, f_gen: dict[str, Tensor], refs: dict[str, dict[str, Tensor]], gen: GenBatch
               ) -> dict[str, tuple[Tensor, dict[str, Tensor], list[Tensor]]]:
        """Every feature set at once: f_gen k -> [L*T_k, N, C_k], refs name -> k -> [L*T_k, M, C_k]; returns
        k -> ``field``'s triple. Here one ``field`` call per set; W-Flow solves all sets in one Sinkhorn loop."""
        return {k: self.field(f, {n: r[k] for n, r in refs.items()}, gen, f.shape[0] // len(gen.x))
                for k, f in f_gen.items()}

    def generator_loss(self, gen: GenBatch, real: RealBatch, rng: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        f_gen, refs = encode_problems(self.features, gen.x, *self.references(gen, real))
        normalize = self.feature_normalize and not self.features.is_identity
        results = self.fields(f_gen, refs, gen)
        losses, logs = [], {}
        for k, f in f_gen.items():
            velocity, info, targets = results[k]
            losses.append(drift_loss(f, velocity, self.eta, feature_scale(f, targets) if normalize else None))
            for name, value in info.items():
                logs.setdefault(name, []).append(value)
        return torch.stack(losses).mean(), {name: torch.stack(v).mean() for name, v in logs.items()}
