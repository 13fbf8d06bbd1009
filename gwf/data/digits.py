"""The embedded default image set: scikit-learn's 8x8 digits (1797 images, shipped with sklearn, no download),
and the small classifier whose penultimate features define the digits Frechet distance (gwf/eval/digits.py).

    python -m gwf.data.digits --root data/digits     # what data.prepare=digits runs

writes under root: train-{000000..000003}.tar (1437 samples), val-000000.tar (360), classifier.pt, manifest.json.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import Tensor, nn
from tqdm import tqdm

from gwf.constants import DIGITS_DTYPE, DIGITS_MAX_INTENSITY, DIGITS_NUM_CLASSES, DIGITS_SHAPE, LABEL_KEY, TENSOR_KEY
from gwf.data.shards import (atomic_write, collate, read_json, read_samples, sha256_file, shard_pattern, write_json,
                             write_shards)

DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DIGITS_TRAIN_SHARDS = 4
CLASSIFIER_FILE = "classifier.pt"
MANIFEST_FILE = "manifest.json"


class DigitClassifier(nn.Module):
    """Small convnet on [B, 1, 8, 8] digits in [-1, 1]: logits [B, 10], penultimate features [B, feature_dim]."""

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = DIGITS_NUM_CLASSES):
        super().__init__()
        self.config = dict(width=width, feature_dim=feature_dim, num_classes=num_classes)
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),  # [B, 2w, 4, 4]
            nn.Flatten(),
            nn.Linear(2 * width * 16, feature_dim), nn.ReLU(),
        )  # fmt: skip
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        """x [B, 1, 8, 8] -> [B, feature_dim], the activations the classification head reads."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def load_classifier(path: str | Path, map_location: str | torch.device = "cpu") -> DigitClassifier:
    """The classifier saved by ``prepare_digits``, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"digit classifier {path.absolute()} not found; create it with prepare_digits(root) "
                                f"(`python -m gwf.data.digits --root {path.parent}`)")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    model = DigitClassifier(**ckpt["config"])
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def _random_shift(x: Tensor, g: torch.Generator) -> Tensor:
    """Translate each image by up to one pixel, filling with the background value -1: cheap augmentation that
    makes the features depend on the digit's shape rather than its exact position."""
    B = x.shape[0]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1), value=-1.0)  # [B, 1, 10, 10]
    dy, dx = torch.randint(0, 3, (2, B), generator=g)
    rows = (dy[:, None] + torch.arange(8))[:, :, None]  # [B, 8, 1]
    cols = (dx[:, None] + torch.arange(8))[:, None, :]  # [B, 1, 8]
    return padded[torch.arange(B)[:, None, None], 0, rows, cols][:, None]


def train_classifier(x_train: Tensor, y_train: Tensor, x_val: Tensor, y_val: Tensor, *, epochs: int = 20,
                     batch_size: int = 64, lr: float = 2e-3, seed: int = 0) -> tuple[DigitClassifier, float]:
    """Train on CPU (a few seconds); returns the model in eval mode and its val accuracy."""
    threads = torch.get_num_threads()
    # One thread: the ops are tiny and OpenMP threads spin-wait on a busy machine; a fixed count also makes the
    # weights bit-reproducible across machines.
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(seed)
        with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's global RNG
            torch.manual_seed(seed)
            model = DigitClassifier()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        steps = epochs * -(-len(x_train) // batch_size)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
        model.train()
        for _ in tqdm(range(epochs), desc="training digit classifier", unit="epoch"):
            for idx in torch.randperm(len(x_train), generator=g).split(batch_size):
                loss = nn.functional.cross_entropy(model(_random_shift(x_train[idx], g)), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
        model.eval()
        with torch.no_grad():
            acc = (model(x_val).argmax(1) == y_val).double().mean().item()
    finally:
        torch.set_num_threads(threads)
    return model, acc


def read_manifest(root: str | Path) -> dict | None:
    return read_json(Path(root) / MANIFEST_FILE)


def _is_complete(root: Path) -> bool:
    """manifest.json present and every file it lists present with its checksum."""
    manifest = read_manifest(root)
    if manifest is None:
        return False
    return all((root / name).is_file() and sha256_file(root / name) == sha for name, sha in manifest["sha256"].items())


def digits_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{"train"/"val": (x float16 [N, 1, 8, 8] in [-1, 1], y int64 [N])}, the fixed stratified split."""
    digits = load_digits()
    x = (digits.images / (DIGITS_MAX_INTENSITY / 2) - 1).astype(DIGITS_DTYPE)[:, None]  # [1797, 1, 8, 8]
    y = digits.target.astype(np.int64)
    idx_train, idx_val = train_test_split(
        np.arange(len(y)), test_size=DIGITS_VAL_FRACTION, stratify=y, random_state=DIGITS_SPLIT_SEED
    )
    return {split: (x[np.sort(idx)], y[np.sort(idx)]) for split, idx in (("train", idx_train), ("val", idx_val))}


def prepare_digits(root: str | Path) -> None:
    """Write the digits shards, train the classifier and write manifest.json under ``root``. Idempotent (nothing to
    do when manifest.json and its files, sha256 checked, are present) and deterministic on a given machine."""
    root = Path(root)
    if _is_complete(root):
        return
    t0 = time.perf_counter()
    arrays = digits_arrays()
    splits = {}
    for split, num_shards in (("train", DIGITS_TRAIN_SHARDS), ("val", 1)):
        x, y = arrays[split]
        per_shard = -(-len(y) // num_shards)
        samples = ((f"digits-{split}-{i:06d}", x[i], int(y[i])) for i in range(len(y)))
        paths = write_shards(samples, root, split, per_shard, total=len(y))
        splits[split] = dict(count=len(y), class_counts=np.bincount(y, minlength=DIGITS_NUM_CLASSES).tolist(),
                             pattern=shard_pattern(split, len(paths)), shards=[p.name for p in paths])

    tensors = {split: (torch.from_numpy(x).float(), torch.from_numpy(y)) for split, (x, y) in arrays.items()}
    (x_train, y_train), (x_val, y_val) = tensors["train"], tensors["val"]
    model, val_acc = train_classifier(x_train, y_train, x_val, y_val)
    buf = io.BytesIO()
    torch.save({"config": model.config, "state_dict": model.state_dict(), "val_accuracy": val_acc}, buf)
    atomic_write(lambda f: f.write(buf.getvalue()), root / CLASSIFIER_FILE)

    files = [name for s in splits.values() for name in s["shards"]] + [CLASSIFIER_FILE]
    manifest = dict(
        dataset="scikit-learn digits (load_digits)",
        format=dict(shape=list(DIGITS_SHAPE), dtype=DIGITS_DTYPE, tensor_key=TENSOR_KEY, label_key=LABEL_KEY,
                    encoding=f"x = intensity / {DIGITS_MAX_INTENSITY / 2:g} - 1, intensity in 0..16"),
        split=dict(val_fraction=DIGITS_VAL_FRACTION, stratified=True, random_state=DIGITS_SPLIT_SEED),
        splits=splits,
        classifier=dict(file=CLASSIFIER_FILE, val_accuracy=val_acc, **model.config),
        seconds=round(time.perf_counter() - t0, 2),
        sha256={name: sha256_file(root / name) for name in files},
    )  # fmt: skip
    write_json(root / MANIFEST_FILE, manifest)


def load_digits_split(root: str | Path, split: str) -> tuple[Tensor, Tensor]:
    """x float32 [N, 1, 8, 8], y int64 [N] of a prepared split, in shard order."""
    root = Path(root)
    manifest = read_manifest(root)
    if manifest is None:
        raise FileNotFoundError(f"{(root / MANIFEST_FILE).absolute()} not found: run prepare_digits(root) "
                                f"(`python -m gwf.data.digits --root {root}`)")
    x, y = collate(list(read_samples([str(root / name) for name in manifest["splits"][split]["shards"]])))
    return x.float(), y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/digits", help="output directory (default: data/digits)")
    root = Path(parser.parse_args().root)
    prepare_digits(root)
    manifest = read_manifest(root)
    print(f"digits ready in {root}: " + ", ".join(f"{k} {v['count']}" for k, v in manifest["splits"].items())
          + f"; classifier val accuracy {manifest['classifier']['val_accuracy']:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
