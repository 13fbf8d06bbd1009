"""Each objective, trained briefly through the shared GWFModule on the GWF 2D recipe (8 Gaussians, JKO with
tau = 1 from mu0), lowers the Sinkhorn divergence to the target by a stated factor. Seeded, so deterministic.
Every objective but those in BUDGET must drop it 4x in 2 x 100 updates; W1 (interpolated penalty, one critic update per
generator update, the official 3 x 128 MLP critic) starts slowly and must drop it 2x in 2 x 400 (measured: 3.1x)."""

import pytest

from gwf.objectives import OBJECTIVES
from gwf.train import train
from tests.conftest import compose_config

# method -> (updates per JKO step, factor); default below. chi2_tight's bound moves its critic slowly (measured:
# 2.1x in 2 x 100, 5.4x in 2 x 400); ckmmd pairs each sample with its noise only (3.96x in 2 x 100).
BUDGET = {"w1": (400, 2.0), "chi2_tight": (400, 4.0), "ckmmd": (100, 3.0)}


@pytest.mark.parametrize("method", sorted(OBJECTIVES))
def test_objective_improves_2d_target(method, tmp_path):
    inner, factor = BUDGET.get(method, (100, 4.0))
    cfg = compose_config(["experiment=gwf_2d", f"method={method}", "jko.steps=2", f"jko.updates_first_step={inner}",
                          f"jko.updates_per_step={inner}", f"eval.every_n_updates={2 * inner}", "eval.num_samples=1000",
                          "trainer.enable_progress_bar=false", "logger=none"])
    summary = train(cfg, tmp_path / method)
    first, last = summary["first"]["sinkhorn_div"], summary["last"]["sinkhorn_div"]
    assert summary["last"]["update"] == 2 * inner
    assert last < first / factor, (method, first, last)
