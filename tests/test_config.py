"""Every config file composes; registries mirror config groups; bad input gives a clear error."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from gwf.models import MODELS
from gwf.models.critics import CRITICS
from gwf.objectives import OBJECTIVES
from gwf.train import run_name
from tests.conftest import CONF_DIR, compose_config

GROUPS = ["method", "data", "model", "critic", "trainer", "logger", "eval", "experiment"]


def _options(group):
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_config_composes(group, option):
    # an evaluator belongs to its data set (the default list picks eval=${data})
    cfg = compose_config([f"data={option}"] if group == "eval" else [f"{group}={option}"])
    if group == "eval":
        assert cfg.eval.evaluator._target_.split(".")[-2] in {"digits", "toy2d", "fidelity"}
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert cfg.method.name in OBJECTIVES and cfg.model.name in MODELS


def test_registries_mirror_config_groups():
    assert sorted(OBJECTIVES) == _options("method")
    assert sorted(MODELS) == _options("model")
    assert sorted(CRITICS) == _options("critic")
    for option in _options("method"):
        assert compose_config([f"method={option}"]).method.name == option


def test_default_is_the_digits_wflow_main_job():
    cfg = compose_config()
    assert cfg.name == "digits_wflow" and cfg.method.name == "wflow" and cfg.data.prepare == "digits"
    assert cfg.data.num_classes == 10 and cfg.batch.alpha_max > 1  # class-conditional with guidance


def test_unknown_method_is_a_clear_error():
    with pytest.raises(ConfigCompositionException, match="method"):
        compose_config(["method=does_not_exist"])
    from gwf.objectives import build_objective

    with pytest.raises(ValueError, match="unknown method 'nope'.*wflow"):
        build_objective("nope")


def test_run_names_are_deterministic():
    assert run_name(None, "") == "default"
    assert run_name("my-run", "jko.tau=1") == "my-run"
    assert run_name(None, "jko.tau=1,seed=2") == "jko.tau=1,seed=2"
    assert "/" not in run_name(None, "data.root=/abs/path")


def test_hydra_run_dir_has_no_timestamp():
    raw = (CONF_DIR / "config.yaml").read_text()
    assert "${now:" not in raw and "gwf_run_name" in raw
    assert Path(CONF_DIR / "experiment" / "digits_wflow.yaml").read_text().startswith("# @package _global_")
