"""tools/field_profile.py: the W-Flow field of a trained 2D run at the samples of a mixture's light modes."""

import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
import field_profile  # noqa: E402

TINY = ["jko.steps=1", "jko.updates_per_step=5", "eval.every_n_updates=5", "eval.num_samples=100",
        "eval.evaluator.num_samples=100", "logger=none", "threads=1"]


def _run(tmp_path, *overrides) -> Path:
    from gwf.train import train
    from tests.conftest import compose_config

    cfg = compose_config(["experiment=gwf_2d", *overrides, *TINY], runs_dir=tmp_path / "runs")
    run = tmp_path / "_".join(o.split("=")[1] for o in overrides)
    train(cfg, run)
    return run / "checkpoints" / "last.ckpt"


def test_profile_of_a_wflow_run_on_the_imbalanced_mixture(tmp_path):
    ckpt = _run(tmp_path, "method=wflow", "data.target=imbalanced")
    table = field_profile.profile(ckpt, batches=8)
    # the target's light mass is the mixture's: two modes of weight 0.02
    assert "(2 of 8;" in table and "(target: 0.040)" in table
    share = float(re.search(r"nearest a light mode: ([0-9.]+)", table).group(1))
    rows = re.findall(r"^\| \[([-+0-9.]+), ([-+0-9.]+)\) \| ([0-9.]+) \| ([-+0-9.]+) ± ([0-9.]+) \|$", table, re.M)
    # every binned sample is a light-mode sample: the bins never hold more than the light share of 256 a batch
    assert sum(float(r[2]) for r in rows) <= share * 256 + 0.01 * len(rows)
    assert all(float(lo) < float(hi) for lo, hi, *_ in rows)
    # with the target as the model the field has no radial bias at the light modes (a few standard errors)
    mean, se = map(float, re.search(r"q = p\), .* is ([-+0-9.]+) ± ([0-9.]+)\.", table).groups())
    assert abs(mean) <= 4 * se + 1e-3 and se > 0

    doc = tmp_path / "doc.md"
    begin, end = field_profile.BEGIN.format(name="t"), field_profile.END.format(name="t")
    doc.write_text(f"before\n{begin}\nold\n{end}\nafter\n")
    field_profile.write_into(doc, "t", table)
    assert doc.read_text() == f"before\n{begin}\n{table}\n{end}\nafter\n"
    with pytest.raises(SystemExit, match="no .* block"):
        field_profile.write_into(doc, "other", table)


def test_radial_offsets_and_bins_have_their_known_values():
    """Samples placed on the line from the mixture's mean through a far mode's centre, at known offsets, with a
    field of known radial component: the offsets, the light-mode flags and every bin's count and mean come back."""
    import torch

    from gwf.data.toy2d import imbalanced

    mix = imbalanced()
    far = mix.centers[7]  # (4, 4), weight 0.02
    u = (far - (mix.weights[:, None] * mix.centers).sum(0))
    u = u / u.norm()
    offsets = torch.tensor([-0.3, -0.1, 0.1, 0.15, 0.3, 0.35, 0.4, 0.6])
    x = (far + offsets[:, None] * u)[None]  # [1, 8, 2]
    normal = torch.stack([-u[1], u[0]])
    v = (torch.arange(8.0)[:, None] * u + 5.0 * normal)[None]  # radial component 0..7, plus a normal one
    light, offset, radial_v = field_profile.radial(x, v, mix)
    assert bool(light.all()) and torch.allclose(offset[0], offsets, atol=1e-5)
    assert torch.allclose(radial_v[0], torch.arange(8.0), atol=1e-5)
    x_near = mix.centers[:1][None] + 0.01  # a heavy mode's sample is not a light one
    assert not bool(field_profile.radial(x_near, torch.zeros_like(x_near), mix)[0].any())
    rows = field_profile.binned(light, offset, radial_v)
    # bins [-0.5, -0.2): 1 sample (dropped, < 2); [-0.2, 0): 1 (dropped); [0, 0.2): 2; [0.2, 0.5): 3; [0.5, 1): 1
    assert [(lo, hi, k) for lo, hi, k, _, _ in rows] == [(0.0, 0.2, 2.0), (0.2, 0.5, 3.0)]
    assert rows[0][3] == pytest.approx(2.5) and rows[1][3] == pytest.approx(5.0)
    assert rows[1][4] == pytest.approx(1.0 / 3**0.5)  # std of (4, 5, 6) is 1


def test_runs_without_light_modes_or_without_wflow_are_refused(tmp_path):
    with pytest.raises(ValueError, match="unequal weights"):
        field_profile.profile(_run(tmp_path, "method=wflow", "data.target=8gaussians_gwf"), batches=2)
    with pytest.raises(ValueError, match="W-Flow runs"):
        field_profile.profile(_run(tmp_path, "method=kl_dv", "data.target=imbalanced"), batches=2)
