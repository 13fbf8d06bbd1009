"""``convert_mae``: the authors' latent MAEs (hf://mae_latent_256, hf://mae_latent_640 in Goodeat/drifting) as gwf
encoder exports, the file ``method.features.path`` loads.

The source is the PyTorch state dict that the official ``misc/convert_mae_to_pt.py`` writes (riesz_flow_hudson; it
saves ``{name: tensor}`` of ``MAEResNetJAX.state_dict()`` as ``ema_params.pt`` next to the release's
``ema_params.msgpack`` and ``metadata.json``), or any file in that layout. The JAX release's ``ema_params.msgpack``
itself is not read: it needs the msgpack package, which gwf does not depend on. Official code read:
riesz_flow_hudson models/mae_model.py (the PyTorch port, cited [PT] with its line numbers), models/hf.py,
misc/convert_mae_to_pt.py, configs/mae/latent_640.yaml and latent_ablation_256.yaml, and the JAX release's
models/mae_model.py ([JAX], as carried by the fork xiaolingHuang22/drifting).

    from gwf.features.convert import convert_mae
    convert_mae("hf_root/models/mae/jax/mae_latent_640/ema_params.pt", "runs/mae_latent_640/encoder.pt")
    gwf-train experiment=imagenet_b2 method.features.path=runs/mae_latent_640/encoder.pt ...
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch

from gwf.constants import MAE_ENCODER_FORMAT
from gwf.features.mae import GN_EPS, MaskedAutoencoder, save_checkpoint

# The official MAE architectures (configs/mae/latent_ablation_256.yaml and latent_640.yaml, ``model:``; num_classes
# 1000 is _mae_from_metadata's default, [PT] 401-404). Both read 4x32x32 SD-VAE latents (input_patch_size 1).
OFFICIAL_MAES = {
    "mae_latent_256": {"in_channels": 4, "base_channels": 256, "layers": [3, 4, 6, 3], "mask_patch": 2,
                       "num_classes": 1000},
    "mae_latent_640": {"in_channels": 4, "base_channels": 640, "layers": [3, 4, 6, 3], "mask_patch": 2,
                       "num_classes": 1000},
}
OFFICIAL_LATENT_SHAPE = (4, 32, 32)  # the latents both official MAEs were trained on (dummy_input: 32 x 32 x C)


def official_shapes(in_channels: int, base_channels: int, layers: Sequence[int], num_classes: int
                    ) -> dict[str, tuple[int, ...]]:
    """The official MAE's state dict as {name: shape}, in [PT] MAEResNetJAX's registration order (input_patch_size 1;
    the decoder and the classifier assume 4 stages)."""
    if len(layers) != 4:
        raise ValueError(f"the official MAE has 4 stages (its decoder and classifier assume them), got {list(layers)}")
    b, shapes = base_channels, {}
    gn = lambda name, c: shapes.update({f"{name}.weight": (c,), f"{name}.bias": (c,)})  # noqa: E731
    shapes["encoder.conv1.weight"] = (b, in_channels, 3, 3)  # [PT] 261 (input_patch_size 1)
    gn("encoder.gn1", b)
    widths = [b * 2**i for i in range(4)]  # [PT] 98: doubling from the 2nd stage
    for i, w in enumerate(widths, start=1):  # registered inside the stage loop, before ``stages`` ([PT] 120, 122)
        gn(f"encoder.layer{i}_norm", w)
    for i, (num_blocks, w) in enumerate(zip(layers, widths)):
        for j in range(num_blocks):
            cin = (widths[i - 1] if i > 0 else b) if j == 0 else w
            name = f"encoder.stages.{i}.{j}"
            shapes[f"{name}.conv1.weight"] = (w, cin, 3, 3)
            gn(f"{name}.gn1", w)
            shapes[f"{name}.conv2.weight"] = (w, w, 3, 3)
            gn(f"{name}.gn2", w)
            if cin != w or (i > 0 and j == 0):  # need_proj: channels or stride change ([PT] 50-56)
                shapes[f"{name}.proj_conv.weight"] = (w, cin, 1, 1)
                gn(f"{name}.proj_gn", w)
    c1, c2, c3, c4, c5 = b, b, 2 * b, 4 * b, 8 * b  # [PT] 181-185
    shapes["decoder.bridge.conv.weight"] = (c5, c5, 3, 3)
    gn("decoder.bridge.gn", c5)
    for name, cin, skip, cout in (("up43", c5, c4, c4), ("up32", c4, c3, c3), ("up21", c3, c2, c2),
                                  ("up10", c2, c1, c1)):  # [PT] 188-191, _UpBlock 162-167
        gn(f"decoder.{name}.concat_norm_fn", cin + skip)
        shapes[f"decoder.{name}.proj.conv.weight"] = (cout, cin + skip, 3, 3)
        gn(f"decoder.{name}.proj.gn", cout)
        shapes[f"decoder.{name}.refine.conv.weight"] = (cout, cout, 3, 3)
        gn(f"decoder.{name}.refine.gn", cout)
    shapes["decoder.head.weight"], shapes["decoder.head.bias"] = (in_channels, c1, 1, 1), (in_channels,)  # [PT] 192
    shapes["fc.weight"], shapes["fc.bias"] = (num_classes, c5), (num_classes,)  # [PT] 268
    return shapes


# official name -> gwf MaskedAutoencoder name: the first matching rule rewrites the prefix (the rest is the same)
_RENAMES = (
    (r"^encoder\.conv1\.", "encoder.stem.0."),
    (r"^encoder\.gn1\.", "encoder.stem.1."),
    (r"^encoder\.layer(\d+)_norm\.", lambda m: f"encoder.stage_norms.{int(m[1]) - 1}."),
    (r"^encoder\.stages\.(\d+)\.(\d+)\.proj_conv\.", r"encoder.stages.\1.\2.proj.0."),
    (r"^encoder\.stages\.(\d+)\.(\d+)\.proj_gn\.", r"encoder.stages.\1.\2.proj.1."),
    (r"^decoder\.bridge\.conv\.", "decoder.bridge.0."),
    (r"^decoder\.bridge\.gn\.", "decoder.bridge.1."),
    (r"^decoder\.up(\d\d)\.concat_norm_fn\.", lambda m: f"decoder.ups.{_UPS.index(m[1])}.norm."),
    (r"^decoder\.up(\d\d)\.proj\.conv\.", lambda m: f"decoder.ups.{_UPS.index(m[1])}.body.0."),
    (r"^decoder\.up(\d\d)\.proj\.gn\.", lambda m: f"decoder.ups.{_UPS.index(m[1])}.body.1."),
    (r"^decoder\.up(\d\d)\.refine\.conv\.", lambda m: f"decoder.ups.{_UPS.index(m[1])}.body.3."),
    (r"^decoder\.up(\d\d)\.refine\.gn\.", lambda m: f"decoder.ups.{_UPS.index(m[1])}.body.4."),
)
_UPS = ("43", "32", "21", "10")  # the official up blocks, coarsest first (gwf's decoder.ups order)


def gwf_name(official: str) -> str:
    """The gwf MaskedAutoencoder parameter that holds an official one (e.g. encoder.layer2_norm.weight ->
    encoder.stage_norms.1.weight; the basic blocks' conv1/gn1/conv2/gn2, decoder.head and fc keep their names)."""
    for pattern, repl in _RENAMES:
        new, n = re.subn(pattern, repl, official)
        if n:
            return new
    return official


def read_official(src: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, metadata) of an official MAE: ``src`` is an ema_params.pt (metadata.json beside it is read when
    present) or the artifact folder holding them. Memory-mapped: MAE-640 is ~9 GB in fp32."""
    src = Path(src)
    folder = src if src.is_dir() else src.parent
    if src.is_dir():
        src = src / "ema_params.pt"
    if src.suffix == ".msgpack" or (not src.exists() and (folder / "ema_params.msgpack").exists()):
        raise ValueError(
            f"{src}: the JAX release's msgpack is not read here (it needs the msgpack package, not a gwf dependency). "
            "Convert it once with the official misc/convert_mae_to_pt.py (W-Flow PyTorch code, with flax installed), "
            "which writes ema_params.pt beside it, and pass that file")
    if not src.is_file():
        raise FileNotFoundError(f"no official MAE state dict at {src} (expected ema_params.pt written by the "
                                "official misc/convert_mae_to_pt.py)")
    state = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{src} is not a state dict ({{name: tensor}}, what misc/convert_mae_to_pt.py writes)")
    meta_path = folder / "metadata.json"
    metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return dict(state), metadata


def official_config(state: Mapping[str, torch.Tensor], metadata: Mapping | None = None) -> dict:
    """The MaskedAutoencoder config of an official state dict: from metadata.json's model_config when given, else
    read off the shapes (conv1's channels, the blocks per stage, the classifier's rows)."""
    model = dict((metadata or {}).get("model_config") or {})
    if int(model.get("input_patch_size", 1)) != 1:
        raise ValueError(f"input_patch_size {model['input_patch_size']}: a pixel-space MAE (space-to-depth input), "
                         "not supported; the latent MAEs have input_patch_size 1")
    if model:
        return {"in_channels": int(model["in_channels"]), "base_channels": int(model["base_channels"]),
                "layers": [int(n) for n in model["layers"]], "mask_patch": int(model.get("patch_size", 2)),
                "num_classes": int(model.get("num_classes", 1000)), "gn_eps": GN_EPS}
    if "encoder.conv1.weight" not in state:
        raise ValueError("not an official MAE state dict: missing key encoder.conv1.weight (and no metadata.json "
                         f"model_config); keys start with {sorted(state)[:5]}")
    base, in_channels = state["encoder.conv1.weight"].shape[:2]
    layers = [sum(1 for j in range(len(state)) if f"encoder.stages.{i}.{j}.conv1.weight" in state) for i in range(4)]
    num_classes = state["fc.weight"].shape[0] if "fc.weight" in state else 1000
    return {"in_channels": int(in_channels), "base_channels": int(base), "layers": layers, "mask_patch": 2,
            "num_classes": int(num_classes), "gn_eps": GN_EPS}


def check_layout(state: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise ValueError naming the missing keys, the unexpected keys and the wrong shapes (10 of each at most)."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(expected[k])})" for k in expected
             if k in state and tuple(state[k].shape) != tuple(expected[k])]
    problems = [f"{len(v)} {name}: {', '.join(v[:10])}{' ...' if len(v) > 10 else ''}"
                for name, v in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong))
                if v]
    if problems:
        raise ValueError(f"{what} does not match the official MAE layout; " + "; ".join(problems))


def official_to_gwf(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """An official state dict (checked against ``official_shapes(config)``) as the state dict of gwf's
    ``MaskedAutoencoder(**config)``: the same tensors (not copied), renamed."""
    check_layout(state, official_shapes(config["in_channels"], config["base_channels"], config["layers"],
                                        config["num_classes"]), "the official state dict")
    out = {gwf_name(k): v for k, v in state.items()}
    with torch.device("meta"):  # shapes only, whatever the size
        target = MaskedAutoencoder(**config).state_dict()
    check_layout(out, {k: tuple(v.shape) for k, v in target.items()}, "the renamed state dict (a gwf bug)")
    return out


def convert_mae(src: str | Path, dst: str | Path, *, dtype: torch.dtype | None = torch.bfloat16,
                data_shape: Sequence[int] = OFFICIAL_LATENT_SHAPE) -> dict:
    """Write the gwf encoder export (gwf-train-encoder's DIR/encoder.pt format, MAE_ENCODER_FORMAT) of the official
    MAE at ``src`` to ``dst`` and return it. Refuses (ValueError naming them) missing or unexpected keys and wrong
    shapes. ``dtype``: of the exported weights (bf16, gwf-train-encoder's default; the official recipes compute the
    MAE in bf16); None keeps the source's. The decoder and the classifier are checked, then dropped."""
    state, metadata = read_official(src)
    config = official_config(state, metadata)
    weights = official_to_gwf(state, config)
    cast = (lambda v: v) if dtype is None else (lambda v: v.to(dtype) if v.is_floating_point() else v)  # noqa: E731
    encoder = {k[len("encoder."):]: cast(v) for k, v in weights.items() if k.startswith("encoder.")}
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in encoder.values()})
    export = {"format": MAE_ENCODER_FORMAT, "config": config, "data_shape": [int(s) for s in data_shape],
              "step": int(metadata.get("step", 0) or 0), "dtype": dtypes[0] if len(dtypes) == 1 else ",".join(dtypes),
              "encoder": encoder, "source": {"path": str(src), "layout": "official MAEResNetJAX state dict",
                                             "metadata": json.dumps(metadata, sort_keys=True)}}
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(dst, export)
    return export
