"""Evaluation: Frechet distance (frechet), the digits metrics (digits), 2D metrics (toy2d), and FID / IS / KID /
precision-recall through torch-fidelity (fidelity; import it explicitly: it loads torch-fidelity)."""

from gwf.eval.digits import DigitsEvaluator
from gwf.eval.frechet import feature_statistics, frechet_distance

__all__ = ["DigitsEvaluator", "feature_statistics", "frechet_distance"]
