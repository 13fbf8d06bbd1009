"""A small masked autoencoder on latents, whose frozen encoder gives the feature sets of feature-space drift.

Architecture of the Drifting release's latent MAE ([DRIFT] App. A.3): a ResNet of basic blocks with GroupNorm on the
latent grid, a U-Net decoder, and a random mask of ``mask_patch`` x ``mask_patch`` latent patches; the loss is the
squared error on the masked entries. The defaults are smaller than the official encoders (one GPU).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gwf.constants import MAE_CHECKPOINT_FORMAT, MAE_ENCODER_FORMAT
from gwf.data.shards import atomic_write
from gwf.features.base import FeatureEncoder, map_feature_sets

_GN_MAX_GROUPS = 32


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the largest number of groups <= 32 that divides ``channels``."""
    groups = next(g for g in range(min(_GN_MAX_GROUPS, channels), 0, -1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class BasicBlock(nn.Module):
    """relu(proj(x) + GN(conv3x3(relu(GN(conv3x3(x)))))), proj = 1x1 conv + GN where the shape changes."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.gn1 = group_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.gn2 = group_norm(channels)
        self.proj = None
        if stride != 1 or in_channels != channels:
            self.proj = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False), group_norm(channels))

    def forward(self, x: Tensor) -> Tensor:
        y = self.gn2(self.conv2(F.relu(self.gn1(self.conv1(x)))))
        return F.relu((x if self.proj is None else self.proj(x)) + y)


class ResNetEncoder(nn.Module):
    """[B, C_in, H, W] -> (maps, blocks): maps "conv1", "layer1".. (after each stage's GroupNorm) and every block's
    output "layer{i}_blk{j}" (j from 1), each [B, C, H / 2^(i-1), W / 2^(i-1)] with C = base * 2^(i-1)."""

    def __init__(self, in_channels: int = 4, base_channels: int = 64, layers: Sequence[int] = (2, 2, 2, 2)):
        super().__init__()
        if not layers or min(layers) < 1:
            raise ValueError(f"layers must be a non-empty list of block counts >= 1, got {list(layers)}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, base_channels, 3, 1, 1, bias=False),
                                  group_norm(base_channels), nn.ReLU())
        self.stages, self.stage_norms, self.widths = nn.ModuleList(), nn.ModuleList(), []
        width = base_channels
        for i, num_blocks in enumerate(layers):
            out = width * 2 if i > 0 else width
            blocks = [BasicBlock(width, out, stride=2 if i > 0 else 1)]
            blocks += [BasicBlock(out, out) for _ in range(num_blocks - 1)]
            self.stages.append(nn.ModuleList(blocks))
            self.stage_norms.append(group_norm(out))
            self.widths.append(out)
            width = out

    def forward(self, x: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        h = self.stem(x)
        maps, blocks = {"conv1": h}, {}
        for i, (stage, norm) in enumerate(zip(self.stages, self.stage_norms), start=1):
            for j, block in enumerate(stage, start=1):
                h = block(h)
                blocks[f"layer{i}_blk{j}"] = h
            h = norm(h)
            maps[f"layer{i}"] = h
        return maps, blocks


class UpBlock(nn.Module):
    """Upsample to the skip's size (bilinear), concatenate, GN, then two 3x3 conv-GN-ReLU."""

    def __init__(self, in_channels: int, skip_channels: int, channels: int):
        super().__init__()
        both = in_channels + skip_channels
        self.norm = group_norm(both)
        self.body = nn.Sequential(nn.Conv2d(both, channels, 3, 1, 1, bias=False), group_norm(channels), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, 1, 1, bias=False), group_norm(channels), nn.ReLU())

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.body(self.norm(torch.cat([x, skip], dim=1)))


class UNetDecoder(nn.Module):
    """Stage maps (coarsest first up to the stem) -> reconstruction [B, C_out, H, W]."""

    def __init__(self, widths: Sequence[int], base_channels: int, out_channels: int):
        super().__init__()
        skips = [base_channels, *widths[:-1]]  # conv1, layer1 .. layer{S-1}
        self.bridge = nn.Sequential(nn.Conv2d(widths[-1], widths[-1], 3, 1, 1, bias=False), group_norm(widths[-1]),
                                    nn.ReLU())
        ups, width = [], widths[-1]
        for skip in reversed(skips):
            ups.append(UpBlock(width, skip, skip))
            width = skip
        self.ups = nn.ModuleList(ups)
        self.head = nn.Conv2d(base_channels, out_channels, 1)

    def forward(self, maps: dict[str, Tensor]) -> Tensor:
        names = list(maps)  # conv1, layer1, ..., layerS
        x = self.bridge(maps[names[-1]])
        for up, name in zip(self.ups, reversed(names[:-1])):
            x = up(x, maps[name])
        return self.head(x)


class MaskedAutoencoder(nn.Module):
    """MAE on latents x [B, C, H, W]: encoder + decoder; ``loss(x, mask)`` is the masked reconstruction error."""

    def __init__(self, in_channels: int = 4, base_channels: int = 64, layers: Sequence[int] = (2, 2, 2, 2),
                 mask_patch: int = 2):
        super().__init__()
        self.config = {"in_channels": int(in_channels), "base_channels": int(base_channels),
                       "layers": [int(n) for n in layers], "mask_patch": int(mask_patch)}
        self.mask_patch = int(mask_patch)
        self.encoder = ResNetEncoder(in_channels, base_channels, layers)
        self.decoder = UNetDecoder(self.encoder.widths, base_channels, in_channels)

    def random_mask(self, x: Tensor, ratio_min: float, ratio_max: float, generator: torch.Generator) -> Tensor:
        """[B, 1, H, W] float, 1 = masked: each mask_patch x mask_patch patch is masked with probability r, r drawn
        per sample on [ratio_min, ratio_max] (official make_patch_mask)."""
        b, _, h, w = x.shape
        p = self.mask_patch
        if h % p or w % p:
            raise ValueError(f"latent {h}x{w} does not split into {p}x{p} mask patches (set mask_patch)")
        ratio = ratio_min + (ratio_max - ratio_min) * torch.rand(b, generator=generator, device=x.device)
        keep = torch.rand(b, 1, h // p, w // p, generator=generator, device=x.device) >= ratio[:, None, None, None]
        return (~keep).float().repeat_interleave(p, dim=2).repeat_interleave(p, dim=3)

    def reconstruct(self, x: Tensor, mask: Tensor) -> Tensor:
        """Decoder output [B, C, H, W] from the visible entries x * (1 - mask)."""
        maps, _ = self.encoder(x * (1.0 - mask))
        return self.decoder(maps)

    def loss(self, x: Tensor, mask: Tensor) -> Tensor:
        """Mean squared reconstruction error over the masked entries (all channels of a masked location)."""
        err = (self.reconstruct(x, mask) - x).pow(2) * mask
        return err.sum() / (mask.sum() * x.shape[1]).clamp_min(1.0)


class MAEFeatures(FeatureEncoder):
    """Frozen MAE encoder -> feature sets (official ``get_activations``) of latents x [B, C, H, W]: those of
    ``map_feature_sets`` for the stem map "conv1", each stage map "layer{i}" and every k-th block output
    "layer{i}_blk{j}" (``every_k_block``, 0: none), and the raw latent "x" [B, C*H*W] (``include_input``)."""

    def __init__(self, encoder: ResNetEncoder, patch_sizes: Sequence[int] = (2, 4), use_mean: bool = True,
                 use_std: bool = True, every_k_block: int = 2, include_input: bool = True):
        super().__init__()
        self.encoder = encoder
        self.patch_sizes, self.every_k_block = tuple(int(s) for s in patch_sizes), int(every_k_block)
        self.use_mean, self.use_std, self.include_input = use_mean, use_std, include_input
        self.freeze()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        maps, blocks = self.encoder(x)
        out = {"x": x.flatten(1)} if self.include_input else {}
        k = self.every_k_block
        chosen = {**maps, **{n: b for n, b in blocks.items() if k > 0 and int(n.rsplit("blk", 1)[1]) % k == 0}}
        for name, fmap in chosen.items():
            out.update(map_feature_sets(name, fmap, self.patch_sizes, self.use_mean, self.use_std))
        return out


# --------------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: str | Path, state: dict) -> None:
    """torch.save to a temporary sibling, then an atomic rename: a killed job never leaves half a checkpoint."""
    atomic_write(lambda f: torch.save(state, f), path)


def export_encoder(state: dict, dtype: torch.dtype = torch.bfloat16) -> dict:
    """The encoder-only export of a training checkpoint's state: the EMA encoder weights in ``dtype`` (bf16: what a
    bf16 run computes with; half the bytes) and the config, without the decoder, the raw weights and the optimizer
    (a training run loads this; it is a fraction of the checkpoint)."""
    weights = state["ema"] if state.get("ema") is not None else state["model"]
    cast = lambda v: v.to(dtype) if v.is_floating_point() else v  # noqa: E731
    return {"format": MAE_ENCODER_FORMAT, "config": state["config"], "data_shape": state["data_shape"],
            "step": state["step"], "dtype": str(dtype).removeprefix("torch."),
            "encoder": {k[len("encoder."):]: cast(v) for k, v in weights.items() if k.startswith("encoder.")}}


_LOADED: dict[tuple, dict] = {}  # (path, mtime, size) -> state: one load per process and file version


def load_checkpoint(path: str | Path) -> dict:
    """A gwf-train-encoder file, memory-mapped (its tensors are read from the page cache as used, shared by the
    processes of a node) and loaded once per process: a run that builds its objective again reuses it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no MAE checkpoint at {path}. Train one with `gwf-train-encoder --out DIR paths.data_dir=...` (it writes "
            "DIR/mae.pt) and pass method.features.path=DIR/mae.pt")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key in _LOADED:
        return _LOADED[key]
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, dict) or state.get("format") not in (MAE_CHECKPOINT_FORMAT, MAE_ENCODER_FORMAT):
        raise ValueError(f"{path} is not a gwf MAE checkpoint (format {MAE_CHECKPOINT_FORMAT!r}); make one with "
                         "gwf-train-encoder")
    if state["format"] == MAE_ENCODER_FORMAT:  # small and read-only: kept (training checkpoints are not)
        _LOADED.clear()
        _LOADED[key] = state
    return state


def load_mae(path: str | Path, use_ema: bool = True) -> MaskedAutoencoder:
    """The MAE of a gwf-train-encoder checkpoint, with its EMA weights (``use_ema``) or the raw ones."""
    state = load_checkpoint(path)
    model = MaskedAutoencoder(**state["config"])
    model.load_state_dict(state["ema"] if use_ema and state.get("ema") is not None else state["model"])
    return model


def load_mae_features(path: str | Path | None = None, use_ema: bool = True, **feature_kwargs) -> MAEFeatures:
    """Frozen feature encoder from gwf-train-encoder's encoder export (DIR/encoder.pt, the EMA weights) or from its
    training checkpoint (DIR/mae.pt: the decoder is dropped)."""
    if path in (None, "", "???"):
        raise ValueError("method.features.path is not set: train an encoder with `gwf-train-encoder --out DIR "
                         "paths.data_dir=<dir of the latent shards>` and pass method.features.path=DIR/encoder.pt")
    state = load_checkpoint(path)
    if state["format"] == MAE_ENCODER_FORMAT:
        config = state["config"]
        encoder = ResNetEncoder(config["in_channels"], config["base_channels"], config["layers"])
        encoder.load_state_dict(state["encoder"])
        return MAEFeatures(encoder, **feature_kwargs)
    return MAEFeatures(load_mae(path, use_ema).encoder, **feature_kwargs)
