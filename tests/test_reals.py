"""loop.reals: one real batch per update (shared) or one per optimizer step (fresh, as the official GWF train.py,
which draws a new data batch for every critic and generator step): fresh batches are disjoint draws that together
are the bank, and a run trains with them."""

import pytest
import torch

from gwf.build import build_module
from gwf.train import train
from tests.conftest import compose_config

FRESH = ["experiment=gwf_2d", "loop.reals=fresh", "data.batch_size=512", "batch.bank_capacity=512"]


def bank_with_distinct_points(cfg):
    module = build_module(cfg, (2,), 0)
    x = torch.arange(1024.0).view(512, 2)  # 512 distinct points: one batch of the stream
    module.push_to_bank(x, torch.zeros(512, dtype=torch.long), 1)
    return module, x


def test_fresh_reals_partition_the_bank():
    module, x = bank_with_distinct_points(compose_config(FRESH))
    critic, generator = module._real_batches(None, 2, torch.Generator().manual_seed(0))  # 1 critic + 1 generator step
    assert critic.pos.shape == generator.pos.shape == (1, 256, 2)
    both = torch.cat([critic.pos[0], generator.pos[0]])
    assert torch.equal(both[both[:, 0].argsort()], x)  # disjoint, and together every sample of the batch


def test_shared_reals_are_one_batch():
    module, x = bank_with_distinct_points(compose_config(["experiment=gwf_2d", "loop.reals=shared"]))
    reals = module._real_batches(None, 2, torch.Generator().manual_seed(0))
    assert reals[0] is reals[1] and reals[0].pos.shape == (1, 256, 2)


def test_fresh_reals_need_room_in_the_bank():
    with pytest.raises(ValueError, match="bank_capacity.*at least 1024"):
        build_module(compose_config(FRESH + ["loop.critic_steps=3"]), (2,), 0)
    with pytest.raises(ValueError, match="loop.reals must be one of"):
        build_module(compose_config(["experiment=gwf_2d", "loop.reals=new"]), (2,), 0)


def test_a_run_trains_with_fresh_reals(tmp_path):
    cfg = compose_config(FRESH + ["jko.steps=2", "jko.updates_per_step=100", "eval.every_n_updates=200",
                                  "eval.num_samples=1000", "trainer.enable_progress_bar=false", "logger=none"])
    summary = train(cfg, tmp_path / "fresh")
    assert summary["last"]["update"] == 200
    assert summary["last"]["sinkhorn_div"] < summary["first"]["sinkhorn_div"] / 4


def test_fresh_reals_wait_for_every_steps_draw():
    """The first update waits until a ring holds the update's disjoint draws (steps x pos_per_label), not one."""
    assert build_module(compose_config(FRESH), (2,), 0).min_reals == 512
    assert build_module(compose_config(["experiment=gwf_2d", "loop.reals=shared"]), (2,), 0).min_reals == 256


def test_sampling_in_chunks_is_sampling_at_once():
    """GWFModule.sample runs the generator on chunks of the same noise (49,920 CIFAR samples do not fit one
    forward): the same samples, to fp32 rounding of the batch size."""
    module = build_module(compose_config(["experiment=gwf_2d"]), (2,), 0)
    whole, z = module.sample(10, seed=3, return_inputs=True)
    parts, z_parts = module.sample(10, seed=3, return_inputs=True, chunk=3)
    assert torch.equal(z, z_parts)
    torch.testing.assert_close(parts, whole, rtol=1e-6, atol=1e-6)
