"""The [GWF] CIFAR-10 Small-Net recipe: its values are the paper's, and it trains end to end on shards that
`gwf-prepare images` makes from a few generated images (CIFAR-10 itself cannot be downloaded here)."""

import numpy as np
import pytest
from PIL import Image

from gwf.jko import JKOSchedule, tau_from_official_lambda2
from gwf.prepare import prepare_images
from gwf.train import train
from tests.conftest import compose_config


def test_recipe_values_are_the_papers():
    cfg = compose_config(["experiment=cifar10_gwf"])
    assert (cfg.model.name, cfg.model.noise_dim, cfg.model.ngf) == ("resnet", 192, 256)
    assert (cfg.method.critic.name, cfg.method.critic.ndf) == ("resnet", 256)
    assert (cfg.jko.steps, cfg.jko.updates_first_step, cfg.jko.updates_per_step) == (100, 2000, 1000)
    assert JKOSchedule(cfg.jko.steps, cfg.jko.updates_per_step, cfg.jko.updates_first_step).total_updates == 101_000
    assert cfg.jko.tau == pytest.approx(tau_from_official_lambda2(1.0, 3 * 32 * 32))
    assert (cfg.optim.lr, list(cfg.optim.betas)) == (2e-4, [0.5, 0.9])
    assert (cfg.critic_optim.lr, list(cfg.critic_optim.betas)) == (1e-4, [0.5, 0.9])
    assert cfg.ema_decay == 0.9999 and cfg.batch.gen_per_label == 256 and cfg.batch.pos_per_label == 256
    # as train.py: a fresh batch of 256 reals for each critic and generator step, uniform z, the first step from
    # fresh Gaussian noise, a constant-decay EMA
    assert (cfg.loop.reals, cfg.data.batch_size, cfg.batch.bank_capacity) == ("fresh", 512, 512)
    assert (cfg.noise, cfg.jko.start, cfg.ema_warmup) == ("uniform", "fresh_noise", False)
    assert list(cfg.data.shape) == [3, 32, 32] and cfg.data.conditional is False
    assert (cfg.eval.every_n_jko_steps, cfg.eval.num_samples) == (10, 49_920)  # eval.py: 195 batches of 256


def test_evaluation_every_10_jko_steps_is_the_officials():
    """eval.every_n_jko_steps=10 scores at the end of JKO steps 0, 10, 20, ... (train.py: k % evaluate_every == 0
    after step k): updates 2,000, 12,000, 22,000, ... of the 101,000."""
    from types import SimpleNamespace

    from gwf.callbacks import EvalCallback

    callback = EvalCallback(lambda: None, every_n_jko_steps=10)
    schedule = JKOSchedule(100, 1000, 2000)
    due = [u for u in range(1, schedule.total_updates + 1) if callback.due(SimpleNamespace(update=u, schedule=schedule))]
    assert due == [2000 + 10_000 * i for i in range(10)]
    every = EvalCallback(lambda: None, every_n_updates=5000)
    assert [u for u in range(1, 20_001) if every.due(SimpleNamespace(update=u, schedule=schedule))] == [5000, 10000,
                                                                                                     15000, 20000]
    with pytest.raises(ValueError, match="every_n_jko_steps"):
        EvalCallback(lambda: None, every_n_jko_steps=0)


def prepared_shards(tmp_path) -> str:
    """24 generated 40x36 images in 2 class folders, prepared as 32x32 pixel shards; their pattern."""
    rng = np.random.default_rng(0)
    for c in ("airplane", "cat"):
        (tmp_path / "src" / c).mkdir(parents=True)
        for i in range(12):  # 40x36 images: the ADM crop brings them to 32x32
            pixels = rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "src" / c / f"{i}.png")
    manifest = prepare_images(tmp_path / "src", tmp_path / "shards", size=32, samples_per_shard=8)
    assert manifest["splits"]["train"]["count"] == 24 and manifest["num_classes"] == 2
    return str(tmp_path / "shards" / manifest["splits"]["train"]["pattern"])


def test_recipe_trains_on_prepared_image_folder(tmp_path):
    pattern = prepared_shards(tmp_path)
    cfg = compose_config([
        "experiment=cifar10_gwf", f"data.train_shards='{pattern}'", "data.num_classes=2", "data.batch_size=8",
        "data.epoch_size=64", "data.num_workers=0", "data.prepare=null", "model.ngf=16", "critic.ndf=16",
        "batch.gen_per_label=8", "batch.pos_per_label=8", "batch.bank_capacity=16", "jko.steps=2",
        "jko.updates_first_step=3", "jko.updates_per_step=3", "eval.every_n_jko_steps=1", "eval.num_samples=16",
        "eval.grid_per_class=4",
        "logger=none", "trainer.enable_progress_bar=false",
    ], runs_dir=tmp_path / "runs")
    run_dir = tmp_path / "run"
    summary = train(cfg, run_dir)
    assert summary["last"]["update"] == 6
    assert (run_dir / "checkpoints" / "last.ckpt").is_file() and (run_dir / "samples" / "final.png").is_file()
    import torch

    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert int(state["state_dict"]["update_count"]) == 6
    # unconditional: the generator has no class embedding, the critic no projection (labels were only checked)
    assert not any("class" in k or "embed" in k for k in state["state_dict"] if k.startswith("generator."))
    # the JKO copy is refreshed at the end of every outer step, the last one included: it equals the final generator
    prev = {k.removeprefix("jko.previous."): v for k, v in state["state_dict"].items() if k.startswith("jko.previous.")}
    gen = {k.removeprefix("generator."): v for k, v in state["state_dict"].items() if k.startswith("generator.")}
    assert prev.keys() == gen.keys() and all(torch.equal(prev[k], gen[k]) for k in gen)


def test_large_net_recipe_is_the_official_command():
    """experiment=cifar10_gwf_large: the official README's Large-Net + KL_DV + JKO command (Table 3, Figure 1)."""
    cfg = compose_config(["experiment=cifar10_gwf_large"])
    assert (cfg.model.name, cfg.model.nz, cfg.method.critic.name, cfg.method.name) == ("ncsnpp", 128, "ncsnpp", "kl_dv")
    assert (cfg.jko.steps, cfg.jko.updates_first_step, cfg.jko.updates_per_step, cfg.jko.start) == (50, 2000, 2000,
                                                                                                     "noise")
    assert cfg.jko.tau == pytest.approx(tau_from_official_lambda2(0.2, 3 * 32 * 32))
    for opt, lr in ((cfg.optim, 2e-4), (cfg.critic_optim, 1e-4)):
        assert (opt.lr, opt.schedule, opt.eta_min, list(opt.betas)) == (lr, "cosine", 5e-5, [0.5, 0.9])
    assert (cfg.method.penalty, cfg.method.penalty_weight, cfg.ema_decay, cfg.ema_warmup) == ("r1", 0.2, 0.9999, False)
    assert (cfg.noise, cfg.loop.reals, cfg.eval.every_n_jko_steps, cfg.eval.num_samples) == ("uniform", "fresh", 10,
                                                                                          49_920)


def test_large_net_recipe_trains_shrunk(tmp_path):
    """The Large-Net recipe end to end at width 16: the first JKO step measured from the image part of z."""
    pattern = prepared_shards(tmp_path)
    cfg = compose_config([
        "experiment=cifar10_gwf_large", f"data.train_shards='{pattern}'", "data.num_classes=2", "data.batch_size=16",
        "data.epoch_size=64", "data.num_workers=0", "data.prepare=null", "model.num_channels_dae=16",
        "model.z_emb_dim=16", "model.nz=8", "critic.ngf=8", "batch.gen_per_label=8", "batch.pos_per_label=8",
        "batch.bank_capacity=16", "jko.steps=2", "jko.updates_first_step=2", "jko.updates_per_step=2",
        "eval.every_n_jko_steps=1", "eval.num_samples=8", "eval.grid_per_class=4", "logger=none",
        "trainer.enable_progress_bar=false",
    ], runs_dir=tmp_path / "runs")
    summary = train(cfg, tmp_path / "run")
    assert summary["last"]["update"] == 4
