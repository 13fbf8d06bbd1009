"""gwf-bench-checkpoint on a shrunk imagenet_b2: its JSON, the bytes of a side file against a hand count of the
bank, the two class-bank persistences, and the replay window against known cases."""

import json

import pytest

from gwf.bench import checkpoint

TINY = ["model=dit_tiny", "data.shape=[4,8,8]", "data.num_classes=10", "data.batch_size=8", "batch.bank_capacity=16",
        "batch.labels_per_update=2", "batch.uncond_per_update=4"]


def test_json_bytes_and_the_two_bank_persistences(capsys, tmp_path):
    checkpoint.main(["--recipe", "imagenet_b2", "--ranks", "64", "--json", "--dir", str(tmp_path), *TINY])
    r = json.loads(capsys.readouterr().out)
    assert {"total_gb", "per_rank_gb", "save_s", "designs"} <= r.keys() and r["bank"] == "replay"  # the recipe's
    data, replay = r["designs"]["data"], r["designs"]["replay"]
    for d in (data, replay):
        assert d["total_gb"] == pytest.approx(d["main_gb"] + 64 * d["per_rank_gb"]) and d["save_s"] > 0
    samples = (10 * 16 + 1000) * 4 * 8 * 8 * 2  # fp16 class rings and the unconditional ring (batch.uncond_bank)
    # the data side file holds the samples; the replay one holds none, and last.ckpt drops rank 0's copy too
    assert data["per_rank_gb"] * 1e9 - replay["per_rank_gb"] * 1e9 == pytest.approx(samples, rel=0.02)
    assert data["main_gb"] * 1e9 - replay["main_gb"] * 1e9 == pytest.approx(samples, rel=0.02)
    assert replay["per_rank_gb"] * 1e9 < 8 * (10 * 16 + 1000) + 4096  # counts and slot positions (int64) + framing
    assert r["total_gb"] == replay["total_gb"] and replay["replay_batches"] >= 16 * 10 // 8


def test_replay_window_known_cases():
    # one class: the ring of c samples is refilled by the last ceil(c / b) pushes of b samples
    assert checkpoint.replay_batches(1, 128, 128) == 1
    assert checkpoint.replay_batches(1, 256, 128) == 2
    assert checkpoint.replay_batches(1, 100, 30) in (4, 5)  # 4 pushes hold 120, the window may start mid-push
    # many classes: every class needs its own ring refilled, well over capacity / (batch / classes)
    assert checkpoint.replay_batches(100, 16, 64) > 16 * 100 // 64
