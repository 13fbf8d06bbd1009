"""Objective registry: keys mirror the config group ``conf/method/`` one to one."""

from __future__ import annotations

from gwf.objectives.base import GenBatch, Objective, RealBatch
from gwf.objectives.wflow import WFlow

OBJECTIVES: dict[str, type[Objective]] = {
    "wflow": WFlow,
}


def build_objective(name: str, **kwargs) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"unknown method '{name}'; choose one of {sorted(OBJECTIVES)} (config group method=...)")
    return OBJECTIVES[name](**kwargs)


__all__ = ["OBJECTIVES", "GenBatch", "Objective", "RealBatch", "build_objective"]
