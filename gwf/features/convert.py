"""``convert_mae``: the authors' latent MAEs (hf://mae_latent_256, hf://mae_latent_640 in Goodeat/drifting) as gwf
encoder exports, the file ``method.features.path`` loads.

Two sources are read, each with the ``metadata.json`` beside it:

- the JAX release's ``ema_params.msgpack`` (hf Goodeat/drifting models/mae/jax/mae_latent_{256,640}/), a Flax
  ``serialization.msgpack_serialize`` tree of the [JAX] MAEResNetJAX params, decoded here without flax or jax
  (``read_flax_msgpack``; needs the ``msgpack`` package: ``pip install msgpack``, or gwf's ``convert`` extra) and
  mapped to the official names by ``official_name`` (Flax module names of [JAX], kernels HWIO -> OIHW and
  (in, out) -> (out, in), GroupNorm scale -> weight);
- the PyTorch state dict that the official ``misc/convert_mae_to_pt.py`` writes (riesz_flow_hudson; it saves
  ``{name: tensor}`` of ``MAEResNetJAX.state_dict()`` as ``ema_params.pt`` next to the msgpack), or any file in that
  layout. A folder holding both is read from the .pt (memory-mapped; the msgpack is decoded into memory).

Official code read: riesz_flow_hudson models/mae_model.py (the PyTorch port, cited [PT] with its line numbers),
models/hf.py, misc/convert_mae_to_pt.py, configs/mae/latent_640.yaml and latent_ablation_256.yaml, the JAX release's
models/mae_model.py ([JAX], as carried by the fork xiaolingHuang22/drifting) and utils/init_util.py, and
google/flax flax/serialization.py (the msgpack encoding).

    from gwf.features.convert import convert_mae
    convert_mae("hf_root/models/mae/jax/mae_latent_640/ema_params.msgpack", "runs/mae_latent_640/encoder.pt")
    gwf-train experiment=imagenet_b2 method.features.path=runs/mae_latent_640/encoder.pt ...
"""

from __future__ import annotations

import json
import math
import mmap
import re
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

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


# ------------------------------------------------------------------------ the JAX release's msgpack (Flax)
# flax/serialization.py (google/flax): msgpack_serialize packs the param tree (nested str-keyed maps) with arrays as
# ExtType(_MsgpackExtType.ndarray = 1, _ndarray_to_bytes(a)), _ndarray_to_bytes(a) = msgpack of (shape, dtype name,
# a.tobytes("C")); numpy scalars as ExtType(npscalar = 3, the same payload of the 0-d array); complex numbers as
# ExtType(native_complex = 2, msgpack of (real, imag)). Arrays above MAX_CHUNK_SIZE = 2**30 bytes are first replaced
# by {"__msgpack_chunked_array__": True, "shape": {"0": n0, ...}, "chunks": {"0": flat chunk, ...}} (_chunk).
_FLAX_NDARRAY, _FLAX_COMPLEX, _FLAX_NPSCALAR = 1, 2, 3
_FLAX_CHUNKED = "__msgpack_chunked_array__"


def _import_msgpack():
    try:
        import msgpack
    except ImportError as e:
        raise ValueError("reading the JAX release's ema_params.msgpack needs the msgpack package: pip install msgpack "
                         "(or gwf's convert extra: pip install -e '.[convert]'); no flax or jax is needed") from e
    return msgpack


def _flax_array(payload: bytes, msgpack) -> torch.Tensor:
    """The tensor of one flax ndarray payload (shape, dtype name, C-order bytes), sharing the decoded bytes (read-only
    memory: copy before writing). The dtype names flax writes (numpy's ``dtype.name``) are torch's dtype names, and
    "bfloat16" (jax's ml_dtypes type, which numpy lacks) is read as torch.bfloat16: the same 16-bit patterns, as if
    viewed as uint16 and reinterpreted."""
    shape, name, data = msgpack.unpackb(payload, raw=True)  # as flax's _ndarray_from_bytes: raw bytes
    name = name.decode() if isinstance(name, bytes) else str(name)
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"flax array of dtype {name!r}: not a dtype torch has")
    shape = tuple(int(n) for n in shape)
    count = math.prod(shape)
    if len(data) != count * dtype.itemsize:
        raise ValueError(f"flax array of shape {shape} and dtype {name} holds {len(data)} bytes, expected "
                         f"{count * dtype.itemsize}: the file is damaged")
    if count == 0:
        return torch.empty(shape, dtype=dtype)
    with warnings.catch_warnings():  # the decoded bytes are immutable; every reader here copies before any write
        warnings.filterwarnings("ignore", message="The given buffer is not writable")
        return torch.frombuffer(data, dtype=dtype, count=count).reshape(shape)


def _unchunk(node: dict, where: str) -> torch.Tensor:
    """flax's _unchunk: the flat chunks in order, concatenated, reshaped."""
    try:
        shape = tuple(int(node["shape"][str(i)]) for i in range(len(node["shape"])))
        chunks = [node["chunks"][str(i)] for i in range(len(node["chunks"]))]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: a chunked flax array without its shape or chunks ({e!r})") from e
    if not chunks or not all(torch.is_tensor(c) and c.dim() == 1 and c.dtype == chunks[0].dtype for c in chunks):
        raise ValueError(f"{where}: the chunks of a chunked flax array are not flat arrays of one dtype")
    return torch.cat(chunks).reshape(shape)


def _restore_chunks(tree: Any, where: str = "") -> Any:
    if isinstance(tree, dict):
        if tree.get(_FLAX_CHUNKED):
            return _unchunk(tree, where or "/")
        return {k: _restore_chunks(v, f"{where}/{k}") for k, v in tree.items()}
    return tree


def read_flax_msgpack(path: str | Path) -> Any:
    """The tree of a Flax ``msgpack_serialize`` file (flax's ``msgpack_restore``, without flax or jax): nested dicts
    with torch tensors for the arrays (bf16 included), 0-d tensors for numpy scalars, chunked arrays joined. The file
    is memory-mapped and decoded once; each array keeps one copy of its bytes (MAE-640: about its file size)."""
    msgpack = _import_msgpack()

    def ext_hook(code: int, payload: bytes):
        if code == _FLAX_NDARRAY:
            return _flax_array(payload, msgpack)
        if code == _FLAX_NPSCALAR:
            return _flax_array(payload, msgpack).reshape(())
        if code == _FLAX_COMPLEX:
            real, imag = msgpack.unpackb(payload)
            return complex(real, imag)
        raise ValueError(f"unknown msgpack extension type {code} (flax writes 1, 2 and 3)")

    path = Path(path)
    with open(path, "rb") as f:
        if path.stat().st_size == 0:
            raise ValueError(f"{path} is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            try:
                tree = msgpack.unpackb(data, raw=False, ext_hook=ext_hook, strict_map_key=False)
            except (msgpack.UnpackException, msgpack.ExtraData, ValueError) as e:
                raise ValueError(f"{path} is not a Flax msgpack file: {e}") from e
    return _restore_chunks(tree)


def flatten_tree(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a/b/c": leaf} of a nested dict (flax's "/"-joined paths)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    out = {}
    for k, v in tree.items():
        out.update(flatten_tree(v, f"{prefix}/{k}" if prefix else str(k)))
    return out


# [JAX] module names -> the [PT] state-dict names. Flax names a submodule by its setup attribute (encoder, decoder,
# fc; conv1, gn1, layer{i}_norm; bridge, up43 .. up10, head; _BasicBlock conv1/gn1/conv2/gn2/proj_conv/proj_gn;
# _ConvGNReLU conv/gn; _UpBlock concat_norm_fn/proj/refine), a list attribute's items by "{name}_{index}"
# (_ResNetEncoder ``self.stages = [...]``: stages_{i}), and the modules passed to nn.Sequential(blocks) by its field
# ``layers`` (layers_{j}). Params: nn.Conv "kernel" (HWIO) and "bias" (head only: use_bias defaults to True),
# nn.GroupNorm "scale" and "bias", nn.Dense "kernel" (in, out) and "bias". proj_conv/proj_gn exist where they are
# called (residual.shape != y.shape: the first block of stages 2-4). A "params" collection wrapper is dropped, as
# [JAX] utils/init_util.py load_init_entry does.
_BLOCK = re.compile(r"^encoder/stages_(\d+)/layers_(\d+)/")
_PT_BLOCK = re.compile(r"^encoder\.stages\.(\d+)\.(\d+)\.")


def official_name(path: str) -> str:
    """The [PT] state-dict name of a [JAX] param path, e.g. encoder/stages_1/layers_0/proj_gn/scale ->
    encoder.stages.1.0.proj_gn.weight, decoder/up43/proj/conv/kernel -> decoder.up43.proj.conv.weight."""
    name = _BLOCK.sub(r"encoder.stages.\1.\2.", path).replace("/", ".")
    head, _, leaf = name.rpartition(".")
    return f"{head}.weight" if leaf in ("kernel", "scale") else name


def flax_path(official: str, ndim: int) -> str:
    """The inverse of ``official_name`` for a tensor of ``ndim`` dimensions (weights of 2 or 4 dimensions are Dense
    or Conv kernels, of 1 GroupNorm scales)."""
    path = _PT_BLOCK.sub(r"encoder/stages_\1/layers_\2/", official).replace(".", "/")
    head, _, leaf = path.rpartition("/")
    return f"{head}/{'scale' if ndim == 1 else 'kernel'}" if leaf == "weight" else path


def _to_torch_layout(path: str, leaf: torch.Tensor) -> torch.Tensor:
    """Conv kernels HWIO -> OIHW, Dense kernels (in, out) -> (out, in); a view (any other leaf as it is)."""
    if path.endswith("kernel") and leaf.dim() == 4:
        return leaf.permute(3, 2, 0, 1)
    if path.endswith("kernel") and leaf.dim() == 2:
        return leaf.t()
    return leaf


def official_flax_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """The [JAX] param tree of an official MAE as {path: shape}, in the file's layouts (HWIO, (in, out))."""
    shapes = official_shapes(config["in_channels"], config["base_channels"], config["layers"], config["num_classes"])
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 4:
            shape = (shape[2], shape[3], shape[1], shape[0])
        elif len(shape) == 2:
            shape = (shape[1], shape[0])
        out[flax_path(name, len(shape))] = shape
    return out


def read_release_msgpack(src: str | Path, metadata: Mapping | None = None) -> dict[str, torch.Tensor]:
    """The official state dict ([PT] names and layouts, contiguous copies) of the JAX release's ema_params.msgpack.
    The tree is checked against the official layout of its config (metadata's model_config, else read off the
    shapes) first: a missing, unexpected or misshaped leaf is refused with its path in the file named."""
    tree = read_flax_msgpack(src)
    if isinstance(tree, dict) and set(tree) == {"params"}:
        tree = tree["params"]
    if not isinstance(tree, dict):
        raise ValueError(f"{src}: the msgpack holds a {type(tree).__name__}, not a Flax param tree")
    flat = flatten_tree(tree)
    del tree
    odd = [p for p, v in flat.items() if not torch.is_tensor(v)]
    if odd:
        raise ValueError(f"{src}: leaves that are not arrays: {', '.join(odd[:10])}")
    state = {official_name(p): _to_torch_layout(p, v) for p, v in flat.items()}  # views of the decoded bytes
    check_layout(flat, official_flax_shapes(official_config(state, metadata)), f"the JAX param tree in {src}")
    del flat
    # one contiguous copy per leaf; the decoded bytes go as soon as their leaf is copied
    return {name: state.pop(name).clone(memory_format=torch.contiguous_format) for name in list(state)}


# ------------------------------------------------------------------------------------------------ reading
def official_file(src: str | Path) -> Path:
    """The file ``read_official`` reads for ``src``: the file itself, or in a folder ema_params.pt if present, else
    ema_params.msgpack."""
    src = Path(src)
    if not src.is_dir():
        return src
    for name in ("ema_params.pt", "ema_params.msgpack"):
        if (src / name).is_file():
            return src / name
    raise FileNotFoundError(f"no ema_params.pt or ema_params.msgpack in {src} (the official MAE artifact folder: "
                            "hf Goodeat/drifting models/mae/jax/mae_latent_{256,640})")


def read_official(src: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict in the [PT] names, metadata) of an official MAE: ``src`` is an ema_params.pt, an
    ema_params.msgpack (metadata.json beside either is read when present), or the artifact folder holding them
    (the .pt first). The .pt is memory-mapped (MAE-640 is 10.75 GB in fp32); the msgpack is decoded into
    memory."""
    src = official_file(src)
    meta_path = src.parent / "metadata.json"
    metadata = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if not src.is_file():
        raise FileNotFoundError(f"no official MAE weights at {src} (expected the release's ema_params.msgpack or "
                                "the ema_params.pt that the official misc/convert_mae_to_pt.py writes)")
    if src.suffix == ".msgpack":
        return read_release_msgpack(src, metadata), metadata
    state = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise ValueError(f"{src} is not a state dict ({{name: tensor}}, what misc/convert_mae_to_pt.py writes)")
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
    MAE at ``src`` (ema_params.msgpack, ema_params.pt or their folder: ``read_official``) to ``dst`` and return it.
    Refuses (ValueError naming them) missing or unexpected keys and wrong
    shapes. ``dtype``: of the exported weights (bf16, gwf-train-encoder's default; the official recipes compute the
    MAE in bf16); None keeps the source's. The decoder and the classifier are checked, then dropped."""
    src = official_file(src)
    state, metadata = read_official(src)
    config = official_config(state, metadata)
    weights = official_to_gwf(state, config)
    cast = (lambda v: v) if dtype is None else (lambda v: v.to(dtype) if v.is_floating_point() else v)  # noqa: E731
    encoder = {k[len("encoder."):]: cast(v) for k, v in weights.items() if k.startswith("encoder.")}
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in encoder.values()})
    layout = ("official MAEResNetJAX Flax params (the JAX release's msgpack)" if src.suffix == ".msgpack"
              else "official MAEResNetJAX state dict")
    export = {"format": MAE_ENCODER_FORMAT, "config": config, "data_shape": [int(s) for s in data_shape],
              "step": int(metadata.get("step", 0) or 0), "dtype": dtypes[0] if len(dtypes) == 1 else ",".join(dtypes),
              "encoder": encoder, "source": {"path": str(src), "layout": layout,
                                             "metadata": json.dumps(metadata, sort_keys=True)}}
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(dst, export)
    return export
