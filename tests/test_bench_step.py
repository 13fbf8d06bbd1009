"""gwf-bench-step on a tiny imagenet_b2 (dit_tiny: the official W-Flow DiT at width 64; a 2-stage MAE of width 8;
4x8x8 latents): its JSON, the memory probe against hand counts, the activation-scaling rule against direct
measurements at two batch sizes, and its op and sync counts (fake tensors, full batch) against a direct OpCounter
count of the same update on real CPU tensors, and the kernel counter of compiled code on known graphs."""

import json

import pytest
import torch

from gwf.bench import step
from gwf.bench.counting import KernelCounter, OpCounter
from gwf.build import build_module

TINY = ["model=dit_tiny", "data.shape=[4,8,8]", "data.num_classes=10", "data.batch_size=8",
        "batch.labels_per_update=2", "batch.gen_per_label=4", "batch.pos_per_label=4", "batch.uncond_per_update=4",
        "batch.bank_capacity=8"]
MAE = ["--mae-channels", "8", "--mae-layers", "1,1"]


@pytest.fixture(scope="module")
def result(capsys_module):
    step.main(["--recipe", "imagenet_b2", "--json", *MAE, *TINY])
    return json.loads(capsys_module())


@pytest.fixture(scope="module")
def capsys_module():
    """stdout of the module-scoped run (pytest's capsys is function-scoped)."""
    import contextlib
    import io

    buffer = io.StringIO()
    stack = contextlib.ExitStack()
    stack.enter_context(contextlib.redirect_stdout(buffer))
    yield lambda: (stack.close(), buffer.getvalue())[1]
    stack.close()


def _tiny_mae(tmp_path, meta: bool):
    return step.write_mae(tmp_path / f"mae{int(meta)}.pt", (4, 8, 8), 8, (1, 1), meta=meta)


def test_json_has_the_keys_and_consistent_figures(result):
    assert {"recipe", "peak_gib", "ops", "syncs", "tflop", "floor_s_h100"} <= result.keys()
    assert result["recipe"] == "imagenet_b2" and result["ops_eager"] > 1000 and result["syncs"] == 0
    # the recipe compiles the generator and the Sinkhorn loop on CUDA (model.compile, method.compile: auto): ops
    # counts them compiled (dispatched ops + Inductor's kernels), fewer than the eager update's
    assert result["compiled"] and 0 < result["ops_by_name"][KernelCounter.KERNEL] < result["ops"] < result["ops_eager"]
    assert result["floor_s_h100"] == pytest.approx(result["tflop"] * 1e12 / (989e12 * 0.6))
    assert result["peak_gib"] == pytest.approx(sum(result["memory_gib"].values()))  # the parts add up
    assert result["memory_gib"]["saved activations"] > 0 and result["memory_gib"]["transport workspace"] > 0
    assert result["assumptions"] and result["host_reads_fake"] == {}  # the update never read a fake tensor's value


def test_parameter_and_optimizer_bytes_equal_a_hand_count(result):
    module = build_module(step.compose("imagenet_b2", [*TINY, "method.features=null"]), (4, 8, 8), 10)
    params = [p for p in module.generator.parameters()]
    numel = sum(p.numel() for p in params)
    gib = 2**30
    assert result["memory_gib"]["parameters"] * gib == pytest.approx(4 * numel, rel=1e-12)  # fp32
    # fused AdamW (what optim.impl=auto picks on CUDA): exp_avg and exp_avg_sq in fp32, one fp32 step per tensor
    assert result["memory_gib"]["optimizer state"] * gib == pytest.approx(8 * numel + 4 * len(params), rel=1e-12)
    assert result["gradients_gib"] * gib == pytest.approx(4 * numel, rel=1e-12)
    # fp16 samples (data.dtype): 10 classes x 8, and the unconditional ring of 1000 (batch.uncond_bank); int64 counts
    bank = 10 * 8 * 4 * 8 * 8 * 2 + 1000 * 4 * 8 * 8 * 2 + 8 * 10 + 8
    bank += 8 * (10 * 8 + 1000)  # int64 stream position of every slot (checkpoint.bank=replay)
    assert result["memory_gib"]["class bank"] * gib == pytest.approx(bank, rel=1e-12)


def test_activation_scaling_rule_matches_direct_measurements(tmp_path):
    """The predictor from 1 and 2 labels gives the direct measurements at 3 and 5 labels: saved activations and the
    transport workspace exactly (linear in the labels), the whole transient peak within 2%."""
    cfg = step.as_on_gpu(step.compose("imagenet_b2", TINY),
                         {"method.features.path": str(_tiny_mae(tmp_path, meta=True))})
    runs = {n: step.measure(cfg, n) for n in (1, 2, 3, 5)}
    for n in (3, 5):
        for what, get, tol in (("saved", lambda r: r["saved"], 1e-9),
                               ("transport", lambda r: r["field_peak"]["total"], 1e-9),
                               ("peak", lambda r: r["peak"]["total"], 0.02)):
            predicted = step.affine(1, get(runs[1]), 2, get(runs[2]), n)
            assert predicted == pytest.approx(get(runs[n]), rel=tol), (what, n)
    assert runs[5]["saved"] > 2 * runs[1]["saved"]  # the activations do grow with the labels


def test_ops_and_syncs_equal_a_direct_opcounter_count(result, tmp_path):
    """The same steady-state update on real CPU tensors (tiny widths, the MAE's real weights), counted by a plain
    OpCounter: the same ops; the syncs the same once the ones OpCounter cannot see are taken out."""
    cfg = step.compose("imagenet_b2", TINY)
    counter, module, _ = step.count_update(step.as_on_gpu(cfg, step.tiny_overrides(cfg, _tiny_mae(tmp_path, False))),
                                           counter_cls=OpCounter)
    assert int(module.update_count) == 2 and type(counter) is OpCounter
    assert result["ops_eager"] == counter.ops
    extra = sum(result["syncs_by_op"].get(k, 0) for k in step.SiteCounter.EXTRA)
    assert result["syncs_eager"] - extra == counter.syncs


def test_memory_probe_counts_a_known_graph():
    """relu(x @ w), w a parameter: x (for dw) and relu's output are saved; x, x @ w and the output are alive at
    once. On real and on fake tensors."""
    for fake in (False, True):
        with step.fake_tensors() if fake else torch.no_grad(), torch.enable_grad():
            w = torch.nn.Parameter(torch.randn(32, 16))
            probe = step.MemoryProbe()
            with probe:
                x = torch.randn(64, 32)
                y = torch.relu(x @ w)
                assert probe.saved == (64 * 32 + 64 * 16) * 4
                y.sum().backward()
            assert probe.peak["total"] >= (64 * 32 + 2 * 64 * 16) * 4 and probe.saved_peak == (64 * 32 + 64 * 16) * 4
            assert probe.flops["float32"] == 2 * (2 * 64 * 32 * 16)  # the forward GEMM and d/dw (x needs no grad)
            del x, y


def test_cuda_autocast_policy_keeps_norms_in_fp32():
    x = torch.randn(2, 8, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = torch.nn.functional.conv2d(x, torch.randn(8, 8, 3, 3), padding=1)
        assert y.dtype == torch.bfloat16 and torch.nn.functional.group_norm(y, 4).dtype == torch.bfloat16
        with step.CudaAutocastPolicy():
            assert torch.nn.functional.group_norm(y, 4).dtype == torch.float32  # as CUDA autocast does
            assert torch.nn.functional.linear(y.flatten(1), torch.randn(3, 128)).dtype == torch.bfloat16


def test_kernel_counter_counts_extern_and_generated_kernels():
    """A compiled exp(sum(relu(x @ w), 1)) runs the GEMM as an extern kernel (dispatched) and one generated kernel
    (relu, row sums and exp fused); eager code under the same counter counts as OpCounter does."""
    from torch._inductor import config as inductor_config

    x, w = torch.randn(16, 8), torch.randn(8, 4)
    fn = lambda x, w: (x @ w).relu().sum(dim=1).exp()  # noqa: E731
    with inductor_config.patch({"cpp.enable_kernel_profile": True}):
        compiled = torch.compile(fn)
        compiled(x, w)  # compiles (a dispatch mode sees no compilation)
    with KernelCounter() as counter:
        out = compiled(x, w)
    assert dict(counter.op_counts) == {"mm": 1, KernelCounter.KERNEL: 1}
    torch.testing.assert_close(out, fn(x, w))
    with KernelCounter() as kernels, OpCounter() as ops:
        fn(x, w)
    assert kernels.op_counts == ops.op_counts and ops.ops == 4  # mm, relu, sum, exp


def test_a_recipe_on_data_sampled_on_the_fly_is_refused_with_the_tool_to_use(capsys):
    from gwf.bench.step import main

    with pytest.raises(SystemExit):
        main(["--recipe", "gwf_2d"])
    err = capsys.readouterr().err
    assert "experiment=gwf_2d samples its data on the fly" in err and "gwf-bench-2d" in err
