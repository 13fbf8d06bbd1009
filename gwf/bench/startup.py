"""Benchmark of the commands' start-up: ``gwf-train --help``, ``import gwf.train`` and the relaunch of a finished
run, each in a fresh process (median of ``--repeats``).

    gwf-bench-startup [--repeats 5] [--json rows.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = ["experiment=toy2d_wflow", "jko.steps=1", "jko.updates_per_step=4", "eval.every_n_updates=4",
       "eval.num_samples=100", "trainer.enable_progress_bar=false", "logger=none"]


def _seconds(cmd: list[str], cwd: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, check=True, capture_output=True)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gwf-bench-startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the rows as JSON to this file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="gwf-bench-startup-") as root:
        train = [sys.executable, "-m", "gwf.train", *RUN, f"paths.root={root}"]
        first = _seconds(train, root)  # trains the run once; every later launch finds it complete
        commands = {"gwf-train --help": [sys.executable, "-m", "gwf.train", "--help"],
                    "import gwf.train": [sys.executable, "-c", "import gwf.train"],
                    "relaunch of a finished run": train,
                    "import torch, lightning (for scale)": [sys.executable, "-c", "import gwf, torch, lightning"]}
        times = {k: [] for k in commands}
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                times[name].append(_seconds(cmd, root))
    rows = [dict(command=k, seconds=statistics.median(v), runs=len(v)) for k, v in times.items()]
    rows.append(dict(command="the run itself (4 updates, 2 evaluations, once)", seconds=first, runs=1))
    text = "\n".join(["| command | seconds (median) | runs |", "|---|---:|---:|",
                      *(f"| {r['command']} | {r['seconds']:.2f} | {r['runs']} |" for r in rows)])
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
