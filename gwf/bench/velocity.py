"""Benchmark of the W-Flow velocity field: wall time of each engine beside the unavoidable work ("floor").

    gwf-bench-velocity                # full table
    gwf-bench-velocity --quick        # smoke test
    gwf-bench-velocity --sizes 1024 --dims 4096 --engines own own+compile --skip-memory --json rows.json
    gwf-bench-velocity --baseline 56636fa     # also the own engine of an earlier commit, timed in the same run

One problem (B = 1), N = M = N2 points in R^D, two-batch estimator (two OT problems: x -> pos and x -> neg); the
floor is ``floor_from``'s; the memory row is the own engine's peak RSS in a subprocess. ``own`` is the own engine as
it runs on the device (on the CPU its row-frame loop), ``own-logdomain`` the same engine in the log-domain form (an
accelerator's form; the CPU's before the row-frame loop), ``own+compile`` the log-domain loop through torch.compile
(``method.compile``), timed after one untimed compiling call.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import gwf  # noqa: F401  (torchvision workaround before anything else)

import numpy as np
import torch

import gwf.ot as ot
from gwf.ot import relative_eps, sinkhorn_velocity
from gwf.constants import DEFAULT_GEOMLOSS_SCALING
from gwf.ot.sinkhorn import chunk_entries, log_domain_loop, row_frame_loop

_QUICK = dict(sizes=[256, 1024], dims=[2, 64], memory=(2048, 64))
# Engine rows: the own engine as it runs on the device, in the log-domain form (the CPU's form before the row-frame
# loop; an accelerator's always), with its loop through torch.compile (value: compile flag, log-domain form), and
# geomloss.
OWN_ENGINES = {"own": (False, False), "own-logdomain": (False, True), "own+compile": (True, False)}
ENGINE_ROWS = [*OWN_ENGINES, "geomloss"]


DEVICE = torch.device("cpu")  # set by --device


def _sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def _seconds(fn) -> float:
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()  # CUDA kernels are asynchronous: time until they finish
    return time.perf_counter() - t0


def _timed(fns: dict, repeats: int, budget_s: float) -> tuple[dict, int]:
    """({name: median seconds}, runs) of callables timed in turn, interleaved so that a change of machine load
    (shared boxes) hits all of them alike. One warm-up round; a round slower than budget_s / 2 is the measurement.
    """
    first = {k: _seconds(f) for k, f in fns.items()}
    if sum(first.values()) * 2 > budget_s:
        return first, 1
    times = {k: [] for k in fns}
    while not times or len(next(iter(times.values()))) < repeats:
        for k, f in fns.items():
            times[k].append(_seconds(f))
        if sum(map(sum, times.values())) + sum(first.values()) > budget_s:
            break
    return {k: float(np.median(v)) for k, v in times.items()}, len(next(iter(times.values())))


def _inputs(n: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, n, d, generator=g)
    pos = 1.2 * torch.randn(1, n, d, generator=g) + 0.3
    neg = torch.randn(1, n, d, generator=g)
    return x.to(DEVICE), pos.to(DEVICE), neg.to(DEVICE)


def floor_parts(x, y, tag: str) -> dict:
    """Callables of the unavoidable work of the own engine for the term x -> y (``floor_from``)."""
    n, m = x.shape[1], y.shape[1]
    buf = torch.empty(1, n, m, device=DEVICE).uniform_(-1.0, 0.0)
    pot = torch.randn(1, m, device=DEVICE)
    rows = max(1, chunk_entries(DEVICE) // m)  # the own engine's chunks on this device
    work = torch.empty(1, min(rows, n), m, device=DEVICE)

    def lse_whole():
        torch.logsumexp(buf + pot[:, None, :], dim=-1)

    def lse_chunked():
        for r0 in range(0, n, rows):
            torch.logsumexp(buf[:, r0 : r0 + rows] + pot[:, None, :], dim=-1)

    def lse_chunked_in_place():  # no allocation per chunk, as the own engine does
        for r0 in range(0, n, rows):
            blk = buf[:, r0 : r0 + rows]
            t = torch.add(blk, pot[:, None, :], out=work[:, : blk.shape[1]])
            mx = t.amax(dim=-1, keepdim=True)
            t.sub_(mx).exp_().sum(dim=-1).log_().add_(mx[..., 0])

    weights = torch.rand(1, 1, n, device=DEVICE)
    return {
        f"cost/{tag}": lambda: torch.bmm(x, y.transpose(1, 2)),
        f"proj/{tag}": lambda: torch.bmm(buf, y),
        f"lse_whole/{tag}": lse_whole,
        f"lse_chunked/{tag}": lse_chunked,
        f"lse_in_place/{tag}": lse_chunked_in_place,
        f"gemv/{tag}": lambda: torch.bmm(weights, buf),  # the row-frame column update: sum_i w_i E_ij
    }


def floor_from(t: dict, tags, n_iters: int, row_frame: bool = False) -> float:
    """Floor = sum over the terms of cost GEMM (x @ y^T) + projection GEMM (P @ y) + per iteration: the log-domain
    form's 2 log-sum-exp passes over the [N, M] matrix (the fastest: whole, chunked, or chunked in place as the own
    engine does), the row-frame form's 1 and a matrix-vector product."""
    lse = {g: min(t[f"lse_{v}/{g}"] for v in ("whole", "chunked", "in_place")) for g in tags}
    per_iter = {g: lse[g] + t[f"gemv/{g}"] if row_frame else 2 * lse[g] for g in tags}
    return sum(t[f"cost/{g}"] + t[f"proj/{g}"] + n_iters * per_iter[g] for g in tags)


def _geomloss_iters(x, y, eps: float, scaling: float) -> int:
    """Length of geomloss's eps-scaling schedule for this problem (its number of Sinkhorn updates)."""
    both = torch.cat([x[0], y[0]])
    blur = math.sqrt(eps)
    diameter = max(float((both.amax(0) - both.amin(0)).norm()), blur)
    return 2 + len(np.arange(2 * math.log(diameter), 2 * math.log(blur), 2 * math.log(scaling)))


def _own(x, pos, neg, n_iters: int, compile: bool, log_domain: bool):
    with log_domain_loop() if log_domain else contextlib.nullcontext():
        return sinkhorn_velocity(x, pos, neg, n_iters=n_iters, compile=compile)


def baseline_engine(rev: str) -> str:
    """Registers the own engine of git revision ``rev`` (its gwf/ot/sinkhorn.py, run with today's velocity code) in
    gwf.ot.ENGINES as ``own@rev``, for a before/after row timed in the same run; returns that name."""
    root = Path(__file__).resolve().parents[2]
    try:
        source = subprocess.run(["git", "show", f"{rev}:gwf/ot/sinkhorn.py"], cwd=root, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"--baseline {rev}: cannot read gwf/ot/sinkhorn.py at that revision from the git checkout "
                         f"at {root} ({getattr(e, 'stderr', '') or e}); pass a commit of this repository") from None
    path = Path(tempfile.mkdtemp(prefix="gwf-baseline-")) / f"sinkhorn_{rev.replace('/', '_')}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    name = f"own@{rev}"
    ot.ENGINES[name] = module.barycentric_projection
    return name


def bench_size(engines, n: int, d: int, n_iters: int, repeats: int, budget_s: float) -> list[dict]:
    """Rows for one (N, D): the own engine (and a baseline revision's) is timed interleaved with the floor's parts;
    geomloss on its own."""
    x, pos, neg = _inputs(n, d)
    fns = {**floor_parts(x, pos, "pos"), **floor_parts(x, neg, "neg")}
    for engine in engines:
        if engine in OWN_ENGINES:  # the own engine's variants, interleaved with the floor
            fns[engine] = partial(_own, x, pos, neg, n_iters, *OWN_ENGINES[engine])
            if OWN_ENGINES[engine][0]:
                fns[engine]()  # compiles (once per process: dynamic shapes), outside the timings
        elif engine.startswith("own@"):
            fns[engine] = partial(sinkhorn_velocity, x, pos, neg, n_iters=n_iters, engine=engine)
    t, runs = _timed(fns, repeats, budget_s)
    rows = []
    for engine in engines:
        if engine.startswith("own@"):
            rows.append(dict(engine=engine, n=n, d=d, iters=n_iters, seconds=t[engine],
                             floor=floor_from(t, ("pos", "neg"), n_iters), runs=runs))
        elif engine in OWN_ENGINES:
            row_frame = row_frame_loop(DEVICE) and engine == "own"
            rows.append(dict(engine=engine, n=n, d=d, iters=n_iters, seconds=t[engine],
                             floor=floor_from(t, ("pos", "neg"), n_iters, row_frame), runs=runs))
        else:
            g, g_runs = _timed({"geomloss": lambda: sinkhorn_velocity(x, pos, neg, engine="geomloss")}, repeats,
                               budget_s)
            iters = _geomloss_iters(x, pos, float(relative_eps(x, [x, neg, pos])[0]), DEFAULT_GEOMLOSS_SCALING)
            rows.append(dict(engine=engine, n=n, d=d, iters=iters, seconds=g["geomloss"],
                             floor=floor_from(t, ("pos", "neg"), n_iters), runs=g_runs))
    return rows


def _peak_rss_gib() -> float:
    """Peak resident set size of this process image: VmHWM (reset at exec, unlike ru_maxrss on Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def _memory_child(n: int, d: int, n_iters: int) -> None:
    """Runs in a subprocess: one velocity call at N = M = N2 = n, D = d; prints JSON with the peak RSS."""
    base = _peak_rss_gib()
    x, pos, neg = _inputs(n, d)
    t0 = time.perf_counter()
    v, _ = sinkhorn_velocity(x, pos, neg, engine="own", n_iters=n_iters)
    seconds = time.perf_counter() - t0
    print(json.dumps(dict(n=n, d=d, seconds=seconds, peak_gib=_peak_rss_gib(), base_gib=base,
                          inputs_gib=3 * x.numel() * 4 / 2**30, finite=bool(torch.isfinite(v).all()))))


def memory_row(n: int, d: int, n_iters: int) -> dict:
    cmd = [sys.executable, "-m", "gwf.bench.velocity", "--memory-child", str(n), str(d), "--n-iters", str(n_iters),
           "--threads", str(torch.get_num_threads())]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:,.1f}" if s < 10 else f"{s * 1e3:,.0f}"


def format_table(rows: list[dict], n_iters: int) -> str:
    lines = ["| engine | N = M | D | Sinkhorn iters | velocity (ms) | floor (ms) | time / floor | runs |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['engine']} | {r['n']} | {r['d']} | {r['iters']} | {_fmt_ms(r['seconds'])} | "
              f"{_fmt_ms(r['floor'])} | {r['seconds'] / r['floor']:.2f} | {r['runs']} |" for r in rows]
    row_frame = row_frame_loop(DEVICE)
    lines += ["", f"Two-batch velocity (two OT problems), B = 1. Floor = 2 x (cost GEMM + projection GEMM + "
              f"{2 * n_iters} log-sum-exp passes) for the own engine's {n_iters} iterations in the log-domain form"
              + (f" (own, in the CPU's row-frame form: {n_iters} log-sum-exp passes and {n_iters} matrix-vector "
                 "products)" if row_frame else "") + f", measured in the same run; geomloss (tensorized, scaling = "
              f"{DEFAULT_GEOMLOSS_SCALING}) runs its own eps-scaling schedule (iterations column) and is shown "
              "against the log-domain floor."]
    lines += [f"{e}: the own engine of git revision {e[4:]}, timed in the same run." for e in
              dict.fromkeys(r["engine"] for r in rows) if e.startswith("own@")]
    if any(r["engine"] == "own-logdomain" for r in rows):
        lines += ["own-logdomain: the own engine in the log-domain form (the form of accelerators)."]
    if any(r["engine"] == "own+compile" for r in rows):
        lines += ["own+compile: the own engine with its log-domain iterations through torch.compile "
                  "(`method.compile`), timed after one untimed compiling call."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gwf-bench-velocity", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small subset (smoke test)")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024, 4096], help="N = M = N2")
    p.add_argument("--dims", type=int, nargs="+", default=[2, 64, 4096], help="D")
    p.add_argument("--engines", nargs="+", default=ENGINE_ROWS, choices=ENGINE_ROWS,
                   help="own+compile: the own engine's loop through torch.compile (method.compile)")
    p.add_argument("--baseline", metavar="REV", help="also time the own engine of this git revision (row own@REV)")
    p.add_argument("--n-iters", type=int, default=10, help="own engine's Sinkhorn iterations")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=30.0, help="time budget per measurement")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--memory-size", type=int, nargs=2, default=[16384, 4096], metavar=("N", "D"))
    p.add_argument("--threads", type=int, help="torch threads (default: torch's default, all cores)")
    p.add_argument("--output", help="also write the Markdown to this file")
    p.add_argument("--json", help="also write the rows (and the memory row) as JSON to this file")
    p.add_argument("--device", default="cpu", help="cpu or cuda (the memory row measures host RSS: CPU only)")
    p.add_argument("--memory-child", type=int, nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(*args.memory_child, args.n_iters)
        return
    if args.baseline:
        args.engines = [*args.engines, baseline_engine(args.baseline)]
    if args.quick:
        args.sizes, args.dims, args.memory_size = _QUICK["sizes"], _QUICK["dims"], list(_QUICK["memory"])
    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda":
        args.skip_memory = True

    where = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else f"{torch.get_num_threads()} threads"
    load = os.getloadavg()[0]
    header = f"torch {torch.__version__}, {where}, {os.cpu_count()} CPUs, load average at start {load:.2f}"
    print(header, flush=True)
    rows = []
    for n in args.sizes:
        for d in args.dims:
            for row in bench_size(args.engines, n, d, args.n_iters, args.repeats, args.budget_s):
                rows.append(row)
                print(f"  {row['engine']:11s} N={n:5d} D={d:5d}: {_fmt_ms(row['seconds'])} ms, floor "
                      f"{_fmt_ms(row['floor'])} ms, ratio {row['seconds'] / row['floor']:.2f}", flush=True)
    text = format_table(rows, args.n_iters)
    mem = None
    if not args.skip_memory:
        n, d = args.memory_size
        mem = memory_row(n, d, args.n_iters)
        text += (f"\n\nMemory: own engine, two-batch velocity, N = M = N2 = {mem['n']}, D = {mem['d']}, {args.n_iters} "
                 f"iterations: peak RSS {mem['peak_gib']:.2f} GiB (subprocess; {mem['base_gib']:.2f} GiB after "
                 f"imports, {mem['inputs_gib']:.2f} GiB of inputs x, pos, neg), {mem['seconds']:.1f} s, finite "
                 f"output: {mem['finite']}.")
    text += f"\n\n({header}; load average at end {os.getloadavg()[0]:.2f}.)"
    print()
    print(text)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(header=header, n_iters=args.n_iters, rows=rows, memory=mem), fh, indent=1)


if __name__ == "__main__":
    main()
