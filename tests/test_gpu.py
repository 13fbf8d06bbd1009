"""What only a GPU can check (each test mirrors a CPU test): the transport stays fp32 under bf16 autocast and gives the
CPU's velocity, a digits job trains with trainer=gpu, an imagenet_b2 update fits gwf-bench-step's predicted peak,
2-GPU NCCL DDP keeps the ranks identical, and a GPU run resumes. Skipped without CUDA (``pytest -m gpu`` selects
them); none has run yet (no GPU was lent to this work), so their first GPU run is also their first check."""

import gwf  # noqa: F401  (first: torchvision workaround)

import itertools

import lightning as L
import pytest
import torch

import gwf.features
from gwf.ot import sinkhorn_velocity

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu
pytestmark = [gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA device")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


def _clouds(seed, batch, n, d, k=3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n, d, generator=g).to(device) for _ in range(k)]


def test_transport_stays_fp32_under_bf16_autocast():
    """bf16 inputs under CUDA bf16 autocast: V is fp32 and equals the fp32 computation on the same (rounded)
    inputs, so no matmul inside ran in bf16 or TF32 (mirrors tests/test_ot_velocity.py)."""
    x, pos, neg = (t.bfloat16() for t in _clouds(0, 4, 64, 32, device="cuda"))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        v, info = sinkhorn_velocity(x, pos, neg, n_iters=20)
    ref, ref_info = sinkhorn_velocity(x.float(), pos.float(), neg.float(), n_iters=20)
    assert v.dtype == torch.float32 and info["eps"].dtype == torch.float32
    torch.testing.assert_close(v, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(info["eps"], ref_info["eps"], rtol=1e-6, atol=0)


def test_velocity_on_cuda_equals_the_cpu_one():
    """Two-batch velocity with guidance, 3 problems of 128 points in R^64: CUDA and CPU agree to fp32 accuracy."""
    x, pos, neg, uncond = _clouds(1, 3, 128, 64, k=4)
    w = torch.tensor([0.0, 0.5, 2.0])
    kw = dict(n_iters=10, uncond=uncond, guidance_w=w)
    v_cpu, info_cpu = sinkhorn_velocity(x, pos + 0.5, neg, **kw)
    cuda = {k: v.cuda() for k, v in kw.items() if torch.is_tensor(v)}
    v_gpu, info_gpu = sinkhorn_velocity(x.cuda(), (pos + 0.5).cuda(), neg.cuda(), n_iters=10, **cuda)
    torch.testing.assert_close(v_gpu.cpu(), v_cpu, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(info_gpu["eps"].cpu(), info_cpu["eps"], rtol=1e-5, atol=0)


def test_digits_job_on_gpu_improves_its_fd(digits_dir, tmp_path):
    """The digits W-Flow job with trainer=gpu (bf16-mixed), 60 updates through gwf.train.train: the Frechet
    distance drops below a fifth (the same command with trainer=cpu: 734 -> 35, measured)."""
    from gwf.train import train
    from tests.conftest import compose_config

    cfg = compose_config([f"paths.data_dir={digits_dir.parent}", "data.num_workers=0", "logger=none", "trainer=gpu",
                          "trainer.enable_progress_bar=false", "optim.warmup_steps=0", "jko.updates_first_step=60",
                          "eval.every_n_updates=30", "eval.num_samples=500"])
    summary = train(cfg, tmp_path / "run")
    assert summary["last"]["update"] == 60
    assert summary["last"]["fd"] < 0.2 * summary["first"]["fd"], summary


class _PeakOfUpdate(L.Callback):
    """torch.cuda.max_memory_allocated over the training step of batch ``index`` (a steady-state update)."""

    def __init__(self, index: int):
        self.index, self.peak = index, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if batch_idx == self.index:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if batch_idx == self.index:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()


@pytest.mark.parametrize("compiled", [False, True])
def test_imagenet_b2_update_fits_the_predicted_peak(monkeypatch, compiled):
    """One steady-state imagenet_b2 update (the official DiT-B/2, MAE-640, 2 labels x 64 per rank, bf16-mixed, fused
    AdamW) peaks within 10% of gwf-bench-step's prediction (torch.cuda.max_memory_allocated) with eager networks, and
    at most 10% above it compiled as the recipe runs (model.compile, method.compile: auto; the prediction is the eager
    networks'). The MAE is random (its checkpoint loader is replaced: no 8 GB file), built through
    gwf.build.build_module like the rest."""
    from gwf.bench import step
    from gwf.build import build_module
    from gwf.features.mae import MAEFeatures, MaskedAutoencoder

    eager = ["model.compile=false", "method.compile=false"]  # the prediction: eager networks (no compiled count)
    cfg = step.compose("imagenet_b2", ["model=dit_b2", *eager])
    channels = step.recipe_mae_channels("imagenet_b2")
    predicted = step.predict(cfg, "imagenet_b2", channels)["peak_gib"] * 2**30

    def random_mae(path=None, use_ema=True, **kwargs):
        with torch.device("cuda"):
            return MAEFeatures(MaskedAutoencoder(4, channels, step.MAE_LAYERS).encoder, **kwargs)

    monkeypatch.setitem(gwf.features.FEATURES, "mae", random_mae)
    run_cfg = step.compose("imagenet_b2", ["model=dit_b2", "trainer=gpu", "method.features.path=random",
                                           *([] if compiled else eager)])
    shape, classes = tuple(run_cfg.data.shape), int(run_cfg.data.num_classes)
    torch.manual_seed(0)
    module = build_module(run_cfg, shape, classes)
    g = torch.Generator().manual_seed(0)
    for c0 in range(0, classes, 100):  # every class full, as after the first batches of a run
        labels = torch.arange(c0, c0 + 100).repeat_interleave(module.bank.capacity)
        module.bank.push(torch.randn(len(labels), *shape, generator=g), labels)
    batches = [step.data_batch(run_cfg, g) for _ in range(3)]
    peak = _PeakOfUpdate(index=2)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision=run_cfg.trainer.precision, max_epochs=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, log_every_n_steps=1000, callbacks=[peak])
    trainer.fit(module, iter(batches))
    assert int(module.update_count) == 3 and peak.peak is not None and module.compiled is compiled
    if compiled:
        assert peak.peak <= 1.10 * predicted, (peak.peak / 2**30, predicted / 2**30)
    else:
        assert abs(peak.peak - predicted) <= 0.10 * predicted, (peak.peak / 2**30, predicted / 2**30)


class _Record(L.Callback):
    """tests/driver.py's record (module state and 8 draws of the rank's noise stream), the noise drawn on the
    module's device (the driver's draw is CPU-only)."""

    def __init__(self, run_dir):
        self.run_dir = run_dir

    def on_train_end(self, trainer, module):
        noise = torch.randn(8, generator=module.rng("gen", 0), device=module.device).cpu()
        state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        torch.save({"noise": noise, "state": state, "world_size": trainer.world_size, "rank": trainer.global_rank},
                   self.run_dir / f"rank{trainer.global_rank}.pt")


def _run_gpu_ranks(run_dir, overrides, world: int = 2, timeout_s: float = 600) -> list[str]:
    """tests/test_ddp.py's run_ranks with this file's driver (``python -m tests.test_gpu RUN_DIR OVERRIDES``)."""
    import subprocess
    import sys

    from tests.test_ddp import REPO, _clean_env, _free_port, torchrun_env

    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tests.test_gpu", str(run_dir), *overrides], cwd=REPO,
                              env={**_clean_env(), **torchrun_env(r, world, port)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(world)]
    outs = [p.communicate(timeout=timeout_s)[0] for p in procs]
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out[-4000:]}"
        assert "were not used in producing the loss" not in out and "SUMMARY" in out, out[-4000:]
    return outs


@two_gpus
def test_two_gpu_nccl_ddp_keeps_ranks_identical(tmp_path, digits_dir):
    """2 ranks on 2 GPUs (NCCL), started from outside as torchrun does (the pattern of tests/test_ddp.py): the
    critic method w1 on the 2D mixture and the digits W-Flow job end with identical parameters on both ranks."""
    from tests.test_ddp import REPLICATED, TINY_2D, _check_ranks

    on_gpu = [o for o in TINY_2D if o != "trainer.accelerator=cpu"] + ["trainer.accelerator=gpu"]
    outs = _run_gpu_ranks(tmp_path / "w1", ["method=w1", *on_gpu])
    assert "distributed_backend=nccl" in outs[0]  # Lightning's choice on GPUs (trainer/ddp.yaml backend: null)
    _check_ranks(tmp_path / "w1")

    digits = [f"paths.data_dir={digits_dir.parent}", "data.num_workers=0", "trainer=ddp", "trainer.accelerator=gpu",
              "trainer.devices=2", "trainer.enable_progress_bar=false", "jko.updates_first_step=20",
              "eval.every_n_updates=1000", "eval.num_samples=100", "logger=none"]
    _run_gpu_ranks(tmp_path / "digits", digits)
    recs = [torch.load(tmp_path / "digits" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    s0, s1 = recs[0]["state"], recs[1]["state"]
    assert int(s0["update_count"]) == int(s1["update_count"]) == 20
    for k in s0:
        if k.startswith(REPLICATED):
            assert torch.allclose(s0[k].float(), s1[k].float(), atol=1e-6, rtol=0), k
    assert not torch.equal(s0["bank.data"], s1["bank.data"])  # rank-local data streams


def test_gpu_run_resumes_within_tolerance(tmp_path):
    """KL with a critic on the 2D mixture, trainer=gpu: stopped by the update budget at 13, 26, 39 and relaunched,
    it ends where the straight run does, to 1e-4 (GPU kernels need not be bitwise reproducible run to run;
    tests/test_resume.py asserts 1e-6 on CPU)."""
    from gwf.train import train
    from tests.conftest import compose_config
    from tests.test_resume import KL_2D, _assert_same_state, _load

    on_gpu = [*KL_2D, "trainer=gpu", "trainer.enable_progress_bar=false"]
    assert train(compose_config(on_gpu), tmp_path / "straight")["finished"]
    budget = compose_config([*on_gpu, "checkpoint.updates_per_job=13"])
    stops = []
    for _ in itertools.repeat(None, 4):
        summary = train(budget, tmp_path / "resumed")
        stops.append(int(_load(tmp_path / "resumed")["state_dict"]["update_count"]))
        if summary["finished"]:
            break
    assert stops == [13, 26, 39, 40]
    _assert_same_state(_load(tmp_path / "resumed"), _load(tmp_path / "straight"), atol=1e-4)


if __name__ == "__main__":  # one DDP rank of _run_gpu_ranks: python -m tests.test_gpu RUN_DIR OVERRIDES...
    import json
    import sys
    from pathlib import Path

    from gwf.train import train
    from tests.conftest import compose_config

    run_dir = Path(sys.argv[1])
    run_dir.mkdir(parents=True, exist_ok=True)
    summary = train(compose_config(sys.argv[2:]), run_dir, extra_callbacks=(_Record(run_dir),))
    print("SUMMARY " + json.dumps(summary), flush=True)
