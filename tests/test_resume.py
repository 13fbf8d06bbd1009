"""Resume reproduces: a run stopped at update N (SIGKILL of a real process, or the updates_per_job budget) and resumed
equals the uninterrupted run, parameter for parameter (generator, critic, EMA, previous generator, class bank,
optimizers), including stops in the middle of a JKO outer step and of a virtual data epoch. Checkpoint files are
atomic."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gwf.checkpointing import atomic_write, remove_stale_temporaries
from gwf.train import train
from tests.conftest import compose_config

REPO = Path(__file__).resolve().parents[1]

# KL with a critic and R1 on 8 Gaussians: 2 outer JKO steps x 20 updates; 10 data batches per virtual epoch, so
# the stops below fall inside an outer step and inside an epoch.
# loop.reals=shared: one data batch per update fills the bank (the stream positions below count on it)
KL_2D = ["experiment=gwf_2d", "loop.reals=shared", "method=kl", "jko.steps=2", "jko.updates_per_step=20",
         "ema_decay=0.9", "batch.gen_per_label=64", "batch.pos_per_label=64", "batch.bank_capacity=128", "data.batch_size=64",
         "data.epoch_size=640", "eval.num_samples=200", "eval.evaluator.num_samples=200", "eval.every_n_updates=1000",
         "logger=none", "trainer.enable_progress_bar=false", "threads=1"]


def _load(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)


def _assert_same_state(a: dict, b: dict, atol: float = 1e-6) -> None:
    sa, sb = a["state_dict"], b["state_dict"]
    assert sa.keys() == sb.keys()
    for prefix in ("generator.", "objective.critic.", "ema.model.", "jko.previous.", "bank."):
        assert any(k.startswith(prefix) for k in sa), prefix  # every part of the JKO state is compared
    for k in sa:
        assert torch.allclose(sa[k].float(), sb[k].float(), atol=atol, rtol=0), k
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for pid, st in opt_a["state"].items():
            for name, v in st.items():
                assert torch.allclose(torch.as_tensor(v).float(), torch.as_tensor(opt_b["state"][pid][name]).float(),
                                      atol=atol, rtol=0), (pid, name)


@pytest.fixture(scope="module")
def straight_kl(tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("straight")
    summary = train(compose_config(KL_2D), run)
    assert summary["finished"]
    ckpt = _load(run)
    assert int(ckpt["state_dict"]["update_count"]) == 40
    return ckpt


def _start(run_dir: Path, *args: str, env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tests.driver", str(run_dir), *args, *KL_2D]
    return subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(path: Path, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended before {path.name}:\n{proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, f"no {path.name} after {timeout_s} s"
        time.sleep(0.05)


def test_sigkill_mid_outer_step_then_resume_equals_straight_run(tmp_path, straight_kl):
    run = tmp_path / "killed"
    # checkpoints at 10 (inside outer step 0) and 20; the process is killed at update 15, 5 updates after the
    # checkpoint: those are lost and recomputed
    proc = _start(run, "--pause-at", "15", "checkpoint.every_n_updates=10")
    _wait_for(run / "paused-rank0", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    killed = _load(run)
    assert int(killed["state_dict"]["update_count"]) == 10  # the work since the last checkpoint is lost, no more
    assert int(killed["state_dict"]["data_position"]) == 10  # one batch per update (the bank fills at once)
    assert not list((run / "checkpoints").glob(".*tmp*"))

    summary = train(compose_config([*KL_2D, "checkpoint.every_n_updates=10"]), run)  # the relaunch
    assert summary["finished"]
    _assert_same_state(_load(run), straight_kl)


def test_updates_per_job_budget_stops_and_resumes_exactly(tmp_path, straight_kl):
    run = tmp_path / "budget"
    cfg = compose_config([*KL_2D, "checkpoint.updates_per_job=13"])
    stops = []
    for _ in range(4):  # 13, 26 (inside outer step 1), 39, 40
        summary = train(cfg, run)
        stops.append(int(_load(run)["state_dict"]["update_count"]))
        if summary["finished"]:
            break
    assert stops == [13, 26, 39, 40]
    _assert_same_state(_load(run), straight_kl)


def test_resume_differs_when_the_stream_is_not_replayed(tmp_path, straight_kl, monkeypatch):
    """The data stream position matters: restarting the stream at its beginning (what Lightning does with iterable
    datasets) gives a different run. Guards against the equality above being vacuous."""
    from gwf.data.toy2d import Toy2DDataModule

    run = tmp_path / "noseek"
    train(compose_config([*KL_2D, "checkpoint.updates_per_job=13"]), run)
    monkeypatch.setattr(Toy2DDataModule, "seek", lambda self, position: None)
    train(compose_config(KL_2D), run)
    resumed = _load(run)["state_dict"]
    assert not torch.allclose(resumed["generator.out.weight"], straight_kl["state_dict"]["generator.out.weight"],
                              atol=1e-6)


@pytest.mark.parametrize("bank", ["data", "replay"])
def test_wflow_digits_shard_stream_resumes_exactly(digits_dir, tmp_path, bank):
    """Class-conditional W-Flow on the digits shards, two data workers, 8 batches per virtual epoch: the shard
    stream is replayed to its position (epoch and batches, worker by worker). checkpoint.bank=replay saves no bank
    samples: the resumed run pushes the stream stretch its bank holds again (checked slot by slot), and the run
    after it equals the straight one (its positives come from that bank)."""
    base = [f"paths.data_dir={digits_dir.parent}", "data.num_workers=2", "data.epoch_size=1024",
            "trainer.enable_progress_bar=false", "jko.updates_first_step=30", "eval.every_n_updates=1000",
            "eval.num_samples=200", "logger=none", "ema_decay=0.9", f"checkpoint.bank={bank}"]
    train(compose_config(base), tmp_path / "straight")
    cfg = compose_config([*base, "checkpoint.updates_per_job=17"])
    assert not train(cfg, tmp_path / "resumed")["finished"]
    assert train(cfg, tmp_path / "resumed")["finished"]
    a, b = _load(tmp_path / "straight"), _load(tmp_path / "resumed")
    assert int(a["state_dict"]["data_position"]) > 1024 // 128  # the run crossed virtual epochs
    sa, sb = a["state_dict"], b["state_dict"]
    assert ("bank.data" in sa) == (bank == "data") and "bank.pushed_at" in sa
    for k in sa:
        assert torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6, rtol=0), k


def test_atomic_write_leaves_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "last.ckpt"
    atomic_write(lambda f: f.write(b"old"), path)

    def dies_halfway(f):
        f.write(b"partial")
        raise KeyboardInterrupt  # a kill in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(dies_halfway, path)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    (tmp_path / ".last.ckpt.tmp-123").write_bytes(b"partial")  # what a SIGKILL during the write leaves
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [".last.ckpt.tmp-123"]
    assert path.read_bytes() == b"old"


def test_bad_checkpoint_settings_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="checkpoint.every_minutes must be > 0"):
        train(compose_config([*KL_2D, "checkpoint.every_minutes=0"]), tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="ckpt_path=.*nope.ckpt does not exist"):
        train(compose_config([*KL_2D, f"ckpt_path={tmp_path}/nope.ckpt"]), tmp_path / "b")


def _final_state(cfg_overrides, run_dir) -> dict:
    while not train(compose_config(cfg_overrides), run_dir)["finished"]:
        pass
    return _load(run_dir)["state_dict"]


def test_stochastic_objective_resumes_exactly(tmp_path, monkeypatch):
    """An objective that draws random numbers in its generator loss (sliced Wasserstein: fresh directions at every
    update, from the rng argument) stopped by the update budget and relaunched equals the straight run, bit for bit.
    The negative control draws the directions from the global RNG instead: the resumed run then differs."""
    sw = [o if o != "method=kl" else "method=sw" for o in KL_2D]
    straight = _final_state(sw, tmp_path / "straight")
    resumed = _final_state([*sw, "checkpoint.updates_per_job=13"], tmp_path / "resumed")
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)

    import gwf.objectives.sliced as sliced

    monkeypatch.setattr(sliced, "random_directions",
                        lambda num, dim, rng, device=None: torch.nn.functional.normalize(torch.randn(num, dim), dim=1))
    straight = _final_state(sw, tmp_path / "straight_global")
    resumed = _final_state([*sw, "checkpoint.updates_per_job=13"], tmp_path / "resumed_global")
    assert not torch.allclose(straight["generator.out.weight"], resumed["generator.out.weight"], atol=1e-6)
