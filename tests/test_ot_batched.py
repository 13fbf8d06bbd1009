"""The GPU-scale shape of the own engine: every feature set of an update in one Sinkhorn loop per target (equal to one
call per set to fp32 rounding), no host synchronization on the training path, the optional torch.compile of the loop (same V
within fp32 rounding), fp32 matmuls pinned inside the fp32 island, chunks sized per device."""

import gwf  # noqa: F401  (first: torchvision workaround)

import contextlib

import pytest
import torch

from gwf.bench.counting import OpCounter
from gwf.build import build_objective
from gwf.features import FeatureEncoder
from gwf.objectives.base import GenBatch, RealBatch
from gwf.objectives.drifting import Drifting
from gwf.objectives.field import FieldObjective, attach_encoder
from gwf.objectives.wflow import WFlow
from gwf.ot import barycentric_projection, barycentric_projections, sinkhorn_velocities, sinkhorn_velocity
from gwf.ot.sinkhorn import (_DEVICE_CHUNK_ENTRIES, _blocks, _log_kernels, _sinkhorn_loop, _sinkhorn_loop_rows,
                             as_on_accelerator, chunk_entries, compiled_loop, fp32_island, row_frame_loop,
                             sinkhorn_potentials)
from tests.conftest import compose_config

L, N, M, U, SHAPE = 3, 12, 16, 10, (4, 8, 8)


def _sets(seed, batches, dims, n, m):
    """Feature-like sets: set k has B_k problems in R^{D_k}, its own scale and offset, and its own eps per problem."""
    g = torch.Generator().manual_seed(seed)
    xs = [(1 + k) * torch.randn(b, n, d, generator=g) for k, (b, d) in enumerate(zip(batches, dims))]
    ys = [torch.randn(b, m, d, generator=g) + 0.5 * k for k, (b, d) in enumerate(zip(batches, dims))]
    eps = [(0.2 + torch.rand(b, generator=g)) * d * (1 + k) for k, (b, d) in enumerate(zip(batches, dims))]
    return xs, ys, eps


class Tokens(FeatureEncoder):
    """Three feature sets of different dimensions and token counts: per-location vectors W x [B, 64, 6], their
    mean over locations [B, 6], and the raw sample [B, 256]."""

    def __init__(self, w):
        super().__init__()
        self.register_buffer("w", w)
        self.freeze()

    def forward(self, x):
        loc = torch.einsum("oc,bchw->bhwo", self.w, x).flatten(1, 2)
        return {"loc": loc, "glob": loc.mean(1), "x": x.flatten(1)}


class PerSetWFlow(WFlow):
    """W-Flow solving one feature set at a time (no merged widths, FieldObjective's one-call-per-tensor ``fields``):
    the path before batching."""

    merge_widths = False
    fields = FieldObjective.fields


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(L, N, *SHAPE, generator=g)
    neg = torch.randn(L, N, *SHAPE, generator=g) + 0.3
    pos = torch.randn(L, M, *SHAPE, generator=g) + 1.0
    unc = 1.5 * torch.randn(U, *SHAPE, generator=g)
    return x, neg, pos, unc, torch.tensor([1.0, 2.0, 3.5]), torch.randn(6, 4, generator=g)


def _loss(objective, x, neg, pos, unc, alpha):
    x = x.clone().requires_grad_(True)
    gen = GenBatch(x, torch.arange(L), alpha, sample=lambda: neg.clone())
    loss, logs = objective.generator_loss(gen, RealBatch(pos, unc, torch.arange(L)), torch.Generator())
    loss.backward()
    return loss.detach(), x.grad, logs


def _objective(cls, encoder=None, **kwargs):
    objective = cls(**kwargs)
    if encoder is not None:
        attach_encoder(objective, encoder)
    return objective


def assert_fp32_equal(actual, expected):
    """Equal to a few fp32 roundings of the larger magnitude (the batch count may change the CPU GEMM kernel)."""
    scale = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=4e-6, atol=4e-6 * max(scale, 1e-30))


# --------------------------------------------------------------------------------------------------------
# One Sinkhorn loop for several sets = one loop per set
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, m, chunk_size, mask", [(12, 10, None, False), (12, 12, None, True), (40, 33, 7, False),
                                                    (33, 33, 1, True), (300, 280, None, False)])
def test_multi_set_projection_equals_one_call_per_set(n, m, chunk_size, mask):
    """Same arithmetic per problem (own GEMM per set, element-wise kernel sweep, per-row reductions), so the sets
    batched along the problem axis give the per-set results, chunked or not, masked or not. To fp32 rounding, not bit
    for bit: on AVX-512 MKL's bmm of [b, 1, K] x [b, K, M] (the row frame's column sums) rounds a problem differently
    with b = 1 and b > 1 (found on an AMD EPYC; bit for bit on the AVX2 machines before)."""
    xs, ys, eps = _sets(0, (3, 1, 5), (4, 7, 130), n, m)
    ys = xs if mask else ys
    together = barycentric_projections(xs, ys, eps, n_iters=15, mask_diagonal=mask, chunk_size=chunk_size)
    for x, y, e, t in zip(xs, ys, eps, together):
        assert_fp32_equal(t, barycentric_projection(x, y, e, n_iters=15, mask_diagonal=mask, chunk_size=chunk_size))


@pytest.mark.parametrize("estimator", ["two_batch", "single", "masked"])
def test_multi_set_velocities_equal_one_call_per_set(estimator):
    xs, pos, _ = _sets(1, (2, 5, 1), (3, 9, 40), 14, 11)
    negs, uncs, _ = _sets(2, (2, 5, 1), (3, 9, 40), 14, 6)
    uncs[1] = uncs[1][0]  # [U, D]: one unconditional batch shared by the set's problems
    ws = [torch.tensor([0.5, 2.0]), 1.5, torch.tensor([3.0])]
    neg = negs if estimator == "two_batch" else None
    vs, infos = sinkhorn_velocities(xs, pos, neg, estimator=estimator, uncond=uncs, guidance_w=ws, n_iters=12)
    for k in range(3):
        v, info = sinkhorn_velocity(xs[k], pos[k], None if neg is None else neg[k], estimator=estimator,
                                    uncond=uncs[k], guidance_w=ws[k], n_iters=12)
        assert_fp32_equal(vs[k], v)
        for name in info:
            assert_fp32_equal(infos[k][name], info[name])


def test_multi_set_errors():
    xs, ys, eps = _sets(3, (2, 2), (3, 4), 8, 9)
    with pytest.raises(ValueError, match="share N and M"):
        barycentric_projections([xs[0], xs[1][:, :5]], [ys[0], ys[1]], eps)
    with pytest.raises(ValueError, match="as many"):
        barycentric_projections(xs, ys[:1], eps)
    with pytest.raises(ValueError, match="one entry per feature set"):
        sinkhorn_velocities(xs, ys[:1], xs)
    with pytest.raises(ValueError, match="share B"):
        sinkhorn_velocities(xs, [ys[1], ys[0]], xs)


# --------------------------------------------------------------------------------------------------------
# W-Flow in feature space: all sets together = the per-set path; one loop per target; no synchronization
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["two_batch", "masked", "single"])
def test_wflow_feature_loss_equals_the_per_set_path(estimator):
    """Same problems and fields; the merged width (loc and glob, C = 6) sums its sets' squares in another order than
    one mean per set, so loss, gradient and logs agree to fp32 rounding (the fields themselves: above)."""
    x, neg, pos, unc, alpha, w = _batch()
    batched = _loss(_objective(WFlow, Tokens(w), estimator=estimator, eta=0.7), x, neg, pos, unc, alpha)
    per_set = _loss(_objective(PerSetWFlow, Tokens(w), estimator=estimator, eta=0.7), x, neg, pos, unc, alpha)
    torch.testing.assert_close(batched[0], per_set[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(batched[1], per_set[1], rtol=1e-5, atol=1e-6 * float(per_set[1].abs().max()))
    assert batched[2].keys() == per_set[2].keys() == {"v_rms", "eps"}
    for k in batched[2]:
        torch.testing.assert_close(batched[2][k], per_set[2][k], rtol=1e-6, atol=0)


def test_one_sinkhorn_loop_per_target_whatever_the_number_of_feature_sets():
    """The log-sum-exp sweeps (exp_ kernels) of an update do not grow with the feature sets: three sets of 1, 64 and
    1 tokens cost the same sweeps as data space (one set), while the per-set path pays them three times."""
    x, neg, pos, unc, alpha, w = _batch()
    for accelerator in (True, False):
        counts = {}
        for name, objective in (("data", WFlow()), ("features", _objective(WFlow, Tokens(w))),
                                ("per_set", _objective(PerSetWFlow, Tokens(w)))):
            with OpCounter() as counter, as_on_accelerator() if accelerator else contextlib.nullcontext():
                _loss(objective, x, neg, pos, unc, alpha)
            counts[name] = counter.op_counts["exp_"]
        # 3 targets (positives, second batch, unconditional) x 20 iterations x (log domain: 2 sweeps + the plan's
        # rows; CPU row frame: 1 sweep, the plan from the last one, a log-domain column sweep where one underflows)
        if accelerator:
            assert counts["data"] == counts["features"] == 3 * (2 * 20 + 1), counts
            assert counts["per_set"] == 3 * counts["features"]
        else:
            assert 3 * 20 <= min(counts.values()) and max(counts["data"], counts["features"]) <= 3 * 20 + 3, counts
            assert counts["per_set"] >= 3 * 3 * 20


class Slices(FeatureEncoder):
    """``k`` feature sets of one width: token i of Tokens' per-location map, each [B, 6]."""

    def __init__(self, w, k):
        super().__init__()
        self.register_buffer("w", w)
        self.k = k
        self.freeze()

    def forward(self, x):
        loc = torch.einsum("oc,bchw->bhwo", self.w, x).flatten(1, 2)
        return {f"s{i}": loc[:, i] for i in range(self.k)}


def test_the_operations_of_an_update_do_not_grow_with_the_sets_of_a_width():
    """Sets of one width are merged before the transport: 14 more sets cost a few view ops each (the encoder's
    slices, their unsqueeze, the backward of both; 8 measured), where one set at a time costs ~1,800 ops a set."""
    x, neg, pos, unc, alpha, w = _batch()
    ops = {}
    for cls in (WFlow, PerSetWFlow):
        for k in (2, 16):
            objective = _objective(cls, Slices(w, k))
            _loss(objective, x, neg, pos, unc, alpha)  # first call: the per-layout weights are made and kept
            with OpCounter() as counter:
                _loss(objective, x, neg, pos, unc, alpha)
            ops[cls, k] = counter.ops
    assert ops[WFlow, 16] - ops[WFlow, 2] <= 10 * 14, ops
    assert ops[PerSetWFlow, 16] - ops[PerSetWFlow, 2] >= 1000 * 14, ops


@pytest.mark.parametrize("cls, kwargs", [(WFlow, {}), (WFlow, {"estimator": "masked"}),
                                         (WFlow, {"estimator": "single", "guidance": False}),
                                         (WFlow, {"cost": "l2", "guidance": "distribution"}),
                                         (WFlow, {"estimator": "masked", "guidance": "distribution"}), (Drifting, {})])
@pytest.mark.parametrize("encoder", [False, True])
def test_training_path_has_no_host_synchronization(cls, kwargs, encoder):
    """No value read back, no data-dependent shape, in one generator loss (the own engine; geomloss is a reference
    engine that reads eps per problem)."""
    x, neg, pos, unc, alpha, w = _batch(1)
    objective = _objective(cls, Tokens(w) if encoder else None, **kwargs)
    with OpCounter() as counter, as_on_accelerator():
        loss, grad, _ = _loss(objective, x, neg, pos, unc, alpha)
    assert counter.syncs == 0, counter.sync_counts
    assert counter.ops > 100 and torch.isfinite(loss) and torch.isfinite(grad).all()
    # On the CPU the row-frame loop reads one underflow flag per iteration (free there): 20 per Sinkhorn loop
    with OpCounter() as counter:
        loss_cpu, grad_cpu, _ = _loss(objective, x, neg, pos, unc, alpha)
    # positives, second batch or self (with the uncond reals under distribution guidance), uncond (velocity guidance)
    loops = 0 if cls is Drifting else 3 - (kwargs.get("guidance", True) not in (True, "velocity"))
    assert counter.sync_counts == ({"_local_scalar_dense": 20 * loops} if loops else {}), counter.sync_counts
    torch.testing.assert_close(loss_cpu, loss, rtol=1e-5, atol=0)


# --------------------------------------------------------------------------------------------------------
# torch.compile of the loop (method.compile)
# --------------------------------------------------------------------------------------------------------


def test_compiled_loop_gives_the_same_velocity_and_loss():
    """Compiled and eager loops run the same iteration with different summation orders: V (unit RMS) agrees to
    fp32 rounding accumulated over 20 iterations, < 2e-5 (measured ~2e-6). One compilation (dynamic shapes, B >= 2)
    serves every call here: ~5-20 s on 2 CPU cores."""
    xs, pos, _ = _sets(4, (2, 6), (3, 33), 24, 20)
    negs, uncs, _ = _sets(5, (2, 6), (3, 33), 24, 7)
    kw = dict(uncond=uncs, guidance_w=[torch.tensor([0.5, 2.0]), 1.0], n_iters=20)
    for estimator, neg in (("two_batch", negs), ("masked", None)):
        eager, eager_info = sinkhorn_velocities(xs, pos, neg, estimator=estimator, **kw)
        compiled, compiled_info = sinkhorn_velocities(xs, pos, neg, estimator=estimator, compile=True, **kw)
        for v, vc, i, ic in zip(eager, compiled, eager_info, compiled_info):
            torch.testing.assert_close(vc, v, atol=2e-5, rtol=0)
            torch.testing.assert_close(ic["v_rms"], i["v_rms"], atol=0, rtol=1e-5)
            assert torch.equal(ic["eps"], i["eps"])
    x, neg, pos_, unc, alpha, w = _batch(2)
    loss, grad, _ = _loss(_objective(WFlow, Tokens(w)), x, neg, pos_, unc, alpha)
    loss_c, grad_c, _ = _loss(_objective(WFlow, Tokens(w), compile=True), x, neg, pos_, unc, alpha)
    torch.testing.assert_close(loss_c, loss, atol=0, rtol=1e-5)
    torch.testing.assert_close(grad_c, grad, atol=1e-9, rtol=1e-4)


def test_compile_option_in_the_config_and_constructor():
    method = compose_config(["method=wflow"]).method
    assert method.compile is False
    objective = build_objective({**method, "compile": True}, SHAPE, 0)
    assert isinstance(objective, WFlow) and objective.compile is True
    with pytest.raises(ValueError, match="method.compile"):
        WFlow(engine="geomloss", compile=True)
    x = torch.randn(2, 8, 3)
    with pytest.raises(ValueError, match="engine='own'"):
        sinkhorn_velocity(x, x + 1.0, x - 1.0, engine="geomloss", compile=True)
    # auto (the ImageNet recipes): compiled on CUDA only; with another engine nothing is compiled
    assert not compiled_loop("auto", torch.device("cpu")) and compiled_loop("auto", torch.device("cuda"))
    assert compiled_loop(True, torch.device("cpu")) and not compiled_loop(False, torch.device("cuda"))
    assert WFlow(engine="geomloss", compile="auto").compile is False
    with pytest.raises(ValueError, match="method.compile must be false, true or auto"):
        WFlow(compile="yes")
    assert compose_config(["experiment=imagenet_b2"]).method.compile == "auto"


# --------------------------------------------------------------------------------------------------------
# The fp32 island and the chunks
# --------------------------------------------------------------------------------------------------------


def _matmul_settings():
    cuda, mkldnn = torch.backends.cuda.matmul, torch.backends.mkldnn.matmul
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:  # mixed per-backend settings: torch refuses the legacy read
        legacy = "mixed"
    return legacy, cuda.fp32_precision, mkldnn.fp32_precision


@pytest.mark.parametrize("user", ["default", "high", "medium", "per_backend"])
def test_fp32_island_pins_fp32_matmul_and_restores_the_user_setting(user):
    try:
        if user in ("high", "medium"):
            torch.set_float32_matmul_precision(user)
        elif user == "per_backend":  # the new API, with a setting the legacy getter cannot express
            torch.backends.cuda.matmul.fp32_precision = "tf32"
            torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        before = _matmul_settings()
        with fp32_island(torch.device("cpu")):
            assert _matmul_settings() == ("highest", "ieee", "ieee")
            with fp32_island(torch.device("cpu")):  # nested islands (a velocity calls the engine's island)
                assert _matmul_settings() == ("highest", "ieee", "ieee")
            assert _matmul_settings() == ("highest", "ieee", "ieee")
            assert not torch.is_grad_enabled()
        assert _matmul_settings() == before
        if user != "default":
            assert before[0] != "highest"
    finally:  # torch's defaults for the rest of the session
        torch.set_float32_matmul_precision("highest")
        torch.backends.cuda.matmul.fp32_precision = "none"
        torch.backends.mkldnn.matmul.fp32_precision = "none"
    assert _matmul_settings() == ("highest", "none", "none")


def test_chunks_are_a_cpu_cache_device_and_a_memory_budget_elsewhere():
    assert chunk_entries(torch.device("cpu")) == 1 << 18  # 1 MiB of fp32: a chunk stays in cache
    assert row_frame_loop(torch.device("cpu")) and not row_frame_loop(torch.device("cuda"))
    with as_on_accelerator():  # what gwf-bench-step and the sync tests count on CPU tensors
        assert chunk_entries(torch.device("cpu")) == _DEVICE_CHUNK_ENTRIES
        assert not row_frame_loop(torch.device("cpu"))
    assert row_frame_loop(torch.device("cpu"))
    assert chunk_entries(torch.device("cuda")) == _DEVICE_CHUNK_ENTRIES == 1 << 28
    # an ImageNet update: 2 labels x 6,103 (feature set, token) problems of 64 x 64 -> one block on the GPU
    assert len(list(_blocks(2 * 6103, 64, 64, None, chunk_entries(torch.device("cuda"))))) == 1
    assert len(list(_blocks(2 * 6103, 64, 64, None, chunk_entries(torch.device("cpu"))))) == 2 * 6103 // 64 + 1
    # 16384^2 entries per problem do not fit the budget: row chunks of 2^28 / 16384 rows
    assert len(list(_blocks(1, 16384, 16384, None, chunk_entries(torch.device("cuda"))))) == 1
    assert len(list(_blocks(2, 32768, 16384, None, chunk_entries(torch.device("cuda"))))) == 4


# --------------------------------------------------------------------------------------------------------
# The CPU's row-frame loop = the log-domain loop
# --------------------------------------------------------------------------------------------------------


def _kernel(x, y, eps, mask=False):
    shift = y.mean(1, keepdim=True)
    return _log_kernels([(x - shift) / eps[:, None, None]], [y - shift], eps, mask)


@pytest.mark.parametrize("n, m, chunk_size, mask", [(40, 33, None, False), (40, 33, 7, False), (33, 33, 1, True),
                                                    (300, 280, None, True)])
def test_row_frame_loop_equals_the_log_domain_loop(n, m, chunk_size, mask):
    """Same iterations: potentials to fp32 rounding (in units of eps), the kept plan's projection too."""
    xs, ys, eps = _sets(6, (4,), (5,), n, m)
    x, y, e = xs[0], (xs[0] if mask else ys[0]), eps[0]
    for n_iters in (1, 2, 25):
        a_log, b_log = _sinkhorn_loop(_kernel(x, y, e, mask), n_iters, chunk_size)
        a_row, b_row, q = _sinkhorn_loop_rows(_kernel(x, y, e, mask), n_iters, chunk_size)
        assert q is None
        torch.testing.assert_close(a_row, a_log, atol=2e-5, rtol=1e-6)
        torch.testing.assert_close(b_row, b_log, atol=2e-5, rtol=1e-6)
        t = barycentric_projection(x, y, e, n_iters=n_iters, mask_diagonal=mask, chunk_size=chunk_size)
        with as_on_accelerator():
            t_log = barycentric_projection(x, y, e, n_iters=n_iters, mask_diagonal=mask, chunk_size=chunk_size)
        torch.testing.assert_close(t, t_log, atol=1e-5, rtol=1e-5)


def test_row_frame_loop_takes_the_log_domain_for_underflowing_columns():
    """A target point far from every source point with a small eps: in every row frame its column underflows (E = 0)
    at the first iterations, so those iterations update it in the log domain; the last one, if it underflows,
    makes the log-kernel again and the plan goes the log-domain way. Potentials as close to a float64 run as fp32
    allows at |beta| ~ 350 (the log-domain loop's own error is up to 4x larger here), same plan as the log domain."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, 30, 3, generator=g)
    y = torch.randn(2, 25, 3, generator=g)
    y[:, 0] += 12.0  # 0.5 * 12^2 / 0.5 = 144 nats from every x: exp(-144) underflows fp32
    eps = torch.tensor([0.5, 0.8])
    for n_iters in (1, 3, 40):
        with fp32_island(x.device):
            logk = _kernel(x, y, eps)
            a, b, q = _sinkhorn_loop_rows(logk, n_iters, None, keep_plan=True,
                                          rebuild=lambda: _kernel(x, y, eps))
            a64, b64 = _sinkhorn_loop(_kernel(x.double(), y.double(), eps.double()), n_iters, None)
        assert torch.isfinite(b).all() and (q is None) == (n_iters == 1)  # 1 iteration: the last one underflowed
        tol = 1e-6 * float(b64.abs().max())  # ~3.5e-4: fp32 rounding of potentials of this size
        torch.testing.assert_close(a.double(), a64, atol=tol, rtol=0)
        torch.testing.assert_close(b.double(), b64, atol=tol, rtol=0)
        if q is None:
            torch.testing.assert_close(logk, _kernel(x, y, eps))  # the log-kernel again, for the plan
        t = barycentric_projection(x, y, eps, n_iters=n_iters)
        with as_on_accelerator():
            t_log = barycentric_projection(x, y, eps, n_iters=n_iters)
        assert torch.isfinite(t).all()
        torch.testing.assert_close(t, t_log, atol=1e-4, rtol=0)
        f, gg = sinkhorn_potentials(x, y, eps, n_iters=n_iters)
        with as_on_accelerator():  # fp32 both: the log domain's own error is the larger, up to 4 tol (x eps)
            f_log, g_log = sinkhorn_potentials(x, y, eps, n_iters=n_iters)
        torch.testing.assert_close(f, f_log, atol=5 * tol * float(eps.max()), rtol=0)
        torch.testing.assert_close(gg, g_log, atol=5 * tol * float(eps.max()), rtol=0)
