"""The official GWF ``--divergence ckMMD`` ([GWF] losses.py, kernels.py ``LearnedKernelDiag``, after CKGAN): the critic
embeds samples in the generator's noise space and the learned kernel compares each input z_i with an embedding,
pair by pair: critic loss mean_i [k(z_i, phi(G(z_i))) - k(z_i, phi(x_i))] (x_i a real sample, unpaired with z_i),
generator loss -mean_i k(z_i, phi(G(z_i))). The embedding's width must equal the noise's (flat noise)."""

from __future__ import annotations

from torch import Tensor, nn

from gwf.objectives.base import GenBatch
from gwf.objectives.mmd_gan import MMDGAN


class CKMMD(MMDGAN):
    """MMDGAN (same arguments; kernel ``learned`` only) with the aligned-pair losses above."""

    uses_noise = True
    estimate = "ckmmd"

    def __init__(self, critic: nn.Module, **kwargs):
        super().__init__(critic, **kwargs)
        if not self.critic.learned:
            raise ValueError("ckmmd compares pairs with the learned kernel: set method.kernel=learned")
        if self.critic.embedding_dim is None:
            raise ValueError("ckmmd embeds samples in the noise space: set method.embedding_dim to the generator's "
                             "noise width (model.noise_dim)")

    def _noise(self, z: Tensor | None, e: Tensor) -> Tensor:
        """z [L*N, *noise_shape] as [L, N, E], checked against the embeddings e [L, N, E]."""
        if z is None:
            raise ValueError("ckmmd needs the generator's inputs z (the trainer passes them)")
        z = z.reshape(e.shape[0], e.shape[1], -1)
        if z.shape[2] != e.shape[2]:
            raise ValueError(f"ckmmd pairs the noise z ({z.shape[2]} values per sample) with the critic's embedding "
                             f"({e.shape[2]}): set method.embedding_dim to the noise width (model.noise_dim)")
        return z.detach()

    def critic_value(self, e_real: Tensor, e_gen: Tensor, z: Tensor | None) -> Tensor:
        z = self._noise(z, e_gen)
        k = min(e_real.shape[1], z.shape[1])  # real x_i paired with z_i; unpaired in distribution
        kernel = self.critic.mixture.aligned
        return kernel(z[:, :k], e_real[:, :k]).mean(1) - kernel(z, e_gen).mean(1)

    def generator_value(self, e_real: Tensor, e_gen: Tensor, gen: GenBatch) -> Tensor:
        return -self.critic.mixture.aligned(self._noise(gen.z, e_gen), e_gen).mean(1)
