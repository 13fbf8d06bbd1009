"""Feature-space drift: identity = data space exactly; the feature loss's gradient is the chain rule through the
encoder; one transport problem per (label, token) against a brute-force loop; mean/std feature sets against direct
computations; the encoder stays frozen; the MAE trains, its checkpoint loads back identically and resumes."""

import numpy as np
import pytest
import torch

from gwf.constants import FEATURE_STD_EPS, MAE_CHECKPOINT_FORMAT
from gwf.data.datamodule import ShardDataModule
from gwf.data.shards import write_shards
from gwf.features import FeatureEncoder, build_features
from gwf.features.base import map_feature_sets
from gwf.objectives.field import attach_encoder
from gwf.features.mae import MAEFeatures, MaskedAutoencoder, load_mae, save_checkpoint
from gwf.features.train import data_config, main as train_encoder_main, train_encoder
from gwf.models.mlp import MLPGenerator
from gwf.module import OptimConfig
from gwf.objectives.base import GenBatch, RealBatch
from gwf.objectives.drifting import Drifting, drifting_field
from gwf.objectives.wflow import WFlow
from gwf.ot.velocity import mean_squared_distance, sinkhorn_velocity

SHAPE = (4, 8, 8)
L, N, M, U = 3, 12, 16, 10


def _step_tensors(seed=0, shape=SHAPE):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(L, N, *shape, generator=g)
    return (x, torch.randn(L, N, *shape, generator=g) + 0.3, torch.randn(L, M, *shape, generator=g) + 1.0,
            torch.randn(U, *shape, generator=g) * 1.5, torch.tensor([1.0, 2.0, 3.5]))


def _loss_and_grad(objective, x, neg, pos, unc, alpha):
    x = x.clone().requires_grad_(True)
    labels = torch.arange(L)
    gen = GenBatch(x, labels, alpha, sample=lambda: neg.clone())
    loss, logs = objective.generator_loss(gen, RealBatch(pos, unc, labels), torch.Generator())
    loss.backward()
    return loss.detach(), x.grad, logs


class Linear(FeatureEncoder):
    """phi(x) = {"lin": A x} [B, C] (a known Jacobian A)."""

    def __init__(self, a):
        super().__init__()
        self.register_buffer("a", a)
        self.freeze()

    def forward(self, x):
        return {"lin": x.flatten(1) @ self.a.T}


class Tokens(FeatureEncoder):
    """A per-location linear map W [C, C_in] (tokens = locations) and the global mean of its map."""

    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", w)
        self.freeze()

    def forward(self, x):
        loc = torch.einsum("oc,bchw->bhwo", self.w, x).flatten(1, 2)  # [B, HW, C]
        return {"loc": loc, "glob": loc.mean(1)}


class RawNotIdentity(FeatureEncoder):
    """The raw sample, through the general feature path (is_identity False)."""

    def __init__(self):
        super().__init__()
        self.freeze()

    def forward(self, x):
        return {"x": x.flatten(1)}


def _with_encoder(cls, encoder, **kwargs):
    objective = cls(**kwargs)
    attach_encoder(objective, encoder)  # what the constructor does with build_features(spec)
    return objective


# ----------------------------------------------------------------------------------------------- identity
@pytest.mark.parametrize("cls", [WFlow, Drifting])
def test_identity_features_reproduce_the_data_space_loss_exactly(cls):
    tensors = _step_tensors()
    base = _loss_and_grad(cls(), *tensors)
    for spec in ["identity", {"name": "identity"}]:
        loss, grad, logs = _loss_and_grad(cls(features=spec), *tensors)
        assert torch.equal(loss, base[0]) and torch.equal(grad, base[1])
        assert all(torch.equal(logs[k], base[2][k]) for k in base[2])
    # the data-space W-Flow loss is the formula mean ||x - sg(x + eta V)||^2 with the two-batch guided V
    if cls is WFlow:
        x, neg, pos, unc, alpha = tensors
        v, _ = sinkhorn_velocity(x.flatten(2), pos.flatten(2), neg.flatten(2), uncond=unc.flatten(1),
                                 guidance_w=alpha - 1)
        assert torch.equal(base[0], (x.flatten(2) - (x.flatten(2) + v)).pow(2).mean())
    # the general feature path (per-token problems, loss per set) with the raw sample and no rescaling agrees
    loss, grad, _ = _loss_and_grad(_with_encoder(cls, RawNotIdentity(), feature_normalize=False), *tensors)
    torch.testing.assert_close(loss, base[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, base[1], rtol=1e-5, atol=1e-9)


# ----------------------------------------------------------------------------------------------- chain rule
@pytest.mark.parametrize("normalize", [False, True])
def test_feature_gradient_is_the_chain_rule_through_a_linear_encoder(normalize):
    """phi(x) = A x: dloss/dx = A^T (-2 eta V_A / (s numel)), V_A the guided two-batch field of the features."""
    x, neg, pos, unc, alpha = _step_tensors(1)
    d, c, eta = int(np.prod(SHAPE)), 24, 0.7
    a = torch.randn(c, d, generator=torch.Generator().manual_seed(5)) / d**0.5
    loss, grad, _ = _loss_and_grad(_with_encoder(WFlow, Linear(a), eta=eta, feature_normalize=normalize),
                                   x, neg, pos, unc, alpha)
    fx, fneg, fpos, func = (t.flatten(-3) @ a.T for t in (x, neg, pos, unc))
    v, _ = sinkhorn_velocity(fx, fpos, fneg, uncond=func, guidance_w=alpha - 1)
    s = (mean_squared_distance(fx, [fx, fneg, fpos]).mean() / c).sqrt() if normalize else torch.tensor(1.0)
    expected = ((-2 * eta / (s * fx.numel())) * v) @ a  # [L, N, D]: V pulled back through A^T
    # atol: fp32 rounding of f - sg(f + eta V) (relative ~1e-7 to f), pulled back through A^T; ~3e-7 of max |grad|
    torch.testing.assert_close(grad.flatten(2), expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    torch.testing.assert_close(loss, torch.tensor(eta**2) * v.square().mean(), rtol=1e-5, atol=0)  # |V| RMS 1


@pytest.mark.parametrize("cls", [WFlow, Drifting])
def test_one_problem_per_label_and_token_against_a_loop(cls):
    """Per-location features: the batched objective equals a loop over (label, token) problems of the field of
    that token's features (with that label's guidance weight), loss averaged over the two feature sets."""
    x, neg, pos, unc, alpha = _step_tensors(2, shape=(3, 2, 2))
    w = torch.randn(5, 3, generator=torch.Generator().manual_seed(7))
    enc = Tokens(w)
    loss, grad, _ = _loss_and_grad(_with_encoder(cls, enc, eta=1.3), x, neg, pos, unc, alpha)

    xr = x.clone().requires_grad_(True)
    feats = {k: enc(xr.flatten(0, 1)) for k in ["gen"]}["gen"]
    with torch.no_grad():
        ref = {name: enc(t.flatten(0, 1)) if t.dim() == 5 else enc(t) for name, t in
               (("neg", neg), ("pos", pos), ("unc", unc))}
    set_losses = []
    for k, f in feats.items():
        f = f.reshape(L, N, -1, f.shape[-1]) if f.dim() == 3 else f.reshape(L, N, 1, -1)
        rk = {n: (r[k] if r[k].dim() == 3 else r[k][:, None]) for n, r in ref.items()}
        terms = []
        for lab in range(L):
            for t in range(f.shape[2]):
                fg = f[lab, :, t][None]
                fpos = rk["pos"].reshape(L, M, *rk["pos"].shape[1:])[lab, :, t][None]
                fneg = rk["neg"].reshape(L, N, *rk["neg"].shape[1:])[lab, :, t][None]
                if cls is WFlow:
                    v, _ = sinkhorn_velocity(fg, fpos, fneg, uncond=rk["unc"][:, t][None],
                                             guidance_w=float(alpha[lab] - 1))
                    targets = [fg, fneg, fpos]
                else:  # guided: the unconditional reals as negatives of weight (alpha - 1)(N - 1)/U
                    unc_t = rk["unc"][:, t][None]
                    weight = (alpha[lab:lab + 1] - 1) * (N - 1) / unc_t.shape[1]
                    v = drifting_field(fg, fpos, None, uncond=unc_t, uncond_weight=weight)
                    targets = [fg, fpos]
                terms.append((fg, v, targets))
        # one scale per feature set: the mean over its problems of the mean squared pairwise distance
        s = (torch.stack([mean_squared_distance(fg, tg)[0] for fg, _, tg in terms]).mean() / f.shape[-1]).sqrt()
        sq = torch.stack([((fg / s) - (fg / s + 1.3 * v).detach()).pow(2).mean() for fg, v, _ in terms])
        set_losses.append(sq.mean())  # every problem has N x C entries: mean of means = mean
    expected = torch.stack(set_losses).mean()
    expected.backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, xr.grad, rtol=1e-4, atol=1e-9)


# ----------------------------------------------------------------------------------------------- feature sets
def test_mean_std_feature_sets_against_direct_computation():
    fmap = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 + 1
    out = map_feature_sets("m", fmap, patch_sizes=(2, 4, 3))
    assert sorted(out) == sorted(["m", "m_mean", "m_std", "m_mean_2", "m_std_2", "m_mean_4", "m_std_4"])  # 3 skipped
    a = fmap.numpy()
    for b in range(2):
        for i in range(8):
            for j in range(8):
                np.testing.assert_array_equal(out["m"][b, i * 8 + j].numpy(), a[b, :, i, j])
        np.testing.assert_allclose(out["m_mean"][b].numpy(), a[b].reshape(3, -1).mean(1), rtol=1e-12)
        np.testing.assert_allclose(out["m_std"][b].numpy(),
                                   np.sqrt(a[b].reshape(3, -1).var(1) + FEATURE_STD_EPS), rtol=1e-12)
        for s in (2, 4):
            for pi in range(8 // s):
                for pj in range(8 // s):
                    block = a[b, :, pi * s:(pi + 1) * s, pj * s:(pj + 1) * s].reshape(3, -1)
                    token = pi * (8 // s) + pj
                    np.testing.assert_allclose(out[f"m_mean_{s}"][b, token].numpy(), block.mean(1), rtol=1e-12)
                    np.testing.assert_allclose(out[f"m_std_{s}"][b, token].numpy(),
                                               np.sqrt(block.var(1) + FEATURE_STD_EPS), rtol=1e-12)
    # a constant map: std = sqrt(eps) and a finite gradient
    flat = torch.ones(1, 2, 4, 4, requires_grad=True)
    std = map_feature_sets("c", flat, (2,))["c_std_2"]
    std.sum().backward()
    assert torch.allclose(std, torch.tensor(FEATURE_STD_EPS).sqrt()) and torch.isfinite(flat.grad).all()


def _mae_checkpoint(path, base=8, layers=(1, 1), seed=0):
    torch.manual_seed(seed)
    model = MaskedAutoencoder(SHAPE[0], base, layers)
    sd = model.state_dict()
    save_checkpoint(path, {"format": MAE_CHECKPOINT_FORMAT, "config": model.config, "data_shape": list(SHAPE),
                           "step": 0, "model": sd, "ema": sd})
    return model


def test_mae_feature_sets_and_encoder_stays_frozen_after_an_optimizer_step(tmp_path):
    _mae_checkpoint(tmp_path / "mae.pt")
    objective = WFlow(features={"name": "mae", "path": str(tmp_path / "mae.pt")})
    enc = objective.features
    assert isinstance(enc, MAEFeatures)
    feats = enc(torch.randn(2, *SHAPE))
    # raw latent; stem and stage maps (8x8, 8x8, 4x4) with every-2nd-block outputs (none here: 1 block per stage)
    assert feats["global"].shape == (2, 256) and feats["conv1"].shape == (2, 64, 8) and feats["layer2"].shape == (2, 16, 16)
    assert feats["layer2_mean_4"].shape == (2, 1, 16) and "layer2_mean_8" not in feats
    # frozen, and outside the module tree: DDP, the optimizers and checkpoints never see it
    assert not any(p.requires_grad for p in enc.parameters()) and list(objective.parameters()) == []
    assert objective.state_dict() == {}
    before = {k: v.clone() for k, v in enc.state_dict().items()}

    generator = MLPGenerator(list(SHAPE), noise_dim=8, hidden=32, depth=2, num_classes=3, alpha_dim=4)
    opt = torch.optim.Adam(generator.parameters(), lr=1e-2)
    objective.train()
    enc.train()
    assert not enc.training  # frozen encoders ignore .train()
    x0, neg, pos, unc, alpha = _step_tensors()
    labels = torch.arange(L)
    z = torch.randn(L * N, 8, generator=torch.Generator().manual_seed(1))
    g_before = [p.detach().clone() for p in generator.parameters()]
    x = generator(z, labels.repeat_interleave(N), alpha.repeat_interleave(N)).view(L, N, *SHAPE)
    loss, _ = objective.generator_loss(GenBatch(x, labels, alpha, sample=lambda: neg), RealBatch(pos, unc, labels),
                                       torch.Generator())
    opt.zero_grad()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in generator.parameters())  # through the encoder
    opt.step()
    assert all(p.grad is None for p in enc.parameters())
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())
    assert all(not torch.equal(p, q) for p, q in zip(generator.parameters(), g_before))


def test_bad_feature_specs_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown feature encoder 'nope'.*identity.*mae"):
        build_features({"name": "nope"})
    with pytest.raises(ValueError, match="method.features.path is not set.*gwf-train-encoder"):
        build_features({"name": "mae", "path": "???"})
    with pytest.raises(FileNotFoundError, match="no MAE checkpoint.*gwf-train-encoder"):
        build_features({"name": "mae", "path": str(tmp_path / "missing.pt")})
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a gwf MAE checkpoint"):
        build_features({"name": "mae", "path": str(tmp_path / "other.pt")})
    with pytest.raises(FileNotFoundError, match="no data config.*digits"):
        data_config("does_not_exist")


# ----------------------------------------------------------------------------------------------- MAE training
def _smooth_latents(n, seed):
    """Sums of three low-frequency waves per channel: a masked patch is predictable from its neighbours."""
    rng = np.random.default_rng(seed)
    h = np.arange(SHAPE[1])[None, None, :, None]
    w = np.arange(SHAPE[2])[None, None, None, :]
    amp, freq = rng.normal(size=(3, n, SHAPE[0], 1, 1)), rng.uniform(0.2, 0.6, size=(3, n, SHAPE[0], 1, 1))
    phase = rng.uniform(0, 2 * np.pi, size=(3, n, SHAPE[0], 1, 1))
    x = (amp[0] * np.sin(freq[0] * h + phase[0]) + amp[1] * np.cos(freq[1] * w + phase[1])
         + amp[2] * np.sin(freq[2] * (h + w) + phase[2]))
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def latent_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    x = _smooth_latents(512, 0)
    write_shards(((f"s{i:05d}", x[i], i % 3) for i in range(len(x))), root, "train", 128)
    return f"{root}/train-{{000000..000003}}.tar"


def _masked_loss(model, x, seed=123):
    with torch.no_grad():
        return float(model.loss(x, model.random_mask(x, 0.5, 0.5, torch.Generator().manual_seed(seed))))


def test_mae_trains_its_checkpoint_loads_back_and_resumes(latent_shards, tmp_path):
    dm = ShardDataModule(latent_shards, None, SHAPE, num_classes=3, batch_size=64, num_workers=0,
                         shuffle_buffer=256, epoch_size=512)
    dm.setup("fit")
    held_out = torch.from_numpy(_smooth_latents(256, 99))
    optim = OptimConfig(name="adamw", lr=1e-2, betas=(0.9, 0.95), weight_decay=0.01, grad_clip=1.0)
    kwargs = dict(base_channels=16, layers=(1, 1), optim=optim, ema_decay=0.0, seed=0, progress=False)
    torch.manual_seed(0)  # train_encoder initializes from the same seed
    before = _masked_loss(MaskedAutoencoder(SHAPE[0], 16, (1, 1)), held_out)
    state = train_encoder(dm, tmp_path, steps=100, save_every=50, **kwargs)
    model = load_mae(tmp_path / "mae.pt", use_ema=False)
    after = _masked_loss(model, held_out)
    assert after < 0.5 * before, (before, after)  # measured: 1.63 -> 0.53 (3.1x)

    # the checkpoint gives back identical features (EMA = raw weights with decay 0)
    enc = build_features({"name": "mae", "path": str(tmp_path / "mae.pt")})
    direct = MAEFeatures(model.encoder)
    x = held_out[:8]
    a, b = enc(x), direct(x)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the encoder-only export written beside it holds the weights in bf16, a fraction of the checkpoint's size: it
    # gives the features of the encoder with bf16-rounded weights exactly, loaded memory-mapped once per process
    from gwf.features import mae as mae_module

    export = build_features({"name": "mae", "path": str(tmp_path / "encoder.pt")})
    rounded = MAEFeatures(load_mae(tmp_path / "mae.pt", use_ema=False).encoder)
    with torch.no_grad():
        for p in rounded.encoder.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    c, d = export(x), rounded(x)
    assert c.keys() == a.keys() and all(torch.equal(c[k], d[k]) for k in a)
    assert all(torch.allclose(c[k], a[k], rtol=0.05, atol=0.05) for k in a)  # bf16 weights: close to fp32's
    exported = mae_module.load_checkpoint(tmp_path / "encoder.pt")
    assert exported["dtype"] == "bfloat16" and exported["encoder"]["stem.0.weight"].dtype == torch.bfloat16
    assert mae_module.load_checkpoint(tmp_path / "encoder.pt") is exported  # once per process (and file version)
    assert (tmp_path / "encoder.pt").stat().st_size < 0.25 * (tmp_path / "mae.pt").stat().st_size

    # rerunning the command resumes at step 100 and keeps the history of the first 100 steps
    train_encoder_main(["--out", str(tmp_path), "--data", "digits", "--steps", "104", "--batch-size", "64",
                        "--base-channels", "16", "--layers", "1", "1", "--lr", "1e-2", "--warmup-steps", "0",
                        "--ema-decay", "0", "--no-progress", "data.prepare=null", f"data.train_shards={latent_shards}",
                        "data.val_shards=null", "data.shape=[4,8,8]", "data.dtype=float32", "data.num_classes=3",
                        "data.num_workers=0"])
    resumed = torch.load(tmp_path / "mae.pt", weights_only=True)
    assert resumed["step"] == 104 and resumed["history"][:100] == state["history"]
    # a finished run returns at once, unchanged
    again = train_encoder(dm, tmp_path, steps=104, **kwargs)
    assert again["history"] == resumed["history"]
    with pytest.raises(ValueError, match="holds an MAE with config"):
        train_encoder(dm, tmp_path, steps=110, **{**kwargs, "base_channels": 8})


def test_frozen_encoders_ignore_train_mode():
    enc = build_features("identity")
    enc.train()
    assert not enc.training and enc.is_identity and enc(torch.ones(2, 3, 4))["x"].shape == (2, 12)


def test_two_process_ddp_trains_one_encoder_in_bf16(latent_shards, tmp_path):
    """gwf-train-encoder under torchrun-style env, 2 gloo ranks, bf16 autocast: one model (the ranks' weights are
    checked equal at the end), rank 0 writes mae.pt and the bf16 encoder export, the logged loss is the ranks'
    mean and falls; a timeout makes a hang fail."""
    import os

    from tests.test_ddp import start_ranks

    args = ["--out", str(tmp_path), "--data", "digits", "--steps", "30", "--batch-size", "32", "--base-channels", "8",
            "--layers", "1", "1", "--lr", "1e-2", "--warmup-steps", "0", "--ema-decay", "0", "--no-progress",
            "--precision", "bf16", "--device", "cpu", "data.prepare=null", f"data.train_shards={latent_shards}",
            "data.val_shards=null", "data.shape=[4,8,8]", "data.dtype=float32", "data.num_classes=3",
            "data.num_workers=0"]
    codes, outs = start_ranks(["-m", "gwf.features.train", *args], extra_env={"OMP_NUM_THREADS": "1"})
    assert codes == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert "the 2 ranks hold identical weights" in outs[0]
    state = torch.load(tmp_path / "mae.pt", weights_only=True)
    losses = [loss for _, loss in state["history"]]
    assert state["step"] == 30 and len(losses) == 30 and sum(losses[-5:]) < 0.8 * sum(losses[:5]), losses
    export = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert export["step"] == 30 and export["encoder"]["stem.0.weight"].dtype == torch.bfloat16
    assert os.path.getsize(tmp_path / "encoder.pt") < os.path.getsize(tmp_path / "mae.pt")
