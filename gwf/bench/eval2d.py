"""Benchmark of the 2D evaluator: the Sinkhorn divergence by gwf's loop against geomloss's SamplesLoss (the
algorithm it follows) on the same clouds, side by side in one process, and a whole ``Toy2DEvaluator.evaluate``.

    gwf-bench-eval2d [--sizes 500 1000 2000] [--repeats 3] [--threads 1] [--json rows.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gwf-bench-eval2d", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000], help="points per cloud")
    p.add_argument("--target", default="8gaussians")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads (the evaluator runs inside training)")
    p.add_argument("--json", help="also write the rows as JSON to this file")
    args = p.parse_args(argv)

    import torch
    from geomloss import SamplesLoss

    from gwf.eval.toy2d import Toy2DEvaluator, sinkhorn_divergence
    from gwf.seeding import make_generator

    torch.set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        ev = Toy2DEvaluator(args.target, num_samples=n)
        x = ev.sampler(n, make_generator("cpu", "bench-eval2d", n)) * 1.1  # a generator slightly off the target
        loss = SamplesLoss("sinkhorn", p=2, blur=ev.blur, scaling=0.9, debias=True, backend="tensorized")
        t_ref, ref = _timed(lambda: float(loss(x, ev.reference)), args.repeats)
        t_own, own = _timed(lambda: sinkhorn_divergence(x, ev.reference, ev.blur), args.repeats)
        t_eval, _ = _timed(lambda: ev.evaluate(x), args.repeats)
        rows.append(dict(points=n, geomloss_s=t_ref, gwf_s=t_own, speedup=t_ref / t_own, geomloss=ref, gwf=own,
                         abs_diff=abs(ref - own), evaluate_s=t_eval))
    print(f"Sinkhorn divergence (blur {ev.blur}, scaling 0.9) of {args.target} x 1.1 against its reference; "
          f"{args.threads} thread(s), median of {args.repeats}")
    print("| points | geomloss s | gwf s | speed-up | geomloss value | gwf value | abs. diff | evaluate() s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['points']} | {r['geomloss_s']:.3f} | {r['gwf_s']:.3f} | {r['speedup']:.1f}x | {r['geomloss']:.7g} "
              f"| {r['gwf']:.7g} | {r['abs_diff']:.1e} | {r['evaluate_s']:.3f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
