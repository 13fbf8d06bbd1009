"""The official GWF ``--divergence iMMD`` ([GWF] losses.py ``loss_D``: ``-MMD2(d_real, d_fake, l=-1)``): the MMD GAN
whose critic maximizes mean k(phi(q), phi(q')) - mean k(phi(p), phi(p')), the MMD^2 without its cross term and with
the data's self-similarity negated; the generator still minimizes the MMD^2."""

from __future__ import annotations

from torch import Tensor

from gwf.objectives.mmd_gan import MMDGAN


class InverseMMD(MMDGAN):
    """MMDGAN (same arguments) with the cross-term-free critic objective above."""

    estimate = "immd"

    def critic_value(self, e_real: Tensor, e_gen: Tensor, z: Tensor | None) -> Tensor:
        return self.divergence(e_real, e_gen, l=-1.0)
