"""gwf-convert: official checkpoints -> gwf generator files.

    gwf-convert wflow-generator <official state_*.pt> --out <gwf .pt> [--size dit_xl2] [--raw]
    gwf-convert mae <official ema_params.msgpack, ema_params.pt or their folder> <gwf encoder .pt>
        [--dtype bfloat16|float32|keep]

The released W-Flow checkpoints (hf jiaqihan99/W-Flow, checkpoints/latent_sota_{B,L,XL}_ot/state_*.pt; official
README "Checkpoint Format" and utils/ckpt_util.py ``save_checkpoint``) are ``torch.save`` dicts {step, model,
ema_model, optimizer, ema_decay}; ``model`` and ``ema_model`` are DitGen state dicts. The official inference
(inference_ours.py ``_load_model``) samples with ``ema_model``, as this converter does by default (``--raw``: the
trained weights). The official train.py compiles the trunk in place (``model.model = torch.compile(...)``) after
making its EMA copy: the raw ``model`` entry then carries ``model._orig_mod.`` names, the EMA copy does not; DDP
would add ``module.``. Both prefixes are removed. Also read: the official EMA
artifact params_ema/ema_params.pt (a flat state dict, utils/ckpt_util.py ``save_params_ema_artifact``), any flat
state dict in a .pt, and .safetensors files when the ``safetensors`` package is installed. NOT read for generators:
the Flax MsgPack trees of the Drifting JAX generator releases (``ema_params.msgpack``, models/hf.py
``load_jax_ema_params``): their names need the official JAX-to-PyTorch tree conversion (utils/param_convert.py), which
the released repository does not contain; W-Flow's own generators are released as torch files.

``gwf-convert mae`` (gwf/features/convert.py) reads the authors' latent MAEs (hf Goodeat/drifting
models/mae/jax/mae_latent_{256,640}): the JAX release's ``ema_params.msgpack`` itself (decoded without flax or jax;
needs the ``msgpack`` package, gwf's ``convert`` extra) or the ``ema_params.pt`` that the official
misc/convert_mae_to_pt.py writes, with the ``metadata.json`` beside it; a folder is read from its .pt first.

Architecture options (num_classes, n_cls_tokens, noise_classes, noise_coords, head count) are read from the
checkpoint's shapes; the size from its width and depth (or checked against ``--size``). The output holds
{"format", "model" (the gwf registry name), "model_config", "state_dict", "source"}; ``load_generator`` rebuilds the
module from it, strictly.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from torch import Tensor

from gwf.constants import SD_VAE_LATENT_SHAPE
from gwf.models.wflow_dit import DIT_SIZES, WFlowDiT, dit, official_keys

FORMAT = "gwf-generator/1"
_PREFIXES = re.compile(r"(^|\.)(module|_orig_mod)\.")  # DDP wrapper, torch.compile wrapper


# ------------------------------------------------------------------------------------------------ reading
def read_checkpoint(src: str | Path) -> dict:
    """The object stored in ``src``: a .safetensors file (flat) or a torch file (loaded with weights_only)."""
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"no checkpoint at {src}")
    if src.suffix == ".msgpack":
        raise ValueError(f"{src}: a Flax MsgPack tree (the Drifting JAX generator release format) is not a W-Flow "
                         "generator: its parameter names need the official JAX-to-PyTorch tree conversion "
                         "(utils/param_convert.py, not released). W-Flow's generators are released as torch "
                         "state_*.pt files, which this reads; the MAE's msgpack is read by `gwf-convert mae`")
    if src.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ValueError(f"{src}: reading .safetensors needs the safetensors package (pip install safetensors)"
                             ) from e
        return load_file(str(src))
    return torch.load(src, map_location="cpu", weights_only=True)


def select_weights(payload: dict, ema: bool = True) -> tuple[dict[str, Tensor], str]:
    """(the official generator state dict, "ema" | "raw" | "flat") of a loaded checkpoint, wrapper prefixes removed.
    A training checkpoint {model, ema_model, ...} gives ema_model (or model when ``ema`` is False); a flat state
    dict is taken as it is."""
    if not isinstance(payload, dict):
        raise ValueError(f"expected a dict (a state_*.pt checkpoint or a state dict), got {type(payload).__name__}")
    if "model" in payload or "ema_model" in payload:
        entry = "ema_model" if ema else "model"
        state = payload.get(entry)
        if state is None:
            hint = "; convert the raw weights with --raw (ema=False)" if ema else ""
            raise ValueError(f"the checkpoint has no '{entry}' weights (keys: {sorted(payload)}){hint}")
        kind = "ema" if ema else "raw"
    else:
        state, kind = payload, "flat"
    tensors = {_PREFIXES.sub(r"\1", k): v for k, v in state.items() if torch.is_tensor(v)}
    if not tensors:
        raise ValueError("the checkpoint holds no tensors")
    return tensors, kind


def infer_options(state: dict[str, Tensor], out_shape=SD_VAE_LATENT_SHAPE, patch: int = 2) -> dict:
    """WFlowDiT options read off an official state dict's shapes (see the key names in gwf.models.wflow_dit)."""
    need = ["class_embed.weight", "model.blocks.0.attn.q_norm.weight"]
    missing = [k for k in need if k not in state]
    if missing:
        raise ValueError(f"not an official W-Flow DitGen state dict: missing {missing} (first keys: "
                         f"{sorted(state)[:6]})")
    num_classes, hidden = state["class_embed.weight"].shape
    head_dim = state["model.blocks.0.attn.q_norm.weight"].shape[0]
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("model.blocks."))
    noise = [k for k in state if re.fullmatch(r"noise_embeds\.\d+\.weight", k)]
    cls = state.get("model.cls_embed")
    return dict(out_shape=list(out_shape), num_classes=int(num_classes), hidden=int(hidden), depth=depth,
                num_heads=int(hidden) // int(head_dim), patch=patch,
                n_cls_tokens=int(cls.shape[1]) if cls is not None else 0,
                noise_classes=int(state["noise_embeds.0.weight"].shape[0]) if noise else 0,
                noise_coords=len(noise))


def size_of(options: dict) -> str:
    """The DIT_SIZES name with these hidden, depth and num_heads."""
    arch = {k: options[k] for k in ("hidden", "depth", "num_heads")}
    for name, numbers in DIT_SIZES.items():
        if numbers == arch:
            return name
    raise ValueError(f"no W-Flow size has {arch}; known sizes: {DIT_SIZES}")


# ------------------------------------------------------------------------------------------------ mapping
def _check(source: dict[str, Tensor], expected: dict[str, torch.Size], what: str) -> None:
    """Refuse any key or shape mismatch, naming every offending key."""
    missing = sorted(set(expected) - set(source))
    unexpected = sorted(set(source) - set(expected))
    shapes = [f"{k}: {tuple(source[k].shape)} != {tuple(expected[k])}" for k in sorted(set(source) & set(expected))
              if tuple(source[k].shape) != tuple(expected[k])]
    if missing or unexpected or shapes:
        lines = [f"{what} does not match the W-Flow generator:"]
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", shapes)):
            if items:
                lines.append(f"  {label} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20
                                                                                      else ""))
        raise ValueError("\n".join(lines))


def official_to_gwf(state: dict[str, Tensor], model: WFlowDiT) -> dict[str, Tensor]:
    """Official DitGen state dict -> ``model``'s state dict (same tensors, renamed); every key and shape checked."""
    names = official_keys(model)  # ours -> official
    ours = model.state_dict()
    _check(state, {names[k]: v.shape for k, v in ours.items()}, "the official state dict")
    return {k: state[names[k]] for k in ours}


def gwf_to_official(state: dict[str, Tensor], model: WFlowDiT) -> dict[str, Tensor]:
    """The inverse: ``model``'s state dict -> the official DitGen names (for the official sampler)."""
    _check(state, {k: v.shape for k, v in model.state_dict().items()}, "the gwf state dict")
    names = official_keys(model)
    return {names[k]: v for k, v in state.items()}


# ------------------------------------------------------------------------------------------------ files
def convert_generator(src: str | Path, dst: str | Path, size: str | None = None, ema: bool = True,
                      out_shape=SD_VAE_LATENT_SHAPE, patch: int = 2) -> dict:
    """Official W-Flow generator checkpoint ``src`` -> gwf generator file ``dst``; returns its model_config.
    ``size``: a DIT_SIZES name, checked against the checkpoint (None: read from it)."""
    payload = read_checkpoint(src)
    state, kind = select_weights(payload, ema)
    options = infer_options(state, out_shape, patch)
    found = size_of(options)
    if size is not None and size != found:
        raise ValueError(f"--size {size} does not match the checkpoint, which is {found} ({options})")
    config = {k: v for k, v in options.items() if k not in DIT_SIZES[found]}
    with torch.device("meta"):  # names and shapes only: no memory
        model = dit(found, **config)
    converted = official_to_gwf(state, model)
    source = dict(path=str(src), weights=kind, step=int(payload.get("step", -1)) if kind != "flat" else -1)
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(format=FORMAT, model=found, model_config=config,
                    state_dict={k: v.contiguous() for k, v in converted.items()}, source=source), dst)
    return dict(model=found, **config)


def load_generator(path: str | Path, device: str | torch.device = "cpu", **options) -> WFlowDiT:
    """The generator of a ``convert_generator`` file, weights loaded strictly; ``options`` (checkpointing,
    attn_fp32, ...) override the stored config."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not a gwf-convert generator file (format {FORMAT})")
    model = dit(payload["model"], **{**payload["model_config"], **options})
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.to(device)


# ------------------------------------------------------------------------------------------------ CLI
def _run_wflow(a) -> None:
    config = convert_generator(a.src, a.out, a.size, ema=not a.raw, out_shape=a.out_shape, patch=a.patch)
    print(f"wrote {a.out}: {config}")


def _run_mae(args) -> None:
    import torch

    from gwf.features.convert import convert_mae

    convert_mae(args.src, args.dst, dtype=None if args.dtype == "keep" else getattr(torch, args.dtype))
    print(f"wrote {args.dst}: use it as method.features.path")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gwf-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("wflow-generator", help="official W-Flow DitGen checkpoint -> gwf generator file")
    p.add_argument("src", help="official state_*.pt, params_ema/ema_params.pt, or a .safetensors state dict")
    p.add_argument("--out", required=True, help="gwf generator file to write (.pt)")
    p.add_argument("--size", choices=sorted(DIT_SIZES), default=None,
                   help="expected size (default: read from the checkpoint)")
    p.add_argument("--raw", action="store_true", help="the trained weights instead of the EMA weights")
    p.add_argument("--out-shape", type=int, nargs=3, default=list(SD_VAE_LATENT_SHAPE), metavar=("C", "H", "W"),
                   help="latent shape (default: the SD-VAE latents 4 32 32)")
    p.add_argument("--patch", type=int, default=2, help="patch size (default 2, the official)")
    p.set_defaults(run=_run_wflow)
    m = sub.add_parser("mae", help="official latent MAE (the JAX release's ema_params.msgpack, or the ema_params.pt "
                                   "of misc/convert_mae_to_pt.py) -> gwf encoder file for method.features.path")
    m.add_argument("src", help="ema_params.msgpack (needs msgpack: pip install msgpack), ema_params.pt, or their "
                               "artifact folder (with metadata.json; the .pt first)")
    m.add_argument("dst", help="gwf encoder file to write (.pt)")
    m.add_argument("--dtype", choices=("bfloat16", "float32", "keep"), default="bfloat16",
                   help="stored precision (default bfloat16; keep: the source's)")
    m.set_defaults(run=_run_mae)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"gwf-convert {args.command}: error: {e}\n")


if __name__ == "__main__":
    main()
