"""End to end: the entry point on the digits shards and on a 2D mixture; JKO keeps the generator near its previous
copy; bad input gives clear errors."""

import json

import lightning as L
import pytest
import torch
from hydra.errors import InstantiationException

from gwf.build import build_module
from gwf.train import train
from tests.conftest import compose_config


def _digits_overrides(digits_dir, *extra):
    return [f"paths.data_dir={digits_dir.parent}", "data.num_workers=0", "trainer.enable_progress_bar=false", *extra]


def _csv_steps(path):
    import csv

    with open(path) as f:
        return [row["step"] for row in csv.DictReader(f)]


def test_digits_short_run_writes_outputs_and_resumes(digits_dir, tmp_path):
    cfg = compose_config(_digits_overrides(digits_dir, "jko.updates_first_step=40", "eval.every_n_updates=20",
                                           "eval.num_samples=200", "checkpoint.every_n_updates=20"))
    run_dir = tmp_path / "run"
    summary = train(cfg, run_dir)
    assert summary["first"]["update"] == 0 and summary["last"]["update"] == 40
    for name in ["checkpoints/last.ckpt", "metrics.csv", "eval.csv", "eval_curves.png", "samples/final.png",
                 "config.yaml"]:
        assert (run_dir / name).exists(), name
    ckpt = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["hyper_parameters"]["config"]["method"]["name"] == "wflow"  # composed config travels with it
    assert int(ckpt["state_dict"]["update_count"]) == 40
    logged_steps = _csv_steps(run_dir / "metrics.csv")
    # a relaunch of the same command resumes and finds nothing left to do, and keeps the metric history
    again = train(cfg, run_dir)
    assert _csv_steps(run_dir / "metrics.csv")[: len(logged_steps)] == logged_steps
    assert again["last"]["update"] == 40
    ckpt2 = torch.load(run_dir / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert torch.equal(ckpt2["state_dict"]["generator.out.weight"], ckpt["state_dict"]["generator.out.weight"])


def test_wflow_lowers_sinkhorn_divergence_on_2d_mixture(tmp_path):
    cfg = compose_config(["experiment=toy2d_wflow", "jko.steps=2", "jko.updates_per_step=300",
                          "eval.every_n_updates=300", "trainer.enable_progress_bar=false"])
    summary = train(cfg, tmp_path / "toy")
    first, last = summary["first"]["sinkhorn_div"], summary["last"]["sinkhorn_div"]
    assert last < first / 10, (first, last)
    assert (tmp_path / "toy" / "trajectories.png").exists()  # particle paths across the 3 evaluations


def _displacement(cfg, tau, updates):
    cfg.jko.tau = tau
    L.seed_everything(0)
    from gwf.data.toy2d import Toy2DDataModule

    dm = Toy2DDataModule(target="8gaussians", batch_size=256)
    module = build_module(cfg, dm.shape, 0)
    trainer = L.Trainer(max_steps=updates, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=dm)
    z = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        initial = module.jko.previous(z) if tau is not None else None
        return module.generator(z), initial


def test_small_tau_keeps_generator_near_previous_copy():
    cfg = compose_config(["experiment=toy2d_wflow", "jko.steps=1", "jko.updates_first_step=1000"])
    x_free, _ = _displacement(cfg, None, 60)
    x_jko, x_prev = _displacement(cfg, 1e-3, 60)  # prev = the initial generator (the outer step is not over)
    # same initialization (seeded), so x_prev is also the free run's starting point
    moved_free = ((x_free - x_prev) ** 2).sum(1).mean()
    moved_jko = ((x_jko - x_prev) ** 2).sum(1).mean()
    assert moved_jko < 0.05 * moved_free, (float(moved_jko), float(moved_free))


def test_bad_tau_and_unknown_names_are_clear_errors(digits_dir, tmp_path):
    with pytest.raises(ValueError, match="tau must be > 0"):
        train(compose_config(_digits_overrides(digits_dir, "jko.tau=0")), tmp_path / "a")
    with pytest.raises(InstantiationException, match="unknown 2D target 'spiral'; choose one of"):
        train(compose_config(["experiment=toy2d_wflow", "data.target=spiral"]), tmp_path / "b")


def test_wrong_shape_names_the_shard(digits_dir, tmp_path):
    cfg = compose_config(_digits_overrides(digits_dir, "data.shape=[1,4,4]", "jko.updates_first_step=5"))
    with pytest.raises(Exception, match=r"train-00000\d\.tar") as info:
        train(cfg, tmp_path / "c")
    assert "(1, 4, 4)" in str(info.value) or "[1, 4, 4]" in str(info.value)


def test_missing_shards_without_preparer(tmp_path):
    cfg = compose_config([f"paths.data_dir={tmp_path}/none", "data.prepare=null"])
    with pytest.raises(FileNotFoundError, match="none/digits/train"):
        train(cfg, tmp_path / "d")


def test_non_finite_loss_stops_with_a_clear_message():
    cfg = compose_config(["experiment=toy2d_wflow"])
    module = build_module(cfg, (2,), 0)
    with pytest.raises(FloatingPointError, match="non-finite generator loss at update 0.*last.ckpt"):
        module._check_finite("generator loss", gen_loss=torch.tensor(float("nan")), prox=torch.tensor(0.0))
    module._check_finite("generator loss", gen_loss=torch.tensor(1.0))  # finite: no error


def test_wandb_logger_runs_offline_without_credentials(tmp_path, monkeypatch):
    from gwf.loggers import wandb_has_credentials, wandb_run_id

    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "toy"))
    assert not wandb_has_credentials()
    cfg = compose_config(["experiment=toy2d_wflow", "logger=wandb", "jko.steps=1", "jko.updates_first_step=10",
                          "trainer.enable_progress_bar=false"])
    train(cfg, tmp_path / "toy")
    runs = list((tmp_path / "toy" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and runs[0].name.endswith(wandb_run_id(tmp_path / "toy"))
    assert wandb_run_id(tmp_path / "toy") == wandb_run_id(tmp_path / "toy")  # a resumed run reuses the id


def test_a_fresh_start_archives_the_earlier_run_and_gets_a_new_wandb_id(tmp_path):
    """ckpt_path=null in a run directory that holds a run: that run's files move to archive/1 (its metrics are not
    continued), the new run starts at update 0 and gets a new wandb id; a resume keeps the id; a later fresh start
    archives to archive/2."""
    from gwf.loggers import wandb_run_id

    run = tmp_path / "toy"
    base = ["experiment=toy2d_wflow", "jko.steps=1", "jko.updates_per_step=6", "eval.every_n_updates=6",
            "eval.num_samples=100", "checkpoint.every_n_updates=3", "trainer.enable_progress_bar=false"]
    train(compose_config(base), run)
    first_id = wandb_run_id(run)
    (run / "train.log").write_text("this launch's Hydra log\n")
    train(compose_config([*base, "ckpt_path=null", "jko.updates_per_step=3"]), run)
    archive = run / "archive" / "1"
    assert {p.name for p in archive.iterdir()} >= {"checkpoints", "config.yaml", "eval.csv", "metrics.csv"}
    assert json.loads((archive / "eval_summary.json").read_text())["last"]["update"] == 6
    assert json.loads((run / "eval_summary.json").read_text())["last"]["update"] == 3  # the new run, from 0
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows and all("6" != r.split(",")[0] for r in rows[1:])  # no row of the earlier run
    assert (run / "train.log").exists() and not (archive / "train.log").exists()  # this launch's log stays
    second_id = wandb_run_id(run)
    assert second_id != first_id
    train(compose_config([*base, "jko.updates_per_step=4"]), run)  # a resume: the same wandb run
    assert wandb_run_id(run) == second_id and not (run / "archive" / "2").exists()
    train(compose_config([*base, "ckpt_path=null"]), run)
    assert (run / "archive" / "2" / "checkpoints").is_dir() and wandb_run_id(run) not in (first_id, second_id)


def test_a_finished_run_returns_at_once_and_a_longer_schedule_continues(tmp_path, monkeypatch):
    """Relaunching a complete run reads checkpoints/finished.json and builds nothing; a longer schedule, or a
    last.ckpt written since, goes through training again."""
    import os

    from gwf import build

    run = tmp_path / "toy"
    base = ["experiment=toy2d_wflow", "jko.steps=1", "jko.updates_per_step=4", "eval.every_n_updates=4",
            "eval.num_samples=100", "trainer.enable_progress_bar=false"]
    first = train(compose_config(base), run)
    assert first["finished"] and (run / "checkpoints" / "finished.json").exists()

    def refuse(*a, **k):
        raise AssertionError("a finished run was built again")

    with monkeypatch.context() as m:
        m.setattr(build, "build_module", refuse)
        assert train(compose_config(base), run) == first
        last = run / "checkpoints" / "last.ckpt"
        os.utime(last, ns=(last.stat().st_atime_ns, last.stat().st_mtime_ns + 1))  # another last.ckpt since
        with pytest.raises(AssertionError, match="built again"):
            train(compose_config(base), run)
    longer = train(compose_config([*base, "jko.steps=2"]), run)
    assert longer["finished"] and longer["last"]["update"] == 8


def test_the_entry_point_imports_nothing_heavy():
    """gwf-train --help and a finished run's relaunch need neither torch nor Lightning (3.6 s of imports)."""
    import subprocess
    import sys

    code = "import gwf.train, sys; print(sorted(m for m in ('torch', 'lightning', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_optimizer_step_measures_the_gradient_norm_when_logged_or_clipping():
    """GWFModule._optimizer_step: without clipping, the global gradient norm is measured only for updates whose logs
    are written (``measure``), and the gradients reach the optimizer as they are; with clipping, always measured and
    the gradients scaled to ``grad_clip``. Norms against torch.linalg.vector_norm of all gradients."""
    from gwf.module import GWFModule

    def fresh():
        p = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
        p[0].grad, p[1].grad = torch.tensor([3.0, 0.0, 4.0]), torch.full((2, 2), 6.0)  # global norm 13
        opt = torch.optim.SGD(p, lr=1.0)
        return p, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda n: 1.0)

    step = GWFModule._optimizer_step
    p, opt, sched = fresh()
    assert step(None, opt, sched, p, None, measure=False) is None
    assert torch.equal(p[0].detach(), -torch.tensor([3.0, 0.0, 4.0]))  # SGD with lr 1: minus the untouched gradient
    p, opt, sched = fresh()
    norm = step(None, opt, sched, p, None, measure=True)
    assert float(norm) == pytest.approx(13.0) and torch.equal(p[1].detach(), torch.full((2, 2), -6.0))
    p, opt, sched = fresh()
    norm = step(None, opt, sched, p, 1.3, measure=False)
    assert float(norm) == pytest.approx(13.0)
    assert float(torch.linalg.vector_norm(torch.cat([q.detach().flatten() for q in p]))) == pytest.approx(1.3, rel=1e-5)


def test_the_updates_fast_paths_leave_every_parameter_bit_for_bit(tmp_path, monkeypatch):
    """The update's speed-ups (gwf/module.py) change no number: gradient norms measured only for logged updates
    (clipping at an infinite norm multiplies by exactly 1) and the critic's parameters left out of autograd in the
    generator's steps (Lightning's toggled_optimizer; their gradients were discarded by the next critic step's
    zero_grad). KL_DV with R1 and JKO on 2D, 2 JKO steps x 6 updates, against the former update (every norm, the
    critic in the generator's graph): generator, critic, EMA, frozen copy, bank and optimizer states equal, and
    the logged metrics."""
    import contextlib
    import csv

    from gwf.module import GWFModule

    args = ["experiment=gwf_2d", "jko.steps=2", "jko.updates_per_step=6", "data.batch_size=128",
            "batch.gen_per_label=64", "batch.pos_per_label=64", "batch.bank_capacity=128", "eval.num_samples=100",
            "eval.evaluator.num_samples=100", "eval.every_n_updates=100", "trainer.log_every_n_steps=4",
            "trainer.enable_progress_bar=false", "threads=1"]

    def run(name):
        train(compose_config(args), tmp_path / name)
        with open(tmp_path / name / "metrics.csv") as f:
            rows = [{k: v for k, v in r.items() if k != "eval/seconds"} for r in csv.DictReader(f)]
        return torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False), rows

    fast, fast_rows = run("fast")
    measure_always = GWFModule._optimizer_step
    monkeypatch.setattr(GWFModule, "_optimizer_step", lambda self, *a, measure=True: measure_always(self, *a))
    monkeypatch.setattr(GWFModule, "toggled_optimizer", lambda self, opt: contextlib.nullcontext())
    former, former_rows = run("former")
    assert fast["state_dict"].keys() == former["state_dict"].keys()
    for prefix in ("generator.", "objective.critic.", "ema.model.", "jko.previous.", "bank."):
        assert any(k.startswith(prefix) for k in fast["state_dict"]), prefix
    for k, v in fast["state_dict"].items():
        assert torch.equal(v, former["state_dict"][k]), k
    for a, b in zip(fast["optimizer_states"], former["optimizer_states"], strict=True):
        for pid, state in a["state"].items():
            for name, v in state.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][pid][name])), (pid, name)
    logged = [r for r in fast_rows if r.get("train/grad_norm_gen")]
    assert len(logged) == 3 and all(r["train/grad_norm_critic"] for r in logged)  # updates 4, 8 and 12
    assert fast_rows == former_rows


def test_an_unconditional_mlp_generator_equals_its_concatenating_form():
    """MLPGenerator without conditioning feeds each layer its input as is instead of concatenating an empty
    conditioning vector (a copy per layer): the same outputs and parameter gradients, to the last bit."""
    from gwf.models.mlp import MLPGenerator

    torch.manual_seed(0)
    gen = MLPGenerator([2], noise_dim=2, hidden=32, depth=3)
    z = torch.rand(64, 2) * 2 - 1
    out = gen(z)
    out.square().sum().backward()
    fast = [p.grad.clone() for p in gen.parameters()]
    gen.zero_grad()
    h, empty = z, z.new_zeros(64, 0)
    for layer in gen.layers:
        h = gen.act(layer(torch.cat([h, empty], dim=-1)))
    ref = gen.out(torch.cat([h, empty], dim=-1))
    ref.square().sum().backward()
    assert torch.equal(out, ref)
    assert all(torch.equal(a, p.grad) for a, p in zip(fast, gen.parameters(), strict=True))


def test_imports_run_without_the_garbage_collector_once_and_leave_it_as_found(monkeypatch):
    """The first import of Lightning in a process runs with gc off and freezes what it made; once Lightning is
    imported (the next job of an in-process sweep), nothing is frozen: that job's predecessor's garbage stays
    collectable."""
    import gc
    import sys

    from gwf.train import imports_without_gc

    assert "lightning" in sys.modules  # the test process has imported it
    frozen = gc.get_freeze_count()
    with imports_without_gc():
        assert gc.isenabled()
        made = [[] for _ in range(10)]
    assert gc.get_freeze_count() == frozen and made
    monkeypatch.delitem(sys.modules, "lightning")  # as in a fresh process
    for enabled in (True, False):
        (gc.enable if enabled else gc.disable)()
        with imports_without_gc():
            assert not gc.isenabled()
            made = [[] for _ in range(10)]
        assert gc.isenabled() is enabled and gc.get_freeze_count() >= frozen + len(made)
    gc.enable()
    gc.unfreeze()
