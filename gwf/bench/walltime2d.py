"""Wall time and high-quality rate of the [GWF] 2D recipe, one thread, side by side with the official script:
``gwf-train experiment=gwf_2d threads=1 seed=i`` (KL_DV + JKO, 5 JKO steps x 500 updates, batch 256, evaluated at the
start and after each JKO step) and, with ``--official``, the official README's 2D command (``train.py --dataset
eight_gaussians --divergence KL_DV --JKO ...``, one thread, ``--seed i``), run alternately in fresh processes, whole
processes timed; repeat i uses seed i on both sides.

    gwf-bench-2d [--repeats 3] [--official ~/GWF --official-python ~/gwf-venv/bin/python] [--json rows.json]
    gwf-bench-2d --official ~/GWF --official-only --method kl_dv,kl,kl_centered,chi2,js   # the official rates

The official code is a clone of github.com/Paulcauch/GWF (nothing is downloaded here); its interpreter needs the
official requirements (torch, torchvision, matplotlib, pytorch-fid). The torchvision workaround of gwf/_compat.py is
applied to it before ``train.py`` runs, unchanged, as ``__main__``, with the README's flags plus ``--seed`` and
``--save_ckpt`` (its generator after each JKO step, a few kB). Both final generators are scored the same way: the
high-quality rate (share within 3 std of a mode) of ``MODE_SAMPLES`` samples of uniform noise, as gwf's 2D
evaluation counts it (``eval.evaluator.mode_samples``). Measure on an idle machine: the ratio, not the seconds,
carries across machines.
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


def official_command(python: str, official: Path, method: str, exp: str, seed: int = 1024) -> list[str]:
    """The official 2D command for ``method`` (a key of METHODS) with ``--seed`` (train.py's default: 1024) and
    ``--save_ckpt``, through the bootstrap."""
    compat = Path(__file__).resolve().parent.parent / "_compat.py"
    return [python, "-c", _BOOTSTRAP, str(compat), str(official), *OFFICIAL_ARGS,
            "--divergence", METHODS[method], "--exp", exp, "--seed", str(seed), "--save_ckpt"]


MODE_SAMPLES = 20_000  # generated samples scored per final generator, as gwf's eval.evaluator.mode_samples
SCORE_SEED = 12345  # their uniform noise


def official_checkpoint(fid_base_dir: Path, method: str, exp: str) -> Path:
    """Where train.py's ``--save_ckpt`` writes (``<FID_BASE_DIR>/checkpoints/GWF/<divergence>/<dataset>/<exp>``)."""
    return Path(fid_base_dir) / "checkpoints" / "GWF" / METHODS[method] / "eight_gaussians" / exp / "latest.pt"


def official_hq_rate(checkpoint: Path, samples: int = MODE_SAMPLES) -> float:
    """The high-quality rate of the official final generator (``netT`` of a ``--save_ckpt`` file: networks/__init__.py
    ``Generator2D``, ``mlp_2d`` widths) on ``samples`` points of uniform noise on [-1, 1]^2 (``--type_noise unif``),
    against the official 8 Gaussians: gwf's ``mode_metrics``, as its 2D evaluation scores gwf's generator."""
    import torch
    from torch import nn

    from gwf.data.toy2d import make_sampler
    from gwf.eval.toy2d import mode_metrics

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["netT"]
    hidden = state["model.0.weight"].shape[0]
    net = nn.Sequential(nn.Linear(2, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                        nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 2))
    net.load_state_dict({k.removeprefix("model."): v for k, v in state.items()})
    with torch.no_grad():
        z = torch.rand(samples, 2, generator=torch.Generator().manual_seed(SCORE_SEED)) * 2 - 1
        return mode_metrics(net(z), make_sampler("8gaussians_gwf"))["hq_rate"]


def _mean_std(values: list[float]) -> str:
    return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def bench(method: str, repeats: int, official: Path | None, official_python: str, root: Path, env: dict,
          run_gwf: bool = True) -> list[dict]:
    """``repeats`` rows for ``method``: repeat i runs seed i, the official script first (with ``official``), then
    gwf-train (with ``run_gwf``); each side's seconds and final high-quality rate."""
    rows = []
    for i in range(repeats):
        row = {"method": method, "run": i + 1, "seed": i}
        if official is not None:
            exp = f"gwf_bench_2d_{method}_{i}"
            row["official_s"] = _timed(official_command(official_python, official, method, exp, seed=i),
                                       str(official), env, root / f"official_{method}_{i}.log")
            row["official_hq_rate"] = official_hq_rate(official_checkpoint(root, method, exp))
            print(f"{method}: official run {i + 1}/{repeats}: {row['official_s']:.1f} s", flush=True)
        if run_gwf:
            run_dir = root / "runs"
            cmd = [sys.executable, "-m", "gwf.train", "experiment=gwf_2d", f"method={method}", "threads=1",
                   f"seed={i}", f"paths.root={run_dir}", f"run_id={method}_{i}"]
            row["gwf_s"] = _timed(cmd, str(root), env, root / f"gwf_{method}_{i}.log")
            summary = json.loads((run_dir / "gwf_2d" / f"{method}_{i}" / "eval_summary.json").read_text())
            row["gwf_hq_rate"] = summary["last"]["hq_rate"]
            print(f"{method}: gwf run {i + 1}/{repeats}: {row['gwf_s']:.1f} s", flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    """One method's rows as Markdown: seconds and hq_rate of each side that ran, the ratio of their seconds, and a
    last row with the median seconds and the mean ± std of the rates."""
    sides = [(k, name) for k, name in (("gwf", "gwf-train"), ("official", "official train.py")) if f"{k}_s" in rows[0]]
    both = len(sides) == 2
    head = "| run (seed) |" + "".join(f" {name} (s) | hq_rate |" for _, name in sides) + (" ratio |" if both else "")
    lines = [head, "|---:|" + "---:|---:|" * len(sides) + ("---:|" if both else "")]
    for r in rows:
        lines.append(f"| {r['run']} ({r['seed']}) |" + "".join(f" {r[k + '_s']:.1f} | {r[k + '_hq_rate']:.3f} |"
                                                             for k, _ in sides)
                     + (f" {r['gwf_s'] / r['official_s']:.2f} |" if both else ""))
    med = statistics.median
    lines.append("| median (hq: mean ± std) |" + "".join(
        f" {med(r[k + '_s'] for r in rows):.1f} | {_mean_std([r[k + '_hq_rate'] for r in rows])} |" for k, _ in sides)
                 + (f" {med(r['gwf_s'] / r['official_s'] for r in rows):.2f} |" if both else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gwf-bench-2d", description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--method", default="kl_dv",
                   help=f"objective, or a comma-separated list of them (a table each, then a summary): "
                        f"{', '.join(sorted(METHODS))}")
    p.add_argument("--official", type=Path, help="a clone of github.com/Paulcauch/GWF (its train.py)")
    p.add_argument("--official-python", default=sys.executable,
                   help="the interpreter with the official requirements (default: this one)")
    p.add_argument("--official-only", action="store_true",
                   help="run only the official script (its seconds and hq_rate): gwf's own rates of the same "
                        "seeds are those of `gwf-train -m experiment=gwf_2d_sweep jko.tau=1 seed=0,1,2`")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        p.error(f"--method {args.method}: choose among {', '.join(sorted(METHODS))} (comma-separated)")
    if args.official is not None and not (args.official / "train.py").is_file():
        p.error(f"--official {args.official} holds no train.py: pass a clone of github.com/Paulcauch/GWF")
    if args.official_only and args.official is None:
        p.error("--official-only needs --official <clone of github.com/Paulcauch/GWF>")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="gwf-bench-2d-") as root:
        env["FID_BASE_DIR"] = root  # the official script's checkpoint / FID folders
        for method in methods:
            rows += bench(method, args.repeats, args.official, args.official_python, Path(root), env,
                          run_gwf=not args.official_only)
    for method in methods:
        print(f"\n{method}:\n" + table([r for r in rows if r["method"] == method]))
    if len(methods) > 1:
        sides = [k for k in ("gwf", "official") if f"{k}_hq_rate" in rows[0]]
        print("\n| objective |" + "".join(f" {k} hq_rate |" for k in sides) + "\n|---|" + "---:|" * len(sides))
        for method in methods:
            mine = [r for r in rows if r["method"] == method]
            print(f"| {method} |" + "".join(f" {_mean_std([r[k + '_hq_rate'] for r in mine])} |" for k in sides))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
