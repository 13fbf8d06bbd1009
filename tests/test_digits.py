"""The embedded digits set (prepare_digits), its classifier and the digits metrics (DigitsEvaluator)."""

import json
import os
import shutil
import time

import numpy as np
import math

import pytest
import torch
from sklearn.datasets import load_digits

import gwf  # noqa: F401
from gwf.constants import DIGITS_SHAPE
from gwf.data import ShardDataModule, load_classifier, load_digits_split, prepare_digits, read_samples
from gwf.data.digits import MANIFEST_FILE, _is_complete
from gwf.eval import DigitsEvaluator


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("digits")
    t0 = time.perf_counter()
    prepare_digits(root)
    print(f"prepare_digits: {time.perf_counter() - t0:.1f} s")
    return root


@pytest.fixture(scope="session")
def evaluator(digits_root):
    return DigitsEvaluator(digits_root)


def _manifest(root):
    return json.loads((root / MANIFEST_FILE).read_text())


def test_counts_and_stratified_split(digits_root):
    manifest = _manifest(digits_root)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    assert (train["count"], val["count"]) == (1437, 360) and train["count"] + val["count"] == 1797
    assert train["shards"] == [f"train-{i:06d}.tar" for i in range(4)] and val["shards"] == ["val-000000.tar"]
    per_class = np.bincount(load_digits().target, minlength=10)
    assert np.array_equal(np.array(train["class_counts"]) + val["class_counts"], per_class)
    assert np.all(np.abs(np.array(val["class_counts"]) - 0.2 * per_class) <= 1)  # stratified: 20% of each class
    x_val, y_val = load_digits_split(digits_root, "val")
    assert x_val.shape == (360, *DIGITS_SHAPE)
    assert np.bincount(y_val.numpy(), minlength=10).tolist() == val["class_counts"]


def test_stored_values_are_exact(digits_root):
    samples = list(read_samples(str(digits_root / "train-{000000..000003}.tar")))
    assert len(samples) == 1437 and samples[123][0] == "digits-train-000123"
    x = np.stack([s[1] for s in samples])
    assert x.dtype == np.float16 and x.shape == (1437, *DIGITS_SHAPE)
    intensity = (x.astype(np.float64) + 1) * 8  # stored x = intensity / 8 - 1, exact in fp16
    assert np.array_equal(intensity, np.round(intensity)) and intensity.min() == 0 and intensity.max() == 16
    x_val, _ = load_digits_split(digits_root, "val")
    total = intensity.sum() + ((x_val.double() + 1) * 8).sum().item()
    assert total == load_digits().images.sum()  # train + val hold exactly the 1797 images


def test_prepare_is_idempotent(digits_root, tmp_path):
    before = {p.name: p.stat().st_mtime_ns for p in digits_root.iterdir()}
    prepare_digits(digits_root)
    assert {p.name: p.stat().st_mtime_ns for p in digits_root.iterdir()} == before
    # a damaged copy is detected by its checksums (prepare_digits would rebuild it)
    copy = tmp_path / "copy"
    shutil.copytree(digits_root, copy)
    assert _is_complete(copy)
    with open(copy / "val-000000.tar", "r+b") as f:
        f.seek(700)
        f.write(b"\x01")
    assert not _is_complete(copy)


def test_classifier_accuracy(digits_root):
    manifest = _manifest(digits_root)
    assert manifest["classifier"]["val_accuracy"] >= 0.95
    model = load_classifier(digits_root / "classifier.pt")
    x_val, y_val = load_digits_split(digits_root, "val")
    with torch.no_grad():
        assert (model(x_val).argmax(1) == y_val).double().mean().item() == pytest.approx(
            manifest["classifier"]["val_accuracy"]
        )
        assert model.features(x_val).shape == (360, 64)
    with pytest.raises(FileNotFoundError, match="prepare_digits"):
        load_classifier(digits_root / "missing.pt")


def test_evaluator_real_vs_noise(digits_root, evaluator):
    x_val, y_val = load_digits_split(digits_root, "val")
    real = evaluator.evaluate(x_val, y_val)
    assert real["class_acc"] >= 0.95
    assert real["fd"] == pytest.approx(evaluator.real_floor())
    g = torch.Generator().manual_seed(0)
    noise = evaluator.evaluate(torch.rand(360, *DIGITS_SHAPE, generator=g) * 2 - 1)
    assert noise["class_acc"] is None
    assert noise["fd"] > 20 * real["fd"]  # measured: val 1.9 vs uniform noise 242 (factor ~130)
    # dropping half of the classes (mode collapse) is far from the floor too
    assert evaluator.evaluate(x_val[y_val < 5])["fd"] > 10 * real["fd"]
    x_train, _ = load_digits_split(digits_root, "train")
    assert evaluator.evaluate(x_train)["fd"] == pytest.approx(0.0, abs=1e-6)  # the reference itself
    # labels that disagree with the images: class_acc ~ chance
    assert evaluator.evaluate(x_val, (y_val + 1) % 10)["class_acc"] < 0.05
    # class_kl against its formula: the classifier's class frequencies on val, and log 10 / log 2 for samples of one
    # digit / of two digits in equal numbers
    from gwf.eval.digits import class_kl

    freq = torch.bincount(evaluator._features_and_logits(x_val)[1].argmax(1), minlength=10).double() / len(x_val)
    assert real["class_kl"] == pytest.approx(float((freq * (10 * freq).log()).nansum()), rel=1e-9)
    assert real["class_kl"] < 0.01  # the val split is balanced (36 per digit) and classified 95%+ right
    assert class_kl(torch.full((50,), 3), 10) == pytest.approx(math.log(10))
    assert class_kl(torch.tensor([1, 7] * 20), 10) == pytest.approx(math.log(5))
    assert evaluator.evaluate(x_val[y_val < 5])["class_kl"] > 0.5  # half the digits missing: about log 2


def test_evaluator_input_checks(evaluator):
    with pytest.raises(ValueError, match=r"x_gen must be \[N >= 2, 1, 8, 8\]"):
        evaluator.evaluate(torch.zeros(10, 64))
    with pytest.raises(ValueError, match="labels must be"):
        evaluator.evaluate(torch.zeros(10, *DIGITS_SHAPE), torch.zeros(9))
    diverged = torch.full((10, *DIGITS_SHAPE), float("nan"))
    assert all(np.isnan(v) for v in evaluator.evaluate(diverged, torch.zeros(10)).values())


def test_datamodule_on_digits(digits_root):
    dm = ShardDataModule(
        train_shards=str(digits_root / "train-{000000..000003}.tar"),
        val_shards=str(digits_root / "val-000000.tar"),
        shape=list(DIGITS_SHAPE), dtype="float16", num_classes=10, batch_size=64, num_workers=0,
        shuffle_buffer=256, epoch_size=256, prepare="digits", root=str(digits_root),
    )  # fmt: skip
    mtimes = {p.name: p.stat().st_mtime_ns for p in digits_root.iterdir()}
    dm.prepare_data()  # everything present: nothing rewritten
    assert {p.name: p.stat().st_mtime_ns for p in digits_root.iterdir()} == mtimes
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, *DIGITS_SHAPE) and x.min() >= -1 and x.max() <= 1
    assert torch.equal(x * 8, (x * 8).round())
    assert os.path.samefile(dm.urls("val")[0], digits_root / "val-000000.tar")


def test_unconditional_digits_run_evaluates_fd_and_class_kl(digits_dir, tmp_path):
    """experiment=digits_gwf_sweep (unconditional digits, a critic objective) trains and evaluates: fd and
    class_kl in eval.csv, no class accuracy (no labels to compare with)."""
    import csv

    from gwf.train import train
    from tests.conftest import compose_config

    cfg = compose_config(["experiment=digits_gwf_sweep", "method=kl_dv", "jko.steps=2", "jko.updates_per_step=10",
                          "eval.every_n_updates=10", "eval.num_samples=100", "logger=none"],
                         data_dir=digits_dir.parent, runs_dir=tmp_path / "runs")
    summary = train(cfg, tmp_path / "run")
    assert summary["last"]["update"] == 20
    with open(tmp_path / "run" / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["update"]) for r in rows] == [0, 10, 20] and set(rows[0]) == {"update", "fd", "class_kl"}
    assert all(0 <= float(r["class_kl"]) <= math.log(10) + 1e-9 for r in rows)


def test_evaluation_over_a_list_of_alphas_logs_each_and_the_best(digits_dir, tmp_path):
    """eval.alpha=[1, 2, 3] (the official cfg_list sweep): every metric at every alpha on the same noise, and the
    first metric's best (fd: the lowest) with its alpha; the single-alpha evaluation equals the list's entry."""
    import csv

    from gwf.train import train
    from tests.conftest import compose_config

    common = ["jko.updates_per_step=20", "eval.every_n_updates=20", "eval.num_samples=100", "logger=none",
              "trainer.enable_progress_bar=false"]
    cfg = compose_config([*common, "eval.alpha=[1.0,2.0,3.0]"], data_dir=digits_dir.parent, runs_dir=tmp_path / "r")
    train(cfg, tmp_path / "list")
    with open(tmp_path / "list" / "eval.csv") as f:
        rows = list(csv.DictReader(f))
    last = {k: float(v) for k, v in rows[-1].items()}
    fds = {a: last[f"fd@{a}"] for a in ("1", "2", "3")}
    assert {f"class_acc@{a}" for a in ("1", "2", "3")} <= last.keys()
    assert last["fd_best"] == min(fds.values()) and fds[f"{last['alpha_best']:g}"] == last["fd_best"]
    one = compose_config([*common, "eval.alpha=2.0"], data_dir=digits_dir.parent, runs_dir=tmp_path / "r")
    train(one, tmp_path / "one")
    with open(tmp_path / "one" / "eval.csv") as f:
        single = list(csv.DictReader(f))
    assert float(single[-1]["fd"]) == pytest.approx(fds["2"], rel=1e-6)  # same weights, same noise
    with pytest.raises(ValueError, match="eval.alpha"):
        from gwf.callbacks import EvalCallback

        EvalCallback(lambda: None, alpha=[0.5])
