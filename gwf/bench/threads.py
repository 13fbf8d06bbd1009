"""Benchmark of the ``threads`` setting on CPU: training time of short runs at threads = 1, 2, ... and the default
(auto), side by side, optionally with other processes keeping cores busy.

    gwf-bench-threads                                   # toy2d_wflow and gwf_2d, 200 updates, threads 1 2 auto
    gwf-bench-threads --busy 1 --json rows.json         # with one core kept busy by another process

Each run is a fresh ``gwf-train`` process (its own OpenMP pool, as a user's), timed by its own progress line (the
training loop, the evaluations in it included);
settings are interleaved over the repeats, each repeat starting with another one, so that machine load and order
hit them alike.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETTINGS = ["1", "2", "auto"]


def _spin(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


def run_one(experiment: str, updates: int, threads: str) -> dict:
    """One ``gwf-train`` run in a fresh process, as a user launches it; the training time is read from its last
    progress line (updates/s since training started: the loop and the evaluations in it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GWF_THREADS", "OMP_NUM_THREADS")}
    with tempfile.TemporaryDirectory(prefix="gwf-bench-threads-") as root:
        overrides = [f"experiment={experiment}", "jko.steps=1", f"jko.updates_per_step={updates}",
                     f"eval.every_n_updates={updates}", f"checkpoint.every_n_updates={updates}", f"paths.root={root}",
                     "trainer.enable_progress_bar=false", "logger=none"]
        out = subprocess.run([sys.executable, "-m", "gwf.train", *overrides,
                              *([] if threads == "default" else [f"threads={threads}"])],
                             env=env, capture_output=True, text=True, cwd=root)
    text = out.stdout + out.stderr
    rate = re.findall(rf"update {updates}/{updates} \(JKO step [^)]*\), ([\d.]+) updates/s", text)
    used = re.findall(r"torch threads: (\d+)", text)
    if out.returncode != 0 or not rate or not used:
        raise SystemExit(f"gwf-bench-threads: the run {experiment} threads={threads} failed:\n{text[-3000:]}")
    return {"threads": int(used[-1]), "train_s": updates / float(rate[-1])}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gwf-bench-threads", description=__doc__.split("\n\n")[0])
    p.add_argument("--experiments", nargs="+", default=["toy2d_wflow", "gwf_2d"])
    p.add_argument("--updates", type=int, default=200)
    p.add_argument("--settings", nargs="+", default=SETTINGS, help="threads values; 'auto' is the default")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--busy", type=int, default=0, help="cores kept busy by spinning processes meanwhile")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    args = p.parse_args(argv)
    spinners = [mp.Process(target=_spin, args=(24 * 3600,), daemon=True) for _ in range(args.busy)]
    for s in spinners:
        s.start()
    header = f"{os.cpu_count()} CPUs, {args.busy} kept busy, load average at start {os.getloadavg()[0]:.2f}"
    print(header, flush=True)
    rows = []
    try:
        for experiment in args.experiments:
            times = {s: [] for s in args.settings}
            used = {}
            for rep in range(args.repeats):
                k = rep % len(args.settings)  # each repeat starts with another setting: order effects even out
                for s in args.settings[k:] + args.settings[:k]:
                    r = run_one(experiment, args.updates, s)
                    times[s].append(r["train_s"])
                    used[s] = r["threads"]
                    print(f"  {experiment} threads={s}: {r['threads']} used, {r['train_s']:.2f} s", flush=True)
            best = min(statistics.median(v) for v in times.values())
            rows += [dict(experiment=experiment, setting=s, threads=used[s], updates=args.updates,
                          seconds=statistics.median(v), vs_best=statistics.median(v) / best, runs=len(v))
                     for s, v in times.items()]
    finally:
        for s in spinners:
            s.terminate()
    lines = ["| experiment | threads | torch threads | training (s) | / best | runs |", "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r['experiment']} | {r['setting']}{' (default)' if r['setting'] == 'auto' else ''} | {r['threads']} "
              f"| {r['seconds']:.2f} | {r['vs_best']:.2f} | {r['runs']} |" for r in rows]
    text = "\n".join(lines) + f"\n\n({header}; {args.updates} updates per run, training loop only.)"
    print()
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header=header, rows=rows), indent=1))


if __name__ == "__main__":
    main()
