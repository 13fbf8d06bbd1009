"""Objective registry: keys mirror the config group ``conf/method/`` one to one. Each entry builds an Objective
from the method config (its ``critic`` already built into a network by gwf.build)."""

from __future__ import annotations

from functools import partial
from typing import Callable

from gwf.objectives.base import GenBatch, Objective, RealBatch
from gwf.objectives.chi2_tight import Chi2Tight
from gwf.objectives.ckmmd import CKMMD
from gwf.objectives.critic import DIVERGENCES, CriticDivergence
from gwf.objectives.drifting import Drifting
from gwf.objectives.immd import InverseMMD
from gwf.objectives.mmd import MMD
from gwf.objectives.mmd_gan import MMDGAN
from gwf.objectives.sliced import SlicedWasserstein
from gwf.objectives.smmd import ScaledMMD
from gwf.objectives.wflow import WFlow

OBJECTIVES: dict[str, Callable[..., Objective]] = {
    "wflow": WFlow,  # W-Flow, Sinkhorn flow ([WF])
    "drifting": Drifting,  # Drifting baseline ([DRIFT])
    # critic-based rows ([GWF]): f-divergences kl, kl_centered, kl_dv, chi2, js with R1 (0.2); the IPM w1 with the
    # official default penalty, interpolated (10)
    **{name: partial(CriticDivergence, name) for name in DIVERGENCES if name != "w1"},
    "w1": partial(CriticDivergence, "w1", penalty="interpolated", penalty_weight=10.0),
    "chi2_tight": Chi2Tight,  # chi2 by the Hammersley-Chapman-Robbins bound, positive critic
    "mmd": MMD,  # MMD-JKO with a fixed kernel ([GWF] Algorithm 1)
    # Table 4's MMD rows ([GWF] --divergence MMD, sMMD, iMMD, ckMMD): learned-kernel MMD GANs
    "mmd_gan": MMDGAN,
    "smmd": ScaledMMD,
    "immd": InverseMMD,
    "ckmmd": CKMMD,
    "sw": SlicedWasserstein,  # sliced-Wasserstein flow (random projections from the update's rng)
}


def build_objective(name: str, **kwargs) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown method '{name}'; choose one of {sorted(OBJECTIVES)} (config group method=...)")
    return OBJECTIVES[name](**kwargs)


__all__ = ["OBJECTIVES", "GenBatch", "Objective", "RealBatch", "build_objective"]
