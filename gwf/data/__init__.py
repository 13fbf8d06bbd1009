"""Data: the shard format and writer (shards), the DataModule that streams shards (datamodule), the embedded digits
set (digits), image folders (images) and SD-VAE latents (latents).

``PREPARERS`` maps a ``data.prepare`` name to ``prepare(root: Path) -> None``, run when shards are missing. Image
and latent shards need a source folder the config does not know: their entries say which command makes them.
``TRANSFORMS`` maps a ``data.transform`` name to the per-sample loader transform (stored x -> model x).

Imports are lazy (PEP 562): ``gwf-prepare`` worker processes import gwf.data.images / latents without paying for
Lightning and scikit-learn (several seconds per process).
"""

import importlib
from pathlib import Path

from gwf.data.latents import LatentDecoder, LatentMoments
from gwf.data.shards import read_samples, write_shards

_LAZY = {
    "ShardDataModule": "gwf.data.datamodule",
    "DigitClassifier": "gwf.data.digits",
    "load_classifier": "gwf.data.digits",
    "load_digits_split": "gwf.data.digits",
    "prepare_digits": "gwf.data.digits",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gwf.data' has no attribute {name!r}")


def _prepare_digits(root: Path) -> None:
    from gwf.data.digits import prepare_digits

    prepare_digits(root)


def _made_by_command(kind: str):
    def prepare(root: Path) -> None:
        raise FileNotFoundError(
            f"the {kind} shards under {Path(root).absolute()} are missing; make them from your image folder with "
            f"`gwf-prepare {kind} --src IMAGE_FOLDER --out {root}`"
            + (" --vae SD_VAE_FOLDER" if kind == "latents" else "")
            + " (see data/README.md), then set data.train_shards to the pattern it prints"
        )

    return prepare


PREPARERS = {"digits": _prepare_digits, "images": _made_by_command("images"), "latents": _made_by_command("latents")}
TRANSFORMS = {"latent_moments": LatentMoments}

__all__ = [
    "PREPARERS",
    "TRANSFORMS",
    "DigitClassifier",
    "LatentDecoder",
    "LatentMoments",
    "ShardDataModule",
    "load_classifier",
    "load_digits_split",
    "prepare_digits",
    "read_samples",
    "write_shards",
]
