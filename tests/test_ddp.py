"""2-process DDP on CPU (gloo), ranks started from outside as srun or torchrun start them (each test in its own
processes: Lightning's own launcher would re-run the pytest command line). Critic-based methods with several
backward passes per step train without unused-parameter errors; ranks draw different noise and data but hold
identical parameters; only rank 0 writes; per-rank sizes derive from batch.global_size."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gwf.build import per_rank_batch

REPO = Path(__file__).resolve().parents[1]
TINY_2D = ["experiment=gwf_2d", "jko.steps=2", "jko.updates_first_step=10", "jko.updates_per_step=10", "ema_decay=0.9",
           "batch.global_size=128", "batch.bank_capacity=128", "data.batch_size=64", "eval.num_samples=200",
           "eval.every_n_updates=1000", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=5", "threads=1",
           "checkpoint.every_n_updates=10", "checkpoint.keep=-1"]
REPLICATED = ("generator.", "objective.critic.", "ema.model.", "jko.previous.")  # identical on every rank
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "GROUP_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env() -> dict:
    return {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS and not k.startswith("SLURM_")}


def slurm_env(rank: int, world: int, port: int) -> dict:
    """What srun sets for task ``rank`` of a 1-node job with ``world`` tasks (Lightning's SLURMEnvironment reads it)."""
    return {"SLURM_NTASKS": str(world), "SLURM_NTASKS_PER_NODE": str(world), "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_NNODES": "1", "SLURM_JOB_ID": "4242",
            "SLURM_JOB_NAME": "gwf", "SLURM_NODELIST": "127.0.0.1", "MASTER_PORT": str(port)}


def torchrun_env(rank: int, world: int, port: int) -> dict:
    return {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world), "NODE_RANK": "0",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def start_ranks(args: list[str], env_of=torchrun_env, world: int = 2, timeout_s: float = 300,
                extra_env: dict | None = None) -> tuple[list[int], list[str]]:
    """``python ARGS`` as the ``world`` ranks of one job (launch variables from ``env_of``): their exit codes and
    outputs; a rank still running after ``timeout_s`` (a hang) kills them all and fails the test."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, *args], cwd=REPO, env={**_clean_env(), **(extra_env or {}),
                                                                      **env_of(r, world, port)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    try:
        outs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"a rank of `{' '.join(args[:3])} ...` still ran after {timeout_s} s (hung?)")
    return [p.returncode for p in procs], outs


def run_ranks(run_dir: Path, overrides: list[str], env_of, world: int = 2, timeout_s: float = 300) -> list[str]:
    """Start ``world`` driver processes as the ranks of one job; returns their outputs (asserts they succeeded)."""
    codes, outs = start_ranks(["-m", "tests.driver", str(run_dir), "--record", *overrides], env_of, world, timeout_s)
    for r, (code, out) in enumerate(zip(codes, outs)):
        assert code == 0, f"rank {r} failed:\n{out[-4000:]}"
        assert "were not used in producing the loss" not in out and "SUMMARY" in out, out[-4000:]
    return outs


def _check_ranks(run_dir: Path) -> list[dict]:
    recs = [torch.load(run_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [r["world_size"] for r in recs] == [2, 2]
    s0, s1 = recs[0]["state"], recs[1]["state"]
    assert int(s0["update_count"]) == int(s1["update_count"]) == 20
    compared = [k for k in s0 if k.startswith(REPLICATED)]
    assert any(k.startswith("objective.critic.") for k in compared) and any(k.startswith("jko.") for k in compared)
    for k in compared:  # gradients averaged over ranks: the replicas never drift apart
        assert torch.allclose(s0[k], s1[k], atol=1e-6, rtol=0), k
    assert not torch.allclose(recs[0]["noise"], recs[1]["noise"])  # per-rank noise streams
    assert not torch.allclose(s0["bank.data"], s1["bank.data"])  # per-rank data streams, rank-local class banks
    return recs


@pytest.mark.parametrize("method,launcher", [("kl", "slurm"), ("w1", "torchrun")])
def test_two_process_ddp_critic_method(tmp_path, method, launcher):
    """kl (R1 penalty) under srun-style variables, w1 (interpolated penalty, a double backward) under torchrun-style
    ones."""
    run = tmp_path / "run"
    env_of = slurm_env if launcher == "slurm" else torchrun_env
    outs = run_ranks(run, [f"method={method}", *TINY_2D], env_of)
    recs = _check_ranks(run)
    # batch.global_size=128 over 2 ranks: 64 generated samples per rank and update
    assert recs[0]["state"]["bank.data"].shape[1] == 128
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outs[1]
    # only rank 0 wrote the main files: one set of checkpoints (every 10 updates, and last), one metrics file, the
    # run's completion record, no Lightning hpc checkpoint (its SLURM auto-requeue is off); each rank wrote its side
    # file per checkpoint
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["finished.json", "last.ckpt", "rank_state", "update0000010.ckpt", "update0000020.ckpt"]
    sides = sorted(p.name for p in (run / "checkpoints" / "rank_state").iterdir())
    assert sides == [f"rank0000{r}-update00000{u}.pt" for r in (0, 1) for u in (10, 20)]
    assert not list(run.glob("hpc_ckpt*")) and (run / "metrics.csv").exists()
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    for k, v in ckpt["state_dict"].items():
        if k.startswith(REPLICATED):
            assert torch.equal(v, recs[0]["state"][k]), k
    assert torch.equal(ckpt["state_dict"]["bank.data"], recs[0]["state"]["bank.data"])  # rank 0's bank
    side = torch.load(run / "checkpoints" / "rank_state" / "rank00001-update0000020.pt", weights_only=True)
    assert torch.equal(side["state"]["bank.data"], recs[1]["state"]["bank.data"])  # rank 1's bank, beside it


def test_global_batch_is_divided_over_ranks():
    b = {"global_size": 1024, "labels_per_update": 10, "gen_per_label": 64, "pos_per_label": 32}
    assert per_rank_batch(b, 8, conditional=True)["labels_per_update"] == 2  # 1024 / (8 ranks x 64 per label)
    unc = per_rank_batch(b, 4, conditional=False)
    assert unc["gen_per_label"] == unc["pos_per_label"] == 256 and "global_size" not in unc
    assert per_rank_batch({**b, "global_size": None}, 8, conditional=True)["labels_per_update"] == 10
    with pytest.raises(ValueError, match="global_size=1000 is not divisible by the 3 ranks"):
        per_rank_batch({**b, "global_size": 1000}, 3, conditional=False)
    with pytest.raises(ValueError, match="not a multiple of batch.gen_per_label=64"):
        per_rank_batch({**b, "global_size": 96 * 2}, 2, conditional=True)


def test_two_process_label_chunks_equal_one_pass(tmp_path, digits_dir):
    """W-Flow on the digits, 2 ranks x 4 labels with guidance: 2 chunks per rank (all-reduce on the last chunk only,
    DDP's no_sync before) give the one-pass parameters on both ranks; ranks stay identical."""
    wflow = [f"paths.data_dir={digits_dir.parent}", "data.num_workers=0", "trainer=ddp", "trainer.accelerator=cpu",
             "trainer.devices=2", "trainer.enable_progress_bar=false", "threads=1", "batch.labels_per_update=4",
             "batch.gen_per_label=8", "batch.pos_per_label=8", "batch.uncond_per_update=8", "optim.warmup_steps=0",
             "jko.updates_per_step=4", "eval.every_n_updates=1000", "eval.num_samples=100", "logger=none"]
    states = {}
    for chunks in (1, 2):
        run = tmp_path / f"chunks{chunks}"
        run_ranks(run, [*wflow, f"batch.label_chunks={chunks}"], torchrun_env)
        recs = [torch.load(run / f"rank{r}.pt", weights_only=False)["state"] for r in range(2)]
        for k in recs[0]:
            if k.startswith(("generator.", "ema.model.")):
                assert torch.allclose(recs[0][k], recs[1][k], atol=1e-6, rtol=0), k
        states[chunks] = recs[0]
    for k, v in states[1].items():
        if k.startswith(("generator.", "ema.model.")):
            assert torch.allclose(states[2][k], v, atol=1e-5, rtol=1e-5), k


def test_a_non_finite_loss_on_one_rank_stops_every_rank_with_the_same_message(tmp_path):
    """Only rank 1's loss is NaN (at update 3): both ranks raise at that update, before any backward pass, with the
    same message naming the rank, instead of rank 0 waiting in the gradient all-reduce until the collective timeout
    (the timeout here makes a hang fail the test)."""
    codes, outs = start_ranks(["-m", "tests.driver", str(tmp_path), "--nan-at", "3", "1", *TINY_2D, "method=wflow"],
                              timeout_s=240)
    message = "FloatingPointError: non-finite generator loss at update 3 on rank 1 of 2 (gen_loss=nan"
    for r, (code, out) in enumerate(zip(codes, outs)):
        assert code != 0 and message in out, f"rank {r}:\n{out[-3000:]}"
    lines = [next(line[line.index(message):] for line in out.splitlines() if message in line) for out in outs]
    assert lines[0] == lines[1]  # the whole message, values included
