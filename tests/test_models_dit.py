"""Latent DiT generator: its pieces against formulas (RoPE, RMSNorm, patchify), the adaLN-zero init, conditioning
tokens, parameter counts of the paper's sizes (built on the meta device), bf16 autocast."""

import math

import pytest
import torch
import torch.nn.functional as F

from gwf.models import MODELS, build_model
from gwf.models.dit import (
    PAPER_PARAMS,
    DiTBlock,
    RMSNorm,
    apply_rope,
    count_parameters,
    dit_tiny,
    patchify,
    rope_2d_angles,
    unpatchify,
)

SHAPE = (4, 8, 8)  # a small latent: 16 tokens with patch 2


def _randomize_modulations(model, std=0.05, seed=0):
    """Give every adaLN modulation nonzero weights, as after some training (at init every block is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def test_rope_preserves_norms_and_depends_on_relative_position_only():
    head_dim, grid = 16, 6
    angles = rope_2d_angles(grid, grid, head_dim).double()
    cos, sin = angles.cos(), angles.sin()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(grid * grid, head_dim, generator=g, dtype=torch.float64)
    assert torch.allclose(apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1), atol=1e-12)

    q, k = torch.randn(2, head_dim, generator=g, dtype=torch.float64)
    rq = apply_rope(q.expand(grid * grid, -1), cos, sin)  # q placed at every position
    rk = apply_rope(k.expand(grid * grid, -1), cos, sin)
    dots = (rq @ rk.T).view(grid, grid, grid, grid)  # [row_m, col_m, row_n, col_n]
    # <R(m) q, R(n) k> = <q, R(n - m) k>: equal for every pair with the same (dr, dc)
    for dr, dc in [(0, 0), (1, 2), (-3, 1), (2, -2)]:
        vals = torch.stack([dots[r, c, r + dr, c + dc] for r in range(grid) for c in range(grid)
                            if 0 <= r + dr < grid and 0 <= c + dc < grid])
        assert torch.allclose(vals, vals[0].expand_as(vals), atol=1e-12), (dr, dc)
    assert torch.isclose(dots[0, 0, 0, 0], q @ k)  # no offset: the plain dot product
    assert not torch.isclose(dots[0, 0, 1, 0], dots[0, 0, 0, 1])  # rows and columns rotate different halves


def test_rmsnorm_matches_formula_and_torch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 24, generator=g, dtype=torch.float64)
    norm = RMSNorm(24, eps=1e-6).double()
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
    # token (i, j) holds the patch x[:, :, 2i:2i+2, 2j:2j+2] ordered (row, col, channel)
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


def test_adaln_zero_block_is_identity_at_init():
    torch.manual_seed(0)
    block = DiTBlock(64, num_heads=4)
    block.adaLN[-1].weight.data.zero_()
    block.adaLN[-1].bias.data.zero_()
    model = dit_tiny(SHAPE, num_classes=3)
    x, c = torch.randn(2, 20, 64), torch.randn(2, 64)
    angles = torch.cat([torch.zeros(4, 8), rope_2d_angles(4, 4, 16)])  # 4 conditioning tokens + 4x4 patches
    assert torch.equal(block(x, c, angles.cos(), angles.sin()), x)
    # the whole generator at init: blocks are the identity, so x = unpatchify(W_out RMSNorm(W_in patchify(z)))
    z = torch.randn(3, *SHAPE)
    tokens = model.patch_embed(patchify(z, 2))
    expected = unpatchify(model.final.linear(F.rms_norm(tokens, (128,), eps=1e-6)), 2, *SHAPE)
    assert torch.allclose(model(z, torch.tensor([0, 1, 2])), expected, atol=1e-5)


def test_init_output_is_small_but_depends_on_z():
    torch.manual_seed(0)
    model = dit_tiny((4, 16, 16), num_classes=2, out_init_rms=0.1)
    z = torch.randn(8, 4, 16, 16)
    with torch.no_grad():
        x = model(z, torch.zeros(8, dtype=torch.long))
    assert abs(x.pow(2).mean().sqrt().item() - 0.1) < 0.02  # RMS-normalized tokens x N(0, 0.1^2 / hidden) weights
    dist = torch.cdist(x.flatten(1), x.flatten(1))
    assert dist[~torch.eye(8, dtype=torch.bool)].min() > 2.0  # different z, different x (|x| ~ 0.1 * 32; measured 4.3)


def test_conditioning_tokens_carry_the_class():
    torch.manual_seed(0)
    z = torch.randn(4, *SHAPE)
    labels_a, labels_b = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 0])

    def outputs(num_cond_tokens):
        torch.manual_seed(1)
        model = dit_tiny(SHAPE, num_classes=4, num_cond_tokens=num_cond_tokens)
        with torch.no_grad():  # modulations independent of c (zero weights, random biases): the class reaches the
            for name, p in model.named_parameters():  # patches only through the in-context tokens
                if "adaLN" in name:
                    p.copy_(torch.randn(p.shape) * 0.05 if name.endswith("bias") else torch.zeros(p.shape))
            return model(z, labels_a), model(z, labels_b)

    xa, xb = outputs(4)
    assert (xa - xb).abs().max() > 1e-3
    xa0, xb0 = outputs(0)
    assert torch.allclose(xa0, xb0, atol=1e-6)  # without tokens the class has no path to the output


def test_alpha_conditions_the_output():
    torch.manual_seed(0)
    model = dit_tiny(SHAPE, num_classes=2)
    _randomize_modulations(model)
    z, labels = torch.randn(3, *SHAPE), torch.tensor([0, 1, 1])
    with torch.no_grad():
        x1 = model(z, labels, torch.ones(3))
        assert torch.equal(model(z, labels), x1)  # alpha None means alpha = 1 (no guidance)
        assert (model(z, labels, torch.full((3,), 3.0)) - x1).abs().max() > 1e-3


def _expected_params(hidden, depth, heads, num_classes, out_shape=(4, 32, 32), patch=2, tokens=16, mlp_ratio=4.0):
    """Closed-form parameter count of gwf.models.dit.DiTGenerator."""
    h, c, f = hidden, out_shape[0], int(2 / 3 * mlp_ratio * hidden)
    attn = (3 * h * h + 3 * h) + (h * h + h) + 2 * (h // heads)  # qkv, proj, QK-norm gains
    block = attn + (2 * h * f + 2 * f) + (f * h + h) + (6 * h * h + 6 * h)  # + SwiGLU + adaLN
    final = (2 * h * h + 2 * h) + (h * patch * patch * c + patch * patch * c)  # adaLN + projection
    # patch embedding, class table, alpha MLP (256 Fourier features -> h -> h), cond -> tokens, token embeddings
    embed = (patch * patch * c * h + h) + max(num_classes, 1) * h + (256 * h + h) + (h * h + h)
    embed += (h * h + h) + tokens * h
    return depth * block + final + embed


@pytest.mark.parametrize("size,dims", [("dit_b2", (768, 12, 12)), ("dit_l2", (1024, 24, 16)),
                                       ("dit_xl2", (1152, 28, 16))])
def test_paper_sizes_count_within_five_percent(size, dims):
    n = count_parameters(size)  # built on the meta device: no memory
    assert n == _expected_params(*dims, num_classes=1000)
    assert abs(n / PAPER_PARAMS[size] - 1) < 0.05, (size, n)


def test_tiny_size_counts_the_same_on_cpu_and_meta():
    model = build_model("dit_tiny", out_shape=[4, 32, 32], num_classes=10)
    n = sum(p.numel() for p in model.parameters())
    assert n == count_parameters("dit_tiny", num_classes=10) == _expected_params(128, 4, 4, 10, tokens=4)
    assert 0.9e6 < n < 1.5e6
    assert set(MODELS) >= {"dit_tiny", "dit_b2", "dit_l2", "dit_xl2"}


def test_bf16_autocast_is_finite_and_close_to_fp32():
    torch.manual_seed(0)
    model = dit_tiny((4, 32, 32), num_classes=10)
    _randomize_modulations(model, std=0.2)  # the blocks then change the output by about 40%
    z, labels, alpha = torch.randn(2, 4, 32, 32), torch.tensor([3, 7]), torch.tensor([1.0, 2.5])
    with torch.no_grad():
        x32 = model(z, labels, alpha)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            x16 = model(z, labels, alpha)
    assert x16.dtype == torch.bfloat16 and torch.isfinite(x16).all()
    rel = ((x16.float() - x32).norm() / x32.norm()).item()
    assert rel < 0.02, rel  # bf16 keeps 8 mantissa bits (2^-8 = 0.4% per rounding); measured 0.005


def test_every_parameter_gets_a_gradient():
    """DDP needs every parameter in the graph, also at init where the adaLN gates are zero."""
    model = dit_tiny(SHAPE, num_classes=3)
    model(torch.randn(2, *SHAPE), torch.tensor([0, 2]), torch.tensor([1.0, 2.0])).square().mean().backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_bad_inputs_are_clear_errors():
    model = dit_tiny(SHAPE, num_classes=3)
    with pytest.raises(ValueError, match="noise of the latent's shape"):
        model(torch.randn(2, 4, 16, 16), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="pass labels"):
        model(torch.randn(2, *SHAPE))
    with pytest.raises(ValueError, match="divisible by model.patch=2"):
        dit_tiny((4, 9, 9))
    with pytest.raises(ValueError, match="divisible by num_heads"):
        dit_tiny(SHAPE, hidden=130)
    with torch.no_grad():
        assert math.isfinite(float(model(torch.randn(1, *SHAPE), torch.tensor([2])).sum()))


def test_dit_tiny_trains_wflow_on_digits(digits_dir, tmp_path):
    """model=dit_tiny through the entry point: 20 W-Flow updates (no warm-up) on the 8x8 digits lower the Frechet
    distance by a stated margin (measured 930 -> 648)."""
    from gwf.train import train
    from tests.conftest import compose_config

    cfg = compose_config([f"paths.data_dir={digits_dir.parent}", "data.num_workers=0", "logger=none",
                          "trainer.enable_progress_bar=false", "model=dit_tiny", "optim.warmup_steps=0",
                          "jko.updates_first_step=20", "eval.every_n_updates=20", "eval.num_samples=200",
                          "batch.labels_per_update=4", "batch.gen_per_label=16", "batch.pos_per_label=16",
                          "batch.uncond_per_update=16"])
    summary = train(cfg, tmp_path / "run")
    assert summary["last"]["update"] == 20
    assert summary["last"]["fd"] < 0.85 * summary["first"]["fd"], summary


@pytest.mark.parametrize("mode", ["blocks", "every_k"])
def test_activation_checkpointing_gives_the_same_gradients(mode):
    """Recomputing the blocks' activations in the backward pass changes memory, not values: outputs and every
    parameter gradient equal the plain model's (1e-6); frozen copies (no grad) run the plain path."""
    torch.manual_seed(0)
    plain = dit_tiny(SHAPE, num_classes=3)
    _randomize_modulations(plain, std=0.2)
    remat = dit_tiny(SHAPE, num_classes=3, checkpointing=mode, checkpoint_every=2)
    remat.load_state_dict(plain.state_dict())
    assert sum(remat.remat) == (4 if mode == "blocks" else 2)
    z, labels, alpha = torch.randn(3, *SHAPE), torch.tensor([0, 2, 1]), torch.tensor([1.0, 2.0, 3.0])
    grads = []
    for model in (plain, remat):
        out = model(z, labels, alpha)
        out.square().mean().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-6, atol=1e-7)
    for n, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][n], g, rtol=1e-6, atol=1e-7, msg=n)
    with pytest.raises(ValueError, match="model.checkpointing"):
        dit_tiny(SHAPE, checkpointing="all")


def test_activation_checkpointing_saves_less_for_the_backward_pass():
    def saved_bytes(model):
        total = []

        def pack(t):
            total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(torch.randn(8, *SHAPE), torch.zeros(8, dtype=torch.long)).sum()
        return sum(total)

    plain, remat = dit_tiny(SHAPE, num_classes=3), dit_tiny(SHAPE, num_classes=3, checkpointing="blocks")
    assert saved_bytes(remat) < 0.35 * saved_bytes(plain)
