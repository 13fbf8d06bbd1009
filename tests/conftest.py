import gwf  # noqa: F401  (first: torchvision shim for the CPU torch)

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from gwf.launch import register_resolvers

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("GWF_THREADS", "1")  # threads=auto in the runs the tests start: one thread (below)

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


@pytest.fixture(autouse=True)
def _one_thread():
    """Small problems everywhere: one thread avoids OpenMP barrier stalls when the cores are shared (CI, busy
    laptops), where two threads were measured up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compose_config(overrides=(), data_dir: Path | None = None, runs_dir: Path | None = None):
    """The composed training config for ``overrides``, as gwf-train would see it (without the hydra node)."""
    extra = []
    if data_dir is not None:
        extra.append(f"paths.data_dir={data_dir}")
    if runs_dir is not None:
        extra.append(f"paths.root={runs_dir}")
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=[*overrides, *extra])


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory) -> Path:
    """scikit-learn digits prepared once per test session (shards + classifier)."""
    from gwf.data.digits import prepare_digits

    root = tmp_path_factory.mktemp("data") / "digits"
    prepare_digits(root)
    return root
