"""The official MAE recipe's pixel augmentation path, for ``gwf-train-encoder --augment pixel``.

The Drifting release trains its MAEs (configs/mae/latent_640.yaml, latent_ablation_256.yaml, pixel_640.yaml:
``use_aug: true``, ``use_cache: false``) on images augmented in pixel space as each batch is read
(dataset/dataset.py ``_build_transforms``): torchvision's ``RandomResizedCrop(256, scale=(0.2, 1.0))`` with bicubic
interpolation (default ratio (3/4, 4/3)), then ``RandomHorizontalFlip()`` (p = 1/2), pixels to [-1, 1]. The latent
MAEs (``use_latent: true``) then see the SD-VAE encoding of the augmented image, one posterior sample times 0.18215
(dataset/vae.py ``vae_enc_decode``: ``dist.sample(key=rng) * 0.18215``); the pixel MAE sees the pixels.

gwf's data are shards, so the path starts from what they hold:

- pixel shards (``gwf-prepare images``, digits) are augmented directly; with a VAE they are then encoded (the latent
  MAE's path), without one the MAE trains on the augmented pixels (the pixel MAE's path);
- latent shards hold the VAE moments of the ADM centre crop, not the image: the latents are decoded to pixels
  (``vae.decode(z / scale)``, clamped to [-1, 1] as real pixels are), augmented, and encoded again.

Per sample, the draws come in torchvision's order from one generator (crop box as
``RandomResizedCrop.get_params``, then the flip's ``rand(1) < p``), and the posterior noise after the whole batch's
boxes: with a generator seeded s this is exactly what torchvision's transforms and diffusers' ``latent_dist.sample()``
compute after ``torch.manual_seed(s)`` (tests/test_features_augment.py), up to the clamp below. The resize runs on
float tensors (bicubic with antialiasing, torchvision's tensor path, clamped to [-1, 1]); the official code resizes
the uint8 PIL image, which rounds to 1/255.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from gwf.constants import SD_VAE_LATENT_SCALE

CROP_SCALE = (0.2, 1.0)  # RandomResizedCrop(scale=(0.2, 1.0)), dataset/dataset.py
CROP_RATIO = (3 / 4, 4 / 3)  # torchvision's default, which the official transform keeps
FLIP_PROB = 0.5  # RandomHorizontalFlip()'s default
AUGMENTATIONS = ("none", "pixel")


def crop_box(height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float],
             generator: torch.Generator) -> tuple[int, int, int, int]:  # fmt: skip
    """(top, left, h, w) of a random crop of area fraction ~U(scale) and log aspect ratio ~U(log ratio): torchvision's
    ``RandomResizedCrop.get_params``, draws and float32 rounding included, from ``generator``; after 10 rejected
    draws, the largest centre crop within the ratio bounds."""
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        aspect = torch.exp(torch.empty(1).uniform_(float(log_ratio[0]), float(log_ratio[1]),
                                                   generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class PixelAugmentation:
    """RandomResizedCrop(size, scale, ratio, bicubic) then a horizontal flip with probability ``flip_prob``, per
    sample, on float pixels x [B, C, H, W] in [-1, 1] -> [B, C, size, size] (``size`` None: H x W, the official
    resolution being the data's); a resized crop is clamped to [-1, 1], as the official uint8 image clips the bicubic
    overshoot. ``scale = ratio = (1, 1)`` and ``flip_prob = 0`` is the identity."""

    scale: tuple[float, float] = CROP_SCALE
    ratio: tuple[float, float] = CROP_RATIO
    flip_prob: float = FLIP_PROB
    size: int | None = None

    def __post_init__(self):
        scale, ratio = tuple(map(float, self.scale)), tuple(map(float, self.ratio))
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"--crop-scale must be MIN MAX with 0 < MIN <= MAX (official 0.2 1.0), got {scale}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"--crop-ratio must be MIN MAX with 0 < MIN <= MAX (official 0.75 1.3333), got {ratio}")
        if not 0 <= self.flip_prob <= 1:
            raise ValueError(f"--flip-prob must be in [0, 1] (official 0.5), got {self.flip_prob}")
        if self.size is not None and self.size < 1:
            raise ValueError(f"--crop-size must be a positive side in pixels (or unset: the data's), got {self.size}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)

    def out_size(self, height: int, width: int) -> tuple[int, int]:
        return (height, width) if self.size is None else (self.size, self.size)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        B, C, H, W = x.shape
        oh, ow = self.out_size(H, W)
        out = x.new_empty(B, C, oh, ow)
        for b in range(B):
            top, left, h, w = crop_box(H, W, self.scale, self.ratio, generator)
            crop = x[b, :, top:top + h, left:left + w]
            if (h, w) != (oh, ow):  # torchvision returns a crop of the output size as it is
                crop = F.interpolate(crop[None], size=(oh, ow), mode="bicubic", align_corners=False,
                                     antialias=True)[0].clamp(-1, 1)  # the overshoot the uint8 image clips
            if torch.rand(1, generator=generator) < self.flip_prob:  # RandomHorizontalFlip draws even at p = 0
                crop = crop.flip(-1)
            out[b] = crop
        return out


class PixelPath:
    """What the MAE trains on under ``--augment pixel``: a batch of the data [B, C, H, W] (pixels in [-1, 1], or
    latents z = scale * VAE sample) -> the augmentation in pixel space -> the VAE's posterior sample times ``scale``
    (with a VAE) or the augmented pixels (without). ``vae``: a diffusers AutoencoderKL (gwf.data.latents.load_vae),
    run in float32 without gradient, ``vae_batch_size`` samples at a time; latent data need it to be decoded."""

    def __init__(self, augmentation: PixelAugmentation, data_shape, vae=None, scale: float = SD_VAE_LATENT_SCALE,
                 vae_batch_size: int = 64):  # fmt: skip
        self.augmentation, self.scale, self.vae_batch_size = augmentation, float(scale), int(vae_batch_size)
        self.vae = vae
        C, H, W = (int(s) for s in data_shape)
        if vae is None:
            self.input = "pixels"
        else:
            pixel_channels, latent_channels = int(vae.config.in_channels), int(vae.config.latent_channels)
            if C == latent_channels and C != pixel_channels:
                self.input = "latents"
            elif C == pixel_channels and C != latent_channels:
                self.input = "pixels"
            else:
                raise ValueError(f"the data have {C} channels; the VAE takes {pixel_channels}-channel images and "
                                 f"makes {latent_channels}-channel latents: pass pixel or latent shards of this VAE")
        self.factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        side = (H * self.factor, W * self.factor) if self.input == "latents" else (H, W)
        oh, ow = augmentation.out_size(*side)
        if vae is not None and (oh % self.factor or ow % self.factor):
            raise ValueError(f"the augmented images are {oh}x{ow}, not a multiple of the VAE's downsampling factor "
                             f"{self.factor}: pass --crop-size as a multiple of {self.factor}")
        channels = int(vae.config.latent_channels) if vae is not None else C
        self.shape = (channels, oh // self.factor, ow // self.factor)  # what the MAE sees

    def settings(self) -> dict:
        """What a resumed run must share (recorded in the checkpoint)."""
        return {**asdict(self.augmentation), "input": self.input, "encode": self.vae is not None,
                "latent_scale": self.scale if self.vae is not None else None}

    @torch.no_grad()
    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """x [B, *data_shape] -> [B, *self.shape] float32; every draw from ``generator`` (a CPU generator)."""
        x = x.float()
        if self.input == "latents":
            x = torch.cat([self.vae.decode(c / self.scale).sample.clamp(-1, 1)
                           for c in x.split(self.vae_batch_size)])
        x = self.augmentation(x, generator)
        if self.vae is None:
            return x
        # one posterior sample z = mean + std * eps per image (diffusers DiagonalGaussianDistribution.sample), eps
        # drawn for the whole batch after the crops, times the SD-VAE scale (official dataset/vae.py)
        eps = torch.randn(x.shape[0], *self.shape, generator=generator).to(x.device)
        out = []
        for c, e in zip(x.split(self.vae_batch_size), eps.split(self.vae_batch_size)):
            post = self.vae.encode(c).latent_dist
            out.append(self.scale * (post.mean + post.std * e))
        return torch.cat(out)
