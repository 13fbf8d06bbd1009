"""GPU-scale features, checked on CPU: label-chunk gradient accumulation equals the one-pass update, an update reads
nothing back from the device (no host synchronization), the class bank's sync-free push equals the ring-buffer rule,
non-finite losses are caught without a per-update read, and the DDP and optimizer settings follow the method."""

import copy

import lightning as L
import pytest
import torch

from gwf import build
from gwf.bench.counting import OpCounter, optimizer_step_counters
from gwf.data.bank import ClassBank
from gwf.module import OptimConfig
from gwf.ot.sinkhorn import as_on_accelerator
from gwf.train import train
from tests.conftest import compose_config

TINY = ["data.num_workers=0", "logger=none", "trainer.enable_progress_bar=false", "eval.every_n_updates=1000",
        "eval.num_samples=100", "batch.labels_per_update=4", "batch.gen_per_label=8", "batch.pos_per_label=8",
        "batch.uncond_per_update=8", "optim.warmup_steps=0", "jko.updates_per_step=3", "threads=1"]


def _generator_state(run_dir):
    """Generator, EMA and bank, and the generator optimizer's moments (linear in the gradients: Adam's update is
    nearly scale-free, its first moment is not)."""
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    state = {k: v for k, v in ckpt["state_dict"].items() if k.startswith(("generator.", "ema.model.", "bank."))}
    for i, s in ckpt["optimizer_states"][0]["state"].items():
        state.update({f"adam.{i}.exp_avg": s["exp_avg"], f"adam.{i}.exp_avg_sq": s["exp_avg_sq"]})
    return state


@pytest.mark.parametrize("extra", [[], ["method.features=null", "jko.tau=0.5"]])
def test_label_chunks_give_the_one_pass_update(digits_dir, tmp_path, extra):
    """fp64, W-Flow with guidance and the second batch, 4 labels in 4 chunks vs one pass, 3 updates (the JKO term
    too in the second case): the same generator, EMA and bank to 1e-6 (the transport itself runs in fp32)."""
    base = [f"paths.data_dir={digits_dir.parent}", *TINY, "trainer.precision=64-true", *extra]
    train(compose_config(base), tmp_path / "one")
    train(compose_config([*base, "batch.label_chunks=4"]), tmp_path / "chunks")
    a, b = _generator_state(tmp_path / "one"), _generator_state(tmp_path / "chunks")
    assert a.keys() == b.keys() and a["generator.out.weight"].dtype == torch.float64
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-9, msg=k)
    L.seed_everything(0)  # as train() does before building: the initial generator
    initial = build.build_module(compose_config(base), (1, 8, 8), 10).generator.out.weight.double()
    changed = (a["generator.out.weight"] - initial).abs().max()
    assert changed > 1e-4  # the updates moved the generator: the comparison is not between two initial states


def test_label_chunks_must_divide_the_labels():
    with pytest.raises(ValueError, match="batch.label_chunks=3 must divide the 4 label"):
        build.build_module(compose_config([*TINY, "batch.label_chunks=3"]), (1, 8, 8), 10)


class _CountOneUpdate(L.Callback):
    """OpCounter around the first full update after the class bank is filled (training_step to EMA)."""

    def __init__(self):
        self.counter = None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if module._bank_ready and module.update == 2 and self.counter is None:
            optimizers = trainer.optimizers
            self.counter = OpCounter(host_tensors=optimizer_step_counters(optimizers)).__enter__()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.counter is not None and module.update == 3:
            self.counter.__exit__(None, None, None)
            trainer.should_stop = True


@pytest.mark.parametrize("chunks", [1, 2])
def test_a_wflow_update_of_a_tiny_dit_never_reads_the_device(digits_dir, chunks):
    """The hot path of a W-Flow update (class bank, conditioning, DiT generator, second batch, guidance, transport,
    loss, backward, optimizer, EMA, non-finite check) issues no host synchronization, counted by the benchmark's
    mode; the optimizer's step counters are host tensors on a GPU too."""
    cfg = compose_config([f"paths.data_dir={digits_dir.parent}", *TINY, "model=dit_tiny", "model.patch=4",
                          f"batch.label_chunks={chunks}", "optim.impl=fused"])
    dm = build.build_datamodule(cfg)
    module = build.build_module(cfg, dm.shape, dm.num_classes)
    module.defer_finite_check = True  # the accelerator path (and the transport's, below)
    count = _CountOneUpdate()
    with as_on_accelerator():
        L.Trainer(accelerator="cpu", devices=1, max_epochs=-1, max_steps=-1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1000,
                  callbacks=[count]).fit(module, datamodule=dm)
    assert count.counter is not None and count.counter.ops > 500  # it counted a real update
    assert count.counter.syncs == 0, dict(count.counter.sync_counts)


def test_bank_push_without_host_reads_follows_the_ring_rule():
    """The vectorized push equals the per-class loop (each class keeps its latest samples, slots in arrival order)
    and reads nothing from the device."""
    g = torch.Generator().manual_seed(0)
    bank, reference = ClassBank(5, 6, (2,)), ClassBank(5, 6, (2,))
    for _ in range(7):
        labels = torch.randint(0, 5, (6,), generator=g)
        x = torch.randn(6, 2, generator=g)
        with OpCounter() as counter:
            bank.push(x, labels)
        assert counter.syncs == 0
        for c in labels.unique().tolist():  # the rule, written out
            for row in x[labels == c]:
                reference.data[c, reference.count[c] % 6] = row
                reference.count[c] += 1
    assert torch.equal(bank.count, reference.count) and torch.equal(bank.data, reference.data)
    fp16 = ClassBank(2, 4, (3,), dtype=torch.float16)
    fp16.push(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    assert fp16.data.dtype == torch.float16 and fp16.sample(None, 2, g).dtype == torch.float32


def test_non_finite_loss_is_recorded_on_the_device_and_reported_before_a_save():
    module = build.build_module(compose_config(["experiment=toy2d_wflow"]), (2,), 0)
    module.defer_finite_check = True
    module._host_update = 7
    module.update_count.fill_(7)
    with OpCounter() as counter:
        module._check_finite("generator loss", gen_loss=torch.tensor(float("nan")), prox=torch.tensor(0.0))
        module._check_finite("generator loss", gen_loss=torch.tensor(1.0), prox=torch.tensor(0.0))
    assert counter.syncs == 0
    with pytest.raises(FloatingPointError, match="non-finite generator loss at update 7.*last.ckpt"):
        module.raise_if_nonfinite()


def test_ddp_and_optimizer_settings_follow_the_method(tmp_path):
    for method, unused in (("wflow", False), ("kl", True)):
        cfg = compose_config(["experiment=gwf_2d", f"method={method}", "trainer=ddp", "trainer.accelerator=cpu"])
        trainer = build.build_trainer(cfg, tmp_path, [], [])
        assert trainer.strategy._ddp_kwargs["find_unused_parameters"] is unused
        assert trainer.strategy._ddp_kwargs["gradient_as_bucket_view"] is True
    w = torch.nn.Parameter(torch.ones(3))
    for impl, key in (("fused", "fused"), ("foreach", "foreach")):
        opt, _ = OptimConfig(impl=impl).build([w])
        assert opt.defaults[key] is True
    assert OptimConfig().build([w], "cuda")[0].defaults["fused"] is True  # auto: fused on CUDA
    assert OptimConfig().build([w], "cpu")[0].defaults["foreach"] is True  # auto: foreach on the CPU
    with pytest.raises(ValueError, match="optim.impl"):
        OptimConfig(impl="jit").build([w])


@pytest.mark.parametrize("name,extra", [("adam", {"betas": (0.5, 0.9)}), ("adamw", {"weight_decay": 0.01}),
                                        ("rmsprop", {"alpha": 0.9, "weight_decay": 1e-3})])
def test_foreach_optimizers_equal_the_per_parameter_loop_bit_for_bit(name, extra):
    """optim.impl=auto on the CPU (foreach) changes no value: 300 steps of an MLP under a varying LR schedule end with
    the parameters of torch's per-parameter implementation (foreach=False), bit for bit."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.SiLU(), torch.nn.Linear(64, 2))
    nets = [copy.deepcopy(net) for _ in range(2)]
    config = OptimConfig(name=name, lr=2e-3, warmup_steps=50, schedule="cosine", eta_min=1e-4,
                         **{k: v for k, v in extra.items() if k != "alpha"}, alpha=extra.get("alpha", 0.99))
    built = [config.build(nets[0].parameters(), "cpu", 300)]
    loop_opt = config.build(nets[1].parameters(), "cpu", 300)
    for group in loop_opt[0].param_groups:
        group["foreach"] = False  # torch's per-parameter loop
    built.append(loop_opt)
    assert built[0][0].defaults["foreach"] is True
    g = torch.Generator().manual_seed(1)
    for _ in range(300):
        x = torch.randn(128, 2, generator=g)
        for model, (opt, sched) in zip(nets, built):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
            sched.step()
    for a, b in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(net.parameters()), next(nets[0].parameters()))  # it trained


def test_ema_update_is_one_foreach_lerp_with_the_warm_up_decay():
    """ema <- d_n ema + (1 - d_n) raw with d_n = min(decay, (1 + n) / (10 + n)), for every parameter in one
    _foreach_lerp_ (no per-parameter op), while the raw weights require grad."""
    from gwf.ema import EMA

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    ema = EMA(model, decay=0.9)
    before = [p.detach().clone() for p in ema.model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.set_num_updates(20)  # d = min(0.9, 21 / 30) = 0.7
    with OpCounter() as counter:
        ema.update(model)
    assert counter.op_counts["_foreach_lerp_"] == 1 and counter.ops <= 3, counter.op_counts
    for old, new, raw in zip(before, ema.model.parameters(), model.parameters()):
        torch.testing.assert_close(new, 0.7 * old + 0.3 * raw.detach(), rtol=1e-6, atol=1e-7)
    assert int(ema.num_updates) == 21 and ema.current_decay() == pytest.approx(22 / 31)


def test_model_compile_gives_the_eager_training_run(digits_dir, tmp_path):
    """model.compile=true (generator and JKO copy through torch.compile, in place) trains as the eager networks do:
    fp64, 3 updates with the JKO term, the same generator, EMA, bank and optimizer moments to 1e-6 absolute (the
    fp32 transport rounds the two fp64 outputs' last-bit differences: about 5e-8 measured, against weight changes
    above 1e-4); the checkpoint's keys are the eager module's (a compiled run's checkpoint loads anywhere)."""
    base = [f"paths.data_dir={digits_dir.parent}", *TINY, "trainer.precision=64-true", "method.features=null",
            "jko.tau=0.5"]
    train(compose_config(base), tmp_path / "eager")
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    train(compose_config([*base, "model.compile=true"]), tmp_path / "compiled")
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames  # Dynamo did compile the networks
    a, b = _generator_state(tmp_path / "eager"), _generator_state(tmp_path / "compiled")
    assert a.keys() == b.keys() and not any("_orig_mod" in k for k in b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-6, msg=k)
    L.seed_everything(0)  # as train() does before building: the initial generator
    initial = build.build_module(compose_config(base), (1, 8, 8), 10).generator.out.weight.double()
    assert (a["generator.out.weight"] - initial).abs().max() > 1e-4  # the updates moved the generator


def test_model_compile_modes():
    """auto compiles on CUDA only; true everywhere (the generator and the JKO copy, not the EMA copy); other values
    are refused when the module is built."""
    module = build.build_module(compose_config([*TINY, "model.compile=auto", "jko.tau=0.5"]), (1, 8, 8), 10)
    assert not module.compile_networks("cpu") and not module.compiled
    assert module.compile_networks("cuda") and module.generator._compiled_call_impl is not None
    assert module.jko.previous._compiled_call_impl is not None and module.ema.model._compiled_call_impl is None
    module = build.build_module(compose_config([*TINY, "model.compile=true"]), (1, 8, 8), 10)
    assert module.compile_networks("cpu")
    with pytest.raises(ValueError, match="model.compile must be false, true or auto"):
        build.build_module(compose_config([*TINY, "model.compile=yes"]), (1, 8, 8), 10)


def test_cosine_schedule_and_rmsprop_as_the_official_options():
    """optim.schedule=cosine is torch's CosineAnnealingLR over the run's optimizer steps (the official
    --lr_scheduler: T_max = all optimizer steps, eta_min), times the linear warm-up when there is one, and stays at
    eta_min after T; optim.name=rmsprop is torch's RMSprop with optim.alpha (the official --optimizer rms)."""
    import math

    w, v = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    opt, sched = OptimConfig(lr=1e-3, schedule="cosine", eta_min=1e-4).build([w], total_steps=10)
    ref_opt = torch.optim.Adam([v], lr=1e-3)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=10, eta_min=1e-4)
    for _ in range(10):
        assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-12)
        opt.step(), sched.step(), ref_opt.step(), ref.step()
    for _ in range(3):  # T reached: eta_min from here on
        assert opt.param_groups[0]["lr"] == pytest.approx(1e-4, rel=1e-12)
        opt.step(), sched.step()
    opt, sched = OptimConfig(lr=1.0, schedule="cosine", warmup_steps=4).build([w], total_steps=8)
    lrs = []
    for _ in range(8):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step(), sched.step()
    assert lrs == pytest.approx([min(1, (n + 1) / 4) * 0.5 * (1 + math.cos(math.pi * n / 8)) for n in range(8)])
    with pytest.raises(ValueError, match="needs the run's number of optimizer steps"):
        OptimConfig(schedule="cosine").build([w])
    with pytest.raises(ValueError, match="optim.schedule must be constant or cosine"):
        OptimConfig(schedule="step").build([w], total_steps=5)

    rms, _ = OptimConfig(name="rmsprop", lr=5e-5, alpha=0.9).build([w])
    assert isinstance(rms, torch.optim.RMSprop) and rms.defaults["alpha"] == 0.9 and rms.defaults["lr"] == 5e-5
    assert OptimConfig(name="rmsprop").build([w], "cuda")[0].defaults["foreach"] is True  # no fused RMSprop


def test_a_cosine_run_ends_each_optimizer_at_eta_min(tmp_path):
    """KL with a critic, 2 critic steps per update: the generator's cosine spans its 30 optimizer steps, the critic's
    its 60, so both end at their eta_min with the run."""
    cfg = compose_config(["experiment=gwf_2d", "loop.reals=shared", "method=kl", "jko.steps=1",
                          "jko.updates_first_step=30", "loop.critic_steps=2", "optim.schedule=cosine", "optim.eta_min=1e-5",
                          "critic_optim.schedule=cosine", "critic_optim.eta_min=2e-6", "eval.every_n_updates=1000",
                          "eval.num_samples=200", "logger=none", "trainer.enable_progress_bar=false", "threads=1"])
    assert train(cfg, tmp_path / "run")["finished"]
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    gen, critic = (s["param_groups"][0]["lr"] for s in ckpt["optimizer_states"])
    assert gen == pytest.approx(1e-5, rel=1e-9) and critic == pytest.approx(2e-6, rel=1e-9)
    assert [s["last_epoch"] for s in ckpt["lr_schedulers"]] == [30, 60]


def test_ema_without_warm_up_is_the_official_one():
    """ema_warmup=false: the shadow is the weights after the first update, then a constant decay (the official
    utils.EMA: cloned after the first optimizer step, then ema = decay ema + (1 - decay) raw)."""
    from gwf.ema import EMA

    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9, warmup=False)
    shadow = None
    for step in range(4):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(float(step + 1))
        ema.update(model)
        raw = [p.detach().clone() for p in model.parameters()]
        shadow = raw if shadow is None else [0.9 * s + 0.1 * r for s, r in zip(shadow, raw)]
        for s, e in zip(shadow, ema.model.parameters()):
            torch.testing.assert_close(e, s, rtol=1e-6, atol=1e-6)
    module = build.build_module(compose_config([*TINY, "ema_warmup=false"]), (1, 8, 8), 10)
    assert module.ema.warmup is False and module.ema.current_decay() == 0.0


def test_uniform_noise_is_the_official_default_option():
    """noise=uniform draws the generator's inputs from U[-1, 1]^d (the official --type_noise unif), from the same
    seeded stream as the Gaussian; other names are refused."""
    uniform = build.build_module(compose_config([*TINY, "noise=uniform"]), (1, 8, 8), 10)
    normal = build.build_module(compose_config(TINY), (1, 8, 8), 10)
    z = uniform.draw_inputs(20000, (4,), torch.Generator().manual_seed(3))
    assert z.min() >= -1 and z.max() < 1
    assert z.mean().abs() < 0.01 and z.var().item() == pytest.approx(1 / 3, rel=0.03)  # U[-1, 1]: mean 0, var 1/3
    expected = torch.rand(20000, 4, generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert torch.equal(z, expected)
    g = normal.draw_inputs(10, (4,), torch.Generator().manual_seed(3))
    assert torch.equal(g, torch.randn(10, 4, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="noise must be one of"):
        build.build_module(compose_config([*TINY, "noise=laplace"]), (1, 8, 8), 10)
    # a generator's normal tail (the official NCSN++ latent zz = randn next to uniform image noise)
    z = uniform.draw_inputs(20000, (7,), torch.Generator().manual_seed(4), normal_tail=3)
    assert z[:, :4].min() >= -1 and z[:, :4].max() < 1 and z[:, :4].var().item() == pytest.approx(1 / 3, rel=0.03)
    assert z[:, 4:].var().item() == pytest.approx(1.0, rel=0.03) and z[:, 4:].abs().max() > 3
    with pytest.raises(ValueError, match="normal_tail"):
        uniform.draw_inputs(2, (3, 2), torch.Generator(), normal_tail=1)


def test_jko_noise_start_uses_the_generators_identity_input():
    """jko.start=noise with a generator whose input is [image noise, latent]: T_0 returns the image part."""
    from gwf.jko import JKOProximal

    class TwoInput(torch.nn.Module):
        noise_shape, normal_tail = (6,), 2

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(()))

        def identity_input(self, z):
            return z[:, :4].view(-1, 1, 2, 2)

        def forward(self, z, labels=None, alpha=None):
            return self.w * z[:, :4].view(-1, 1, 2, 2) + z[:, 4:].sum(1).view(-1, 1, 1, 1)

    gen = TwoInput()
    prox = JKOProximal(gen, tau=0.5, start="noise")
    z = torch.randn(5, 6, generator=torch.Generator().manual_seed(0))
    x = gen(z)
    expected = (x - z[:, :4].view(-1, 1, 2, 2)).pow(2).flatten(1).sum(1).mean() / (2 * 0.5)
    torch.testing.assert_close(prox(x, z), expected)


def test_spectral_norm_critic_layers_have_unit_spectral_norm():
    """critic.spectral_norm=true: every linear layer of the critic is spectrally normalized (the official
    --use_sn); after 100 training-mode forwards (power iterations) each effective weight's largest singular value
    is 1 to 1e-3, against torch.linalg.matrix_norm(ord=2). Off by default."""
    from gwf.models.critics import build_critic

    torch.manual_seed(0)  # the weights and the power iteration's start: convergence speed depends on them
    critic = build_critic("mlp", spectral_norm=True, in_shape=[2], num_classes=0, out_dim=1, hidden=32, depth=3)
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    critic.train()
    for _ in range(100):
        critic(x, None)
    layers = [m for m in critic.modules() if isinstance(m, torch.nn.Linear)]
    assert layers and all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in layers)
    for m in layers:
        assert float(torch.linalg.matrix_norm(m.weight.detach(), ord=2)) == pytest.approx(1.0, abs=1e-3)
    plain = build_critic("mlp", in_shape=[2], num_classes=0, out_dim=1, hidden=32, depth=3)
    assert not any(torch.nn.utils.parametrize.is_parametrized(m) for m in plain.modules())
    cfg = compose_config(["experiment=gwf_2d", "method=kl", "critic.spectral_norm=true"])
    module = build.build_module(cfg, (2,), 0)
    assert any(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in module.objective.critic.modules())
