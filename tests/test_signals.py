"""Preemption: SIGUSR1 / SIGTERM sent to a training process mid-run produce a checkpoint at the end of the current
update and a clean exit; the relaunch continues from it. Requeue requests go to the one owner of each path: the
sbatch script's GWF_REQUEUE_FILE, or the handler submitit installed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from gwf.train import train
from tests.conftest import compose_config
from tests.test_resume import KL_2D, REPO, _load

SHORT = [*KL_2D, "jko.updates_per_step=10", "checkpoint.every_n_updates=5"]  # 2 JKO steps x 10 updates


def _summary(out: str) -> dict:
    line = [ln for ln in out.splitlines() if ln.startswith("SUMMARY ")][-1]
    return json.loads(line[len("SUMMARY "):])


@pytest.mark.parametrize("sig,requeue", [(signal.SIGUSR1, True), (signal.SIGTERM, False), (signal.SIGINT, False)])
def test_signal_saves_exits_cleanly_and_relaunch_continues(tmp_path, sig, requeue):
    run, flag = tmp_path / "run", tmp_path / "requeue-flag"
    env = {**os.environ, "GWF_REQUEUE_FILE": str(flag)}
    proc = subprocess.Popen([sys.executable, "-m", "tests.driver", str(run), "--pause-at", "7", *SHORT], cwd=REPO,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (run / "paused-rank0").exists():
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)  # arrives between updates 7 and 8; the last numbered checkpoint is at 5
    (run / "go").touch()
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]  # a clean exit, not a kill
    assert _summary(out)["finished"] is False
    assert int(_load(run)["state_dict"]["update_count"]) == 8  # saved at the end of the update under way
    assert flag.exists() == requeue  # SIGUSR1 (time limit) asks the sbatch script to requeue; SIGTERM, Ctrl-C do not

    summary = train(compose_config(SHORT), run)  # relaunch of the same command
    assert summary["finished"] and int(_load(run)["state_dict"]["update_count"]) == 20
    straight = tmp_path / "straight"
    train(compose_config(SHORT), straight)
    a, b = _load(run)["state_dict"], _load(straight)["state_dict"]
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=0) for k in a)


class _SignalSelf(L.Callback):
    def __init__(self, update: int, sig: int):
        self.update, self.sig = update, sig

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if int(module.update_count) == self.update:
            os.kill(os.getpid(), self.sig)


def test_submitit_handler_gets_the_signal_after_the_save(tmp_path):
    """In the submitit path submitit's USR2 handler requeues; gwf first saves, then calls it."""
    calls = []

    def submitit_like(signum, frame):
        calls.append((signum, int(_load(tmp_path / "run")["state_dict"]["update_count"])))

    previous = signal.signal(signal.SIGUSR2, submitit_like)
    try:
        summary = train(compose_config(SHORT), tmp_path / "run", extra_callbacks=(_SignalSelf(3, signal.SIGUSR2),))
        assert signal.getsignal(signal.SIGUSR2) is submitit_like  # handlers restored after fit
    finally:
        signal.signal(signal.SIGUSR2, previous)
    assert summary["finished"] is False
    assert calls == [(signal.SIGUSR2, 4)]  # called once, after last.ckpt at the end of update 4 was written


def test_ctrl_c_twice_stops_at_once_without_saving(tmp_path):
    """The first Ctrl-C asks for a save at the end of the update; a second one before it stops at once (Lightning's
    KeyboardInterrupt shutdown, exit status 1): last.ckpt is still the previous save."""

    class TwoCtrlC(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if int(module.update_count) == 7:
                os.kill(os.getpid(), signal.SIGINT)
                os.kill(os.getpid(), signal.SIGINT)

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as stop:
        train(compose_config(SHORT), tmp_path / "run", extra_callbacks=(TwoCtrlC(),))
    assert stop.value.code == 1
    assert int(_load(tmp_path / "run")["state_dict"]["update_count"]) == 5  # the numbered save before
    signal.signal(signal.SIGINT, handler)  # Lightning leaves SIGINT ignored after its shutdown


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_during_a_save_leaves_a_valid_last_checkpoint(tmp_path, sig):
    """The second save (update 10) stalls before its rename and the process gets SIGTERM or SIGKILL then. SIGTERM
    is a stop request: the save completes (its numbered copy exists) and the process stops at the end of the next
    update, saved (exit 0, last.ckpt at update 11); SIGKILL leaves the previous last.ckpt (update 5) whole and
    loadable, and no partial file in its place."""
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tests.driver", str(run), "--slow-save", "5", *SHORT], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (run / "saving-2").exists():  # the numbered copy of update 5 is a link, not a write
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert (run / "saving-2").read_text().endswith("last.ckpt")
    proc.send_signal(sig)
    out = proc.communicate(timeout=120)[0]
    ckpt = _load(run)  # a whole checkpoint: torch.load reads it
    if sig == signal.SIGTERM:
        assert proc.returncode == 0 and int(ckpt["state_dict"]["update_count"]) == 11, out[-3000:]
        assert not _summary(out)["finished"]
        numbered = torch.load(run / "checkpoints" / "update0000010.ckpt", weights_only=False)
        assert int(numbered["state_dict"]["update_count"]) == 10
    else:
        assert proc.returncode == -signal.SIGKILL and int(ckpt["state_dict"]["update_count"]) == 5
    assert len(list((run / "checkpoints").glob(".*.tmp-*"))) == (1 if sig == signal.SIGKILL else 0)  # the killed
    #                                                                  write's temporary, removed at the next start
