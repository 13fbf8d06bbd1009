"""Data: the shard format and writer (shards), the DataModule that streams shards (datamodule), and the
embedded digits set (digits). ``PREPARERS`` maps a ``data.prepare`` name to ``prepare(root: Path) -> None``."""

from gwf.data.datamodule import ShardDataModule
from gwf.data.digits import DigitClassifier, load_classifier, load_digits_split, prepare_digits
from gwf.data.shards import read_samples, write_shards

PREPARERS = {"digits": prepare_digits}

__all__ = [
    "PREPARERS",
    "DigitClassifier",
    "ShardDataModule",
    "load_classifier",
    "load_digits_split",
    "prepare_digits",
    "read_samples",
    "write_shards",
]
