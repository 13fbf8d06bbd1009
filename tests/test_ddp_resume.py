"""Exact DDP resume for every rank: each rank's class bank (and every other buffer) is saved in its own side file
next to the checkpoint and reloaded by that rank. 2 processes (gloo, srun-style variables), KL on 8 Gaussians:
12 updates straight vs 6 updates (stopped by checkpoint.updates_per_job, in the middle of outer step 1) then
resumed for 6 more; and a resume on a different number of ranks (the documented fallback)."""

import logging
import shutil
from pathlib import Path

import pytest
import torch

from gwf.train import train
from tests.conftest import compose_config
from tests.test_ddp import run_ranks, slurm_env

# Per rank: 64 generated and 64 real samples per update, 16 data samples per batch into a bank of 256, so the bank
# at the end still holds samples pushed before the stop (the comparison of banks is not vacuous). 2 outer JKO steps
# of 4 + 8 updates; numbered checkpoints every 4 updates, one kept.
TINY = ["experiment=gwf_2d", "loop.reals=shared", "method=kl", "jko.steps=2", "jko.updates_first_step=4",
        "jko.updates_per_step=8", "ema_decay=0.9",
        "batch.global_size=128", "batch.bank_capacity=256", "data.batch_size=16", "eval.num_samples=200",
        "eval.evaluator.num_samples=200", "eval.every_n_updates=1000", "logger=none", "trainer=ddp",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.enable_progress_bar=false", "threads=1",
        "checkpoint.every_n_updates=4", "checkpoint.keep=1"]
STOP = ["checkpoint.updates_per_job=6"]


def _states(run_dir: Path) -> list[dict]:
    return [torch.load(run_dir / f"rank{r}.pt", weights_only=False)["state"] for r in range(2)]


def _side_files(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints" / "rank_state").iterdir())


def _max_diff(a: dict, b: dict) -> dict:
    assert a.keys() == b.keys()
    return {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()}


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A 2-rank run stopped after update 6 by the budget (the stop saves last.ckpt); tests resume copies of it."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    run_ranks(run, [*TINY, *STOP], slurm_env)
    return run


def test_two_rank_resume_equals_straight_run_on_every_rank(tmp_path, stopped_run):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ranks(straight, TINY, slurm_env)
    shutil.copytree(stopped_run, resumed)
    stopped = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert int(stopped["state_dict"]["update_count"]) == 6 and stopped["gwf_rank_state"] == {"world_size": 2}
    assert _side_files(resumed) == [f"rank0000{r}-update000000{u}.pt" for r in (0, 1) for u in (4, 6)]
    rank1_at_stop = torch.load(resumed / "checkpoints" / "rank_state" / "rank00001-update0000006.pt")["state"]
    assert not torch.equal(rank1_at_stop["bank.data"], stopped["state_dict"]["bank.data"])  # rank 1's own bank
    control = tmp_path / "control"
    shutil.copytree(resumed, control)

    run_ranks(resumed, [*TINY, *STOP], slurm_env)  # the relaunch of the same command: updates 7 to 12
    ref = _states(straight)
    for r, state in enumerate(_states(resumed)):
        assert int(state["update_count"]) == 12
        diffs = _max_diff(state, ref[r])
        for prefix in ("generator.", "objective.critic.", "ema.model.", "jko.previous.", "bank.data", "data_position"):
            assert any(k.startswith(prefix) for k in diffs), prefix  # every part is compared, on both ranks
        bad = {k: d for k, d in diffs.items() if d > 1e-6}
        assert not bad, f"rank {r} differs from the straight run: {bad}"
    # side files are kept for the checkpoints that exist only: last.ckpt and update0000012.ckpt, both at 12
    assert sorted(p.name for p in (resumed / "checkpoints").glob("*.ckpt")) == ["last.ckpt", "update0000012.ckpt"]
    assert _side_files(resumed) == ["rank00000-update0000012.pt", "rank00001-update0000012.pt"]

    # Negative control: the same relaunch with rank 0's buffers loaded on every rank (no side files) leaves rank 1
    # with a different bank, hence different positives and different (still replicated) parameters.
    run_ranks(control, [*TINY, *STOP, "--ignore-rank-state"], slurm_env)
    wrong = _max_diff(_states(control)[1], ref[1])
    assert wrong["bank.data"] > 1e-3 and wrong["generator.out.weight"] > 1e-6, wrong


def test_resume_on_fewer_ranks_warns_and_refills_the_bank(tmp_path, stopped_run, caplog):
    """A 2-rank checkpoint resumed by one process: parameters and the rest are restored, a warning says the run is not
    an exact continuation, and the emptied bank refills from the stream first: one rank now takes the whole global
    batch, 128 positives, i.e. 128 / 16 = 8 batches before the next update (7 without an update, then 6 updates)."""
    run = tmp_path / "one_rank"
    shutil.copytree(stopped_run, run)
    position_at_stop = int(torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
                           ["data_position"])
    single = [o for o in TINY if o not in ("trainer=ddp", "trainer.devices=2")]
    with caplog.at_level(logging.WARNING, logger="gwf"):
        assert train(compose_config(single), run)["finished"]
    assert "was written by 2 ranks, this run has 1" in caplog.text and "class banks are emptied" in caplog.text
    final = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["gwf_rank_state"] == {"world_size": 1} and int(final["state_dict"]["update_count"]) == 12
    assert int(final["state_dict"]["data_position"]) == position_at_stop + 7 + 6
    # one process writes no side files, and those of the 2-rank checkpoints, no longer kept, are pruned
    assert list((run / "checkpoints" / "rank_state").glob("*.pt")) == []


def test_two_rank_resume_with_a_replayed_bank(tmp_path):
    """checkpoint.bank=replay: neither the side files nor the main checkpoint hold bank samples (only counts and
    each slot's stream position); on resume each rank pushes its own stream stretch again, and both ranks end equal
    to the straight run, their banks included."""
    replay = [*TINY, "checkpoint.bank=replay"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_ranks(straight, replay, slurm_env)
    run_ranks(resumed, [*replay, *STOP], slurm_env)
    side = torch.load(resumed / "checkpoints" / "rank_state" / "rank00001-update0000006.pt")["state"]
    main = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    assert "bank.pushed_at" in side and not any(k in d for k in ("bank.data", "bank.uncond") for d in (side, main))
    run_ranks(resumed, [*replay, *STOP], slurm_env)
    ref = _states(straight)
    for r, state in enumerate(_states(resumed)):
        assert int(state["update_count"]) == 12
        diffs = _max_diff(state, ref[r])
        assert "bank.samples" in diffs and "generator.out.weight" in diffs
        bad = {k: d for k, d in diffs.items() if d > 1e-6}
        assert not bad, f"rank {r} differs from the straight run: {bad}"
