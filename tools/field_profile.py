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
    centers, weights = target.centers, target.weights
    light = weights < weights.max()
    mean = (weights[:, None] * centers).sum(0)
    u = centers - mean
    u = u / u.norm(dim=1, keepdim=True)  # outward unit direction of each mode

    def radial(x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(on a light mode, offset from its centre, radial V), each [batches, n_gen], by nearest mode."""
        nearest = torch.cdist(x.reshape(-1, 2), centers).argmin(1).reshape(x.shape[:2])
        c, un = centers[nearest], u[nearest]
        return light[nearest], ((x - c) * un).sum(-1), (v * un).sum(-1)

    on_light, offset, radial_v = radial(x, v)
    ref_light, _, ref_v = radial(x_ref, v_ref)
    ref = ref_v[ref_light]
    share_gen = float(on_light.float().mean())
    share_target = float(weights[light].sum())
    lines = [f"W-Flow field at the generated samples of the light modes ({int(light.sum())} of {len(weights)}; "
             f"`{ckpt.parent.parent.name}`), {batches} draws of {n_gen} generated + {n_gen} second batch + {n_pos} "
             f"target samples. Generated mass nearest a light mode: {share_gen:.3f} (target: {share_target:.3f}).",
             "", "| radial offset from the centre | samples per batch | mean radial V (> 0: outwards) |",
             "|---|---:|---:|"]
    for lo, hi in zip(EDGES[:-1], EDGES[1:]):
        m = on_light & (offset >= lo) & (offset < hi)
        k = int(m.sum())
        if k >= 2:
            se = float(radial_v[m].std() / k**0.5)
            lines.append(f"| [{lo:+.1f}, {hi:+.1f}) | {k / batches:.2f} | {float(radial_v[m].mean()):+.2f} ± {se:.2f} |")
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
