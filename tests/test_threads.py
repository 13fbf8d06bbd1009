"""threads=auto: the cores free at start (other processes' use measured from /proc/stat), less the data workers,
shared by a node's ranks; inherited by the ranks a process starts; integers pinned; bad values named. The threads and
start-up benchmarks run."""

import os
import subprocess
import sys
import time

import pytest

from gwf import launch


@pytest.fixture
def box(monkeypatch):
    """A 4-core box whose other processes keep ``state['busy']`` cores busy; no inherited choice, no SLURM."""
    for var in (launch.THREADS_ENV, "SLURM_CPUS_PER_TASK"):
        monkeypatch.delenv(var, raising=False)
    state = {"busy": 0.0}
    monkeypatch.setattr(launch, "allowed_cores", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(launch, "busy_cores", lambda cores, window_s=0.25: state["busy"])
    return state


@pytest.mark.parametrize("busy, workers, expected", [(0.0, 0, 4), (0.2, 0, 4), (0.3, 0, 3), (1.0, 0, 3),
                                                     (1.3, 0, 2), (3.9, 0, 1), (0.0, 1, 3), (3.0, 2, 1),
                                                     (None, 0, 4)])
def test_auto_takes_the_free_cores_less_the_data_workers(box, busy, workers, expected):
    box["busy"] = busy
    threads, why = launch.choose_threads("auto", data_workers=workers)
    assert threads == expected and why.startswith("auto: 4 cores")


def test_ranks_share_the_cores_and_inherit_the_launching_process_choice(box, monkeypatch):
    box["busy"] = 3.0  # not measured with several ranks: siblings starting up would look busy
    assert launch.choose_threads("auto", local_ranks=2) == (2, "auto: 4 cores shared by 2 ranks")
    assert launch.choose_threads("auto", local_ranks=8)[0] == 1
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert launch.choose_threads("auto", local_ranks=4) == (6, "auto: SLURM_CPUS_PER_TASK")
    monkeypatch.setenv(launch.THREADS_ENV, "3")
    assert launch.choose_threads("auto")[0] == 3


def test_integers_are_pinned_and_bad_values_named(box):
    assert launch.choose_threads(5) == (5, "threads")
    assert launch.choose_threads(None) == (None, "torch's default")
    for bad in (0, -2, "many", 1.5, True):
        with pytest.raises(ValueError, match="threads must be a positive integer, auto or null"):
            launch.choose_threads(bad)


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="Linux /proc/stat")
def test_busy_cores_sees_a_process_spinning_on_a_core():
    cores = launch.allowed_cores()
    spin = subprocess.Popen([sys.executable, "-c", "import os, time\nos.sched_setaffinity(0, {%d})\n"
                             "t = time.time()\nwhile time.time() - t < 5: pass" % cores[0]])
    try:
        time.sleep(0.5)
        busy_one = launch.busy_cores(cores[:1], window_s=0.5)
    finally:
        spin.kill()
        spin.wait()
    assert 0.7 <= busy_one <= 1.0  # the spinning process holds that core
    assert 0.0 <= launch.busy_cores(cores, window_s=0.1) <= len(cores)


def test_the_benchmark_runs_each_setting_in_its_own_process(tmp_path):
    """gwf-bench-threads: fresh processes, the default resolved by threads=auto (here: GWF_THREADS is not
    inherited, so the box is measured), a row per setting against the best."""
    from gwf.bench import threads as bench

    out = tmp_path / "rows.json"
    bench.main(["--experiments", "toy2d_wflow", "--updates", "2", "--settings", "1", "auto", "--repeats", "1",
                "--json", str(out)])
    import json

    rows = json.loads(out.read_text())["rows"]
    assert [(r["setting"], r["updates"]) for r in rows] == [("1", 2), ("auto", 2)]
    assert rows[0]["threads"] == 1 and 1 <= rows[1]["threads"] <= len(launch.allowed_cores())
    assert min(r["vs_best"] for r in rows) == 1.0 and all(r["seconds"] > 0 for r in rows)


def test_the_startup_benchmark_times_each_command(tmp_path):
    from gwf.bench import startup

    out = tmp_path / "rows.json"
    startup.main(["--repeats", "1", "--json", str(out)])
    import json

    rows = {r["command"]: r for r in json.loads(out.read_text())}
    assert {"gwf-train --help", "import gwf.train", "relaunch of a finished run"} <= set(rows)
    assert all(r["seconds"] > 0 for r in rows.values())
