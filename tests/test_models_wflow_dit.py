"""The official W-Flow generator (gwf/models/wflow_dit.py) and its checkpoint converter (gwf/convert.py).

The official parameter names, shapes and counts are written below as data, read off the constructors of the official
models/generator.py (hanjq17/W-Flow; its public fork hudsonchen/riesz_flow_hudson at commit a8941cb), never from our
model: the round trip builds an official-layout state dict from them. Then the tiny size: forward, the zero output
layer at init, gradients, labels and alpha, the noise mapping, bf16 autocast, checkpointing."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from gwf import convert
from gwf.models.wflow_dit import (
    DIT_SIZES,
    PAPER_PARAMS,
    RMSNorm,
    count_parameters,
    dit,
    official_key,
    patchify,
    rope_tables,
    rotate_half,
    sincos_pos_embed,
    swiglu_width,
    unpatchify,
)

# ---------------------------------------------------------------------------------------------------------------------
# The official parameter shapes, as data (models/generator.py; configs/gen/latent_sota_{B,L,XL}_ot_1node.yaml)
# ---------------------------------------------------------------------------------------------------------------------

# hidden_size, depth, num_heads from the configs (cond_dim = hidden_size); swiglu = the SwiGLUFFN width of
# LightningDiTBlock: int(2/3 * int(4.0 * hidden)) rounded up to a multiple of 32 (2730 -> 2752 for L/2);
# params = the sum of the shapes below with 1000 classes, 4x32x32 latents, patch 2, 16 class tokens, 32 noise
# coordinates of 64 classes (the official DitGen built at these settings counts the same).
OFFICIAL = {
    "dit_b2": dict(hidden=768, depth=12, heads=12, swiglu=2048, params=132_708_880),
    "dit_l2": dict(hidden=1024, depth=24, heads=16, swiglu=2752, params=462_909_456),
    "dit_xl2": dict(hidden=1152, depth=28, heads=16, swiglu=3072, params=678_929_872),
}
# the tiny size at the options of conf/model/dit_tiny.yaml (not an official size): 4x8x8 latents, 10 classes
TINY = dict(hidden=64, depth=2, heads=4, swiglu=192, num_classes=10, channels=4, size=8, n_cls=4, noise_classes=16,
            noise_coords=8)
TINY_OPTIONS = dict(n_cls_tokens=4, noise_classes=16, noise_coords=8)


def official_shapes(hidden, depth, heads, swiglu, num_classes=1000, channels=4, size=32, n_cls=16, noise_classes=64,
                    noise_coords=32, patch=2, **_):
    """{official DitGen state-dict key: shape}. TorchLinear(in, out) keeps an nn.Linear under ``.linear``."""
    h, pp, tokens = hidden, patch * patch * channels, (size // patch) ** 2

    def linear(name, d_in, d_out):  # TorchLinear(d_in, d_out, bias=True)
        return {f"{name}.linear.weight": (d_out, d_in), f"{name}.linear.bias": (d_out,)}

    s = {"class_embed.weight": (num_classes, h)}  # DitGen: nn.Embedding(num_classes, cond_dim)
    s |= {f"noise_embeds.{i}.weight": (noise_classes, h) for i in range(noise_coords)}  # one table per coordinate
    s |= linear("cfg_embedder.fc1", 256, h) | linear("cfg_embedder.fc2", h, h)  # TimestepEmbedder(cond_dim)
    s |= {"cfg_norm.weight": (h,)}  # RMSNorm(cond_dim)
    s |= linear("model.patch_embed", pp, h)  # LightningDiT: TorchLinear(p*p*in_channels, hidden)
    for i in range(depth):  # LightningDiTBlock
        b = f"model.blocks.{i}"
        s |= {f"{b}.norm1.weight": (h,), f"{b}.norm2.weight": (h,)}  # RMSNorm(hidden) (use_rmsnorm)
        s |= linear(f"{b}.attn.qkv", h, 3 * h)  # Attention: qkv_bias=True
        s |= {f"{b}.attn.q_norm.weight": (h // heads,), f"{b}.attn.k_norm.weight": (h // heads,)}  # use_qknorm
        s |= linear(f"{b}.attn.proj", h, h)
        s |= linear(f"{b}.mlp.w1", h, swiglu) | linear(f"{b}.mlp.w3", h, swiglu) | linear(f"{b}.mlp.w2", swiglu, h)
        s |= linear(f"{b}.adaLN_mod.1", h, 6 * h)  # Sequential(SiLU, TorchLinear)
    s |= {"model.final_layer.norm_final.weight": (h,)}  # FinalLayer
    s |= linear("model.final_layer.adaLN_mod.1", h, 2 * h) | linear("model.final_layer.linear", h, pp)
    s |= {"model.pos_embed": (1, tokens, h), "model.cls_embed": (1, n_cls, h)}
    s |= linear("model.c_token_proj", h, h)  # TorchLinear(cond_dim, hidden)
    return s


def ours_of(official_name: str) -> str:
    """Our name of an official key, by the rule of gwf/models/wflow_dit.py written independently: no ``model.``
    trunk prefix, no TorchLinear level."""
    return re.sub(r"\.linear\.(weight|bias)$", r".\1", official_name.removeprefix("model."))


# ---------------------------------------------------------------------------------------------------------------------
# 1. parameter counts and names of the released sizes (meta device)
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", sorted(OFFICIAL))
def test_released_sizes_match_the_official_names_shapes_and_counts(size):
    spec = OFFICIAL[size]
    shapes = official_shapes(**spec)
    assert sum(math.prod(s) for s in shapes.values()) == spec["params"]  # the data is self-consistent
    assert swiglu_width(spec["hidden"]) == spec["swiglu"]
    with torch.device("meta"):
        model = dit(size, [4, 32, 32], 1000)
    ours = {official_key(model, k): tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == shapes
    assert count_parameters(size) == spec["params"]
    assert abs(spec["params"] - PAPER_PARAMS[size]) < 0.05e6  # [WF]: 132.7M, 462.9M, 678.9M (rounded)
    assert model.noise_shape == (4 * 32 * 32 + 32,) and model.normal_tail == 4 * 32 * 32 + 32


def test_sizes_mirror_the_configs():
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "model"
    for size in DIT_SIZES:
        cfg = OmegaConf.load(conf / f"{size}.yaml")
        assert cfg.name == size and cfg.compile is False
        if size != "dit_tiny":  # the official options (latent_sota_*_ot_1node.yaml)
            assert (cfg.patch, cfg.n_cls_tokens, cfg.noise_classes, cfg.noise_coords, cfg.attn_fp32) == (
                2, 16, 64, 32, False)
        else:
            assert {k: cfg[k] for k in TINY_OPTIONS} == TINY_OPTIONS


# ---------------------------------------------------------------------------------------------------------------------
# 2. official checkpoints -> gwf, and back
# ---------------------------------------------------------------------------------------------------------------------

def _official_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) for k, s in official_shapes(**TINY).items()}


def _official_checkpoint(path, ema, raw):
    """A state_*.pt as the official save_checkpoint writes it; the raw weights under torch.compile names (the official
    train.py compiles DitGen.model after copying the EMA model)."""
    compiled = {re.sub(r"^model\.", "model._orig_mod.", k): v for k, v in raw.items()}
    torch.save(dict(step=1234, model=compiled, ema_model=ema, optimizer={"state": {}, "param_groups": []},
                    ema_decay=0.999), path)


def test_official_checkpoint_round_trip(tmp_path):
    ema, raw = _official_state(0), _official_state(1)
    src = tmp_path / "state_00001234.pt"
    _official_checkpoint(src, ema, raw)

    config = convert.convert_generator(src, tmp_path / "ema.pt", out_shape=[4, 8, 8])
    assert config == dict(model="dit_tiny", out_shape=[4, 8, 8], num_classes=10, patch=2, **TINY_OPTIONS)
    model = convert.load_generator(tmp_path / "ema.pt")  # strict
    sd = model.state_dict()
    assert len(sd) == len(ema)
    for k, v in ema.items():  # every official tensor landed, bit for bit, under our name
        assert torch.equal(sd[ours_of(k)], v), k
    back = convert.gwf_to_official(sd, model)
    assert back.keys() == ema.keys() and all(torch.equal(back[k], ema[k]) for k in ema)
    assert torch.load(tmp_path / "ema.pt", weights_only=True)["source"] == dict(path=str(src), weights="ema",
                                                                                step=1234)

    convert.convert_generator(src, tmp_path / "raw.pt", size="dit_tiny", ema=False, out_shape=[4, 8, 8])
    sd = convert.load_generator(tmp_path / "raw.pt").state_dict()
    assert all(torch.equal(sd[ours_of(k)], v) for k, v in raw.items())  # _orig_mod. names resolved


def test_flat_state_dicts_and_safetensors(tmp_path):
    ema = _official_state(2)
    torch.save({f"module.{k}": v for k, v in ema.items()}, tmp_path / "ema_params.pt")  # DDP names, flat
    convert.convert_generator(tmp_path / "ema_params.pt", tmp_path / "a.pt", out_shape=[4, 8, 8])
    sd = convert.load_generator(tmp_path / "a.pt").state_dict()
    assert all(torch.equal(sd[ours_of(k)], v) for k, v in ema.items())
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save_file(ema, str(tmp_path / "ema.safetensors"))
    convert.convert_generator(tmp_path / "ema.safetensors", tmp_path / "b.pt", out_shape=[4, 8, 8])
    sd = convert.load_generator(tmp_path / "b.pt").state_dict()
    assert all(torch.equal(sd[ours_of(k)], v) for k, v in ema.items())


def test_mismatches_are_refused_by_name(tmp_path):
    with torch.device("meta"):
        model = dit("dit_tiny", [4, 8, 8], 10, **TINY_OPTIONS)
    state = _official_state(3)
    missing = {k: v for k, v in state.items() if k != "model.blocks.1.mlp.w3.linear.bias"}
    with pytest.raises(ValueError, match=r"missing keys \(1\): model\.blocks\.1\.mlp\.w3\.linear\.bias"):
        convert.official_to_gwf(missing, model)
    wrong = {**state, "model.pos_embed": torch.zeros(1, 17, 64)}
    with pytest.raises(ValueError, match=r"shape mismatches \(1\): model\.pos_embed: \(1, 17, 64\) != \(1, 16, 64\)"):
        convert.official_to_gwf(wrong, model)
    extra = {**state, "model.blocks.2.norm1.weight": torch.ones(64)}
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): model\.blocks\.2\.norm1\.weight"):
        convert.official_to_gwf(extra, model)
    ours = convert.official_to_gwf(state, model)
    with pytest.raises(ValueError, match=r"missing keys \(1\): cls_embed"):
        convert.gwf_to_official({k: v for k, v in ours.items() if k != "cls_embed"}, model)

    src = tmp_path / "state.pt"
    _official_checkpoint(src, state, state)
    with pytest.raises(ValueError, match="--size dit_b2 does not match the checkpoint, which is dit_tiny"):
        convert.convert_generator(src, tmp_path / "x.pt", size="dit_b2", out_shape=[4, 8, 8])
    one_channel = r"shape mismatches \(3\): model\.final_layer\.linear\.linear\.bias: \(16,\) != \(4,\)"
    with pytest.raises(ValueError, match=one_channel):
        convert.convert_generator(src, tmp_path / "x.pt", out_shape=[1, 8, 8])  # 1 channel, not 4
    torch.save(dict(step=1, model=state, ema_model=None), tmp_path / "no_ema.pt")
    with pytest.raises(ValueError, match="no 'ema_model' weights.*--raw"):
        convert.convert_generator(tmp_path / "no_ema.pt", tmp_path / "x.pt", out_shape=[4, 8, 8])
    (tmp_path / "ema_params.msgpack").write_bytes(b"\x80")
    with pytest.raises(ValueError, match="not a W-Flow generator.*gwf-convert mae"):
        convert.read_checkpoint(tmp_path / "ema_params.msgpack")


def test_cli(tmp_path, capsys):
    src = tmp_path / "state.pt"
    _official_checkpoint(src, _official_state(4), _official_state(5))
    convert.main(["wflow-generator", str(src), "--out", str(tmp_path / "g.pt"), "--out-shape", "4", "8", "8"])
    assert "dit_tiny" in capsys.readouterr().out and (tmp_path / "g.pt").is_file()
    with pytest.raises(SystemExit) as e:
        convert.main(["wflow-generator", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "h.pt")])
    assert e.value.code == 2 and "no checkpoint at" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# 3. the tiny size: forward, init, gradients, conditioning, noise
# ---------------------------------------------------------------------------------------------------------------------

SHAPE = (4, 8, 8)


def _tiny(num_classes=10, seed=0, **kw):
    torch.manual_seed(seed)
    return dit("dit_tiny", SHAPE, num_classes, **{**TINY_OPTIONS, **kw})


def _perturb_zero_init(model, std=0.1, seed=1):
    """Nonzero adaLN modulations and output projection, as after training (they start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_mod" in name or name.startswith("final_layer.linear"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _inputs(model, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, *model.noise_shape, generator=g), torch.randint(0, 10, (n,), generator=g),
            1 + 3 * torch.rand(n, generator=g))


def test_output_is_exactly_zero_at_init_then_depends_on_everything():
    model = _tiny()
    z, labels, alpha = _inputs(model)
    with torch.no_grad():
        x = model(z, labels, alpha)
    assert x.shape == (3, *SHAPE) and torch.equal(x, torch.zeros_like(x))  # zero final projection (official)
    _perturb_zero_init(model)
    with torch.no_grad():
        x = model(z, labels, alpha)
        assert torch.isfinite(x).all() and x.abs().min() > 0
        z2 = z.clone()
        z2[:, 0] += 1.0  # one latent coordinate
        assert (model(z2, labels, alpha) - x).abs().max() > 1e-3
        assert (model(z, (labels + 1) % 10, alpha) - x).abs().max() > 1e-3
        assert (model(z, labels, alpha + 1) - x).abs().max() > 1e-3


def test_gradients_reach_every_parameter():
    model = _tiny()
    z, labels, alpha = _inputs(model)
    model(z, labels, alpha).square().mean().backward()  # at init: the graph holds every parameter (DDP)
    assert [n for n, p in model.named_parameters() if p.grad is None] == []
    model.zero_grad(set_to_none=True)
    _perturb_zero_init(model)
    model(z, labels, alpha).square().mean().backward()
    assert [n for n, p in model.named_parameters() if not (p.grad.abs().max() > 0)] == []
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_labels_and_alpha_as_the_official():
    model = _tiny()
    _perturb_zero_init(model)
    z, labels, _ = _inputs(model)
    with pytest.raises(ValueError, match="pass labels"):
        model(z)
    with torch.no_grad():
        assert torch.equal(model(z, labels), model(z, labels, torch.ones(3)))  # cfg_scale defaults to 1.0
    uncond = _tiny(num_classes=0)  # gwf extension: one class row for every sample
    assert uncond.class_embed.weight.shape == (1, 64) and uncond(z).shape == (3, *SHAPE)


def test_noise_mapping_is_deterministic_and_uniform():
    model = _tiny()
    d = math.prod(SHAPE)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(20_000, *model.noise_shape, generator=g)
    latent, tokens = model.split_noise(z)
    assert torch.equal(latent, z[:, :d].view(-1, *SHAPE)) and torch.equal(model.identity_input(z), latent)
    assert tokens.shape == (20_000, 8) and tokens.dtype == torch.long
    assert torch.equal(tokens, model.split_noise(z.clone())[1])
    # token = floor(16 Phi(z)): uniform on 0..15 for N(0, 1) coordinates (the official torch.randint law)
    freq = torch.bincount(tokens.flatten(), minlength=16).double() / tokens.numel()
    assert (freq - 1 / 16).abs().max() < 0.004  # 160k draws: std of each frequency 6e-4
    edges = torch.special.ndtri(torch.tensor([3 / 16, 4 / 16], dtype=torch.float64))  # token 3 <-> [Phi^-1(3/16), ..)
    probe = torch.zeros(4, *model.noise_shape)
    probe[:, d] = torch.stack([edges[0] + 1e-4, edges[1] - 1e-4, edges[1] + 1e-4, torch.tensor(12.0)]).float()
    assert model.split_noise(probe)[1][:, 0].tolist() == [3, 3, 4, 15]  # Phi = 1 in fp32 far out: clamped to 15
    # the inverse puts each token at its bin centre
    back = model.noise_from_tokens(latent[:50], tokens[:50])
    assert torch.equal(model.split_noise(back)[1], tokens[:50]) and torch.equal(back[:, :d], z[:50, :d])
    # moving a coordinate inside its bin changes nothing; the output sees the tokens only
    _perturb_zero_init(model)
    labels = torch.zeros(50, dtype=torch.long)
    with torch.no_grad():
        assert torch.equal(model(back, labels), model(z[:50], labels))


def test_position_tables_match_the_official_formulas():
    pe = sincos_pos_embed(8, 2, 3)  # dim 8: a quarter of 2 frequencies, 1 and 10000^(-1/2)
    w = torch.tensor([1.0, 0.01])
    for row in range(2):
        for col in range(3):
            expected = torch.cat([(col * w).sin(), (col * w).cos(), (row * w).sin(), (row * w).cos()])
            assert torch.allclose(pe[row * 3 + col], expected, atol=1e-7)  # first half: the column (official)
    cos, sin = rope_tables(5, 4)  # head_dim 4: angles t * [1, 10000^(-1/2)], repeated over both halves
    angles = torch.arange(5.0)[:, None] * torch.tensor([1.0, 0.01, 1.0, 0.01])
    assert torch.allclose(cos, angles.cos()) and torch.allclose(sin, angles.sin())
    model = _tiny()
    assert model.rope_cos.shape == (4 + 16, 16)  # class tokens take positions 0..3, patches 4..19
    assert torch.equal(model.pos_embed.detach()[0], sincos_pos_embed(64, 4, 4))  # learnable, sin-cos at init


def test_bf16_autocast_and_checkpointing():
    model = _tiny()
    _perturb_zero_init(model, std=0.3)
    z, labels, alpha = _inputs(model)
    with torch.no_grad():
        x32 = model(z, labels, alpha)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x16 = model(z, labels, alpha)
    assert x16.dtype == torch.bfloat16 and torch.isfinite(x16).all()
    assert ((x16.float() - x32).norm() / x32.norm()).item() < 0.05  # bf16 residual stream, as the official
    remat = _tiny(checkpointing="blocks")
    remat.load_state_dict(model.state_dict())
    for m in (model, remat):
        m.train().zero_grad()
        m(z, labels, alpha).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), remat.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_bad_inputs_are_clear_errors():
    model = _tiny()
    with pytest.raises(ValueError, match=r"flat z of shape \[B, 264\] = \[B, 4\*8\*8 latent noise \+ 8 noise"):
        model(torch.randn(2, *SHAPE), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="divisible by model.patch=2"):
        dit("dit_tiny", (4, 9, 9))
    with pytest.raises(ValueError, match="heads of even size"):
        dit("dit_tiny", SHAPE, num_heads=3)
    with pytest.raises(ValueError, match="model.checkpointing"):
        dit("dit_tiny", SHAPE, checkpointing="all")


# ---------------------------------------------------------------------------------------------------------------------
# 4. the pieces against formulas; activation checkpointing; training through the entry point
# ---------------------------------------------------------------------------------------------------------------------

def test_rmsnorm_matches_formula_and_torch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 24, generator=g, dtype=torch.float64)
    norm = RMSNorm(24).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(24, generator=g, dtype=torch.float64) + 0.5)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    assert torch.allclose(norm(x), expected, atol=1e-12)
    assert torch.allclose(norm(x), F.rms_norm(x, (24,), norm.weight, eps=1e-6), atol=1e-12)


def test_patchify_round_trip_and_patch_embedding_is_a_strided_conv():
    p, (c, h, w) = 2, (4, 6, 8)
    x = torch.randn(2, c, h, w, dtype=torch.float64)
    tokens = patchify(x, p)
    assert torch.equal(unpatchify(tokens, p, c, h, w), x)
    # token (i, j) holds the patch x[:, :, 2i:2i+2, 2j:2j+2] ordered (row, col, channel), as the official
    # _patch_embed orders its channels-last input
    i, j = 2, 3
    patch_ij = x[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2].permute(0, 2, 3, 1).flatten(1)
    assert torch.equal(tokens[:, i * (w // p) + j], patch_ij)
    # linear on patches == Conv2d(c, D, p, stride=p) with the weight reordered
    lin = torch.nn.Linear(p * p * c, 5).double()
    conv = torch.nn.Conv2d(c, 5, p, stride=p).double()
    with torch.no_grad():
        conv.weight.copy_(lin.weight.view(5, p, p, c).permute(0, 3, 1, 2))
        conv.bias.copy_(lin.bias)
    assert torch.allclose(lin(tokens), conv(x).flatten(2).transpose(1, 2), atol=1e-12)


def test_rope_preserves_norms_and_depends_on_relative_position_only():
    """The 1D RoPE of the official Attention (rope_tables + rotate_half): |R(m) q| = |q| and
    <R(m) q, R(n) k> = <q, R(n - m) k>, in float64 from the tables' angles."""
    n, head_dim = 12, 16
    cos, sin = (t.double() for t in rope_tables(n, head_dim))
    rot = lambda v: v * cos + rotate_half(v) * sin  # noqa: E731  (official l.201-202)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, head_dim, generator=g, dtype=torch.float64)
    assert torch.allclose(rot(x).norm(dim=-1), x.norm(dim=-1), atol=1e-6)  # fp32 tables: 1e-7 per entry
    q, k = torch.randn(2, head_dim, generator=g, dtype=torch.float64)
    dots = rot(q.expand(n, -1)) @ rot(k.expand(n, -1)).T  # [m, n]
    for offset in (0, 1, 5, -3):
        vals = torch.stack([dots[m, m + offset] for m in range(n) if 0 <= m + offset < n])
        assert torch.allclose(vals, vals[0].expand_as(vals), atol=1e-5), offset
    assert torch.isclose(dots[0, 0], q @ k) and not torch.isclose(dots[0, 1], dots[0, 2])


@pytest.mark.parametrize("mode", ["blocks", "every_k"])
def test_activation_checkpointing_gives_the_same_gradients(mode):
    """Recomputing the blocks' activations in the backward pass changes memory, not values (official use_remat):
    outputs and every parameter gradient equal the plain model's; frozen copies (no grad) run the plain path."""
    plain = _tiny(depth=4)
    _perturb_zero_init(plain, std=0.2)
    remat = _tiny(depth=4, checkpointing=mode, checkpoint_every=2)
    remat.load_state_dict(plain.state_dict())
    assert sum(remat.remat) == (4 if mode == "blocks" else 2)
    z, labels, alpha = _inputs(plain)
    grads = []
    for model in (plain, remat):
        out = model.train()(z, labels, alpha)
        out.square().mean().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-7)
    for n, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][n], g, rtol=1e-6, atol=1e-7, msg=n)


def test_compiled_in_place_gives_the_eager_outputs_and_gradients():
    """nn.Module.compile (what model.compile does, in place: state dict names unchanged), the first of the two blocks
    recomputed in the backward pass (every_k): the eager outputs and gradients to fp32 rounding."""
    eager = _tiny(checkpointing="every_k")
    _perturb_zero_init(eager, std=0.2)
    compiled = _tiny(checkpointing="every_k")
    compiled.load_state_dict(eager.state_dict())
    compiled.compile()
    assert compiled.state_dict().keys() == eager.state_dict().keys() and eager.remat == [True, False]
    z, labels, alpha = _inputs(eager)
    results = []
    for model in (eager, compiled):
        out = model.train()(z, labels, alpha)
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    for (name, _), a, b in zip(eager.named_parameters(), results[0][1], results[1][1]):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6, msg=name)


def test_activation_checkpointing_saves_less_for_the_backward_pass():
    def saved_bytes(model):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        z, labels, alpha = _inputs(model, n=8)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model.train()(z, labels, alpha).sum()
        return sum(total)

    plain, remat = _tiny(depth=4), _tiny(depth=4, checkpointing="blocks")
    assert saved_bytes(remat) < 0.35 * saved_bytes(plain)


def test_dit_tiny_trains_wflow_on_digits(digits_dir, tmp_path):
    """model=dit_tiny through the entry point: 40 W-Flow updates (no warm-up) on the 8x8 digits lower the Frechet
    distance by a stated margin (measured 1226 -> 563; the samples start at exactly 0, the zero output layer, and
    20 updates gave 1069)."""
    from gwf.train import train
    from tests.conftest import compose_config

    cfg = compose_config([f"paths.data_dir={digits_dir.parent}", "data.num_workers=0", "logger=none",
                          "trainer.enable_progress_bar=false", "model=dit_tiny", "optim.warmup_steps=0",
                          "jko.updates_first_step=40", "eval.every_n_updates=40", "eval.num_samples=200",
                          "batch.labels_per_update=4", "batch.gen_per_label=16", "batch.pos_per_label=16",
                          "batch.uncond_per_update=16"])
    summary = train(cfg, tmp_path / "run")
    assert summary["last"]["update"] == 40
    assert summary["last"]["fd"] < 0.6 * summary["first"]["fd"], summary
