"""Wall time of the [GWF] 2D recipe, one thread, side by side with the official script: ``gwf-train
experiment=gwf_2d threads=1`` (KL_DV + JKO, 5 JKO steps x 500 updates, batch 256, evaluated at the start and after
each JKO step) and, with ``--official``, the official README's 2D command (``train.py --dataset eight_gaussians
--divergence KL_DV --JKO ...``, one thread), run alternately in fresh processes, whole processes timed.

    gwf-bench-2d [--repeats 3] [--official ~/GWF --official-python ~/gwf-venv/bin/python] [--json rows.json]

The official code is a clone of github.com/Paulcauch/GWF (nothing is downloaded here); its interpreter needs the
official requirements (torch, torchvision, matplotlib, pytorch-fid). The torchvision workaround of gwf/_compat.py is
applied to it before ``train.py`` runs, unchanged, as ``__main__``. Measure on an idle machine: the ratio, not the
seconds, carries across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The official README's "2D toy datasets" command (lambda2 = 1 is train.py's default); --divergence from METHODS.
OFFICIAL_ARGS = ["--dataset", "eight_gaussians", "--JKO", "--model_name", "mlp_2d", "--nz", "2", "--embed_dim", "1",
                 "--JKO_steps", "5", "--inner_iterations_first", "500", "--inner_iterations", "500",
                 "--batch_size", "256", "--gp_type", "sjko", "--lbda_gp", "0.2", "--print_every", "100",
                 "--evaluate_every", "1", "--save_image_every", "1", "--compute_MMD"]
# gwf method -> the official --divergence, for the objectives that the README command's R1 ("sjko") 0.2 fits
METHODS = {"kl_dv": "KL_DV", "kl": "KL", "kl_centered": "KL_centered", "chi2": "chi2", "js": "Shannon"}

# Runs the official train.py unchanged in one thread, after gwf/_compat.py's torchvision workaround (loaded by path:
# the official interpreter need not have gwf installed).
_BOOTSTRAP = """
import importlib.util, os, runpy, sys
spec = importlib.util.spec_from_file_location("gwf_compat", sys.argv[1])
compat = importlib.util.module_from_spec(spec); spec.loader.exec_module(compat)
compat.patch_torchvision_for_cpu_torch()
import torch
torch.set_num_threads(1); torch.set_num_interop_threads(1)
script = os.path.join(sys.argv[2], "train.py")
sys.argv = [script] + sys.argv[3:]
runpy.run_path(script, run_name="__main__")
"""


def _timed(cmd: list[str], cwd: str, env: dict, log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if done.returncode:
        raise SystemExit(f"gwf-bench-2d: {' '.join(cmd[:3])} ... failed (exit {done.returncode}); see {log}")
    return seconds


def official_command(python: str, official: Path, method: str, exp: str) -> list[str]:
    """The official 2D command for ``method`` (a key of METHODS), through the bootstrap."""
    compat = Path(__file__).resolve().parent.parent / "_compat.py"
    return [python, "-c", _BOOTSTRAP, str(compat), str(official), *OFFICIAL_ARGS,
            "--divergence", METHODS[method], "--exp", exp]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gwf-bench-2d", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--method", default="kl_dv", choices=sorted(METHODS))
    p.add_argument("--official", type=Path, help="a clone of github.com/Paulcauch/GWF (its train.py)")
    p.add_argument("--official-python", default=sys.executable,
                   help="the interpreter with the official requirements (default: this one)")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    args = p.parse_args(argv)
    if args.official is not None and not (args.official / "train.py").is_file():
        p.error(f"--official {args.official} holds no train.py: pass a clone of github.com/Paulcauch/GWF")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="gwf-bench-2d-") as root:
        env["FID_BASE_DIR"] = root  # the official script's checkpoint / FID folders
        for i in range(args.repeats):
            row = {"run": i + 1}
            if args.official is not None:
                row["official_s"] = _timed(official_command(args.official_python, args.official, args.method,
                                                            f"gwf_bench_2d_{i}"),
                                           str(args.official), env, Path(root) / f"official_{i}.log")
                print(f"official run {i + 1}/{args.repeats}: {row['official_s']:.1f} s", flush=True)
            run_dir = Path(root) / "runs"
            cmd = [sys.executable, "-m", "gwf.train", "experiment=gwf_2d", f"method={args.method}", "threads=1",
                   f"paths.root={run_dir}", f"run_id=run{i}"]
            row["gwf_s"] = _timed(cmd, root, env, Path(root) / f"gwf_{i}.log")
            summary = json.loads((run_dir / "gwf_2d" / f"run{i}" / "eval_summary.json").read_text())
            row["gwf_hq_rate"] = summary["last"]["hq_rate"]
            print(f"gwf run {i + 1}/{args.repeats}: {row['gwf_s']:.1f} s", flush=True)
            rows.append(row)
    official = "official_s" in rows[0]
    head = "| run | gwf-train (s) | hq_rate |" + (" official train.py (s) | ratio |" if official else "")
    lines = [head, "|---:|---:|---:|" + ("---:|---:|" if official else "")]
    for r in rows:
        lines.append(f"| {r['run']} | {r['gwf_s']:.1f} | {r['gwf_hq_rate']:.3f} |"
                     + (f" {r['official_s']:.1f} | {r['gwf_s'] / r['official_s']:.2f} |" if official else ""))
    med = statistics.median
    lines.append(f"| median | {med(r['gwf_s'] for r in rows):.1f} | |"
                 + (f" {med(r['official_s'] for r in rows):.1f} | "
                    f"{med(r['gwf_s'] / r['official_s'] for r in rows):.2f} |" if official else ""))
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
