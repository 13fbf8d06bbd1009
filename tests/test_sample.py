"""gwf-sample on a real (tiny) digits checkpoint: per-index seeding, labels and guidance, EMA vs raw weights, the
PNG grid, and sharding over 2 CPU ranks (torch.distributed.run, gloo) giving exactly the single-rank samples."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import gwf  # noqa: F401
from gwf.sample import load_module, run as main
from gwf.data.toy2d import make_sampler
from gwf.seeding import make_generator
from gwf.train import train
from tests.conftest import compose_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(digits_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    cfg = compose_config(["jko.updates_first_step=6", "eval.every_n_updates=6", "eval.num_samples=100",
                          "checkpoint.every_n_updates=6", "trainer.enable_progress_bar=false"],
                         data_dir=digits_dir.parent)
    train(cfg, run_dir)
    return run_dir / "checkpoints" / "last.ckpt"


def _load(out):
    with np.load(out / "samples.npz") as f:
        return {k: f[k] for k in f.files}


def test_samples_follow_per_index_seeds_labels_and_alpha(ckpt, tmp_path):
    out = main(["--ckpt", str(ckpt), "--num-samples", "30", "--classes", "2,5,7", "--alpha", "2",
                "--out", str(tmp_path / "s"), "--batch-size", "8"])
    s = _load(out)
    assert s["x"].shape == (30, 1, 8, 8)
    np.testing.assert_array_equal(s["labels"], np.tile([2, 5, 7], 10))
    np.testing.assert_array_equal(s["alpha"], np.full(30, 2.0, np.float32))
    # sample i = EMA generator(z_i, label_i, alpha) with z_i from its own generator seeded by (seed, i)
    module, _ = load_module(ckpt)
    model = module.ema.model
    for i in (0, 17, 29):
        z = torch.randn(1, *model.noise_shape, generator=make_generator("cpu", "gwf-sample", 0, i))
        expected = model(z, torch.tensor([[2, 5, 7][i % 3]]), torch.tensor([2.0]))
        np.testing.assert_allclose(s["x"][i], expected[0].detach().numpy(), atol=1e-6)
    # ADM-layout uint8 images: (x + 1) * 127.5, NHWC
    np.testing.assert_array_equal(s["arr_0"][..., 0], np.round((np.clip(s["x"][:, 0], -1, 1) + 1) * 127.5))
    # the grid: one row per class, 10 columns, 8x8 digits with 1-pixel padding, upscaled 8x
    assert Image.open(out / "grid.png").size == ((10 * 9 + 1) * 8, (3 * 9 + 1) * 8)
    meta = json.loads((out / "sample.json").read_text())
    assert (meta["weights"], meta["world_size"], meta["update"]) == ("ema", 1, 6)

    # per-index seeding: a smaller N gives a prefix of the same samples; raw weights give other samples
    prefix = _load(main(["--ckpt", str(ckpt), "--num-samples", "11", "--classes", "2,5,7", "--alpha", "2",
                         "--out", str(tmp_path / "p"), "--batch-size", "4"]))
    np.testing.assert_allclose(prefix["x"], s["x"][:11], atol=1e-6)
    raw = _load(main(["--ckpt", str(ckpt), "--num-samples", "11", "--classes", "2,5,7", "--alpha", "2",
                      "--out", str(tmp_path / "r"), "--raw"]))
    assert np.abs(raw["x"] - s["x"][:11]).max() > 1e-3


def test_bad_arguments_are_named(ckpt, tmp_path):
    with pytest.raises(ValueError, match=r"--classes: \[10\] outside \[0, 10\)"):
        main(["--ckpt", str(ckpt), "--num-samples", "4", "--classes", "3,10", "--out", str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="checkpoint .* not found"):
        main(["--ckpt", str(tmp_path / "none.ckpt"), "--num-samples", "4"])
    with pytest.raises(ValueError, match="not latents"):
        main(["--ckpt", str(ckpt), "--num-samples", "4", "--vae", "sd-vae", "--out", str(tmp_path)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_write_exactly_the_single_rank_samples(ckpt, tmp_path):
    n = 25  # not a multiple of the 2 ranks nor of the batch: padding must be dropped
    args = ["--ckpt", str(ckpt), "--num-samples", str(n), "--batch-size", "4", "--alpha", "1.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "gwf.sample", *args, "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = _load(tmp_path / "ddp")
    assert json.loads((tmp_path / "ddp" / "sample.json").read_text())["world_size"] == 2
    single = _load(main([*args, "--out", str(tmp_path / "one")]))
    assert ddp["x"].shape == (n, 1, 8, 8)
    assert len(np.unique(ddp["x"].reshape(n, -1), axis=0)) == n  # n distinct samples
    np.testing.assert_array_equal(ddp["labels"], np.arange(n) % 10)
    np.testing.assert_allclose(ddp["x"], single["x"], atol=1e-6)


def test_checkpoint_of_an_older_version_loads(ckpt, tmp_path):
    """A checkpoint whose stored config uses the keys of before the rename (jko.inner, batch.labels_per_step, ...)
    rebuilds the same module: gwf.config.upgrade_config."""
    from gwf.config import RENAMED

    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    config = state["hyper_parameters"]["config"]
    for old, new in RENAMED.items():  # write the new keys back under their old names
        (new_parent, new_leaf), (old_parent, old_leaf) = new.rpartition(".")[::2], old.rpartition(".")[::2]
        node = config.get(new_parent) if new_parent else config
        if isinstance(node, dict) and new_leaf in node:
            config.setdefault(old_parent, {})[old_leaf] = node.pop(new_leaf)
    assert "inner" in config["jko"] and "labels_per_step" in config["batch"]
    torch.save(state, tmp_path / "old.ckpt")
    old, _ = load_module(tmp_path / "old.ckpt")
    new, _ = load_module(ckpt)
    assert old.schedule == new.schedule and old.sizes == new.sizes
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), new.state_dict().values()))


def test_a_2d_run_is_drawn_over_its_target(tmp_path, capsys):
    """The scatter plot of a 2D checkpoint draws the data's held-out points under the samples (it used to show a
    "target" legend entry with no points)."""
    from gwf.sample import target_points

    run_dir = tmp_path / "toy"
    cfg = compose_config(["experiment=toy2d_wflow", "jko.updates_per_step=4", "eval.every_n_updates=4",
                          "eval.num_samples=200", "checkpoint.every_n_updates=4", "trainer.enable_progress_bar=false"])
    train(cfg, run_dir)
    target = target_points(cfg, 500)
    held_out = make_sampler(cfg.data.target)(500, make_generator("cpu", "toy2d-heldout", "val", cfg.data.seed))
    assert torch.equal(target, held_out)
    out = tmp_path / "samples"
    capsys.readouterr()
    main(["--ckpt", str(run_dir / "checkpoints" / "last.ckpt"), "--num-samples", "300", "--batch-size", "128",
          "--out", str(out)])
    bar = capsys.readouterr().err
    assert "gwf-sample: 100%" in bar and "300/300" in bar and "sample/s" in bar  # the bar, in samples
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB")).astype(int)
    # bluish pixels (the target's tab:blue, blue well above red; the samples are orange, the frame grey)
    assert ((grid[..., 2] - grid[..., 0]) > 20).sum() > 500
    assert target_points(compose_config([]), 10) is None  # digits: images, no scatter target


MERGE_PROBE = r"""
import sys, numpy as np
from pathlib import Path
from gwf.sample import RankParts
out, rows = Path(sys.argv[1]), int(sys.argv[2])
parts = RankParts(out, world=2, num_samples=2000)
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
before = status("VmRSS")
parts.merge(out / "samples.npz", {"labels": np.arange(2000) % 10}, rows=rows)
print(status("VmHWM") - before)
"""


def test_rank0_merge_memory_does_not_grow_with_the_samples(tmp_path):
    """2,000 samples of 3x64x64 (x float32 and arr_0 uint8: 123 MB) in the parts of 2 ranks: rank 0's merge into
    samples.npz (a fresh process; peak RSS from the kernel) holds one block of samples, not all of them, and the
    result is the samples in index order. Extrapolated at the default block (MERGE_ROWS) to 50k 256x256 images
    (arr_0 rows of 196,608 bytes): far below the 8 GB target."""
    from gwf.sample import MERGE_ROWS, RankParts

    n, world, rows = 2000, 2, 128
    parts = RankParts(tmp_path, world, n)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3, 64, 64), dtype=np.float32)
    img = rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)
    for r in range(world):
        for name, a in (("x", x), ("arr_0", img)):
            f, w = parts.open_writer(name, r, a.shape[1:], a.dtype)
            for start in range(r, n, 100 * world):  # appended in batches, as the ranks do
                w.write(a[start : start + 100 * world : world])
            w.close()
            f.close()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    probe = subprocess.run([sys.executable, "-c", MERGE_PROBE, str(tmp_path), str(rows)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
    assert probe.returncode == 0, probe.stderr[-3000:]
    growth = int(probe.stdout.split()[-1])
    total = x.nbytes + img.nbytes
    assert growth < total / 4, (growth, total)  # one block (128 samples: 6.3 MB of x), not 123 MB
    with np.load(tmp_path / "samples.npz") as f:
        np.testing.assert_array_equal(f["x"], x)
        np.testing.assert_array_equal(f["arr_0"], img)
        np.testing.assert_array_equal(f["labels"], np.arange(n) % 10)
    largest_row = x[0].nbytes  # the largest array's sample, held in blocks of `rows`
    predicted = growth * (MERGE_ROWS * 256 * 256 * 3) / (rows * largest_row)
    assert predicted <= 8e9, predicted  # 50k 256x256 uint8 images merged on rank 0
