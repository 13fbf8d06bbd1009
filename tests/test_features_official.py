"""The official latent MAE of Drifting / W-Flow in gwf: its state-dict layout (written below as data from the official
code) converts into gwf's encoder export and back into gwf's MaskedAutoencoder bitwise; the converted encoder computes
the official forward; the JAX release's Flax msgpack tree (its key names and layouts written below as data from the
official code, encoded as flax encodes it) converts the same, bitwise; a mismatched file is refused with the key
named; the official feature sets (names, order, norm_x, global, means, stds, patch statistics) against direct
computations; the MAE-256 / MAE-640 parameter counts; the classification fine-tune's loss and ramp against their
formulas.

Official code read: riesz_flow_hudson models/mae_model.py ([PT], the PyTorch port of the release, line numbers),
models/hf.py, misc/convert_mae_to_pt.py, configs/mae/latent_640.yaml, latent_ablation_256.yaml, and the JAX release's
models/mae_model.py, utils/init_util.py and train_mae.py ([JAX]), google/flax flax/serialization.py.
"""

import json
import math
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gwf.constants import FEATURE_STD_EPS, MAE_CHECKPOINT_FORMAT
from gwf.data.datamodule import ShardDataModule
from gwf.data.shards import write_shards
from gwf.features import build_features
from gwf.features.convert import (OFFICIAL_MAES, convert_mae, flax_path, gwf_name, official_flax_shapes, official_name,
                                  official_shapes, official_to_gwf, read_flax_msgpack, read_official)
from gwf.features.mae import GN_EPS, LEGACY_GN_EPS, MAEFeatures, MaskedAutoencoder, load_mae, save_checkpoint
from gwf.features.train import finetune_weight, train_encoder
from gwf.module import OptimConfig

# The official MAEResNetJAX state dict ({name: shape}) for in_channels 4, base_channels 8, layers [1, 2, 1, 1],
# num_classes 10 ([PT] 25-268: _BasicBlock conv1/gn1/conv2/gn2 and proj_conv/proj_gn where the channels or the stride
# change; _ResNetEncoder conv1 (overridden with in_channels * input_patch_size^2 inputs, 261), gn1, layer{i}_norm,
# stages; _UNetDecoder bridge, up43/up32/up21/up10 (_UpBlock concat_norm_fn, proj, refine: _ConvGNReLU conv + gn),
# head; fc on base * 8). What the official misc/convert_mae_to_pt.py saves, at this small size.
OFFICIAL_TINY = {"in_channels": 4, "base_channels": 8, "layers": [1, 2, 1, 1], "num_classes": 10}
OFFICIAL_TINY_SHAPES = {
    "encoder.conv1.weight": (8, 4, 3, 3), "encoder.gn1.weight": (8,), "encoder.gn1.bias": (8,),
    "encoder.layer1_norm.weight": (8,), "encoder.layer1_norm.bias": (8,),
    "encoder.layer2_norm.weight": (16,), "encoder.layer2_norm.bias": (16,),
    "encoder.layer3_norm.weight": (32,), "encoder.layer3_norm.bias": (32,),
    "encoder.layer4_norm.weight": (64,), "encoder.layer4_norm.bias": (64,),
    "encoder.stages.0.0.conv1.weight": (8, 8, 3, 3), "encoder.stages.0.0.gn1.weight": (8,),
    "encoder.stages.0.0.gn1.bias": (8,), "encoder.stages.0.0.conv2.weight": (8, 8, 3, 3),
    "encoder.stages.0.0.gn2.weight": (8,), "encoder.stages.0.0.gn2.bias": (8,),
    "encoder.stages.1.0.conv1.weight": (16, 8, 3, 3), "encoder.stages.1.0.gn1.weight": (16,),
    "encoder.stages.1.0.gn1.bias": (16,), "encoder.stages.1.0.conv2.weight": (16, 16, 3, 3),
    "encoder.stages.1.0.gn2.weight": (16,), "encoder.stages.1.0.gn2.bias": (16,),
    "encoder.stages.1.0.proj_conv.weight": (16, 8, 1, 1), "encoder.stages.1.0.proj_gn.weight": (16,),
    "encoder.stages.1.0.proj_gn.bias": (16,),
    "encoder.stages.1.1.conv1.weight": (16, 16, 3, 3), "encoder.stages.1.1.gn1.weight": (16,),
    "encoder.stages.1.1.gn1.bias": (16,), "encoder.stages.1.1.conv2.weight": (16, 16, 3, 3),
    "encoder.stages.1.1.gn2.weight": (16,), "encoder.stages.1.1.gn2.bias": (16,),
    "encoder.stages.2.0.conv1.weight": (32, 16, 3, 3), "encoder.stages.2.0.gn1.weight": (32,),
    "encoder.stages.2.0.gn1.bias": (32,), "encoder.stages.2.0.conv2.weight": (32, 32, 3, 3),
    "encoder.stages.2.0.gn2.weight": (32,), "encoder.stages.2.0.gn2.bias": (32,),
    "encoder.stages.2.0.proj_conv.weight": (32, 16, 1, 1), "encoder.stages.2.0.proj_gn.weight": (32,),
    "encoder.stages.2.0.proj_gn.bias": (32,),
    "encoder.stages.3.0.conv1.weight": (64, 32, 3, 3), "encoder.stages.3.0.gn1.weight": (64,),
    "encoder.stages.3.0.gn1.bias": (64,), "encoder.stages.3.0.conv2.weight": (64, 64, 3, 3),
    "encoder.stages.3.0.gn2.weight": (64,), "encoder.stages.3.0.gn2.bias": (64,),
    "encoder.stages.3.0.proj_conv.weight": (64, 32, 1, 1), "encoder.stages.3.0.proj_gn.weight": (64,),
    "encoder.stages.3.0.proj_gn.bias": (64,),
    "decoder.bridge.conv.weight": (64, 64, 3, 3), "decoder.bridge.gn.weight": (64,), "decoder.bridge.gn.bias": (64,),
    "decoder.up43.concat_norm_fn.weight": (96,), "decoder.up43.concat_norm_fn.bias": (96,),
    "decoder.up43.proj.conv.weight": (32, 96, 3, 3), "decoder.up43.proj.gn.weight": (32,),
    "decoder.up43.proj.gn.bias": (32,), "decoder.up43.refine.conv.weight": (32, 32, 3, 3),
    "decoder.up43.refine.gn.weight": (32,), "decoder.up43.refine.gn.bias": (32,),
    "decoder.up32.concat_norm_fn.weight": (48,), "decoder.up32.concat_norm_fn.bias": (48,),
    "decoder.up32.proj.conv.weight": (16, 48, 3, 3), "decoder.up32.proj.gn.weight": (16,),
    "decoder.up32.proj.gn.bias": (16,), "decoder.up32.refine.conv.weight": (16, 16, 3, 3),
    "decoder.up32.refine.gn.weight": (16,), "decoder.up32.refine.gn.bias": (16,),
    "decoder.up21.concat_norm_fn.weight": (24,), "decoder.up21.concat_norm_fn.bias": (24,),
    "decoder.up21.proj.conv.weight": (8, 24, 3, 3), "decoder.up21.proj.gn.weight": (8,),
    "decoder.up21.proj.gn.bias": (8,), "decoder.up21.refine.conv.weight": (8, 8, 3, 3),
    "decoder.up21.refine.gn.weight": (8,), "decoder.up21.refine.gn.bias": (8,),
    "decoder.up10.concat_norm_fn.weight": (16,), "decoder.up10.concat_norm_fn.bias": (16,),
    "decoder.up10.proj.conv.weight": (8, 16, 3, 3), "decoder.up10.proj.gn.weight": (8,),
    "decoder.up10.proj.gn.bias": (8,), "decoder.up10.refine.conv.weight": (8, 8, 3, 3),
    "decoder.up10.refine.gn.weight": (8,), "decoder.up10.refine.gn.bias": (8,),
    "decoder.head.weight": (4, 8, 1, 1), "decoder.head.bias": (4,),
    "fc.weight": (10, 64), "fc.bias": (10,),
}

# The same MAE as the JAX release stores it (ema_params.msgpack: {path: shape} of the Flax param tree, [JAX]
# models/mae_model.py): modules named by their setup attributes, the stage lists ``self.stages = [...]`` as
# stages_{i}, the blocks of each nn.Sequential(blocks) as its field layers_{j}; nn.Conv kernels HWIO (+ bias for the
# head), nn.GroupNorm scale/bias, nn.Dense kernel (in, out) + bias. (Only the shapes matter here: at these widths
# [JAX]'s 32-group concat_norm_fn could not be built for up21 / up10.)
FLAX_TINY_SHAPES = {
    "encoder/conv1/kernel": (3, 3, 4, 8), "encoder/gn1/scale": (8,), "encoder/gn1/bias": (8,),
    "encoder/layer1_norm/scale": (8,), "encoder/layer1_norm/bias": (8,), "encoder/layer2_norm/scale": (16,),
    "encoder/layer2_norm/bias": (16,), "encoder/layer3_norm/scale": (32,), "encoder/layer3_norm/bias": (32,),
    "encoder/layer4_norm/scale": (64,), "encoder/layer4_norm/bias": (64,),
    "encoder/stages_0/layers_0/conv1/kernel": (3, 3, 8, 8), "encoder/stages_0/layers_0/gn1/scale": (8,),
    "encoder/stages_0/layers_0/gn1/bias": (8,), "encoder/stages_0/layers_0/conv2/kernel": (3, 3, 8, 8),
    "encoder/stages_0/layers_0/gn2/scale": (8,), "encoder/stages_0/layers_0/gn2/bias": (8,),
    "encoder/stages_1/layers_0/conv1/kernel": (3, 3, 8, 16), "encoder/stages_1/layers_0/gn1/scale": (16,),
    "encoder/stages_1/layers_0/gn1/bias": (16,), "encoder/stages_1/layers_0/conv2/kernel": (3, 3, 16, 16),
    "encoder/stages_1/layers_0/gn2/scale": (16,), "encoder/stages_1/layers_0/gn2/bias": (16,),
    "encoder/stages_1/layers_0/proj_conv/kernel": (1, 1, 8, 16), "encoder/stages_1/layers_0/proj_gn/scale": (16,),
    "encoder/stages_1/layers_0/proj_gn/bias": (16,), "encoder/stages_1/layers_1/conv1/kernel": (3, 3, 16, 16),
    "encoder/stages_1/layers_1/gn1/scale": (16,), "encoder/stages_1/layers_1/gn1/bias": (16,),
    "encoder/stages_1/layers_1/conv2/kernel": (3, 3, 16, 16), "encoder/stages_1/layers_1/gn2/scale": (16,),
    "encoder/stages_1/layers_1/gn2/bias": (16,), "encoder/stages_2/layers_0/conv1/kernel": (3, 3, 16, 32),
    "encoder/stages_2/layers_0/gn1/scale": (32,), "encoder/stages_2/layers_0/gn1/bias": (32,),
    "encoder/stages_2/layers_0/conv2/kernel": (3, 3, 32, 32), "encoder/stages_2/layers_0/gn2/scale": (32,),
    "encoder/stages_2/layers_0/gn2/bias": (32,), "encoder/stages_2/layers_0/proj_conv/kernel": (1, 1, 16, 32),
    "encoder/stages_2/layers_0/proj_gn/scale": (32,), "encoder/stages_2/layers_0/proj_gn/bias": (32,),
    "encoder/stages_3/layers_0/conv1/kernel": (3, 3, 32, 64), "encoder/stages_3/layers_0/gn1/scale": (64,),
    "encoder/stages_3/layers_0/gn1/bias": (64,), "encoder/stages_3/layers_0/conv2/kernel": (3, 3, 64, 64),
    "encoder/stages_3/layers_0/gn2/scale": (64,), "encoder/stages_3/layers_0/gn2/bias": (64,),
    "encoder/stages_3/layers_0/proj_conv/kernel": (1, 1, 32, 64), "encoder/stages_3/layers_0/proj_gn/scale": (64,),
    "encoder/stages_3/layers_0/proj_gn/bias": (64,), "decoder/bridge/conv/kernel": (3, 3, 64, 64),
    "decoder/bridge/gn/scale": (64,), "decoder/bridge/gn/bias": (64,), "decoder/up43/concat_norm_fn/scale": (96,),
    "decoder/up43/concat_norm_fn/bias": (96,), "decoder/up43/proj/conv/kernel": (3, 3, 96, 32),
    "decoder/up43/proj/gn/scale": (32,), "decoder/up43/proj/gn/bias": (32,),
    "decoder/up43/refine/conv/kernel": (3, 3, 32, 32), "decoder/up43/refine/gn/scale": (32,),
    "decoder/up43/refine/gn/bias": (32,), "decoder/up32/concat_norm_fn/scale": (48,),
    "decoder/up32/concat_norm_fn/bias": (48,), "decoder/up32/proj/conv/kernel": (3, 3, 48, 16),
    "decoder/up32/proj/gn/scale": (16,), "decoder/up32/proj/gn/bias": (16,),
    "decoder/up32/refine/conv/kernel": (3, 3, 16, 16), "decoder/up32/refine/gn/scale": (16,),
    "decoder/up32/refine/gn/bias": (16,), "decoder/up21/concat_norm_fn/scale": (24,),
    "decoder/up21/concat_norm_fn/bias": (24,), "decoder/up21/proj/conv/kernel": (3, 3, 24, 8),
    "decoder/up21/proj/gn/scale": (8,), "decoder/up21/proj/gn/bias": (8,),
    "decoder/up21/refine/conv/kernel": (3, 3, 8, 8), "decoder/up21/refine/gn/scale": (8,),
    "decoder/up21/refine/gn/bias": (8,), "decoder/up10/concat_norm_fn/scale": (16,),
    "decoder/up10/concat_norm_fn/bias": (16,), "decoder/up10/proj/conv/kernel": (3, 3, 16, 8),
    "decoder/up10/proj/gn/scale": (8,), "decoder/up10/proj/gn/bias": (8,),
    "decoder/up10/refine/conv/kernel": (3, 3, 8, 8), "decoder/up10/refine/gn/scale": (8,),
    "decoder/up10/refine/gn/bias": (8,), "decoder/head/kernel": (1, 1, 8, 4), "decoder/head/bias": (4,),
    "fc/kernel": (64, 10), "fc/bias": (10,),
}


def _pt_name(path):
    """[JAX] path -> [PT] name, written from the two official files: stages_i/layers_j -> stages.i.j, kernel and
    scale -> weight."""
    parts = path.split("/")
    if parts[1].startswith("stages_"):  # encoder/stages_i/layers_j/...
        parts[1:3] = ["stages", parts[1][len("stages_"):], parts[2][len("layers_"):]]
    parts[-1] = {"kernel": "weight", "scale": "weight"}.get(parts[-1], parts[-1])
    return ".".join(parts)


def _to_pt_layout(a):
    """HWIO -> OIHW, (in, out) -> (out, in)."""
    return a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T if a.ndim == 2 else a


# Parameter counts of the official MAEs (MAEResNetJAX(num_classes=1000, in_channels=4, base_channels=B,
# layers=[3, 4, 6, 3], input_patch_size=1), configs/mae/latent_ablation_256.yaml and latent_640.yaml), summed over
# the official constructors' parameter shapes: (whole model, encoder alone).
OFFICIAL_COUNTS = {"mae_latent_256": (431_354_348, 340_216_832), "mae_latent_640": (2_687_866_604, 2_126_036_480)}
# a few MAE-640 shapes, read off the constructors: stem, a stride-2 projection, the last norm, decoder, classifier
MAE_640_SHAPES = {"encoder.conv1.weight": (640, 4, 3, 3), "encoder.stages.3.0.proj_conv.weight": (5120, 2560, 1, 1),
                  "encoder.stages.2.5.conv2.weight": (2560, 2560, 3, 3), "encoder.layer4_norm.weight": (5120,),
                  "decoder.up43.concat_norm_fn.weight": (7680,), "decoder.up10.proj.conv.weight": (640, 1280, 3, 3),
                  "decoder.head.weight": (4, 640, 1, 1), "fc.weight": (1000, 5120)}


def _official_state(seed=0, shapes=OFFICIAL_TINY_SHAPES):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * 0.3 + (1.0 if k.endswith("gn1.weight") else 0.0)
            for k, s in shapes.items()}


def _official_maps(sd, x):
    """The official encoder forward ([PT] 124-149 with _BasicBlock.forward 61-74, eval mode) from the official state
    dict, written with torch.nn.functional. GroupNorm eps 1e-6: flax.linen.GroupNorm's default, which the released
    (JAX-trained) weights saw. Returns (maps, block outputs) as {name: [B, C, H, W]}."""
    def gn(h, name):
        w = sd[f"{name}.weight"]
        return F.group_norm(h, next(g for g in range(min(32, len(w)), 0, -1) if len(w) % g == 0), w,
                            sd[f"{name}.bias"], eps=1e-6)

    h = F.relu(gn(F.conv2d(x, sd["encoder.conv1.weight"], padding=1), "encoder.gn1"))
    maps, blocks = {"conv1": h}, {}
    for i in range(4):
        j = 0
        while f"encoder.stages.{i}.{j}.conv1.weight" in sd:
            p = f"encoder.stages.{i}.{j}"
            stride = 2 if i > 0 and j == 0 else 1
            y = F.relu(gn(F.conv2d(h, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.gn1"))
            y = gn(F.conv2d(y, sd[f"{p}.conv2.weight"], padding=1), f"{p}.gn2")
            res = gn(F.conv2d(h, sd[f"{p}.proj_conv.weight"], stride=stride), f"{p}.proj_gn") \
                if f"{p}.proj_conv.weight" in sd else h
            h = F.relu(res + y)
            j += 1
            blocks[f"layer{i + 1}_blk{j}"] = h
        h = gn(h, f"encoder.layer{i + 1}_norm")
        maps[f"layer{i + 1}"] = h
    return maps, blocks


def _write_official(tmp_path, sd, metadata=None):
    folder = tmp_path / "mae_latent_tiny"
    folder.mkdir()
    torch.save(sd, folder / "ema_params.pt")  # what misc/convert_mae_to_pt.py writes: {name: tensor}
    if metadata is not None:
        (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder / "ema_params.pt"


# ----------------------------------------------------------------------------------------------- layout
def test_official_layout_and_the_official_parameter_counts():
    assert official_shapes(**OFFICIAL_TINY) == OFFICIAL_TINY_SHAPES
    for name, (total, encoder) in OFFICIAL_COUNTS.items():
        cfg = OFFICIAL_MAES[name]
        shapes = official_shapes(cfg["in_channels"], cfg["base_channels"], cfg["layers"], cfg["num_classes"])
        assert sum(math.prod(s) for s in shapes.values()) == total
        assert sum(math.prod(s) for k, s in shapes.items() if k.startswith("encoder.")) == encoder
        if name == "mae_latent_640":
            assert {k: shapes[k] for k in MAE_640_SHAPES} == MAE_640_SHAPES
        # gwf's MaskedAutoencoder holds exactly these tensors (meta device: shapes only)
        with torch.device("meta"):
            model = MaskedAutoencoder(**cfg)
            official = {k: torch.empty(s) for k, s in shapes.items()}
        renamed = official_to_gwf(official, cfg)
        assert {k: v.shape for k, v in renamed.items()} == {k: v.shape for k, v in model.state_dict().items()}
        assert sum(p.numel() for p in model.parameters()) == total
        assert sum(p.numel() for p in model.encoder.parameters()) == encoder
        assert model.config["gn_eps"] == 1e-6 == GN_EPS


@pytest.mark.parametrize("with_metadata", [False, True])
def test_official_checkpoint_round_trip_is_bitwise(tmp_path, with_metadata):
    sd = _official_state()
    meta = {"model_config": {"base_channels": 8, "patch_size": 2, "dropout_prob": 0.0, "layers": [1, 2, 1, 1],
                             "in_channels": 4, "use_bf16": True, "input_patch_size": 1, "num_classes": 10},
            "step": 123}
    src = _write_official(tmp_path, sd, meta if with_metadata else None)
    export = convert_mae(src, tmp_path / "out" / "encoder.pt", dtype=None)
    assert export["step"] == (123 if with_metadata else 0) and export["dtype"] == "float32"
    assert export["config"] == {"in_channels": 4, "base_channels": 8, "layers": [1, 2, 1, 1], "mask_patch": 2,
                                "num_classes": 10, "gn_eps": 1e-6}
    # method.features.path loads it (strict load_state_dict); every encoder tensor lands bitwise
    enc = build_features({"name": "mae", "path": str(tmp_path / "out" / "encoder.pt")})
    assert isinstance(enc, MAEFeatures) and not any(p.requires_grad for p in enc.parameters())
    loaded = enc.encoder.state_dict()
    encoder_keys = [k for k in sd if k.startswith("encoder.")]
    assert len(loaded) == len(encoder_keys)
    for k in encoder_keys:
        assert torch.equal(loaded[gwf_name(k)[len("encoder."):]], sd[k]), k
    assert all(m.eps == 1e-6 for m in enc.modules() if isinstance(m, torch.nn.GroupNorm))
    # the whole model (decoder and classifier too) in gwf's MaskedAutoencoder, strictly, bitwise
    model = MaskedAutoencoder(**export["config"])
    model.load_state_dict(official_to_gwf(sd, export["config"]), strict=True)
    full = model.state_dict()
    assert len(full) == len(sd) and all(torch.equal(full[gwf_name(k)], v) for k, v in sd.items())
    # and it computes the official forward: every map and block output, hence every feature set
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    want_maps, want_blocks = _official_maps(sd, x)
    with torch.no_grad():
        maps, blocks = enc.encoder(x)
    assert maps.keys() == want_maps.keys() and blocks.keys() == want_blocks.keys()
    for name in [*maps, *blocks]:
        torch.testing.assert_close({**maps, **blocks}[name], {**want_maps, **want_blocks}[name], rtol=1e-5, atol=1e-6)
    # the default export is bf16 (gwf-train-encoder's default): the same tensors, rounded
    bf16 = convert_mae(src, tmp_path / "bf16.pt")
    assert bf16["dtype"] == "bfloat16"
    assert all(torch.equal(bf16["encoder"][gwf_name(k)[len("encoder."):]], sd[k].to(torch.bfloat16))
               for k in encoder_keys)


def test_mismatched_official_checkpoints_are_refused_with_the_key_named(tmp_path):
    sd = _official_state()
    cases = {
        "missing": ({k: v for k, v in sd.items() if k != "encoder.stages.1.1.gn2.bias"},
                    r"1 missing keys: encoder\.stages\.1\.1\.gn2\.bias"),
        "unexpected": ({**sd, "encoder.stages.0.0.proj_conv.weight": torch.zeros(8, 8, 1, 1)},
                       r"1 unexpected keys: encoder\.stages\.0\.0\.proj_conv\.weight"),
        "shape": ({**sd, "decoder.up21.proj.conv.weight": torch.zeros(8, 24, 1, 1)},
                  r"1 wrong shapes: decoder\.up21\.proj\.conv\.weight \(8, 24, 1, 1\) \(expected \(8, 24, 3, 3\)\)"),
    }
    for name, (bad, match) in cases.items():
        (tmp_path / name).mkdir()
        with pytest.raises(ValueError, match=match):
            convert_mae(_write_official(tmp_path / name, bad), tmp_path / name / "encoder.pt")
        assert not (tmp_path / name / "encoder.pt").exists()
    # metadata that disagrees with the weights: every tensor of the wrong width is named
    (tmp_path / "meta").mkdir()
    src = _write_official(tmp_path / "meta", sd, {"model_config": {**OFFICIAL_TINY, "base_channels": 16}})
    with pytest.raises(ValueError, match=r"wrong shapes: encoder\.conv1\.weight \(8, 4, 3, 3\) \(expected \(16, 4"):
        convert_mae(src, tmp_path / "meta" / "encoder.pt")
    (tmp_path / "pixel").mkdir()
    src = _write_official(tmp_path / "pixel", sd, {"model_config": {**OFFICIAL_TINY, "input_patch_size": 8}})
    with pytest.raises(ValueError, match="input_patch_size 8: a pixel-space MAE"):
        convert_mae(src, tmp_path / "pixel" / "encoder.pt")


# ----------------------------------------------------------------------------------------------- the JAX msgpack
def _flax_ext(shape, dtype_name, raw, code=1):
    """flax/serialization.py _msgpack_ext_pack: ExtType(ndarray 1 | npscalar 3, msgpack of (shape, dtype name,
    C-order bytes), use_bin_type=True)."""
    msgpack = pytest.importorskip("msgpack")
    return msgpack.ExtType(code, msgpack.packb((tuple(shape), dtype_name, raw), use_bin_type=True))


def _ext(t):
    """A torch tensor as flax writes the array: numpy's bytes and dtype name; bf16 (jnp.bfloat16, dtype name
    "bfloat16") as its 16-bit patterns."""
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return _flax_ext(t.shape, "bfloat16", t.view(torch.int16).numpy().tobytes("C"))
    a = t.numpy()
    return _flax_ext(a.shape, a.dtype.name, a.tobytes("C"))


def _chunked(t, chunk):
    """flax's _chunk (done there above 2**30 bytes): the flat array in pieces of ``chunk`` elements."""
    flat = t.contiguous().reshape(-1)
    return {"__msgpack_chunked_array__": True, "shape": {str(i): n for i, n in enumerate(t.shape)},
            "chunks": {str(i): _ext(flat[k:k + chunk]) for i, k in enumerate(range(0, flat.numel(), chunk))}}


CHUNKED_LEAF = "encoder/stages_1/layers_1/conv2/kernel"  # 2,304 elements: written in chunks of 1,000
BF16_LEAF = "decoder/up43/proj/conv/kernel"  # written in bf16 (its values rounded to bf16 in the source)


def _write_msgpack(folder, flax_leaves, metadata=None, wrap=True):
    """ema_params.msgpack (+ metadata.json) of {flax path: tensor in the file's layout}, as flax's
    msgpack_serialize packs it: nested maps, ExtType leaves, CHUNKED_LEAF chunked, BF16_LEAF in bf16."""
    msgpack = pytest.importorskip("msgpack")
    tree = {}
    for path, t in flax_leaves.items():
        node = tree
        *parents, leaf = path.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = _chunked(t, 1000) if path == CHUNKED_LEAF else _ext(t)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "ema_params.msgpack").write_bytes(msgpack.packb({"params": tree} if wrap else tree, use_bin_type=True))
    if metadata is not None:
        (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder / "ema_params.msgpack"


def _random_gwf_mae_as_flax():
    """(official state dict, {flax path: tensor in the file's layout}) of a random gwf MaskedAutoencoder at the tiny
    official size; BF16_LEAF's values rounded to bf16."""
    torch.manual_seed(0)
    model = MaskedAutoencoder(**{k: OFFICIAL_TINY[k] for k in ("in_channels", "base_channels", "layers")},
                              num_classes=OFFICIAL_TINY["num_classes"])
    for p in model.parameters():  # GroupNorm starts at 1 / 0: random values everywhere
        p.data.normal_()
    gwf_sd = model.state_dict()
    official = {k: gwf_sd[gwf_name(k)].clone() for k in OFFICIAL_TINY_SHAPES}
    official[_pt_name(BF16_LEAF)] = official[_pt_name(BF16_LEAF)].to(torch.bfloat16)
    flax = {path: _file_layout(official[_pt_name(path)]) for path in FLAX_TINY_SHAPES}
    return official, flax


def _file_layout(t):
    """OIHW -> HWIO, (out, in) -> (in, out): the inverse of _to_pt_layout."""
    return t.permute(2, 3, 1, 0).contiguous() if t.dim() == 4 else t.t().contiguous() if t.dim() == 2 else t


def test_flax_tree_names_and_layouts_against_the_official_layout():
    """The [JAX] tree written above is the [PT] state dict renamed and transposed, leaf for leaf; gwf's name mapping
    and its expected tree agree with it, and at the MAE-640 size every name maps back."""
    assert {_pt_name(p): tuple(_to_pt_layout(np.empty(s)).shape) for p, s in FLAX_TINY_SHAPES.items()} \
        == OFFICIAL_TINY_SHAPES
    assert official_flax_shapes(OFFICIAL_TINY) == FLAX_TINY_SHAPES
    assert all(official_name(p) == _pt_name(p) for p in FLAX_TINY_SHAPES)
    cfg = OFFICIAL_MAES["mae_latent_640"]
    shapes = official_shapes(cfg["in_channels"], cfg["base_channels"], cfg["layers"], cfg["num_classes"])
    assert all(official_name(flax_path(k, len(s))) == k for k, s in shapes.items())
    assert flax_path("encoder.stages.2.5.proj_gn.weight", 1) == "encoder/stages_2/layers_5/proj_gn/scale"


@pytest.mark.parametrize("wrap", [True, False])
def test_jax_release_msgpack_converts_bitwise(tmp_path, wrap):
    """A random gwf MAE written as the JAX release's ema_params.msgpack (flax's encoding, one chunked leaf, one bf16
    leaf, with and without the "params" wrapper) converts back to the same tensors exactly; gwf-convert mae reads
    the folder."""
    official, flax = _random_gwf_mae_as_flax()
    meta = {"model_config": {"base_channels": 8, "patch_size": 2, "dropout_prob": 0.0, "layers": [1, 2, 1, 1],
                             "in_channels": 4, "use_bf16": True, "input_patch_size": 1, "num_classes": 10},
            "step": 7}
    src = _write_msgpack(tmp_path / "mae_latent_tiny", flax, meta if wrap else None, wrap=wrap)
    state, metadata = read_official(src.parent)  # the folder: no ema_params.pt, so the msgpack
    assert metadata == (meta if wrap else {})
    assert state.keys() == official.keys()
    for k, v in official.items():
        assert state[k].dtype == v.dtype and state[k].is_contiguous() and torch.equal(state[k], v), k
    export = convert_mae(src, tmp_path / "encoder.pt", dtype=None)
    assert export["step"] == (7 if wrap else 0) and export["dtype"] == "float32"  # the bf16 leaf is the decoder's
    assert export["config"] == {**OFFICIAL_TINY, "mask_patch": 2, "gn_eps": 1e-6}
    assert "msgpack" in export["source"]["layout"]
    enc = build_features({"name": "mae", "path": str(tmp_path / "encoder.pt")})
    loaded = enc.encoder.state_dict()
    encoder_keys = [k for k in official if k.startswith("encoder.")]
    assert len(loaded) == len(encoder_keys)
    assert all(torch.equal(loaded[gwf_name(k)[len("encoder."):]], official[k]) for k in encoder_keys)
    # the whole model, decoder (the bf16 leaf too) and classifier
    model = MaskedAutoencoder(**export["config"])
    model.load_state_dict(official_to_gwf(state, export["config"]), strict=True)
    full = model.state_dict()
    assert all(torch.equal(full[gwf_name(k)], v.float()) for k, v in official.items())
    # gwf-convert mae FOLDER DST
    from gwf.convert import main

    main(["mae", str(src.parent), str(tmp_path / "cli.pt"), "--dtype", "float32"])
    cli = torch.load(tmp_path / "cli.pt", weights_only=True)
    assert cli["encoder"].keys() == export["encoder"].keys()
    assert all(torch.equal(cli["encoder"][k], v) for k, v in export["encoder"].items())


def test_msgpack_decoding_known_answers(tmp_path):
    """flax's other leaves: a numpy scalar (ext 3) as a 0-d tensor, a complex (ext 2), int and bool arrays, an
    empty array; a damaged array and an unknown extension are refused."""
    msgpack = pytest.importorskip("msgpack")
    ints = np.arange(6, dtype=np.int64).reshape(2, 3)
    tree = {"step": _flax_ext((), "int32", np.int32(41).tobytes(), code=3), "z": msgpack.ExtType(2, msgpack.packb(
        (1.5, -2.0))), "a": {"ints": _ext(torch.from_numpy(ints)), "mask": _ext(torch.tensor([True, False])),
                              "empty": _ext(torch.zeros(0, 3))}}
    (tmp_path / "t.msgpack").write_bytes(msgpack.packb(tree, use_bin_type=True))
    out = read_flax_msgpack(tmp_path / "t.msgpack")
    assert out["step"].shape == () and out["step"].item() == 41 and out["step"].dtype == torch.int32
    assert out["z"] == complex(1.5, -2.0)
    assert torch.equal(out["a"]["ints"], torch.from_numpy(ints)) and out["a"]["mask"].tolist() == [True, False]
    assert out["a"]["empty"].shape == (0, 3)
    (tmp_path / "bad.msgpack").write_bytes(msgpack.packb({"w": _flax_ext((2, 3), "float32", b"\0" * 20)}))
    with pytest.raises(ValueError, match=r"shape \(2, 3\) and dtype float32 holds 20 bytes, expected 24"):
        read_flax_msgpack(tmp_path / "bad.msgpack")
    (tmp_path / "ext.msgpack").write_bytes(msgpack.packb({"w": msgpack.ExtType(9, b"")}))
    with pytest.raises(ValueError, match="unknown msgpack extension type 9"):
        read_flax_msgpack(tmp_path / "ext.msgpack")


def test_mismatched_msgpack_trees_are_refused_with_the_path_named(tmp_path, monkeypatch):
    _, flax = _random_gwf_mae_as_flax()
    missing = {k: v for k, v in flax.items() if k != "encoder/stages_1/layers_1/gn2/bias"}
    with pytest.raises(ValueError, match=r"1 missing keys: encoder/stages_1/layers_1/gn2/bias"):
        convert_mae(_write_msgpack(tmp_path / "missing", missing), tmp_path / "missing" / "encoder.pt")
    shape = {**flax, "decoder/up21/proj/conv/kernel": torch.zeros(1, 1, 24, 8)}
    with pytest.raises(ValueError, match=r"1 wrong shapes: decoder/up21/proj/conv/kernel \(1, 1, 24, 8\) "
                                         r"\(expected \(3, 3, 24, 8\)\)"):
        convert_mae(_write_msgpack(tmp_path / "shape", shape), tmp_path / "shape" / "encoder.pt")
    extra = {**flax, "encoder/stages_0/layers_0/proj_conv/kernel": torch.zeros(1, 1, 8, 8)}
    with pytest.raises(ValueError, match=r"1 unexpected keys: encoder/stages_0/layers_0/proj_conv/kernel"):
        convert_mae(_write_msgpack(tmp_path / "extra", extra), tmp_path / "extra" / "encoder.pt")
    assert not any(tmp_path.glob("*/encoder.pt"))
    (tmp_path / "junk.msgpack").write_bytes(b"\xc1")  # a byte msgpack never uses
    with pytest.raises(ValueError, match="junk.msgpack is not a Flax msgpack file"):
        convert_mae(tmp_path / "junk.msgpack", tmp_path / "encoder.pt")
    # without the msgpack package: the error says what to install
    monkeypatch.setitem(sys.modules, "msgpack", None)
    with pytest.raises(ValueError, match="pip install msgpack"):
        convert_mae(tmp_path / "missing" / "ema_params.msgpack", tmp_path / "encoder.pt")


def test_the_artifact_folder_is_read_from_its_pt_first(tmp_path):
    """A folder with both files (what misc/convert_mae_to_pt.py leaves) reads ema_params.pt; without either, the
    error names both."""
    official, flax = _random_gwf_mae_as_flax()
    folder = tmp_path / "mae_latent_tiny"
    _write_msgpack(folder, flax)
    other = _official_state(5)
    torch.save(other, folder / "ema_params.pt")
    state, _ = read_official(folder)
    assert all(torch.equal(state[k], v) for k, v in other.items())
    assert convert_mae(folder, tmp_path / "e.pt")["source"]["path"].endswith("ema_params.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no ema_params.pt or ema_params.msgpack in"):
        read_official(tmp_path / "empty")


# ----------------------------------------------------------------------------------------------- feature sets
def _sets(name, h, w, mean_sizes=(2, 4), std_sizes=(2, 4), use_mean=True, use_std=True):
    """The names process_feat gives a map of h x w, in its order ([PT] 341-358)."""
    out = [name] + ([f"{name}_mean"] if use_mean else []) + ([f"{name}_std"] if use_std else [])
    out += [f"{name}_mean_{s}" for s in mean_sizes if h % s == 0 and w % s == 0]
    return out + [f"{name}_std_{s}" for s in std_sizes if h % s == 0 and w % s == 0]


def test_official_feature_set_names_and_order():
    """Default options = the official activation_kwargs (patch sizes [2, 4], means, stds, every 2nd block): on a
    4x32x32 latent with the official [3, 4, 6, 3] stages, 86 sets: global ([PT] 459), norm_x (339), the 5 maps
    (conv1, layer1..4 at 32, 32, 16, 8, 4) then every 2nd block of each stage (363-370), 7 sets each."""
    torch.manual_seed(0)
    enc = MAEFeatures(MaskedAutoencoder(4, 8, (3, 4, 6, 3)).encoder)
    with torch.no_grad():
        feats = enc(torch.randn(1, 4, 32, 32))
    side = {"conv1": 32, "layer1": 32, "layer2": 16, "layer3": 8, "layer4": 4}
    blocks = ["layer1_blk2", "layer2_blk2", "layer2_blk4", "layer3_blk2", "layer3_blk4", "layer3_blk6", "layer4_blk2"]
    expected = ["global", "norm_x"]
    for name in [*side, *blocks]:
        s = side[name.split("_")[0]]
        expected += _sets(name, s, s)
    assert list(feats) == expected and len(expected) == 86
    # options: patch means and stds apart, global mean/std off (patch sets stay, as official), no blocks
    enc = MAEFeatures(enc.encoder, patch_mean_size=[4], patch_std_size=[2, 8], use_mean=False, use_std=False,
                      every_k_block=float("inf"), include_raw_global=False, use_norm_x=False)
    with torch.no_grad():
        feats = enc(torch.randn(1, 4, 32, 32))
    assert list(feats) == [n for name, s in side.items() for n in _sets(name, s, s, [4], [2, 8], False, False)]
    assert MAEFeatures(enc.encoder, every_k_block=0).every_k_block == 0
    assert MAEFeatures(enc.encoder, every_k_block=3.7).every_k_block == 3  # int(every_k_block), as official


def test_norm_x_and_global_known_answers():
    """norm_x of x[b, c] = (b + 1)(c + 1) everywhere is sqrt(((b + 1)(c + 1))^2 + 1e-6); global lists x in (h, w, c)
    order; the gradient of norm_x stays finite at x = 0."""
    torch.manual_seed(0)
    enc = MAEFeatures(MaskedAutoencoder(3, 8, (1, 1, 1, 1)).encoder)
    x = ((torch.arange(2.0)[:, None] + 1) * (torch.arange(3.0)[None] + 1))[:, :, None, None].expand(2, 3, 4, 8)
    with torch.no_grad():
        feats = enc(x.contiguous())
    want = torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]], dtype=torch.float64)
    torch.testing.assert_close(feats["norm_x"].double(), (want**2 + 1e-6).sqrt(), rtol=1e-7, atol=0)
    x = torch.randn(2, 3, 4, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        g = enc(x)["global"]
    assert g.shape == (2, 4 * 8 * 3)
    for b, c, i, j in [(0, 0, 0, 0), (1, 2, 3, 7), (0, 1, 2, 5), (1, 0, 1, 6)]:
        assert g[b, (i * 8 + j) * 3 + c] == x[b, c, i, j]
    zero = torch.zeros(1, 3, 4, 8, requires_grad=True)
    enc(zero)["norm_x"].sum().backward()
    assert torch.isfinite(zero.grad).all()


def test_every_feature_set_against_a_direct_computation(tmp_path):
    """A converted official MAE on an 8x8 latent, float64: each set against loops over the official definitions
    ([PT] 339, 341-358, safe_std 222-226: biased variance + 1e-6) of the maps of the official forward."""
    sd = {k: v.double() for k, v in _official_state(3).items()}
    src = _write_official(tmp_path, {k: v.float() for k, v in sd.items()})
    convert_mae(src, tmp_path / "encoder.pt", dtype=None)
    enc = build_features({"name": "mae", "path": str(tmp_path / "encoder.pt")}).double()
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    with torch.no_grad():
        feats = enc(x)
        maps, blocks = _official_maps({k: v.float().double() for k, v in sd.items()}, x)
    a = x.numpy()
    np.testing.assert_allclose(feats["norm_x"].numpy(), np.sqrt((a**2).mean(axis=(2, 3)) + 1e-6), rtol=1e-12)
    np.testing.assert_array_equal(feats["global"].numpy(), a.transpose(0, 2, 3, 1).reshape(2, -1))
    chosen = {**maps, "layer2_blk2": blocks["layer2_blk2"]}  # every 2nd block: the 2nd of stage 2 only
    names = ["global", "norm_x"]
    for name, fmap in chosen.items():
        m = fmap.numpy()
        _, c, h, w = m.shape
        names += _sets(name, h, w)
        tok = feats[name].numpy()
        for i in range(h):
            for j in range(w):
                np.testing.assert_allclose(tok[:, i * w + j], m[:, :, i, j], rtol=1e-9, atol=1e-12)
        flat = m.reshape(2, c, -1)
        np.testing.assert_allclose(feats[f"{name}_mean"].numpy(), flat.mean(-1), rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(feats[f"{name}_std"].numpy(), np.sqrt(flat.var(-1) + FEATURE_STD_EPS), rtol=1e-9)
        for s in (2, 4):
            if h % s or w % s:
                assert f"{name}_mean_{s}" not in feats and f"{name}_std_{s}" not in feats
                continue
            for pi in range(h // s):
                for pj in range(w // s):
                    block = m[:, :, pi * s:(pi + 1) * s, pj * s:(pj + 1) * s].reshape(2, c, -1)
                    t = pi * (w // s) + pj
                    np.testing.assert_allclose(feats[f"{name}_mean_{s}"][:, t].numpy(), block.mean(-1), rtol=1e-9,
                                               atol=1e-12)
                    np.testing.assert_allclose(feats[f"{name}_std_{s}"][:, t].numpy(),
                                               np.sqrt(block.var(-1) + FEATURE_STD_EPS), rtol=1e-9)
    assert list(feats) == names  # layer3 (2x2) has no 4x4 patch sets, layer4 (1x1) none at all


# ----------------------------------------------------------------------------------------------- the recipe
def test_official_loss_and_fine_tune_ramp_known_answers():
    """loss = lambda CE + (1 - lambda) recon ([PT] 288-304): with a zero decoder head and classifier, recon = per
    sample sum of x^2 over the masked entries / (number of masked locations + 1e-8), CE = log(num_classes)."""
    torch.manual_seed(0)
    model = MaskedAutoencoder(4, 8, (1, 1, 1, 1), mask_patch=2, num_classes=5)
    with torch.no_grad():
        for p in [model.decoder.head.weight, model.decoder.head.bias, model.fc.weight, model.fc.bias]:
            p.zero_()
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    model.double()
    mask = model.random_mask(x, 0.3, 0.7, torch.Generator().manual_seed(2)).double()
    recon = torch.stack([(x[b] ** 2 * mask[b]).sum() / (mask[b].sum() + 1e-8) for b in range(3)]).mean()
    labels = torch.tensor([0, 4, 2])
    for lam in (0.0, 0.1, 1.0):
        torch.testing.assert_close(model.loss(x, mask, labels, lam), lam * math.log(5) + (1 - lam) * recon,
                                   rtol=1e-12, atol=1e-12)
    # the official ramp (train_mae.py: lambda_cls = finetune_cls * min(1, (step - start) / warmup) from
    # start = total - finetune_last_steps): 10 steps, the last 4 fine-tuned, warm-up 2, target 0.1
    assert [finetune_weight(n, 10, 4, 2, 0.1) for n in range(10)] == [0.0] * 7 + [0.05, 0.1, 0.1]
    assert [finetune_weight(n, 10, 0, 2, 0.1) for n in range(10)] == [0.0] * 10  # MAE-256: no fine-tune
    with pytest.raises(ValueError, match="num_classes > 0"):
        MaskedAutoencoder(4, 8, (1, 1)).loss(x.float(), mask.float(), None, 0.1)


def test_fine_tune_trains_a_classifier_that_the_export_drops(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4, 8, 8)).astype(np.float32)
    write_shards(((f"s{i:04d}", x[i], i % 3) for i in range(len(x))), tmp_path / "data", "train", 64)
    dm = ShardDataModule(f"{tmp_path}/data/train-000000.tar", None, (4, 8, 8), num_classes=3, batch_size=16,
                         num_workers=0, shuffle_buffer=0, epoch_size=64)
    dm.setup("fit")
    optim = OptimConfig(name="adamw", lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0, grad_clip=2.0)
    state = train_encoder(dm, tmp_path / "run", steps=4, base_channels=8, layers=(1, 1), optim=optim, ema_decay=0.0,
                          progress=False, finetune_last_steps=2, warmup_finetune=1, finetune_cls=0.5)
    assert state["config"]["num_classes"] == 3 and "fc.weight" in state["model"]
    assert all(math.isfinite(loss) for _, loss in state["history"]) and len(state["history"]) == 4
    # steps 0-2 have lambda 0: the classifier's gradient is zero, Adam leaves it (no weight decay); step 3 moves it
    torch.manual_seed(0)
    init = MaskedAutoencoder(4, 8, (1, 1), num_classes=3).fc.weight
    assert not torch.equal(state["model"]["fc.weight"], init)
    export = torch.load(tmp_path / "run" / "encoder.pt", weights_only=True)
    assert not any(k.startswith("fc") for k in export["encoder"]) and export["config"]["num_classes"] == 3
    assert isinstance(build_features({"name": "mae", "path": str(tmp_path / "run" / "encoder.pt")}), MAEFeatures)


def test_checkpoints_without_gn_eps_load_with_torch_default(tmp_path):
    torch.manual_seed(0)
    model = MaskedAutoencoder(4, 8, (1, 1), gn_eps=LEGACY_GN_EPS)
    legacy = {k: v for k, v in model.config.items() if k not in ("gn_eps", "num_classes")}
    sd = model.state_dict()
    save_checkpoint(tmp_path / "mae.pt", {"format": MAE_CHECKPOINT_FORMAT, "config": legacy, "data_shape": [4, 8, 8],
                                          "step": 0, "model": sd, "ema": sd})
    loaded = load_mae(tmp_path / "mae.pt")
    assert loaded.config["gn_eps"] == LEGACY_GN_EPS and loaded.fc is None
    assert all(m.eps == LEGACY_GN_EPS for m in loaded.modules() if isinstance(m, torch.nn.GroupNorm))


def test_gwf_convert_mae_command(tmp_path, capsys):
    """gwf-convert mae SRC DST: the same export as convert_mae; a wrong source exits with the error, no traceback."""
    from gwf.convert import main

    src = _write_official(tmp_path, _official_state(), None)
    main(["mae", str(src), str(tmp_path / "cli.pt"), "--dtype", "keep"])
    assert "method.features.path" in capsys.readouterr().out
    enc = build_features({"name": "mae", "path": str(tmp_path / "cli.pt")})
    assert isinstance(enc, MAEFeatures)
    with pytest.raises(SystemExit) as exit_info:
        main(["mae", str(tmp_path / "missing.pt"), str(tmp_path / "x.pt")])
    assert exit_info.value.code == 2 and "gwf-convert mae: error" in capsys.readouterr().err
