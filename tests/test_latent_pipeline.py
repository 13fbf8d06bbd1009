"""Issue 4's whole path on CPU: generated images -> gwf-prepare latents (a tiny random AutoencoderKL built from a
config) -> latent shards -> ShardDataModule (z = scale * (mean + std * eps)) -> a short W-Flow run of the latent DiT
-> sample grids decoded through the VAE, in training and with gwf-sample --vae."""

import numpy as np
import torch
from PIL import Image

from gwf.data.latents import LatentDecoder
from gwf.sample import run as sample_run
from gwf.train import train
from gwf.viz import image_grid
from tests.conftest import compose_config
from tests.test_latents import LATENT, RESOLUTION, latent_shards


def test_prepare_train_decode(tmp_path):
    out, manifest = latent_shards(tmp_path)
    vae = tmp_path / "vae"
    pattern = str(out / manifest["splits"]["train"]["pattern"])
    cfg = compose_config([
        "data=latents", f"data.train_shards='{pattern}'", f"data.shape={list(LATENT)}", "data.num_classes=2",
        "data.batch_size=4", "data.epoch_size=16", "data.num_workers=0", "data.shuffle_buffer=0", "data.prepare=null",
        "model=dit_tiny", "batch.labels_per_update=2", "batch.gen_per_label=4", "batch.pos_per_label=3",
        "batch.uncond_per_update=3", "batch.bank_capacity=3", "jko.updates_first_step=4", "optim.warmup_steps=0",
        f"eval.evaluator.vae={vae}", "eval.every_n_updates=4", "eval.num_samples=4", "eval.grid_per_class=2",
        "logger=none", "trainer.enable_progress_bar=false",
    ], runs_dir=tmp_path / "runs")
    run_dir = tmp_path / "run"
    summary = train(cfg, run_dir)
    assert summary["last"]["update"] == 4 and summary["finished"]

    # in training: 2 classes x 2 samples, decoded to RESOLUTION x RESOLUTION RGB, drawn 8x (gwf.viz.save_image_grid)
    grid = Image.open(run_dir / "samples" / "final.png")
    expected = image_grid(torch.zeros(4, 3, RESOLUTION, RESOLUTION), 2)
    assert grid.size == (expected.shape[1] * 8, expected.shape[0] * 8) and grid.mode == "RGB"

    # gwf-sample --vae: the stored images are the VAE decoding of the stored latents
    result = sample_run(["--ckpt", str(run_dir / "checkpoints" / "last.ckpt"), "--num-samples", "4",
                         "--vae", str(vae), "--out", str(tmp_path / "gen")])
    data = np.load(tmp_path / "gen" / "samples.npz")
    assert data["x"].shape == (4, *LATENT) and data["arr_0"].shape == (4, RESOLUTION, RESOLUTION, 3)
    decoded = LatentDecoder(vae).decode(torch.from_numpy(data["x"]).float())  # [-1, 1]
    expected_u8 = ((decoded.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).numpy()
    assert np.abs(expected_u8 - data["arr_0"].astype(np.float64)).max() <= 1.0
    assert result is not None

    # in-training evaluation runs where the samples are (the training device) unless a device is named
    from gwf.eval.fidelity import FidelityEvaluator

    on_meta = torch.zeros(1, device="meta")
    assert FidelityEvaluator(vae=str(vae)).device_for(on_meta).type == "meta"
    assert FidelityEvaluator(device="cpu").device_for(on_meta).type == "cpu"
