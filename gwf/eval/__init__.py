"""Evaluation: Frechet distance (frechet) and the digits metrics (digits)."""

from gwf.eval.digits import DigitsEvaluator
from gwf.eval.frechet import feature_statistics, frechet_distance

__all__ = ["DigitsEvaluator", "feature_statistics", "frechet_distance"]
