"""Is it the field or the generator? The W-Flow field of a trained 2D run, averaged over many batch draws, at the
generated samples that belong to the target's light modes (a Gaussian mixture with unequal weights, such as
``data.target=imbalanced``), as a function of each sample's radial offset from its mode's centre.

    python tools/field_profile.py runs/<name>/<run>/checkpoints/last.ckpt [--batches 200] \\
        [--into docs/recipes.md --name imbalanced_field]

For each of ``--batches`` independent draws (the run's generator on fresh noise, its second batch, and a fresh target
batch of the run's sizes), the field V is computed exactly as in training (the run's eps_rel, estimator, cost and RMS
normalization). A generated sample belongs to a light mode when that mode's centre is its nearest one; its offset is
its position along the line from the mixture's mean to the centre (> 0: beyond the centre). The table gives, per
offset bin, the samples per batch and the mean radial V (> 0: pushed outwards) with its standard error. If V points
back to the centre from both sides, the estimator is right there and what remains is the generator's optimization.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

BEGIN = "<!-- field-profile:{name}:begin (tools/field_profile.py) -->"
END = "<!-- field-profile:{name}:end -->"
EDGES = (-9.0, -2.0, -1.0, -0.5, -0.2, 0.0, 0.2, 0.5, 1.0, 2.0, 9.0)


def radial(x, v, mixture):
    """For samples x [B, N, 2] and their field v [B, N, 2]: (nearest mode is a light one, offset along the line from
    the mixture's mean through that mode's centre (> 0: beyond it), the field's component along that line), each
    [B, N]. Light modes: those lighter than the heaviest."""
    import torch

    centers, weights = mixture.centers, mixture.weights
    u = centers - (weights[:, None] * centers).sum(0)
    u = u / u.norm(dim=1, keepdim=True)  # outward unit direction of each mode
    nearest = torch.cdist(x.reshape(-1, 2), centers).argmin(1).reshape(x.shape[:2])
    c, un = centers[nearest], u[nearest]
    return (weights < weights.max())[nearest], ((x - c) * un).sum(-1), (v * un).sum(-1)


def binned(select, offset, value, edges=EDGES) -> list[tuple[float, float, float, float, float]]:
    """(lo, hi, selected samples per batch, mean value, its standard error) of each offset bin [lo, hi) holding at
    least 2 selected samples; ``select``, ``offset``, ``value`` [B, N]."""
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = select & (offset >= lo) & (offset < hi)
        k = int(m.sum())
        if k >= 2:
            rows.append((lo, hi, k / len(select), float(value[m].mean()), float(value[m].std() / k**0.5)))
    return rows


def profile(ckpt: Path, batches: int, seed: int = 1) -> str:
    import torch

    import gwf  # noqa: F401  (torchvision workaround before anything else)
    from gwf.data.toy2d import GaussianMixture, make_sampler
    from gwf.ot.velocity import sinkhorn_velocities
    from gwf.sample import load_module

    torch.set_num_threads(1)
    module, cfg = load_module(ckpt)
    target = make_sampler(cfg.data.target)
    if not isinstance(target, GaussianMixture) or bool((target.weights == target.weights[0]).all()):
        raise ValueError(f"data.target={cfg.data.target} is not a Gaussian mixture with unequal weights (light modes)")
    method = cfg.method
    if method.name != "wflow" or isinstance(method.eps_rel, (list, tuple)) or method.get("features"):
        raise ValueError("field_profile reads W-Flow runs in data space with one eps_rel")
    n_gen, n_pos = int(cfg.batch.gen_per_label), int(cfg.batch.pos_per_label)
    g = torch.Generator().manual_seed(seed)
    model = module.generator.eval()
    with torch.no_grad():
        def draw() -> torch.Tensor:
            return model(module.model_inputs(model, batches * n_gen, g), None, None).reshape(batches, n_gen, 2)

        def field(x: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
            pos = torch.stack([target(n_pos, g) for _ in range(batches)])
            (v,), _ = sinkhorn_velocities([x], [pos], [neg], eps_rel=float(method.eps_rel), n_iters=method.n_iters,
                                          estimator=method.estimator, rms_normalize=bool(method.rms_normalize),
                                          cost=method.get("cost", "sq"))
            return v

        x = draw()
        v = field(x, draw())
        # the estimator's own bias: the same field with the target as the model (q = p), where it should vanish
        x_ref = torch.stack([target(n_gen, g) for _ in range(batches)])
        v_ref = field(x_ref, torch.stack([target(n_gen, g) for _ in range(batches)]))
    weights = target.weights
    light = weights < weights.max()
    on_light, offset, radial_v = radial(x, v, target)
    ref_light, _, ref_v = radial(x_ref, v_ref, target)
    ref = ref_v[ref_light]
    lines = [f"W-Flow field at the generated samples of the light modes ({int(light.sum())} of {len(weights)}; "
             f"`{ckpt.parent.parent.name}`), {batches} draws of {n_gen} generated + {n_gen} second batch + {n_pos} "
             f"target samples. Generated mass nearest a light mode: {float(on_light.float().mean()):.3f} (target: "
             f"{float(weights[light].sum()):.3f}).",
             "", "| radial offset from the centre | samples per batch | mean radial V (> 0: outwards) |",
             "|---|---:|---:|"]
    lines += [f"| [{lo:+.1f}, {hi:+.1f}) | {k:.2f} | {m:+.2f} ± {se:.2f} |"
              for lo, hi, k, m, se in binned(on_light, offset, radial_v)]
    lines += ["", f"With the target as the model (q = p), the same field's mean radial V at the light modes' samples is "
              f"{float(ref.mean()):+.3f} ± {float(ref.std() / len(ref) ** 0.5):.3f}.",
              "", f"(made by `python tools/field_profile.py {ckpt} --batches {batches}`)"]
    return "\n".join(lines)


def write_into(doc: Path, name: str, table: str) -> None:
    text = doc.read_text()
    begin, end = BEGIN.format(name=name), END.format(name=name)
    if begin not in text or end not in text:
        raise SystemExit(f"{doc} has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    doc.write_text(head + begin + "\n" + table + "\n" + end + rest.split(end, 1)[1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", type=Path)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--into", type=Path, help="a document with the field-profile:<name> markers")
    p.add_argument("--name", default="imbalanced_field")
    a = p.parse_args(argv)
    table = profile(a.ckpt, a.batches)
    print(table)
    if a.into:
        write_into(a.into, a.name, table)


if __name__ == "__main__":
    sys.exit(main())
