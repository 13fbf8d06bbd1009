"""SD-VAE latents: loading the VAE (diffusers ``AutoencoderKL``), posterior moments of an image and its flip, the
loader transform that draws z from them, and the decoder for sample grids. Shards store unscaled moments: the scale
multiplies only in ``LatentMoments`` and divides only in ``LatentDecoder`` (data/README.md).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gwf._compat import require
from gwf.constants import LATENT_MOMENTS_DTYPE, SD_VAE_LATENT_SCALE, SD_VAE_RESOLUTION
from gwf.data.images import Item, load_image
from gwf.seeding import derive_seed
from gwf.data.shards import sha256_files

_HUB_ID = re.compile(r"^[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+$")  # "stabilityai/sd-vae-ft-mse"


def _not_found(vae: str, why: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"SD-VAE {vae!r}: {why}. Nothing is downloaded at run time here (no network). On a machine with internet, "
        "fetch it once, e.g. `huggingface-cli download stabilityai/sd-vae-ft-mse --local-dir /path/sd-vae-ft-mse` "
        "(or a Stable Diffusion folder, whose VAE is in its vae/ subfolder), then pass --vae /path/sd-vae-ft-mse "
        "(and --subfolder vae for a full pipeline folder); --allow-download lets diffusers fetch a hub id itself."
    )


def _source(vae: str | Path, subfolder: str | None, allow_download: bool) -> dict:
    """from_pretrained keyword arguments for a local folder or a hub id; a clear error when neither can load."""
    vae = str(vae)
    path = Path(vae).expanduser()
    if path.is_dir():
        folder = path / subfolder if subfolder else path
        if not (folder / "config.json").is_file():
            hint = " (it has vae/config.json: pass --subfolder vae)" if (path / "vae" / "config.json").is_file() else ""
            raise _not_found(vae, f"{folder} holds no config.json{hint}")
        return dict(pretrained_model_name_or_path=str(path), subfolder=subfolder, local_files_only=True)
    if path.exists() or not _HUB_ID.match(vae):
        raise _not_found(vae, f"{path.absolute()} is not a directory")
    return dict(pretrained_model_name_or_path=vae, subfolder=subfolder, local_files_only=not allow_download)


def vae_config(vae: str | Path, subfolder: str | None = None, allow_download: bool = False) -> dict:
    """The VAE's config.json (no weights loaded): checks the path early, in the parent process."""
    AutoencoderKL = require("diffusers", "the SD-VAE (latents)").AutoencoderKL

    kwargs = _source(vae, subfolder, allow_download)
    try:
        return dict(AutoencoderKL.load_config(kwargs.pop("pretrained_model_name_or_path"), **kwargs))
    except OSError as e:
        raise _not_found(str(vae), f"not a local folder and not in the Hugging Face cache ({e.__class__.__name__})")


def load_vae(vae, subfolder: str | None = None, allow_download: bool = False):
    """``diffusers.AutoencoderKL`` from a local folder or a (cached) hub id, in eval mode (an instance passes)."""
    AutoencoderKL = require("diffusers", "the SD-VAE (latents)").AutoencoderKL

    if isinstance(vae, AutoencoderKL):
        return vae.eval()
    try:
        kwargs = _source(vae, subfolder, allow_download)
        return AutoencoderKL.from_pretrained(**kwargs, low_cpu_mem_usage=False).eval()  # no `accelerate` needed
    except OSError as e:
        raise _not_found(str(vae), f"cannot load it ({e})") from e


def random_vae(block_out_channels=(128, 256, 512, 512), layers_per_block: int = 2, latent_channels: int = 4,
               norm_num_groups: int = 32, seed: int = 0):
    """A randomly initialized ``AutoencoderKL``: the SD-VAE architecture by default (same compute as the real one, for
    benchmarks), or a tiny one for tests, e.g. ``random_vae((32, 32, 32, 32), 1)`` (also downsamples by 8)."""
    AutoencoderKL = require("diffusers", "the SD-VAE (latents)").AutoencoderKL

    n = len(block_out_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                            block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                            latent_channels=latent_channels, norm_num_groups=norm_num_groups)
    return vae.eval()


def latent_shape(config: dict, resolution: int) -> tuple[int, int, int]:
    """(C, h, w) of the latents of a ``resolution``^2 image: each down block but the last halves the side."""
    factor = 2 ** (len(config["block_out_channels"]) - 1)
    if resolution % factor:
        raise ValueError(f"--resolution {resolution} is not a multiple of the VAE's downsampling factor {factor}")
    return int(config["latent_channels"]), resolution // factor, resolution // factor


def weights_sha256(vae: str | Path, subfolder: str | None) -> str | None:
    """sha256 over the weight files of a local VAE folder (None for a hub id): part of the encoder id."""
    folder = Path(vae).expanduser() / (subfolder or "")
    weights = {".safetensors", ".bin", ".ckpt"}
    files = sorted(p for p in folder.glob("*") if p.suffix in weights) if folder.is_dir() else []
    if not files:
        return None
    return sha256_files(files)


@torch.no_grad()
def encode_moments(vae, x: Tensor) -> Tensor:
    """x [B, 3, H, W] in [-1, 1] -> float32 [B, 2 (original, flipped), 2 (mean, std), C, h, w].

    The posterior is N(mean, diag(std^2)) (diffusers ``DiagonalGaussianDistribution``: logvar clamped to [-30, 20]);
    the flipped view is the encoding of x.flip(-1), not the flip of the encoding.
    """
    B = x.shape[0]
    post = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
    moments = torch.stack([post.mean, post.std], dim=1).float()  # [2B, 2, C, h, w]
    return torch.stack([moments[:B], moments[B:]], dim=1)


class LatentShards:
    """What ``gwf-prepare latents`` writes per sample: (key, moments float16 [2, 2, C, h, w], label)."""

    kind = "latents"

    def __init__(self, vae, subfolder=None, resolution=SD_VAE_RESOLUTION, batch_size=32, allow_download=False,
                 decode_threads=4):  # fmt: skip
        self.vae, self.subfolder, self.resolution = str(vae), subfolder, int(resolution)
        self.batch_size, self.allow_download, self.decode_threads = int(batch_size), allow_download, int(decode_threads)
        self.config = vae_config(self.vae, subfolder, allow_download)  # fails here, early, on a bad path
        self.shape = latent_shape(self.config, self.resolution)
        self.weights = weights_sha256(self.vae, subfolder)
        self.model, self.device = None, "cpu"

    def settings(self) -> dict:
        """Everything that determines the bytes of a shard (part of each shard's fingerprint)."""
        return dict(vae=self.vae, subfolder=self.subfolder, weights_sha256=self.weights, resolution=self.resolution,
                    crop="adm_center_crop", moments="mean,std of the image and of its horizontal flip")  # fmt: skip

    def describe(self) -> dict:
        """The manifest's format entry."""
        return dict(
            shape=[2, 2, *self.shape], dtype=LATENT_MOMENTS_DTYPE, latent_shape=list(self.shape),
            layout="[view (0 original, 1 horizontal flip), moment (0 mean, 1 std), C, h, w], unscaled",
            scale=SD_VAE_LATENT_SCALE, vae_config_scaling_factor=self.config.get("scaling_factor"),
            encoder=dict(vae=self.vae, subfolder=self.subfolder, weights_sha256=self.weights,
                         cls=self.config.get("_class_name"), latent_channels=self.config["latent_channels"]),
        )  # fmt: skip

    def setup(self, device: str) -> None:
        self.device = device
        self.model = load_vae(self.vae, self.subfolder, self.allow_download).to(device)

    def samples(self, items: list[Item], keys: list[str], on_item=lambda n: None):
        """(iterator of (key, moments, label) of the decodable images, list of undecodable paths filled as it runs)."""
        corrupt: list[str] = []

        def gen():
            with ThreadPoolExecutor(self.decode_threads) as pool:  # PIL decodes outside the GIL
                for start in range(0, len(items), self.batch_size):
                    chunk = list(zip(items[start : start + self.batch_size], keys[start : start + self.batch_size]))
                    pixels = list(pool.map(lambda ik: load_image(ik[0][0], self.resolution), chunk))
                    corrupt.extend(path for ((path, _), _), p in zip(chunk, pixels) if p is None)
                    good = [(key, label, p) for ((_, label), key), p in zip(chunk, pixels) if p is not None]
                    if good:
                        x = torch.from_numpy(np.stack([p for _, _, p in good])).to(self.device).float() / 127.5 - 1
                        moments = encode_moments(self.model, x).cpu().numpy().astype(LATENT_MOMENTS_DTYPE)
                        yield from ((key, m, label) for (key, label, _), m in zip(good, moments))
                    on_item(len(chunk))

        return gen(), corrupt


LATENT_SAMPLINGS = ("resample", "fixed")


class LatentMoments:
    """Loader transform (``data.transform: latent_moments``): stored moments [2, 2, *shape] -> z float32 [*shape].

    z = scale * (mean_v + std_v * eps), eps ~ N(0, I), view v in {original, flipped} picked with probability 1/2
    (``flip=False``: always the original). ``sampling``: ``resample`` draws a new eps at every load; ``fixed`` uses one
    eps per sample, seeded by its key and the same for both views: one stored posterior sample per image and its
    flip, as the official W-Flow cache (hudsonchen/riesz_flow_hudson dataset/latent.py: the flip encoded with the same
    generator state, a view picked at random at each load).
    """

    def __init__(self, scale: float = SD_VAE_LATENT_SCALE, flip: bool = True, sampling: str = "resample"):
        if sampling not in LATENT_SAMPLINGS:
            raise ValueError(f"data.transform_args.sampling must be one of {LATENT_SAMPLINGS}, got {sampling!r}")
        self.scale, self.flip, self.sampling = float(scale), bool(flip), sampling

    def stored_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (2, 2, *shape)

    def __call__(self, moments: np.ndarray, rng: np.random.Generator, key: str | None = None) -> np.ndarray:
        view = int(rng.integers(2)) if self.flip else 0
        mean, std = moments[view].astype(np.float32)
        if self.sampling == "fixed":
            if key is None:
                raise ValueError("sampling='fixed' draws each sample's eps from its key: pass key")
            eps = np.random.default_rng(derive_seed("latent-eps", key)).standard_normal(mean.shape, dtype=np.float32)
        else:
            eps = rng.standard_normal(mean.shape, dtype=np.float32)
        return self.scale * (mean + std * eps)


class LatentDecoder:
    """``LatentDecoder(vae_path).decode(z)``: scaled latents z [B, C, h, w] (the generator's output) -> images
    float32 [B, 3, H, W] in [-1, 1] on the CPU, as vae.decode(z / scale) in chunks of ``batch_size``."""

    def __init__(self, vae, subfolder=None, device="cpu", scale=SD_VAE_LATENT_SCALE, batch_size=32,
                 allow_download=False):  # fmt: skip
        self.vae = load_vae(vae, subfolder, allow_download).to(device)
        self.device, self.scale, self.batch_size = torch.device(device), float(scale), int(batch_size)

    def to(self, device) -> "LatentDecoder":
        """The VAE on ``device`` (decoding runs there); returns self."""
        device = torch.device(device)
        if device != self.device:
            self.vae.to(device)
            self.device = device
        return self

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        if z.ndim != 4 or z.shape[1] != self.vae.config.latent_channels:
            raise ValueError(
                f"latents must be [B, {self.vae.config.latent_channels}, h, w] for this VAE, got {list(z.shape)}"
            )
        out = [self.vae.decode(c.to(self.device, torch.float32) / self.scale).sample for c in z.split(self.batch_size)]
        return torch.cat(out).clamp(-1, 1).cpu()
