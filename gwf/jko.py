"""The parametric JKO step, written once for every objective ([GWF] Eq. 25; tau and lambda2 in docs/conventions.md):

    theta_{k+1} = argmin_theta  F(G_theta # mu0) + 1/(2 tau) E_z || G_theta(z) - G_{theta_k}(z) ||^2

tau None is the "no JKO" baseline.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import Tensor, nn

from gwf.schedule import JKOSchedule  # noqa: F401  (its home before; torch-free now)


# Where the first JKO step measures its transport from: the initial generator; the noise itself (T_0 = identity);
# or fresh standard normal noise of the data's shape drawn at every step, independent of z (the official GWF first
# step for flat-latent generators, train.py ``netT_old = lambda x: noise_sampler_old.sample()``).
STARTS = ("generator", "noise", "fresh_noise")
# The frozen copy's mode: the generator's (default: equal weights give a zero term, batch norm included) or always
# eval (batch norm with running statistics), as the official GWF train.py (``netT_old.eval()``).
PREVIOUS_MODES = ("generator", "eval")


def tau_from_official_lambda2(lambda2: float, data_dim: int) -> float:
    """The official GWF code's ``--lambda2`` (transport term averaged over D dims, weight 1/lambda2) as our tau."""
    return lambda2 * data_dim / 2.0


def check_identity_start(noise_shape: tuple[int, ...], data_shape: tuple[int, ...]) -> None:
    """jko.start=noise takes T_0 = identity on the noise (or its image-shaped part): the sizes must agree."""
    if math.prod(noise_shape) != math.prod(data_shape):
        raise ValueError(f"jko.start=noise needs noise of the data's size (T_0 = identity), got noise {noise_shape} "
                         f"for data {data_shape}: set model.noise_dim to the data dimension or jko.start=generator")


class JKOProximal(nn.Module):
    """Frozen previous generator G_{theta_k} and the proximal term 1/(2 tau) E ||G_theta(z) - G_theta_k(z)||^2."""

    def __init__(self, generator: nn.Module, tau: float | None, start: str = "generator",
                 previous_mode: str = "generator"):
        super().__init__()
        if tau is not None and not tau > 0:
            raise ValueError(f"jko.tau must be > 0 (or null for no JKO term), got {tau}")
        if start not in STARTS:
            raise ValueError(f"jko.start must be one of {STARTS}, got {start!r}")
        if previous_mode not in PREVIOUS_MODES:
            raise ValueError(f"jko.previous_mode must be one of {PREVIOUS_MODES}, got {previous_mode!r}")
        self.tau, self.previous_mode = tau, previous_mode
        # No copy at all for tau = None: the baseline carries no extra state.
        self.previous = self._frozen_copy(generator) if tau is not None else None
        # start="noise": T_0 = identity on z, or on the image-shaped part a generator's identity_input(z) returns (needs
        # noise of the data's size). A buffer, so checkpoints taken before
        # and after the first refresh have the same keys.
        self.register_buffer("from_noise", torch.tensor(start in ("noise", "fresh_noise")))
        self._host_from_noise: bool | None = start in ("noise", "fresh_noise")  # host copy; None: re-read
        self.fresh = start == "fresh_noise"

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._host_from_noise = None

    @staticmethod
    def _frozen_copy(generator: nn.Module) -> nn.Module:
        prev = copy.deepcopy(generator)
        prev.requires_grad_(False)
        return prev.eval()

    @torch.no_grad()
    def refresh(self, generator: nn.Module) -> None:
        """G_{theta_k} <- G_theta (end of an outer step)."""
        if self.previous is None:
            return
        self.from_noise.fill_(False)
        self._host_from_noise = False
        torch._foreach_copy_(list(self.previous.parameters()), list(generator.parameters()))
        buffers = list(self.previous.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(generator.buffers()))

    def forward(self, x: Tensor, *gen_inputs, train_mode: bool = True, rng: torch.Generator | None = None) -> Tensor:
        """Scalar proximal term (0 when tau is None) for ``x = G_theta(*gen_inputs)``: the SAME inputs go through
        the frozen copy, in the generator's mode ``train_mode`` (so equal weights give 0 with batch norm too), or in
        eval mode with ``previous_mode="eval"``. Before the first refresh with ``start="fresh_noise"`` the previous
        outputs are N(0, I) of x's shape drawn from ``rng``."""
        if self.previous is None:
            return x.new_zeros(())
        with torch.no_grad():
            if self._host_from_noise is None:
                self._host_from_noise = bool(self.from_noise)
            if self._host_from_noise and self.fresh:
                x_prev = torch.randn(x.shape, generator=rng, device=x.device, dtype=torch.float32)
            elif self._host_from_noise:
                z = gen_inputs[0]
                if hasattr(self.previous, "identity_input"):  # the generator's image-shaped part of z (NCSN++)
                    z = self.previous.identity_input(z)
                check_identity_start(tuple(z.shape[1:]), tuple(x.shape[1:]))
                x_prev = z.reshape(x.shape)
            else:
                x_prev = self.previous.train(train_mode and self.previous_mode == "generator")(*gen_inputs)
        sq = (x.float() - x_prev.float()).pow(2).flatten(1).sum(1)  # [B] squared distances over all dims
        return sq.mean() / (2.0 * self.tau)
