"""Data: shards (format, writer), the DataModule that streams them, the embedded digits, image folders, SD-VAE latents.

``PREPARERS``: ``data.prepare`` name -> ``prepare(root: Path)``, run when shards are missing (images and latents need
a source folder, so theirs raise with the command to run). ``TRANSFORMS``: ``data.transform`` name -> per-sample
loader transform (stored x -> model x). Imports are lazy (PEP 562) so that gwf-prepare's workers skip Lightning and
scikit-learn.
"""

import importlib
from pathlib import Path

from gwf.data.latents import LatentDecoder, LatentMoments
from gwf.data.shards import read_samples, write_shards

_LAZY = {"ShardDataModule": "gwf.data.datamodule", "DigitClassifier": "gwf.data.digits",
         "load_classifier": "gwf.data.digits", "load_digits_split": "gwf.data.digits",
         "prepare_digits": "gwf.data.digits"}


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

__all__ = ["PREPARERS", "TRANSFORMS", "DigitClassifier", "LatentDecoder", "LatentMoments", "ShardDataModule",
           "load_classifier", "load_digits_split", "prepare_digits", "read_samples", "write_shards"]
