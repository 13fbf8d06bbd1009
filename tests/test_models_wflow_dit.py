"""The official W-Flow generator (gwf/models/wflow_dit.py) and its checkpoint converter (gwf/convert.py).

The official parameter names, shapes and counts are written below as data, read off the constructors of the official
models/generator.py (hanjq17/W-Flow; its public fork hudsonchen/riesz_flow_hudson at commit a8941cb), never from our
model: the round trip builds an official-layout state dict from them. Then the tiny size: forward, the zero output
layer at init, gradients, labels and alpha, the noise mapping, bf16 autocast, checkpointing."""

import math
import re

import pytest
import torch

from gwf import convert
from gwf.models.wflow_dit import (
    PAPER_PARAMS,
    WFLOW_SIZES,
    count_parameters,
    official_key,
    rope_tables,
    sincos_pos_embed,
    swiglu_width,
    wflow_dit,
)

# ---------------------------------------------------------------------------------------------------------------------
# The official parameter shapes, as data (models/generator.py; configs/gen/latent_sota_{B,L,XL}_ot_1node.yaml)
# ---------------------------------------------------------------------------------------------------------------------

# hidden_size, depth, num_heads from the configs (cond_dim = hidden_size); swiglu = the SwiGLUFFN width of
# LightningDiTBlock: int(2/3 * int(4.0 * hidden)) rounded up to a multiple of 32 (2730 -> 2752 for L/2);
# params = the sum of the shapes below with 1000 classes, 4x32x32 latents, patch 2, 16 class tokens, 32 noise
# coordinates of 64 classes (the official DitGen built at these settings counts the same).
OFFICIAL = {
    "wflow_dit_b2": dict(hidden=768, depth=12, heads=12, swiglu=2048, params=132_708_880),
    "wflow_dit_l2": dict(hidden=1024, depth=24, heads=16, swiglu=2752, params=462_909_456),
    "wflow_dit_xl2": dict(hidden=1152, depth=28, heads=16, swiglu=3072, params=678_929_872),
}
# the tiny size at the options of conf/model/wflow_dit_tiny.yaml (not an official size): 4x8x8 latents, 10 classes
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
        model = wflow_dit(size, [4, 32, 32], 1000)
    ours = {official_key(model, k): tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == shapes
    assert count_parameters(size) == spec["params"]
    assert abs(spec["params"] - PAPER_PARAMS[size]) < 0.05e6  # [WF]: 132.7M, 462.9M, 678.9M (rounded)
    assert model.noise_shape == (4 * 32 * 32 + 32,) and model.normal_tail == 4 * 32 * 32 + 32


def test_sizes_mirror_the_configs():
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "model"
    for size in WFLOW_SIZES:
        cfg = OmegaConf.load(conf / f"{size}.yaml")
        assert cfg.name == size and cfg.compile is False
        if size != "wflow_dit_tiny":  # the official options (latent_sota_*_ot_1node.yaml)
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
    assert config == dict(model="wflow_dit_tiny", out_shape=[4, 8, 8], num_classes=10, patch=2, **TINY_OPTIONS)
    model = convert.load_generator(tmp_path / "ema.pt")  # strict
    sd = model.state_dict()
    assert len(sd) == len(ema)
    for k, v in ema.items():  # every official tensor landed, bit for bit, under our name
        assert torch.equal(sd[ours_of(k)], v), k
    back = convert.gwf_to_official(sd, model)
    assert back.keys() == ema.keys() and all(torch.equal(back[k], ema[k]) for k in ema)
    assert torch.load(tmp_path / "ema.pt", weights_only=True)["source"] == dict(path=str(src), weights="ema",
                                                                                step=1234)

    convert.convert_generator(src, tmp_path / "raw.pt", size="wflow_dit_tiny", ema=False, out_shape=[4, 8, 8])
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
        model = wflow_dit("wflow_dit_tiny", [4, 8, 8], 10, **TINY_OPTIONS)
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
    with pytest.raises(ValueError, match="--size wflow_dit_b2 does not match the checkpoint, which is wflow_dit_tiny"):
        convert.convert_generator(src, tmp_path / "x.pt", size="wflow_dit_b2", out_shape=[4, 8, 8])
    one_channel = r"shape mismatches \(3\): model\.final_layer\.linear\.linear\.bias: \(16,\) != \(4,\)"
    with pytest.raises(ValueError, match=one_channel):
        convert.convert_generator(src, tmp_path / "x.pt", out_shape=[1, 8, 8])  # 1 channel, not 4
    torch.save(dict(step=1, model=state, ema_model=None), tmp_path / "no_ema.pt")
    with pytest.raises(ValueError, match="no 'ema_model' weights.*--raw"):
        convert.convert_generator(tmp_path / "no_ema.pt", tmp_path / "x.pt", out_shape=[4, 8, 8])
    (tmp_path / "ema_params.msgpack").write_bytes(b"\x80")
    with pytest.raises(ValueError, match="flax"):
        convert.read_checkpoint(tmp_path / "ema_params.msgpack")


def test_cli(tmp_path, capsys):
    src = tmp_path / "state.pt"
    _official_checkpoint(src, _official_state(4), _official_state(5))
    convert.main(["wflow-generator", str(src), "--out", str(tmp_path / "g.pt"), "--out-shape", "4", "8", "8"])
    assert "wflow_dit_tiny" in capsys.readouterr().out and (tmp_path / "g.pt").is_file()
    with pytest.raises(SystemExit) as e:
        convert.main(["wflow-generator", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "h.pt")])
    assert e.value.code == 2 and "no checkpoint at" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------------
# 3. the tiny size: forward, init, gradients, conditioning, noise
# ---------------------------------------------------------------------------------------------------------------------

SHAPE = (4, 8, 8)


def _tiny(num_classes=10, seed=0, **kw):
    torch.manual_seed(seed)
    return wflow_dit("wflow_dit_tiny", SHAPE, num_classes, **{**TINY_OPTIONS, **kw})


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
        wflow_dit("wflow_dit_tiny", (4, 9, 9))
    with pytest.raises(ValueError, match="heads of even size"):
        wflow_dit("wflow_dit_tiny", SHAPE, num_heads=3)
    with pytest.raises(ValueError, match="model.checkpointing"):
        wflow_dit("wflow_dit_tiny", SHAPE, checkpointing="all")
