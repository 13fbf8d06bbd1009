"""Objective registry: keys mirror the config group ``conf/method/`` one to one."""

from __future__ import annotations

from gwf.objectives.base import GenBatch, Objective, RealBatch
from gwf.objectives.drifting import Drifting
from gwf.objectives.fdiv import JS, KL, KLDV, Chi2
from gwf.objectives.ipm import W1
from gwf.objectives.mmd import MMD
from gwf.objectives.mmd_gan import MMDGAN
from gwf.objectives.wflow import WFlow

OBJECTIVES: dict[str, type[Objective]] = {
    "wflow": WFlow,  # W-Flow, Sinkhorn flow ([WF])
    "drifting": Drifting,  # Drifting baseline ([DRIFT])
    "kl": KL,  # f-divergences with a critic ([GWF])
    "kl_dv": KLDV,
    "chi2": Chi2,
    "js": JS,
    "w1": W1,  # IPM, WGAN-like
    "mmd": MMD,  # MMD-JKO with a fixed kernel ([GWF] Algorithm 1)
    "mmd_gan": MMDGAN,  # learned-kernel JKO MMD GAN
}


def build_objective(name: str, **kwargs) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown method '{name}'; choose one of {sorted(OBJECTIVES)} (config group method=...)")
    return OBJECTIVES[name](**kwargs)


__all__ = ["OBJECTIVES", "GenBatch", "Objective", "RealBatch", "build_objective"]
