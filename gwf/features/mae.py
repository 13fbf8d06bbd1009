"""The latent masked autoencoder of the Drifting release, whose frozen encoder gives the feature sets of feature-space
drift ([DRIFT] App. A.3).

A ResNet of basic blocks with GroupNorm on the latent grid, a U-Net decoder, a random mask of ``mask_patch`` x
``mask_patch`` latent patches, and optionally a linear classifier on the pooled last map for the official recipe's
classification fine-tune. The layout holds the official MAEs exactly (MAE-256: base 256, MAE-640: base 640, both
layers [3, 4, 6, 3] on 4x32x32 latents; gwf/features/convert.py maps their weights); gwf-train-encoder's defaults are
smaller (one GPU). Official code read: the W-Flow PyTorch port riesz_flow_hudson models/mae_model.py ([PT], with its
line numbers) and the JAX release's models/mae_model.py ([JAX], as carried by the fork xiaolingHuang22/drifting).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gwf.constants import MAE_CHECKPOINT_FORMAT, MAE_ENCODER_FORMAT
from gwf.data.shards import atomic_write
from gwf.features.base import FeatureEncoder, channel_rms, map_feature_sets, raw_global

_GN_MAX_GROUPS = 32
# GroupNorm epsilon of the official MAEs: flax.linen.GroupNorm's default 1e-6 ([JAX] trained the released weights);
# the PyTorch port keeps torch's 1e-5, a small difference. gwf-train-encoder checkpoints written before the eps was
# recorded in their config were trained with torch's 1e-5 (LEGACY_GN_EPS, used when the config has none).
GN_EPS = 1e-6
LEGACY_GN_EPS = 1e-5


def group_norm(channels: int, eps: float = GN_EPS) -> nn.GroupNorm:
    """GroupNorm with the largest number of groups <= 32 that divides ``channels`` ([PT] _choose_gn_groups, 18-22)."""
    groups = next(g for g in range(min(_GN_MAX_GROUPS, channels), 0, -1) if channels % g == 0)
    return nn.GroupNorm(groups, channels, eps=eps)


class BasicBlock(nn.Module):
    """relu(proj(x) + GN(conv3x3(relu(GN(conv3x3(x)))))), proj = 1x1 conv + GN where the shape changes ([PT] 25-74;
    the official dropout is 0 in both MAE recipes and has no parameters)."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1, gn_eps: float = GN_EPS):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.gn1 = group_norm(channels, gn_eps)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.gn2 = group_norm(channels, gn_eps)
        self.proj = None
        if stride != 1 or in_channels != channels:
            self.proj = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride, bias=False),
                                      group_norm(channels, gn_eps))

    def forward(self, x: Tensor) -> Tensor:
        y = self.gn2(self.conv2(F.relu(self.gn1(self.conv1(x)))))
        return F.relu((x if self.proj is None else self.proj(x)) + y)


class ResNetEncoder(nn.Module):
    """[B, C_in, H, W] -> (maps, blocks): maps "conv1", "layer1".. (after each stage's GroupNorm) and every block's
    output "layer{i}_blk{j}" (j from 1), each [B, C, H / 2^(i-1), W / 2^(i-1)] with C = base * 2^(i-1) ([PT] 77-149)."""

    def __init__(self, in_channels: int = 4, base_channels: int = 64, layers: Sequence[int] = (2, 2, 2, 2),
                 gn_eps: float = GN_EPS):
        super().__init__()
        if not layers or min(layers) < 1:
            raise ValueError(f"layers must be a non-empty list of block counts >= 1, got {list(layers)}")
        self.stem = nn.Sequential(nn.Conv2d(in_channels, base_channels, 3, 1, 1, bias=False),
                                  group_norm(base_channels, gn_eps), nn.ReLU())
        self.stages, self.stage_norms, self.widths = nn.ModuleList(), nn.ModuleList(), []
        width = base_channels
        for i, num_blocks in enumerate(layers):
            out = width * 2 if i > 0 else width
            blocks = [BasicBlock(width, out, stride=2 if i > 0 else 1, gn_eps=gn_eps)]
            blocks += [BasicBlock(out, out, gn_eps=gn_eps) for _ in range(num_blocks - 1)]
            self.stages.append(nn.ModuleList(blocks))
            self.stage_norms.append(group_norm(out, gn_eps))
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
    """Upsample to the skip's size (bilinear), concatenate, GN, then two 3x3 conv-GN-ReLU ([PT] 162-175; [JAX]
    normalizes the concatenation with 32 groups, the same for the official widths)."""

    def __init__(self, in_channels: int, skip_channels: int, channels: int, gn_eps: float = GN_EPS):
        super().__init__()
        both = in_channels + skip_channels
        self.norm = group_norm(both, gn_eps)
        self.body = nn.Sequential(nn.Conv2d(both, channels, 3, 1, 1, bias=False), group_norm(channels, gn_eps),
                                  nn.ReLU(), nn.Conv2d(channels, channels, 3, 1, 1, bias=False),
                                  group_norm(channels, gn_eps), nn.ReLU())

    def forward(self, x: Tensor, skip: Tensor) -> Tensor:
        x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.body(self.norm(torch.cat([x, skip], dim=1)))


class UNetDecoder(nn.Module):
    """Stage maps (coarsest first up to the stem) -> reconstruction [B, C_out, H, W] ([PT] 178-200 for 4 stages)."""

    def __init__(self, widths: Sequence[int], base_channels: int, out_channels: int, gn_eps: float = GN_EPS):
        super().__init__()
        skips = [base_channels, *widths[:-1]]  # conv1, layer1 .. layer{S-1}
        self.bridge = nn.Sequential(nn.Conv2d(widths[-1], widths[-1], 3, 1, 1, bias=False),
                                    group_norm(widths[-1], gn_eps), nn.ReLU())
        ups, width = [], widths[-1]
        for skip in reversed(skips):
            ups.append(UpBlock(width, skip, skip, gn_eps))
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
    """MAE on latents x [B, C, H, W]: encoder + decoder (+ ``fc``, a linear classifier of the mean of the last map,
    when ``num_classes`` > 0: [PT] 268, 294-296); ``loss(x, mask, labels, lambda_cls)`` is the official loss."""

    def __init__(self, in_channels: int = 4, base_channels: int = 64, layers: Sequence[int] = (2, 2, 2, 2),
                 mask_patch: int = 2, num_classes: int = 0, gn_eps: float = GN_EPS):
        super().__init__()
        self.config = {"in_channels": int(in_channels), "base_channels": int(base_channels),
                       "layers": [int(n) for n in layers], "mask_patch": int(mask_patch),
                       "num_classes": int(num_classes), "gn_eps": float(gn_eps)}
        self.mask_patch = int(mask_patch)
        self.encoder = ResNetEncoder(in_channels, base_channels, layers, gn_eps)
        self.decoder = UNetDecoder(self.encoder.widths, base_channels, in_channels, gn_eps)
        self.fc = nn.Linear(self.encoder.widths[-1], num_classes) if num_classes > 0 else None

    def random_mask(self, x: Tensor, ratio_min: float, ratio_max: float, generator: torch.Generator) -> Tensor:
        """[B, 1, H, W] float, 1 = masked: each mask_patch x mask_patch patch is masked with probability r, r drawn
        per sample on [ratio_min, ratio_max] (official make_patch_mask, [PT] 212-219)."""
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

    def loss(self, x: Tensor, mask: Tensor, labels: Tensor | None = None, lambda_cls: float = 0.0) -> Tensor:
        """The official MAE loss ([PT] 288-304), averaged over the batch:

            recon = sum over masked entries of (x_hat - x)^2 / (number of masked locations + 1e-8)   (per sample)
            loss  = lambda_cls * CE(fc(mean of the last map), label) + (1 - lambda_cls) * recon

        The reconstruction error is summed over channels (C times the per-entry mean). Without ``fc`` (num_classes 0)
        the loss is recon alone; with it the classifier is always evaluated, so that its weights get (zero) gradients
        while lambda_cls is 0 and DDP sees every parameter used."""
        maps, _ = self.encoder(x * (1.0 - mask))
        err = (self.decoder(maps) - x).pow(2) * mask
        recon = (err.sum(dim=(1, 2, 3)) / (mask.sum(dim=(1, 2, 3)) + 1e-8)).mean()
        if self.fc is None:
            if lambda_cls:
                raise ValueError("lambda_cls > 0 needs the classifier: build the MAE with num_classes > 0")
            return recon
        if labels is None:
            raise ValueError("the MAE has a classifier (num_classes > 0): pass the labels to loss()")
        logits = self.fc(maps[list(maps)[-1]].mean(dim=(2, 3)))
        ce = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), labels.long())
        return lambda_cls * ce + (1.0 - lambda_cls) * recon


class MAEFeatures(FeatureEncoder):
    """Frozen MAE encoder -> the official feature sets of latents x [B, C, H, W], in the official order
    ([PT] activation_fn 456-466 and get_activations 315-372):

    global        [B, H*W*C]  the raw latent, (h, w, c) order (``include_raw_global``; always on officially)
    norm_x        [B, C]      per-channel root mean square of the latent (``use_norm_x``)
    then, for the stem map "conv1", each stage map "layer{i}" and every k-th block output "layer{i}_blk{j}"
    (``every_k_block`` k; 0, inf or < 1: none), the sets of ``map_feature_sets``: per-location vectors, mean and
    std over locations (``use_mean``, ``use_std``), patch means (``patch_mean_size``) and patch stds
    (``patch_std_size``). The defaults are the official ``activation_kwargs`` of every recipe (patch sizes [2, 4],
    means and stds, every 2nd block). ``patch_sizes`` sets both patch lists."""

    def __init__(self, encoder: ResNetEncoder, patch_mean_size: Sequence[int] = (2, 4),
                 patch_std_size: Sequence[int] = (2, 4), use_mean: bool = True, use_std: bool = True,
                 every_k_block: float = 2, include_raw_global: bool = True, use_norm_x: bool = True,
                 patch_sizes: Sequence[int] | None = None):
        super().__init__()
        self.encoder = encoder
        if patch_sizes is not None:
            patch_mean_size = patch_std_size = patch_sizes
        self.patch_mean_size = tuple(int(s) for s in patch_mean_size)
        self.patch_std_size = tuple(int(s) for s in patch_std_size)
        # official need_blocks: a finite number >= 1, truncated to an int ([PT] 331, 364)
        k = float(every_k_block)
        self.every_k_block = int(k) if math.isfinite(k) and k >= 1 else 0
        self.use_mean, self.use_std = bool(use_mean), bool(use_std)
        self.include_raw_global, self.use_norm_x = bool(include_raw_global), bool(use_norm_x)
        self.freeze()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        maps, blocks = self.encoder(x)
        out = {"global": raw_global(x)} if self.include_raw_global else {}
        if self.use_norm_x:
            out["norm_x"] = channel_rms(x)
        k = self.every_k_block
        chosen = {**maps, **{n: b for n, b in blocks.items() if k > 0 and int(n.rsplit("blk", 1)[1]) % k == 0}}
        for name, fmap in chosen.items():
            out.update(map_feature_sets(name, fmap, self.patch_mean_size, self.patch_std_size, self.use_mean,
                                        self.use_std))
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


def mae_config(config: dict) -> dict:
    """A checkpoint's MaskedAutoencoder config, completed for files written before ``num_classes`` and ``gn_eps``
    were recorded (no classifier; torch's GroupNorm eps, which they were trained with)."""
    return {"num_classes": 0, "gn_eps": LEGACY_GN_EPS, **config}


def load_mae(path: str | Path, use_ema: bool = True) -> MaskedAutoencoder:
    """The MAE of a gwf-train-encoder checkpoint, with its EMA weights (``use_ema``) or the raw ones."""
    state = load_checkpoint(path)
    model = MaskedAutoencoder(**mae_config(state["config"]))
    model.load_state_dict(state["ema"] if use_ema and state.get("ema") is not None else state["model"])
    return model


def load_mae_features(path: str | Path | None = None, use_ema: bool = True, **feature_kwargs) -> MAEFeatures:
    """Frozen feature encoder from gwf-train-encoder's encoder export (DIR/encoder.pt, the EMA weights; also what
    ``gwf.features.convert.convert_mae`` writes from the official MAEs) or from its training checkpoint (DIR/mae.pt:
    the decoder is dropped). ``feature_kwargs``: MAEFeatures options (official defaults)."""
    if path in (None, "", "???"):
        raise ValueError("method.features.path is not set: train an encoder with `gwf-train-encoder --out DIR "
                         "paths.data_dir=<dir of the latent shards>` and pass method.features.path=DIR/encoder.pt")
    state = load_checkpoint(path)
    if state["format"] == MAE_ENCODER_FORMAT:
        config = mae_config(state["config"])
        encoder = ResNetEncoder(config["in_channels"], config["base_channels"], config["layers"], config["gn_eps"])
        encoder.load_state_dict(state["encoder"])
        return MAEFeatures(encoder, **feature_kwargs)
    return MAEFeatures(load_mae(path, use_ema).encoder, **feature_kwargs)
