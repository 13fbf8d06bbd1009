"""wandb offline: a tiny 2D run through gwf.train.train writes its offline run (config, tags, media, summary table)
inside the run directory, never asks for credentials, and a resumed run continues the same run id."""

import json

import pytest

import gwf  # noqa: F401
from gwf.loggers import flatten_config, run_tags, wandb_group, wandb_run_id
from gwf.train import train
from tests.conftest import compose_config


def _offline_runs(run_dir):
    return sorted((run_dir / "wandb").glob("offline-run-*"))


def _files(offline_run, pattern):
    return sorted((offline_run / "files").rglob(pattern))


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # offline must follow from the missing credentials
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_CACHE_DIR", raising=False)


def test_offline_run_writes_media_table_and_resumes_with_the_same_id(tmp_path, no_credentials):
    run_dir = tmp_path / "toy2d" / "multirun" / "jko.tau=0.5,seed=3"  # a sweep member
    overrides = ["experiment=toy2d_wflow", "logger=wandb", "jko.steps=1", "jko.tau=0.5", "seed=3",
                 "eval.every_n_updates=5", "eval.num_samples=256", "trainer.enable_progress_bar=false"]
    first = train(compose_config([*overrides, "jko.updates_first_step=10"]), run_dir)
    (offline,) = _offline_runs(run_dir)
    run_id = wandb_run_id(run_dir)
    assert offline.name.endswith(run_id)
    # the sample pictures of every evaluation (updates 0, 5, 10) and the final summary table are media
    assert len(_files(offline, "eval/samples_*.png")) == 3
    (table,) = _files(offline, "summary_*.table.json")
    content = json.loads(table.read_text())
    row = dict(zip(content["columns"], content["data"][0]))
    assert (row["objective"], row["tau"], row["seed"], row["update"], row["total_updates"]) == ("wflow", "0.5", 3,
                                                                                             10, 10)
    assert row["sinkhorn_div"] == pytest.approx(first["last"]["sinkhorn_div"], rel=1e-6)
    # group, tags and flattened config keys travel in the offline run's record log (protobuf strings)
    log = next(offline.glob("run-*.wandb")).read_bytes()
    for token in (b"toy2d_wflow-sweep", b"method=wflow", b"tau=0.5", b"seed=3", b"jko.tau", b"method.name",
                  b"final/sinkhorn_div", b"run.overrides"):
        assert token in log, token
    # every metric against `update` (generator updates), not Lightning's optimizer steps: the glob "*" is defined
    # again with step metric "update" after Lightning's definition (MetricRecord: glob_name=2, step_metric=4)
    ours, lightnings = b'\x12\x01*"\x06update', b'\x12\x01*"\x13trainer/global_step'
    assert ours in log and log.rfind(ours) > log.rfind(lightnings)
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "update" in header  # the CSV has the same axis

    # resume: more updates, same run directory -> a second offline segment of the same wandb run
    second = train(compose_config([*overrides, "jko.updates_first_step=15"]), run_dir)
    runs = _offline_runs(run_dir)
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)
    assert second["last"]["update"] == 15 and second["first"]["update"] == 0


def test_tags_group_and_flat_config():
    cfg = {"method": {"name": "kl"}, "jko": {"tau": None, "steps": 2}, "seed": 1}
    assert run_tags(cfg) == ["method=kl", "tau=none", "seed=1"]
    assert run_tags({**cfg, "jko": {"tau": 0.01}}) == ["method=kl", "tau=0.01", "seed=1"]
    assert flatten_config(cfg) == {"method.name": "kl", "jko.tau": None, "jko.steps": 2, "seed": 1}
    assert wandb_group("gwf_2d", "runs/gwf_2d/multirun/method=kl,seed=0") == "gwf_2d-sweep"
    assert wandb_group("gwf_2d", "runs/gwf_2d/default") == "gwf_2d"


def test_long_sweep_names_are_cut_with_a_digest():
    from gwf.loggers import short_run_name

    assert short_run_name("gwf_2d", "method=kl,seed=0") == "gwf_2d/method=kl,seed=0"
    long_a = "method=kl_dv,jko.tau=0.5,seed=3,optim.lr=0.0002,critic.hidden=512,loop.critic_steps=5"
    long_b = long_a.replace("steps=5", "steps=6")
    a, b = short_run_name("gwf_2d", long_a), short_run_name("gwf_2d", long_b)
    assert len(a) == len("gwf_2d/") + 48 and a != b and a.startswith("gwf_2d/method=kl_dv,jko.tau=0.5")
