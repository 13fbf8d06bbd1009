"""Class memory bank and per-step conditioning (labels, guidance alpha)."""

import math

import pytest
import torch

from gwf.conditioning import ConditioningSampler, sample_alpha
from gwf.data.bank import ClassBank


def _batch(labels):
    labels = torch.tensor(labels)
    # each sample encodes its class in its value, and its order of arrival in the second coordinate
    x = torch.stack([labels.float(), torch.arange(len(labels)).float()], 1)
    return x, labels


def test_bank_positives_are_of_their_class_and_distinct():
    bank = ClassBank(num_classes=3, capacity=8, shape=(2,))
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        bank.push(*_batch(torch.randint(0, 3, (12,), generator=g).tolist()))
    assert bank.ready(4)
    pos = bank.sample(torch.tensor([2, 0]), 4, g)
    assert pos.shape == (2, 4, 2)
    assert (pos[0, :, 0] == 2).all() and (pos[1, :, 0] == 0).all()
    # without replacement when the class holds enough samples: the slot values differ
    for row in pos:
        assert len(set(map(tuple, row.tolist()))) == 4


def test_bank_ring_buffer_keeps_latest():
    bank = ClassBank(num_classes=1, capacity=4, shape=(2,), uncond_capacity=3)
    bank.push(*_batch([0] * 6))  # arrivals 0..5 of class 0; the buffer keeps the last 4
    kept = sorted(bank.data[0, :, 1].tolist())
    assert kept == [2.0, 3.0, 4.0, 5.0]
    assert sorted(bank.uncond[:, 1].tolist()) == [3.0, 4.0, 5.0]
    bank.push(*_batch([0, 0]))  # arrivals 0, 1 of a new batch overwrite the two oldest slots (2, 3)
    assert sorted(bank.data[0, :, 1].tolist()) == [0.0, 1.0, 4.0, 5.0]


def test_bank_with_few_samples_draws_with_replacement():
    bank = ClassBank(num_classes=2, capacity=16, shape=(2,))
    bank.push(*_batch([0, 1, 1]))
    assert not bank.ready(2)
    pos = bank.sample(torch.tensor([0]), 5, torch.Generator().manual_seed(0))
    assert (pos[0, :, 0] == 0).all() and pos.shape == (1, 5, 2)
    with pytest.raises(ValueError, match="shape"):
        bank.push(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long))


def test_alpha_distribution_matches_power_law():
    # density proportional to alpha^-k on [1, a_max]: CDF(a) = (1 - a^(1-k)) / (1 - a_max^(1-k))
    k, a_max, n = 3.0, 4.0, 200_000
    alpha = sample_alpha(n, a_max, k, 0.0, torch.Generator().manual_seed(0))
    assert float(alpha.min()) >= 1.0 and float(alpha.max()) <= a_max
    for a in (1.2, 1.5, 2.0, 3.0):
        cdf = (1 - a ** (1 - k)) / (1 - a_max ** (1 - k))
        assert abs(float((alpha <= a).float().mean()) - cdf) < 0.005
    forced = sample_alpha(n, a_max, k, 0.3, torch.Generator().manual_seed(1))
    # P(alpha == 1) = 0.3 exactly (continuous part has no atom)
    assert abs(float((forced == 1.0).float().mean()) - 0.3) < 0.005
    mean_expected = (k - 1) / (k - 2) * (1 - a_max ** (2 - k)) / (1 - a_max ** (1 - k))
    assert math.isclose(float(alpha.mean()), mean_expected, rel_tol=5e-3)


def test_conditioning_sampler():
    cond = ConditioningSampler(num_classes=10, labels_per_update=4, alpha_max=4.0)
    labels, alpha = cond.sample(torch.Generator().manual_seed(0))
    assert len(set(labels.tolist())) == 4 and alpha.shape == (4,)
    assert ConditioningSampler(num_classes=0).sample(torch.Generator()) == (None, None)
    with pytest.raises(ValueError, match="labels_per_update"):
        ConditioningSampler(num_classes=3, labels_per_update=5)


@pytest.mark.parametrize("saved_as,loaded_as,legacy", [("replay", "replay", False), ("data", "replay", False),
                                                       ("replay", "data", False), ("data", "replay", True)])
def test_bank_persistences_load_under_either_setting(saved_as, loaded_as, legacy):
    """A bank saved with or without its samples (checkpoint.bank) and loaded under either setting, or a checkpoint
    from before slot positions existed (legacy): replaying the stream where samples are missing rebuilds it exactly,
    twice in a row (the second checkpoint taken after two more pushes), and a legacy bank keeps saving its samples
    while slots without a position remain."""
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 2, generator=g), torch.randint(3, (6,), generator=g)) for _ in range(22)]

    def resume(state, upto):
        bank = ClassBank(3, 4, (2,), uncond_capacity=3, persist=loaded_as)
        bank.load_state_dict(state)
        start = bank.replay_from()
        if start is not None:
            bank.start_replay()
            for i in range(start, upto):
                bank.push(*batches[i], i + 1)
            bank.finish_replay()
        return bank

    straight = ClassBank(3, 4, (2,), uncond_capacity=3, persist=saved_as)
    for i in range(20):
        straight.push(*batches[i], i + 1)
    state = {k: v for k, v in straight.state_dict().items() if not (legacy and "pushed_at" in k)}
    assert ("data" in state) == (saved_as == "data")
    resumed = resume(state, 20)
    assert torch.equal(resumed.data, straight.data) and torch.equal(resumed.uncond, straight.uncond)
    for i in (20, 21):
        straight.push(*batches[i], i + 1)
        resumed.push(*batches[i], i + 1)
    state = resumed.state_dict()
    assert ("data" in state) == (loaded_as == "data" or legacy)
    again = resume(state, 22)
    assert torch.equal(again.data, straight.data) and torch.equal(again.count, straight.count)


def test_bank_replay_of_another_stream_is_an_error():
    g = torch.Generator().manual_seed(1)
    bank = ClassBank(2, 4, (2,), persist="replay")
    for i in range(6):
        bank.push(torch.randn(4, 2, generator=g), torch.randint(2, (4,), generator=g), i + 1)
    other = ClassBank(2, 4, (2,), persist="replay")
    other.load_state_dict(bank.state_dict())
    start = other.replay_from()
    other.start_replay()
    for i in range(start, 6):  # the same positions, other labels
        other.push(torch.randn(4, 2, generator=g), torch.tensor([0, 0, 0, 0]) if i % 2 else torch.tensor([1, 1, 1, 1]),
                   i + 1)
    with pytest.raises(RuntimeError, match="did not rebuild the class bank as saved.*ckpt_path=null"):
        other.finish_replay()


def test_per_label_unconditional_draws_from_a_large_ring():
    """batch.uncond_bank=1000, uncond_per_label: the unconditional ring outgrows the class rings (capacity 8 here) and
    every label draws its own reals from all of it, without replacement within a label (the official
    negative_bank_size 1000, one draw of neg_per_sample per label)."""
    bank = ClassBank(num_classes=3, capacity=8, shape=(1,), uncond_capacity=1000)
    for start in range(0, 1200, 100):  # 1,200 pushed: the ring keeps the last 1,000
        bank.push(torch.arange(start, start + 100, dtype=torch.float32)[:, None], torch.zeros(100, dtype=torch.long))
    g = torch.Generator().manual_seed(0)
    draws = bank.sample_uncond(32, g, rows=5)
    assert draws.shape == (5, 32, 1)
    values = draws[..., 0]
    assert all(len(set(row.tolist())) == 32 for row in values)  # without replacement within a label
    assert not torch.equal(values[0], values[1])  # independent draws per label
    seen = torch.cat([bank.sample_uncond(32, g, rows=5).flatten() for _ in range(40)])
    assert seen.min() >= 200 and seen.max() < 1200  # only the ring's last 1,000 values ...
    assert len(set(seen.tolist())) > 900  # ... and all of them, not only the class rings' 8 slots
    assert bank.sample_uncond(32, g).shape == (32, 1)  # shared: one draw


def test_wflow_with_per_label_unconditional_reals_solves_each_problem_with_its_own():
    """RealBatch.uncond [L, U, *shape]: each label's guidance term uses its own unconditional reals, the same
    velocity as sinkhorn_velocity with per-problem uncond."""
    from gwf.objectives.base import GenBatch, RealBatch
    from gwf.objectives.wflow import WFlow
    from gwf.ot import sinkhorn_velocity

    g = torch.Generator().manual_seed(4)
    x, pos, neg, unc = (torch.randn(3, 16, 2, generator=g) for _ in range(4))
    alpha = torch.tensor([1.5, 2.0, 3.0])
    gen = GenBatch(x, torch.arange(3), alpha, sample=lambda: neg)
    objective = WFlow()
    grouped, shared = objective.references(gen, RealBatch(pos, unc, torch.arange(3)))
    assert "uncond" in grouped and not shared
    v = objective._fields([x], {k: [t] for k, t in grouped.items()}, gen)[0][0]
    expected, _ = sinkhorn_velocity(x, pos, neg, uncond=unc, guidance_w=alpha - 1)
    torch.testing.assert_close(v, expected)
