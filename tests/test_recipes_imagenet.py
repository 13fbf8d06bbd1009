"""The ImageNet recipes: each composes with the official settings it cites and the cluster command in its header,
builds a module through gwf.build.build_module on a small latent shape with a frozen MAE encoder, and one recipe
trains a few updates through Lightning with the encoder untouched."""

import re

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from gwf.constants import MAE_CHECKPOINT_FORMAT
from gwf.data.datamodule import ShardDataModule
from gwf.data.shards import write_shards
from gwf.features.mae import MAEFeatures, MaskedAutoencoder, save_checkpoint
from gwf.models import build_model
from gwf.models.wflow_dit import WFlowDiT
from gwf.objectives.drifting import Drifting
from gwf.objectives.wflow import WFlow
from gwf.build import build_module
from gwf.jko import JKOSchedule
from tests.conftest import CONF_DIR, compose_config

SHAPE = (4, 8, 8)
NUM_CLASSES = 10

# Values read in the official configs each recipe cites (hanjq17/W-Flow configs/gen/ablation_ot_1node.yaml and
# latent_sota_{B,L,XL}_ot_8node.yaml, lambertae/drifting configs/gen/latent_sota_L.yaml): model, global labels per step,
# positives per label, lr, weight decay, warm-up, updates, eps R / temperatures, Sinkhorn iterations, alpha power
# (neg_cfg_pw), forced alpha = 1 fraction (no_cfg_frac), unconditional reals per label (neg_per_sample), reals pushed
# per step and bank (push_per_step, where one loader batch of dataset.batch_size / hosts does not exceed it); the
# generator: its parameter count with 1000 classes (the official DitGen's at hidden_size / depth / num_heads of the
# config, tests/test_models_wflow_dit.py), attn_fp32, use_remat (gwf also recomputes the Drifting L/2's blocks and
# every 4th block of B/2: memory only).
OFFICIAL = {
    "imagenet_wflow_ablation": dict(model="dit_b2", labels=64, pos=64, lr=2e-4, wd=0.01, warmup=5000, updates=30000,
                                    eps_rel=0.05, n_iters=10, power=3.0, one=0.0, uncond=16, params=132_708_880,
                                    attn_fp32=True, remat="none"),
    "imagenet_b2": dict(model="dit_b2", labels=128, pos=64, lr=4e-4, wd=0.0, warmup=10000, updates=200000,
                        eps_rel=0.05, n_iters=10, power=5.0, one=0.0, uncond=32, push=128, params=132_708_880,
                        attn_fp32=False, remat="every_k"),
    "imagenet_l2": dict(model="dit_l2", labels=128, pos=64, lr=4e-4, wd=0.01, warmup=10000, updates=200000,
                        eps_rel=0.05, n_iters=1, power=3.0, one=0.5, uncond=32, push=128, params=462_909_456,
                        attn_fp32=False, remat="blocks"),
    "imagenet_xl2": dict(model="dit_xl2", labels=128, pos=128, lr=3e-4, wd=0.01, warmup=10000, updates=180000,
                         eps_rel=0.01, n_iters=1, power=4.0, one=0.2, uncond=32, push=128, params=678_929_872,
                         attn_fp32=False, remat="blocks"),
    # Drift-L: neg_per_sample 32, no_cfg_frac 0.5, neg_cfg_pw 3, push_per_step 64 per host (2048 / 32 hosts)
    "imagenet_drifting": dict(model="dit_l2", labels=128, pos=64, lr=4e-4, wd=0.01, warmup=10000, updates=200000,
                              temperatures=[0.2, 0.05, 0.02], power=3.0, one=0.5, uncond=32, push=64,
                              params=462_909_456, attn_fp32=False, remat="blocks"),
}


def _cluster_ranks(recipe: str) -> int:
    """Ranks of the header's `sbatch --nodes N --gpus-per-node G --ntasks-per-node G slurm/train.sbatch \\
    experiment=<recipe>` command (one task per GPU, as slurm/train.sbatch requires): N x G."""
    text = (CONF_DIR / "experiment" / f"{recipe}.yaml").read_text()
    pattern = (r"sbatch --nodes (\d+) --gpus-per-node (\d+) --ntasks-per-node (\d+) slurm/train\.sbatch \\\n"
               rf"#\s+experiment={recipe} ")
    m = re.search(pattern, text)
    assert m, f"{recipe}.yaml: no cluster command in its header"
    nodes, gpus, tasks = map(int, m.groups())
    assert gpus == tasks
    return nodes * gpus


@pytest.mark.parametrize("recipe", sorted(OFFICIAL))
def test_recipe_composes_with_the_official_settings(recipe):
    cfg = compose_config([f"experiment={recipe}", "trainer=slurm"])  # as slurm/train.sbatch composes it
    c = OmegaConf.to_container(cfg, resolve=True)
    want = OFFICIAL[recipe]
    assert c["name"] == recipe and c["model"]["name"] == want["model"]
    assert c["data"]["shape"] == [4, 32, 32] and c["data"]["num_classes"] == 1000
    assert c["batch"]["labels_per_update"] * _cluster_ranks(recipe) == want["labels"]  # per rank x ranks = global
    assert c["batch"]["gen_per_label"] == 64 and c["batch"]["pos_per_label"] == want["pos"]
    assert c["batch"]["bank_capacity"] == 128
    # guidance: cfg on [cfg_min 1, cfg_max 4] with density alpha^-neg_cfg_pw, a no_cfg_frac at alpha = 1, neg_per_sample
    # unconditional reals drawn for each label from a ring of negative_bank_size 1000
    assert c["batch"]["alpha_max"] == 4.0 and c["batch"]["alpha_power"] == want["power"]
    assert c["batch"]["alpha_one_fraction"] == want["one"]
    assert c["batch"]["uncond_per_update"] == want["uncond"] and c["batch"]["uncond_per_label"] is True
    assert c["batch"]["uncond_bank"] == 1000
    if "push" in want:
        assert c["data"]["batch_size"] == want["push"]
    assert c["optim"] == dict(name="adamw", lr=want["lr"], betas=[0.9, 0.95], weight_decay=want["wd"],
                              warmup_steps=want["warmup"], grad_clip=2.0, impl="auto", alpha=0.99,
                              schedule="constant", eta_min=0.0)  # warm-up then constant, as the official configs
    assert c["ema_decay"] == 0.999 and c["jko"]["tau"] is None
    sched = JKOSchedule(c["jko"]["steps"], c["jko"]["updates_per_step"], c["jko"]["updates_first_step"])
    assert sched.total_updates == want["updates"]
    assert c["method"]["features"]["name"] == "mae" and c["trainer"]["precision"] == "bf16-mixed"
    # the official generator at the config's options: every parameter, attn_fp32, use_remat
    model = {k: v for k, v in c["model"].items() if k not in ("name", "compile")}
    with torch.device("meta"):
        generator = build_model(c["model"]["name"], out_shape=[4, 32, 32], num_classes=1000, **model)
    assert isinstance(generator, WFlowDiT) and sum(p.numel() for p in generator.parameters()) == want["params"]
    assert generator.noise_shape == (4 * 32 * 32 + 32,) and generator.n_cls_tokens == 16
    assert model["attn_fp32"] is want["attn_fp32"]
    assert c["model"]["checkpointing"] == want["remat"] and c["model"]["checkpoint_every"] == (
        4 if want["remat"] == "every_k" else 2)
    # grad_accum_steps (the ablation's 4 chunks)
    assert c["batch"]["label_chunks"] == (4 if recipe == "imagenet_wflow_ablation" else 1)
    if c["method"]["name"] == "wflow":
        assert c["method"]["estimator"] == "two_batch" and c["method"]["eps_rel"] == want["eps_rel"]
        assert c["method"]["n_iters"] == want["n_iters"]
    else:
        assert c["method"]["name"] == "drifting" and c["method"]["temperatures"] == want["temperatures"]
        assert c["method"]["guidance"] is True


def _tiny_mae(path):
    torch.manual_seed(0)
    model = MaskedAutoencoder(SHAPE[0], 8, (1, 1))
    sd = model.state_dict()
    save_checkpoint(path, {"format": MAE_CHECKPOINT_FORMAT, "config": model.config, "data_shape": list(SHAPE),
                           "step": 0, "model": sd, "ema": sd})
    return path


def _small(recipe, *extra):
    """The recipe with sizes shrunk for a CPU test (the evaluator is not used by build_module)."""
    chunks = ["batch.label_chunks=2"] if recipe == "imagenet_wflow_ablation" else []  # its 4 chunks, 2 labels here
    return compose_config([f"experiment={recipe}", "model=dit_tiny", "eval=digits", "batch.labels_per_update=2",
                           "batch.gen_per_label=4", "batch.pos_per_label=4", "batch.uncond_per_update=4",
                           "batch.bank_capacity=8", *chunks, *extra])


@pytest.mark.parametrize("recipe", sorted(OFFICIAL))
def test_recipe_builds_a_module_on_a_small_latent_shape(recipe, tmp_path):
    path = _tiny_mae(tmp_path / "mae.pt")
    module = build_module(_small(recipe, f"method.features.path={path}"), SHAPE, NUM_CLASSES)
    objective = module.objective
    assert isinstance(objective, Drifting if recipe == "imagenet_drifting" else WFlow)
    assert isinstance(objective.features, MAEFeatures)
    assert not any(p.requires_grad for p in objective.features.parameters())
    assert not any(k.startswith("objective.") for k in module.state_dict())  # never in checkpoints, unseen by DDP
    assert module.optim.lr == OFFICIAL[recipe]["lr"] and tuple(module.optim.betas) == (0.9, 0.95)
    x = module.sample(6, labels=torch.arange(6), alpha=1.5 if module.conditioning.guided else None)
    assert x.shape == (6, *SHAPE) and torch.isfinite(x).all()
    # data space instead of features: the same recipe with method.features=null
    plain = build_module(_small(recipe, "method.features=null"), SHAPE, NUM_CLASSES)
    assert plain.objective.features.is_identity
    plain.load_state_dict(module.state_dict())  # strict: a checkpoint loads without the encoder (e.g. to sample)


def test_recipe_without_an_encoder_path_is_a_clear_error():
    with pytest.raises(ValueError, match=r"method.features.path is not set.*gwf-train-encoder"):
        build_module(_small("imagenet_b2"), SHAPE, NUM_CLASSES)


def test_ablation_recipe_trains_through_lightning_with_the_encoder_frozen(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, *SHAPE)).astype(np.float32)
    write_shards(((f"s{i:04d}", x[i], i % NUM_CLASSES) for i in range(len(x))), tmp_path, "train", 128)
    dm = ShardDataModule(f"{tmp_path}/train-{{000000..000001}}.tar", None, SHAPE, NUM_CLASSES, batch_size=64,
                         num_workers=0, shuffle_buffer=0, epoch_size=256)
    path = _tiny_mae(tmp_path / "mae.pt")
    cfg = _small("imagenet_wflow_ablation", f"method.features.path={path}", "jko.updates_per_step=3",
                 "optim.warmup_steps=0")
    module = build_module(cfg, SHAPE, NUM_CLASSES)
    encoder_before = {k: v.clone() for k, v in module.objective.features.state_dict().items()}
    generator_before = {k: v.clone() for k, v in module.generator.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, max_steps=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    assert int(module.update_count) == 3 and not module.objective.features.training
    assert all(torch.equal(encoder_before[k], v) for k, v in module.objective.features.state_dict().items())
    assert any(not torch.equal(generator_before[k], v) for k, v in module.generator.state_dict().items())


def test_frozen_encoder_is_held_in_bf16_under_bf16_trainers_and_the_bank_in_the_data_dtype(tmp_path):
    path = _tiny_mae(tmp_path / "mae.pt")
    gpu = build_module(_small("imagenet_b2", f"method.features.path={path}", "trainer=gpu"), SHAPE, NUM_CLASSES)
    assert {p.dtype for p in gpu.objective.features.parameters()} == {torch.bfloat16}
    assert gpu.bank.data.dtype == torch.float16  # latents are stored as float16 moments
    cpu = build_module(_small("imagenet_b2", f"method.features.path={path}", "trainer.precision=32-true"), SHAPE,
                       NUM_CLASSES)
    assert {p.dtype for p in cpu.objective.features.parameters()} == {torch.float32}
    x = torch.randn(2, 3, *SHAPE)
    pos = torch.randn(2, 4, *SHAPE)
    from gwf.objectives.base import GenBatch, RealBatch

    loss, _ = gpu.objective.generator_loss(GenBatch(x.requires_grad_(True), torch.arange(2), None, lambda: x.detach()),
                                           RealBatch(pos, None, torch.arange(2)), torch.Generator())
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(x.grad).all()  # the field and the loss stay fp32
