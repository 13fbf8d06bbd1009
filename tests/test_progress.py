"""Progress in updates: the bar's total is the run's updates with the JKO step in its description; with the bar off,
a line every tenth of the run; one line per evaluation; the run directory at the start."""

import logging
import re

import lightning as L

from gwf.train import train
from tests.conftest import compose_config

RUN = ["experiment=toy2d_wflow", "jko.steps=3", "jko.updates_per_step=10", "eval.every_n_updates=15",
       "eval.num_samples=200", "checkpoint.every_n_updates=30"]


def test_the_bar_counts_updates_and_shows_the_jko_step(tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="gwf")
    train(compose_config([*RUN, "trainer.enable_progress_bar=true"]), tmp_path / "run")
    out = capsys.readouterr()
    text = out.out + out.err
    assert re.search(r"JKO step 3/3: 100%.*30/30", text), text[-2000:]
    assert "Epoch" not in text  # the stream's virtual epochs are not shown
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == f"run directory: {tmp_path / 'run'}" or f"run directory: {tmp_path / 'run'}" in messages
    evals = [m for m in messages if m.startswith("evaluation at update")]
    assert [int(m.split()[3].rstrip(":")) for m in evals] == [0, 15, 30]
    assert "sinkhorn_div" in evals[-1] and "hq_rate" in evals[-1]


def test_without_the_bar_a_line_every_tenth_of_the_run(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="gwf")
    train(compose_config([*RUN, "trainer.enable_progress_bar=false"]), tmp_path / "run")
    lines = [r.getMessage() for r in caplog.records if re.match(r"update \d+/30", r.getMessage())]
    assert [int(m.split()[1].split("/")[0]) for m in lines] == [3, 6, 9, 12, 15, 18, 21, 24, 27, 30]
    assert lines[0].startswith("update 3/30 (JKO step 1/3)") and lines[-1].startswith("update 30/30 (JKO step 3/3)")
    assert all(m.endswith("updates/s") for m in lines)


def test_the_console_has_only_gwf_lines_and_real_warnings(tmp_path, caplog, recwarn):
    """Lightning's hardware summary, advertisement, seed line and weights_only notice, and the warnings gwf knows
    and answers, are dropped; a resumed run (which loads a checkpoint) too."""
    caplog.set_level(logging.INFO)
    cfg = compose_config([*RUN, "trainer.enable_progress_bar=false"])
    train(cfg, tmp_path / "run")
    train(compose_config([*RUN, "trainer.enable_progress_bar=false", "jko.steps=4"]), tmp_path / "run")
    noise = ("GPU available", "TPU available", "Tip:", "Seed set to", "weights_only")
    assert not [r.getMessage() for r in caplog.records if any(n in r.getMessage() for n in noise)]
    assert not [str(w.message) for w in recwarn if "IterableDataset" in str(w.message) or "LeafSpec" in str(w.message)]
    assert any(r.getMessage().startswith("resuming from") for r in caplog.records)


class CountUpdates(L.Callback):
    """A user's callback, given by the callbacks group: counts the training batches it sees."""

    seen = 0

    def __init__(self, every: int = 1):
        self.every = every

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        CountUpdates.seen += 1


def test_the_callbacks_group_adds_the_users_callbacks(tmp_path):
    CountUpdates.seen = 0
    train(compose_config([*RUN, "trainer.enable_progress_bar=false", "jko.steps=1",
                          "+callbacks.count._target_=tests.test_progress.CountUpdates", "+callbacks.count.every=2"]),
          tmp_path / "run")
    assert CountUpdates.seen >= 10  # every update's batch (and the bank's filling ones)
    cfg = compose_config(["callbacks=device_stats"])
    assert cfg.callbacks.device_stats._target_.endswith("DeviceStatsMonitor")


def test_each_evaluation_is_timed_and_one_over_budget_warns(tmp_path, caplog):
    """eval/seconds is logged at every evaluation; one longer than eval.max_seconds warns with what to do. Without
    max_seconds the budget is half the DDP collective timeout under DDP, and no limit on one process."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    from gwf.callbacks import EvalCallback

    caplog.set_level(logging.INFO, logger="gwf")
    train(compose_config([*RUN, "trainer.enable_progress_bar=false", "eval.max_seconds=0"]), tmp_path / "run")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert sum("over eval.max_seconds=0 s" in m and "eval.num_samples" in m for m in warnings) == 3  # 0, 15, 30
    with open(tmp_path / "run" / "metrics.csv") as f:
        header = f.readline().strip().split(",")
        seconds = [float(row.split(",")[header.index("eval/seconds")]) for row in f if row.split(",")[
            header.index("eval/seconds")]]
    assert len(seconds) == 3 and all(s > 0 for s in seconds)

    callback = EvalCallback(lambda: None)
    ddp = L.Trainer(accelerator="cpu", devices=2, strategy=DDPStrategy(timeout=timedelta(minutes=10)), logger=False)
    assert callback.budget(ddp) == 300.0 and callback.budget(L.Trainer(accelerator="cpu", logger=False)) is None
    assert EvalCallback(lambda: None, max_seconds=42).budget(ddp) == 42.0


def test_the_bar_redraws_at_most_every_min_interval_at_new_jko_steps_and_at_the_end():
    """A redraw per update cost 3% of a 2D run: the bar is drawn again after min_interval seconds, at a new JKO
    step's description, and at the last update, never in between."""
    from gwf.callbacks import UpdateProgress

    bar = UpdateProgress(min_interval=0.1)
    bar._drawn = (10.0, "JKO step 1/3")
    assert not bar.redraw_due(5, 30, "JKO step 1/3", 10.05)  # too soon, same step
    assert bar.redraw_due(6, 30, "JKO step 1/3", 10.2)  # min_interval elapsed
    assert bar.redraw_due(10, 30, "JKO step 2/3", 10.01)  # a new JKO step
    assert bar.redraw_due(30, 30, "JKO step 1/3", 10.0)  # the end
    assert UpdateProgress(min_interval=0).redraw_due(7, 30, "", 0.0)  # 0: every update (the old behaviour)


def test_the_run_pictures_are_redrawn_at_most_every_redraw_seconds_and_at_the_end(tmp_path):
    """eval_curves.png and trajectories.png: drawn at an evaluation when redraw_seconds have passed since the last
    drawing, skipped before, and always drawn when training ends (force); the particles are recorded every time."""
    import torch

    from gwf.callbacks import EvalCallback

    callback = EvalCallback(lambda: None, redraw_seconds=3600)
    callback.rows = [{"update": 0, "hq_rate": 0.0}, {"update": 10, "hq_rate": 0.5}]
    callback.particles = [torch.zeros(4, 2), torch.ones(4, 2)]
    callback._real_2d = torch.randn(50, 2)
    pictures = [tmp_path / "eval_curves.png", tmp_path / "trajectories.png"]
    callback._run_pictures(tmp_path, force=False)  # never drawn yet: due
    assert all(p.exists() for p in pictures)
    for p in pictures:
        p.unlink()
    callback.rows.append({"update": 20, "hq_rate": 0.7})
    callback._run_pictures(tmp_path, force=False)  # within the hour: skipped
    assert not any(p.exists() for p in pictures)
    callback._run_pictures(tmp_path, force=True)  # the end of training
    assert all(p.exists() for p in pictures)
    assert EvalCallback(lambda: None, redraw_seconds=0)._drawn_at == float("-inf")
