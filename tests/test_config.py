"""Every config file composes; registries mirror config groups; bad input gives a clear error."""

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from gwf.models import MODELS
from gwf.models.critics import CRITICS
from gwf.objectives import OBJECTIVES
from gwf.launch import run_name
from tests.conftest import CONF_DIR, compose_config

GROUPS = ["method", "data", "model", "critic", "trainer", "logger", "callbacks", "eval", "experiment"]


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


def test_renamed_keys_are_refused_with_the_new_names(tmp_path, monkeypatch, capsys):
    """One word per unit: the keys renamed to say "update" are refused, naming the new key, on the command line
    (gwf-train's console script, before Hydra composes) and in a composed config (before train() writes anything)."""
    import sys

    from gwf.train import cli, train

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["gwf-train", "jko.inner=5", "checkpoint.every_n_steps=2"])
    with pytest.raises(SystemExit, match="checkpoint.every_n_steps -> checkpoint.every_n_updates, "
                                         "jko.inner -> jko.updates_per_step"):
        cli()
    assert list(tmp_path.iterdir()) == []  # no run directory
    with pytest.raises(ValueError, match=r"method.d_steps -> loop.critic_steps"):
        train(compose_config(["+method.d_steps=2"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_trainer_arguments_gwf_sets_are_refused_naming_what_to_set(tmp_path, monkeypatch):
    """+trainer.max_steps=10 used to die in Trainer() with "multiple values for keyword argument" after the run
    directory existed: refused before Hydra composes, naming the update keys; in a composed config before train()
    writes anything."""
    import sys

    from gwf.config import OWNED_BY_GWF
    from gwf.train import cli, train

    monkeypatch.chdir(tmp_path)
    for arg in ("+trainer.max_steps=10", "+trainer.max_epochs=3"):
        monkeypatch.setattr(sys, "argv", ["gwf-train", "experiment=toy2d_wflow", arg])
        with pytest.raises(SystemExit, match=rf"{arg[1:].split('=')[0]} is set by gwf: the run's length is in "
                                             r"updates: jko.steps x jko.updates_per_step"):
            cli()
    assert list(tmp_path.iterdir()) == []  # no run directory
    with pytest.raises(ValueError, match=r"trainer.enable_checkpointing is set by gwf: .*checkpoint.every_n_updates"):
        train(compose_config(["+trainer.enable_checkpointing=true"]), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    # every owned key is an argument build_trainer passes itself (so a user's value would clash or be lost)
    import inspect

    from gwf import build

    source = inspect.getsource(build.build_trainer)
    assert all(f"{k.split('.')[1]}=" in source or k == "trainer.plugins" for k in OWNED_BY_GWF)


def test_stored_configs_of_older_runs_are_upgraded():
    from gwf.config import RENAMED, set_keys, upgrade_config

    old = {"jko": {"tau": 1.0, "inner_first": 30, "inner": 20}, "checkpoint": {"every_n_steps": 5},
           "method": {"name": "kl", "d_steps": 2, "t_steps": 1, "critic_optim": {"lr": 1e-4}}}
    new = upgrade_config(old)
    assert new["jko"] == {"tau": 1.0, "updates_first_step": 30, "updates_per_step": 20}
    assert new["loop"] == {"critic_steps": 2, "generator_steps": 1} and new["critic_optim"] == {"lr": 1e-4}
    assert new["method"] == {"name": "kl"} and new["checkpoint"] == {"every_n_updates": 5}
    assert set_keys(new) == [] and len(set_keys(old)) == 6 and old["jko"]["inner"] == 20  # a copy
    assert sorted(RENAMED.values()) == sorted(set(RENAMED.values()))  # no two old keys map to one new key


def test_no_module_imports_the_entry_point():
    """Arrows point down: gwf.train (the Hydra entry point) is imported by nothing in the package."""
    import ast

    importers, package = [], CONF_DIR.parent / "gwf"
    for path in sorted(package.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if "gwf.train" in names and path != package / "train.py":
                importers.append(str(path))
    assert importers == []


def test_a_missing_optional_package_names_its_extra(monkeypatch, tmp_path):
    """diffusers, wandb and the submitit launcher are extras: using them without the package says how to get it."""
    import sys

    from gwf._compat import require
    from gwf.data.latents import random_vae
    from gwf.loggers import make_wandb_logger

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers -> ImportError, as when not installed
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ModuleNotFoundError, match=r"the SD-VAE \(latents\) needs the optional package 'diffusers'.*"
                                                  r"\.\[latents\]"):
        random_vae((32, 32, 32, 32), 1)
    with pytest.raises(ModuleNotFoundError, match=r"logger=wandb needs .*'wandb'.*gwf\[wandb\]"):
        make_wandb_logger({}, tmp_path, "g", "n", {})
    assert require("json", "a test").dumps([1]) == "[1]"


def test_the_extras_cover_the_optional_imports():
    import re
    import tomllib

    project = tomllib.loads((CONF_DIR.parent / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert {"diffusers", "safetensors"} <= set(extras["latents"]) and extras["wandb"] == ["wandb"]
    assert any(d.startswith("hydra-submitit-launcher") for d in extras["slurm"])
    assert any(d.startswith("msgpack") for d in extras["convert"])  # gwf-convert mae of the JAX release's msgpack
    assert "gwf[latents,slurm,wandb,convert]" in extras["dev"]  # the README's commands install every part
    assert "gwf[latents,slurm,wandb,convert]" in extras["all"]
    base = {re.split(r"[<>=\[]", d)[0] for d in project["dependencies"]}
    assert not base & {"diffusers", "safetensors", "wandb", "hydra-submitit-launcher", "msgpack"}


def test_every_ablation_variant_composes_its_method_on_2d_and_digits():
    """conf/ablation/*: each variant sets the objective and the one knob it names; on top of any experiment."""
    want = {"sinkhorn": ("wflow", {}), "kl_like": ("wflow", {"n_iters": 0.5}), "mmd_like": ("wflow", {"n_iters": 0}),
            "drifting": ("drifting", {}), "masked": ("wflow", {"estimator": "masked"}),
            "single": ("wflow", {"estimator": "single"}), "l2": ("wflow", {"cost": "l2"}),
            "distribution": ("wflow", {"guidance": "distribution"})}
    assert sorted(want) == _options("ablation")
    for experiment in ("gwf_2d", "digits_wflow"):
        for variant, (method, keys) in want.items():
            cfg = compose_config([f"experiment={experiment}", f"+ablation={variant}"])
            assert cfg.method.name == method, (experiment, variant)
            for k, v in keys.items():
                assert cfg.method[k] == v, (experiment, variant, k)
            if method == "wflow" and variant != "sinkhorn":  # one knob off the default
                default = compose_config([f"experiment={experiment}", "+ablation=sinkhorn"]).method
                assert [k for k in cfg.method if cfg.method[k] != default[k]] == list(keys), (experiment, variant)


def test_wflow_on_2d_data_takes_its_tuned_defaults_and_the_command_line_wins():
    """conf/tuning/wflow_toy2d.yaml applies to W-Flow on toy2d data after the experiment, to nothing else."""
    cfg = compose_config(["experiment=gwf_2d", "method=wflow"])
    assert (cfg.method.eps_rel, cfg.optim.lr) == (0.002, 3e-3)
    assert compose_config(["experiment=toy2d_wflow"]).method.eps_rel == 0.002
    cfg = compose_config(["experiment=gwf_2d", "method=wflow", "method.eps_rel=0.05", "optim.lr=2e-4"])
    assert (cfg.method.eps_rel, cfg.optim.lr) == (0.05, 2e-4)
    assert compose_config(["experiment=gwf_2d"]).optim.lr == 2e-4          # KL_DV: the official 2D lr
    assert compose_config(["experiment=gwf_2d", "method=drifting"]).optim.lr == 2e-4
    main = compose_config([])                                              # W-Flow on digits: untouched
    assert (main.method.eps_rel, main.optim.lr) == (0.05, compose_config(["method=drifting"]).optim.lr)
