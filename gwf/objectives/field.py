"""Field objectives (W-Flow, Drifting): the generator moves its samples along a velocity field V_k computed in each
feature set k of a frozen encoder phi (data space: the identity encoder), one transport problem per (label, token):

    loss = 1/K sum_k  mean || phi_k(x) / s_k - stopgrad(phi_k(x) / s_k + eta V_k) ||^2     ([DRIFT] Sec. 3.5)

s_k (detached) puts the sets on one scale (docs/wflow.md). Sets of the same width C are merged along their tokens
before anything else (``merge_sets``): a problem is one (label, token) pair whichever set holds it, so the merge
changes no problem, and an update runs a fixed number of tensor operations per width instead of per set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch
from torch import Tensor, nn

from gwf.features import FeatureSpec, build_features
from gwf.features.base import FeatureEncoder, IdentityFeatures
from gwf.objectives.base import GenBatch, Objective, RealBatch


def attach_encoder(objective: nn.Module, encoder: FeatureEncoder | None) -> None:
    """``objective.features`` = the frozen encoder (None: the identity). Held outside the module tree: never
    trained, never seen by DDP or the optimizers, never in checkpoints (rebuilt from method.features)."""
    object.__setattr__(objective, "features", IdentityFeatures() if encoder is None else encoder)


@dataclass(frozen=True)
class SetLayout:
    """Feature sets of one width merged along their tokens: set k holds tokens [start_k, start_k + tokens[k])."""

    names: tuple[str, ...]
    tokens: tuple[int, ...]

    @property
    def total(self) -> int:
        return sum(self.tokens)


def merge_sets(feats: Mapping[str, Tensor], by_width: bool = True) -> tuple[list[Tensor], list[SetLayout]]:
    """Feature sets {k: [B, T_k, C_k] or [B, C_k]} -> one [B, sum T_k, C] tensor per width C (widths in order of
    first appearance; a width's sets concatenated in their order, promoted to a common dtype) and their layouts;
    ``by_width`` False: one tensor per set."""
    groups: dict[int | str, list[tuple[str, Tensor]]] = {}
    for name, f in feats.items():
        groups.setdefault(f.shape[-1] if by_width else name, []).append((name, f[:, None] if f.dim() == 2 else f))
    merged, layouts = [], []
    for parts in groups.values():
        merged.append(parts[0][1] if len(parts) == 1 else torch.cat([t for _, t in parts], dim=1))
        layouts.append(SetLayout(tuple(n for n, _ in parts), tuple(t.shape[1] for _, t in parts)))
    return merged, layouts


def grouped_problems(f: Tensor, num_problems: int) -> Tensor:
    """Tokens of L*N samples grouped by label, [L*N, T, C] -> [L*T, N, C]: problem l*T + t holds token t of label
    l's N samples."""
    ln, t, c = f.shape
    return f.reshape(num_problems, ln // num_problems, t, c).transpose(1, 2).reshape(num_problems * t, -1, c)


def shared_problems(f: Tensor, num_problems: int) -> Tensor:
    """Tokens of U samples shared by every label, [U, T, C] -> [L*T, U, C] (``grouped_problems`` layout)."""
    u, t, c = f.shape
    return f.transpose(0, 1)[None].expand(num_problems, t, u, c).reshape(num_problems * t, u, c)


def encode_problems(encoder: FeatureEncoder, x: Tensor, grouped: Mapping[str, Tensor], shared: Mapping[str, Tensor],
                    by_width: bool = True) -> tuple[list[Tensor], dict[str, list[Tensor]], list[SetLayout]]:
    """An update's samples as transport problems, one tensor per width of merged feature sets: ([L*T_w, N, C_w],
    {name: [L*T_w, M, C_w]}, layouts). x: [L, N, *shape] (gradient kept); grouped: name -> [L, M, *shape]; shared:
    name -> [U, *shape]. The references are encoded in one call without gradient. ``by_width``: see merge_sets."""
    num_problems = x.shape[0]
    encoder = encoder.to(x.device)  # no-op once there (the encoder is outside the module tree)
    param = next(encoder.parameters(), None)
    cast = (lambda t: t) if param is None else (lambda t: t.to(param.dtype))  # e.g. fp32 weights, bf16 samples
    merged, layouts = merge_sets(encoder(cast(x.flatten(0, 1))), by_width)
    gen = [grouped_problems(f, num_problems) for f in merged]
    parts = [(name, t.flatten(0, 1), grouped_problems) for name, t in grouped.items()]
    parts += [(name, t, shared_problems) for name, t in shared.items()]
    refs: dict[str, list[Tensor]] = {}
    if parts:
        with torch.no_grad():
            feats, _ = merge_sets(encoder(cast(torch.cat([p[1] for p in parts]))), by_width)
        start = 0
        for name, flat, to_problems in parts:
            rows = slice(start, start + flat.shape[0])
            refs[name] = [to_problems(f[rows], num_problems) for f in feats]
            start += flat.shape[0]
    return gen, refs, layouts


class SetMeans:
    """Means over each feature set's problems of per-problem values, for one merged width: ``means(v [L*T]) -> [K]``
    and ``per_problem(s [K]) -> [L*T]`` (each problem gets its set's value). Elementwise products with a small
    [T, K] weight matrix made once per layout and device: no matmul (autocast would run it in bf16)."""

    def __init__(self, layout: SetLayout, labels: int, device: torch.device):
        self.labels, self.single = labels, len(layout.tokens) == 1
        member = torch.zeros(layout.total, len(layout.tokens))
        start = 0
        for k, t in enumerate(layout.tokens):
            member[start : start + t, k] = 1.0
            start += t
        self.member = member.to(device)
        self.weight = (member / (labels * torch.tensor(layout.tokens, dtype=torch.float32))).to(device)

    def means(self, values: Tensor) -> Tensor:
        if self.single:
            return values.mean()[None]
        return (values.view(self.labels, -1).sum(0)[:, None] * self.weight).sum(0)

    def per_problem(self, per_set: Tensor) -> Tensor:
        if self.single:
            return per_set.expand(self.labels * self.member.shape[0])
        return (self.member * per_set).sum(1).repeat(self.labels)


class FieldObjective(Objective):
    """Base of W-Flow and Drifting: subclasses name the reals to encode (``references``) and compute the fields of
    the merged feature sets (``fields``, all widths at once, or ``field``, one width). ``features``: a spec for
    ``gwf.features.build_features`` (None: data space); ``feature_normalize``: rescale each set by s_k (ignored in
    data space). ``merge_widths`` (class attribute): solve the sets of one width together (merge_sets); False: one
    set at a time, the same problems."""

    merge_widths = True

    def __init__(self, eta: float = 1.0, features: FeatureSpec = None, feature_normalize: bool = True):
        super().__init__()
        self.eta, self.feature_normalize = eta, feature_normalize
        attach_encoder(self, build_features(features))  # at construction: a wrong path fails before training
        self._set_means: dict[tuple, SetMeans] = {}

    def references(self, gen: GenBatch, real: RealBatch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """The samples the field needs besides x: ({name: [L, M, *shape]} per label, {name: [U, *shape]} shared)."""
        raise NotImplementedError

    @staticmethod
    def with_uncond(grouped: dict[str, Tensor], real: RealBatch) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """``references``' pair with the unconditional reals added: per problem ([L, U, *shape], with the grouped
        reals) or shared by the problems ([U, *shape])."""
        if real.uncond.dim() == real.pos.dim():
            return {**grouped, "uncond": real.uncond}, {}
        return grouped, {"uncond": real.uncond}

    def field(self, f: Tensor, refs: dict[str, Tensor], gen: GenBatch, tokens: int
              ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """One width: f [L*T, N, C], refs name -> [L*T, M, C] (problem l*T + t); returns V [L*T, N, C] (detached
        fp32), per-problem logs {name: [L*T]} and the per-problem mean squared distance [L*T] over the targets of
        the scale s_k."""
        raise NotImplementedError

    def fields(self, f_gen: list[Tensor], refs: dict[str, list[Tensor]], gen: GenBatch
               ) -> list[tuple[Tensor, dict[str, Tensor], Tensor]]:
        """Every width at once: f_gen [L*T_w, N, C_w] per width, refs name -> the same per width; returns ``field``'s
        triple per width. Here one ``field`` call per width; W-Flow solves all widths in one Sinkhorn loop."""
        return [self.field(f, {n: r[w] for n, r in refs.items()}, gen, f.shape[0] // len(gen.x))
                for w, f in enumerate(f_gen)]

    def set_scale(self, stat: Tensor, sets: SetMeans, width: int) -> Tensor:
        """s_k [K] of a width's feature sets from the fields' per-problem distance statistic [L*T]: here the mean
        squared distance, s_k = sqrt(mean over set k's problems / C) (the official scale / sqrt(S))."""
        return (sets.means(stat) / width).sqrt()

    def _means(self, layout: SetLayout, labels: int, device: torch.device) -> SetMeans:
        key = (layout, labels, device)
        if key not in self._set_means:
            self._set_means[key] = SetMeans(layout, labels, device)
        return self._set_means[key]

    def generator_loss(self, gen: GenBatch, real: RealBatch, rng: torch.Generator) -> tuple[Tensor, dict[str, Tensor]]:
        f_gen, refs, layouts = encode_problems(self.features, gen.x, *self.references(gen, real), self.merge_widths)
        normalize = self.feature_normalize and not self.features.is_identity
        set_losses, logs = [], {}
        for f, (velocity, info, msd), layout in zip(f_gen, self.fields(f_gen, refs, gen), layouts):
            sets = self._means(layout, len(gen.x), f.device)
            f = f.float()
            if normalize:  # s_k = sqrt(mean over set k's problems of msd / C), detached (``set_scale``)
                scale = self.set_scale(msd, sets, f.shape[-1]).clamp_min(torch.finfo(torch.float32).tiny)
                f = f / sets.per_problem(scale)[:, None, None]
            target = (f + self.eta * velocity.float()).detach()
            sq = (f - target).pow(2)  # gradient -2 eta V / (s_k * numel_k) w.r.t. f
            set_losses.append(sq.mean()[None] if sets.single else sets.means(sq.sum((1, 2))) / sq[0].numel())
            for name, value in info.items():
                logs.setdefault(name, []).append(sets.means(value))
        return torch.cat(set_losses).mean(), {name: torch.cat(v).mean() for name, v in logs.items()}
