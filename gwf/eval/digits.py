"""Digits metrics: Frechet distance in the digit classifier's penultimate features (an FID for 8x8 digits) and
class accuracy of conditional samples. Needs ``prepare_digits(root)``. FD depends on N: compare runs at equal N.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gwf.constants import DIGITS_SHAPE
from gwf.data.digits import CLASSIFIER_FILE, load_classifier, load_digits_split
from gwf.eval.frechet import feature_statistics, frechet_distance


def class_kl(predicted: Tensor, num_classes: int) -> float:
    """KL(p || uniform) of the class frequencies p of ``predicted`` [N] labels: sum_c p_c log(C p_c), 0 log 0 = 0."""
    p = torch.bincount(predicted, minlength=num_classes).double() / len(predicted)
    p = p[p > 0]
    return float((p * (p * num_classes).log()).sum())


class DigitsEvaluator:
    """Reference statistics are those of the train split, computed once at construction."""

    def __init__(self, root: str | Path, device: str | torch.device = "cpu", batch_size: int = 2048):
        self.root, self.device, self.batch_size = Path(root), torch.device(device), batch_size
        self.classifier = load_classifier(self.root / CLASSIFIER_FILE, map_location=self.device)
        x_train, _ = load_digits_split(self.root, "train")
        self.mu_ref, self.sigma_ref = feature_statistics(self._features_and_logits(x_train)[0])
        self._floor: float | None = None

    @torch.no_grad()
    def _features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [N, 1, 8, 8] -> features float64 [N, 64] (on CPU), logits [N, 10]."""
        feats, logits = [], []
        for chunk in x.split(self.batch_size):
            f = self.classifier.features(chunk.to(self.device, torch.float32))
            feats.append(f.double().cpu())
            logits.append(self.classifier.head(f).cpu())
        return torch.cat(feats), torch.cat(logits)

    def evaluate(self, x_gen: Tensor | np.ndarray, labels: Tensor | np.ndarray | None = None) -> dict:
        """x_gen [N, 1, 8, 8] in [-1, 1] (N >= 2), labels [N] conditioning classes or None.

        Returns {"fd": Frechet distance to the train features, "class_acc": fraction of samples classified as
        their label (None without labels), "class_kl": KL(predicted class frequencies || uniform), 0 when the
        classifier finds every digit equally often, log 10 when it finds one digit only (mode coverage of
        unconditional samples)}; nan when x_gen has non-finite values (diverged generator).
        """
        x_gen = torch.as_tensor(x_gen)
        if tuple(x_gen.shape[1:]) != DIGITS_SHAPE or x_gen.shape[0] < 2:
            raise ValueError(f"x_gen must be [N >= 2, {', '.join(map(str, DIGITS_SHAPE))}], got {list(x_gen.shape)}")
        if labels is not None:
            labels = torch.as_tensor(labels).long().cpu()
            if labels.shape != (x_gen.shape[0],):
                raise ValueError(f"labels must be [N={x_gen.shape[0]}], got {list(labels.shape)}")
        if not torch.isfinite(x_gen).all():
            return {"fd": float("nan"), "class_acc": None if labels is None else float("nan"), "class_kl": float("nan")}
        feats, logits = self._features_and_logits(x_gen)
        fd = frechet_distance(*feature_statistics(feats), self.mu_ref, self.sigma_ref)
        predicted = logits.argmax(1)
        class_acc = None if labels is None else (predicted == labels).double().mean().item()
        return {"fd": fd, "class_acc": class_acc, "class_kl": class_kl(predicted, logits.shape[1])}

    def real_floor(self) -> float:
        """FD of the real val images against the train reference: what a perfect generator scores at N = 360."""
        if self._floor is None:
            x_val, _ = load_digits_split(self.root, "val")
            self._floor = self.evaluate(x_val)["fd"]
        return self._floor
