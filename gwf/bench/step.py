"""What one training update of a recipe asks of a GPU, computed on the CPU: predicted peak memory per rank, aten ops
and host synchronizations, FLOPs and the H100 floor time.

    gwf-bench-step --recipe imagenet_b2 [--json]     # one recipe
    gwf-bench-step --recipe imagenet_b2 --data-space # method.features=null
    gwf-bench-step --all                             # every imagenet_* recipe, a Markdown table
    gwf-bench-step --recipe imagenet_l2 model.checkpointing=blocks   # any Hydra override

Every figure comes from ``module.training_step`` of a module built by gwf.build.build_module from the composed recipe,
with a random MAE of the recipe's size (nothing is downloaded) and a Lightning Trainer attached, run on fake tensors
(shapes and dtypes: no memory, no compute) at full width and at the recipe's per-rank batch: memory (live tensors and
saved activations), FLOPs, aten ops and host syncs. docs/benchmarks.md explains the method; the printed assumptions
state what is not measured.
"""

from __future__ import annotations

import gwf  # noqa: F401  (torchvision workaround before anything else)

import argparse
import contextlib
import gc
import json
import re
import sys
import tempfile
import traceback
import warnings
import weakref
from collections import Counter
from functools import partial
from pathlib import Path
from unittest import mock

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from gwf.bench.counting import KernelCounter, OpCounter, optimizer_step_counters
from gwf.ot.sinkhorn import as_on_accelerator

GIB = 2**30
H100_BF16, H100_FP32, UTILISATION = 989e12, 67e12, 0.6  # dense FLOP/s (SXM, no sparsity) and the assumed efficiency
MAE_LAYERS = (3, 4, 6, 3)  # the official latent MAEs (docs/imagenet.md); base channels from the recipe's header
TINY_HEAD_DIM, TINY_MAE_CHANNELS = 8, 8  # widths of the op-count run (op counts do not depend on widths)
# CUDA autocast runs these in fp32 (torch.amp docs, "CUDA ops that can autocast to float32"); CPU autocast does not.
CUDA_FP32_OPS = frozenset(
    "__pow__ __rdiv__ __rpow__ __rtruediv__ acos asin binary_cross_entropy_with_logits cosh cosine_embedding_loss "
    "cdist cosine_similarity cross_entropy cumprod cumsum dist erfinv exp expm1 group_norm hinge_embedding_loss "
    "kl_div l1_loss layer_norm log log_softmax log10 log1p log2 margin_ranking_loss mse_loss multilabel_margin_loss "
    "multi_margin_loss nll_loss norm normalize pdist poisson_nll_loss pow prod reciprocal rsqrt sinh smooth_l1_loss "
    "soft_margin_loss softmax softmin softplus sum renorm tan triplet_margin_loss".split())
ASSUMPTIONS = [
    "peak = torch.cuda.max_memory_allocated of a steady-state update: persistent state + the peak of the tensors "
    "alive during training_step (one count per storage; 512 B rounding ignored); allocator fragmentation "
    "(reserved > allocated), the CUDA context, cuDNN/cuBLAS workspaces and NCCL buffers are not counted",
    "the update runs as on a GPU: CPU autocast with CUDA's fp32 op list emulated, the fused optimizer (optim.impl "
    "auto picks it on CUDA), the transport in its accelerator form (gwf.ot.sinkhorn.as_on_accelerator: the "
    "log-domain loop, chunked by the workspace budget, not the CPU's row-frame loop chunked by the cache) and the non-finite check deferred (module.defer_finite_check)",
    "transients measured on fake tensors at 1 and 2 label chunks' worth of labels per rank and extrapolated "
    "affinely in the labels (the direct full-batch measurement is printed beside it)",
    f"floor time = FLOPs / ({H100_BF16 / 1e12:.0f} TFLOP/s bf16 dense x {UTILISATION:.0%}); the fp32-aware floor "
    f"puts the fp32 FLOPs (transport GEMMs, no TF32) at {H100_FP32 / 1e12:.0f} TFLOP/s x {UTILISATION:.0%}; "
    "elementwise work (Sinkhorn sweeps) is memory-bound and not in the floor",
    "with model.compile / method.compile true or auto (the ImageNet recipes compile the generator and the Sinkhorn "
    "loop on CUDA): ops = the aten ops dispatched (eager parts, and the extern kernels the compiled graphs call: "
    "GEMMs, attention) + the kernels Inductor generated, counted on real CPU tensors at tiny widths "
    "(gwf.bench.counting.KernelCounter). Inductor's C++ kernels stand for its Triton ones: the same scheduler, but "
    "the CPU fuses some loops that Triton keeps apart (with that CPU-only outer-loop fusion off, the data-space "
    "imagenet_b2 update counted 23 kernels fewer, 1,182 instead of 1,205) and Triton fuses a reduction with its "
    "consumer where the CPU does not. Memory and FLOPs are the eager networks' (Inductor's partitioner saves no "
    "more for backward than eager autograd)",
    "FLOPs, ops and syncs: FlopCounterMode and OpCounter around the next update (the 3rd; no logging; from the bank "
    "push to the EMA update) "
    "on the fake tensors at the full per-rank batch (the transport's chunk loop depends on the batch sizes); the "
    "counts equal those on real CPU tensors (tests/test_bench_step.py; --cpu-count repeats it at tiny widths); CPU "
    "op names (e.g. the CPU attention kernel); bool-mask indexing and tolist also counted as syncs",
]


def compose(recipe: str, overrides=(), data_space: bool = False):
    """The composed config of ``experiment=<recipe>`` with ``overrides`` (``method.features=null`` for data space)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    from gwf.build import conf_dir
    from gwf.launch import register_resolvers

    register_resolvers()
    extra = ["method.features=null"] if data_space else []
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=[f"experiment={recipe}", *extra, *overrides])


def recipe_mae_channels(recipe: str, default: int = 640) -> int:
    """Base channels of the MAE in the recipe's cluster command (``.../mae_latent_<C>/mae.pt``)."""
    from gwf.build import conf_dir

    m = re.search(r"mae_latent_(\d+)/", (Path(conf_dir()) / "experiment" / f"{recipe}.yaml").read_text())
    return int(m.group(1)) if m else default


def write_mae(path: Path, shape, channels: int, layers, meta: bool) -> Path:
    """A randomly initialised gwf-train-encoder checkpoint (on the meta device: shapes only, a few KiB)."""
    from gwf.constants import MAE_CHECKPOINT_FORMAT
    from gwf.features.mae import MaskedAutoencoder, save_checkpoint

    torch.manual_seed(0)
    with torch.device("meta") if meta else contextlib.nullcontext():
        model = MaskedAutoencoder(shape[0], channels, layers)
    sd = model.state_dict()
    save_checkpoint(path, {"format": MAE_CHECKPOINT_FORMAT, "config": model.config, "data_shape": list(shape),
                           "step": 0, "model": sd, "ema": sd})
    return path


def as_on_gpu(cfg, overrides: dict):
    """A copy of ``cfg`` with ``overrides`` (dotted keys) and the optimizer CUDA would use (optim.impl auto: fused)."""
    from omegaconf import OmegaConf, open_dict

    cfg = OmegaConf.create(OmegaConf.to_container(cfg))
    with open_dict(cfg):
        for key, value in overrides.items():
            OmegaConf.update(cfg, key, value, force_add=True)
        if cfg.optim.get("impl") == "auto":
            cfg.optim.impl = "fused"
    return cfg


class CudaAutocastPolicy(TorchFunctionMode):
    """Under CPU autocast, run CUDA autocast's fp32 ops (norms, softmax, reductions, ...) in fp32 as CUDA would."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__name__", "") in CUDA_FP32_OPS and torch.is_autocast_enabled("cpu"):
            up = lambda t: t.float() if torch.is_tensor(t) and t.dtype in (torch.bfloat16, torch.float16) else t
            args, kwargs = tree_map(up, args), tree_map(up, kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def fake_tensors():
    """FakeTensorMode (CPU device, no storage) whose tensors keep no weak reference in the converter's memo, so that
    Module.to can swap fake parameters (build_module casts the encoder; encode_problems moves it)."""
    from torch._subclasses.fake_tensor import FakeTensorConverter, FakeTensorMode

    with warnings.catch_warnings(), mock.patch.object(FakeTensorConverter, "set_tensor_memo", lambda *a: None):
        warnings.simplefilter("ignore")
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            yield mode


def attach_trainer(module, precision: str):
    """A CPU Lightning Trainer attached to ``module`` as fit would (strategy, optimizers, schedulers), not run."""
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, precision=precision, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=0)
    trainer.strategy.connect(module)
    module.trainer = trainer
    trainer.strategy.setup_optimizers(trainer)
    if hasattr(module, "defer_finite_check"):
        module.defer_finite_check = True  # as on an accelerator: no host read of the loss
    return trainer


def training_step(module, trainer, batch, index: int, *modes):
    """``module.training_step`` as Lightning calls it (the precision plugin's autocast), inside ``modes``."""
    with contextlib.ExitStack() as stack:
        for mode in (CudaAutocastPolicy(), *modes, trainer.precision_plugin.train_step_context()):
            stack.enter_context(mode)
        return module.training_step(batch, index)


def data_batch(cfg, generator=None):
    """One data batch (reals pushed into the class bank): ``data.batch_size`` samples with uniform labels."""
    n, shape, classes = int(cfg.data.batch_size), tuple(cfg.data.shape), max(int(cfg.data.num_classes), 1)
    return torch.randn(n, *shape, generator=generator), torch.randint(classes, (n,), generator=generator)


# ------------------------------------------------------------------------------------------------ ops and syncs
class SiteCounter(OpCounter):
    """OpCounter that also counts the host reads it cannot see (bool-mask indexing runs nonzero inside ``index``;
    ``tolist`` copies to the host) and records the call site (innermost gwf frame) of every sync."""

    EXTRA = ("index[bool]", "tolist")

    def __init__(self, host_tensors=()):
        super().__init__(host_tensors)
        self.sites: Counter = Counter()
        self._tolist = _ToList(self)

    def __enter__(self):
        self._tolist.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self._tolist.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "prim" or (func.overloadpacket is torch.ops.aten.detach and (
                self._tolist.fn in _NO_OP_CASTS or _in_parameter_swap())):
            return func(*args, **(kwargs or {}))  # fake tensors only: metadata queries, casts to the same dtype
            #                                       and Module.to's parameter swap dispatch these
        before = self.syncs
        out = super().__torch_dispatch__(func, types, args, kwargs)
        name = func.overloadpacket.__name__
        if name in ("index", "index_put", "index_put_", "_index_put_impl_") and any(
                torch.is_tensor(i) and i.dtype in (torch.bool, torch.uint8) for i in (args[1] if len(args) > 1 else ())
                if i is not None):
            self.sync_counts["index[bool]"] += 1
            self.record("index[bool]")
        elif self.syncs > before:
            self.record(name)
        return out

    def record(self, name: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-2] if "/gwf/" in f.filename and "/bench/" not in f.filename]
        site = f"gwf/{frames[-1].filename.split('/gwf/')[-1]}:{frames[-1].lineno} {frames[-1].name}" if frames else "?"
        self.sites[(name, site)] += 1


def _in_parameter_swap() -> bool:
    """Whether torch.nn.Parameter is being made by Module._apply (which swaps fake parameters on Module.to)."""
    f = sys._getframe(2)
    for _ in range(8):
        if f is None:
            return False
        if f.f_code.co_name == "_apply" and f.f_code.co_filename.endswith("torch/nn/modules/module.py"):
            return True
        f = f.f_back
    return False


_NO_OP_CASTS = frozenset({"float", "to", "bfloat16", "half", "double", "type_as"})


class _ToList(TorchFunctionMode):
    """Counts ``tolist`` and keeps the name of the torch function being run."""

    def __init__(self, counter: SiteCounter):
        super().__init__()
        self.counter, self.fn = counter, ""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.fn = getattr(func, "__name__", "")
        if self.fn == "tolist":
            self.counter.sync_counts["tolist"] += 1
            self.counter.record("tolist")
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self.fn = ""


def tiny_overrides(cfg, mae_path: Path | None) -> dict:
    """The op-count run: tiny widths (DiT head dim 8, the tiny MAE at ``mae_path``); depth, encoder layout, batch
    sizes (the class bank's too: a push larger than its capacity takes another path) and data shape unchanged."""
    from gwf.models.wflow_dit import DIT_SIZES

    out = {}
    if cfg.model.name in DIT_SIZES:
        out["model.hidden"] = TINY_HEAD_DIM * cfg.model.get("num_heads", DIT_SIZES[cfg.model.name]["num_heads"])
    if cfg.method.get("features") is not None:
        out["method.features.path"] = str(mae_path)
    return out


def count_update(cfg, counter_cls=SiteCounter, seed: int = 0, compiled: bool = False):
    """Ops and syncs of the 2nd update of ``module.training_step`` on real CPU tensors (the class bank filled first):
    the counter, the module and its trainer. ``compiled``: what ``model.compile`` and ``method.compile`` (true or
    auto) compile on CUDA compiled here too (by the 1st update), counted by a KernelCounter (dispatched ops + the
    kernels Inductor generated)."""
    from gwf.build import build_module

    shape, num_classes = tuple(cfg.data.shape), int(cfg.data.num_classes)
    torch.manual_seed(seed)
    module = build_module(cfg, shape, num_classes)
    trainer = attach_trainer(module, str(cfg.trainer.precision))
    profile_kernels = contextlib.nullcontext()
    if compiled:
        from torch._inductor import config as inductor_config

        profile_kernels = inductor_config.patch({"cpp.enable_kernel_profile": True})  # the profiler sees them
        module.compile_networks("cuda")
        if getattr(module.objective, "compile", False) == "auto":
            module.objective.compile = True  # the transport loop as on CUDA
        counter_cls = KernelCounter
    g = torch.Generator().manual_seed(seed)
    for c0 in range(0, max(num_classes, 1), 64):  # fill every class: an update needs all of them ready
        labels = torch.arange(c0, min(c0 + 64, max(num_classes, 1))).repeat_interleave(module.bank.capacity)
        module.bank.push(torch.randn(len(labels), *shape, generator=g), labels if num_classes else None)
    with warnings.catch_warnings(), as_on_accelerator(), profile_kernels:
        warnings.simplefilter("ignore")
        training_step(module, trainer, data_batch(cfg, g), 0)
        counter = counter_cls(host_tensors=optimizer_step_counters(trainer.optimizers))
        training_step(module, trainer, data_batch(cfg, g), 1, counter)
    if int(module.update_count) != 2:
        raise RuntimeError(f"expected 2 updates, ran {int(module.update_count)}")
    return counter, module, trainer


# ------------------------------------------------------------------------------------------------ memory and FLOPs
class _Saved:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


class FakeHostReads(TorchDispatchMode):
    """Answers host reads of fake tensors (values unknown) with True / 2^31 - 1 / 1.0, so that the class bank reads
    as full, and counts them by call site."""

    def __init__(self):
        super().__init__()
        self.reads: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is not torch.ops.aten._local_scalar_dense.default:
            return func(*args, **(kwargs or {}))
        frames = [f for f in traceback.extract_stack() if "/gwf/" in f.filename and "/bench/" not in f.filename]
        self.reads[f"gwf/{frames[-1].filename.split('/gwf/')[-1]}:{frames[-1].lineno}" if frames else "?"] += 1
        return True if args[0].dtype == torch.bool else 1.0 if args[0].is_floating_point() else 2**31 - 1


class MemoryProbe(TorchDispatchMode):
    """Bytes of the tensors alive inside (one count per storage) and their peak, with the parts saved for backward
    (saved_tensors_hooks) and allocated by the velocity field (under gwf/ot or ``objective.field(s)``, by gwf
    function) at that moment; FLOPs by dtype (FlopCounterMode's formulas)."""

    def __init__(self, field_codes=()):
        super().__init__()
        self.live: dict[int, list] = {}  # storage -> [bytes, weak reference, gwf function if the field made it]
        self.now = self.saved = self.saved_peak = self.field = 0
        self.peak, self.field_peak = {"total": 0}, {"total": 0}
        self.field_by_fn: Counter = Counter()
        self.saved_refs: Counter = Counter()
        self.field_codes = set(field_codes)
        self.flops: Counter = Counter()
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda h: h.t if isinstance(h, _Saved) else h)

    def __enter__(self):
        self.hooks.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self.hooks.__exit__(*exc)

    def track(self, tensors) -> None:
        """Count tensors made before (e.g. the previous update's gradients) until they are freed."""
        for t in tensors:
            self._new(t, None)

    @staticmethod
    def _key(t) -> int:
        return t.untyped_storage()._cdata

    def _field_function(self) -> str | None:
        """The innermost gwf function on the stack if the velocity field is running, else None."""
        f, inner = sys._getframe(2), None
        while f is not None:
            code = f.f_code
            if inner is None and "/gwf/" in code.co_filename and "/gwf/bench/" not in code.co_filename:
                inner = code.co_name
            if "/gwf/ot/" in code.co_filename or code in self.field_codes:
                return inner
            f = f.f_back
        return None

    def _new(self, t, fn: str | None) -> None:
        """A new storage, followed to its end by a weak reference (as torch.distributed._tools.mem_tracker)."""
        st = t.untyped_storage()
        nbytes = st.nbytes()
        self.live[st._cdata] = [nbytes, weakref.ref(st, partial(self._freed, st._cdata)), fn]
        self.now += nbytes
        if fn is not None:
            self.field += nbytes
            self.field_by_fn[fn] += nbytes
            if self.field > self.field_peak["total"]:
                self.field_peak = {"total": self.field, **self.field_by_fn}

    def _freed(self, key, _ref) -> None:
        nbytes, _, fn = self.live.pop(key)
        self.now -= nbytes
        if fn is not None:
            self.field -= nbytes
            self.field_by_fn[fn] -= nbytes

    def _pack(self, t):
        key = self._key(t)
        if key not in self.live:  # parameters, frozen weights, state made outside: not activations
            return t
        self.saved_refs[key] += 1
        if self.saved_refs[key] == 1:
            self.saved += self.live[key][0]
            self.saved_peak = max(self.saved_peak, self.saved)
        holder = _Saved(t)
        weakref.finalize(holder, self._unpacked, key, self.live[key][0])
        return holder

    def _unpacked(self, key, nbytes) -> None:
        self.saved_refs[key] -= 1
        if self.saved_refs[key] == 0:
            self.saved -= nbytes
            del self.saved_refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {self._key(a) for a in tree_flatten((args, kwargs))[0] if isinstance(a, torch.Tensor)}
        new = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.layout == torch.strided
               and self._key(t) not in inputs and self._key(t) not in self.live]  # not a view, not seen before
        fn = self._field_function() if new and not torch.is_grad_enabled() else None
        for t in new:
            self._new(t, fn)
        if self.now > self.peak["total"]:
            self.peak = {"total": self.now, "saved": self.saved, "field": self.field,
                         "in backward": torch._C._current_autograd_node() is not None}
        if func.overloadpacket in flop_registry:
            dtype = next((a.dtype for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)), None)
            self.flops[str(dtype).replace("torch.", "")] += flop_registry[func.overloadpacket](*args, **kwargs,
                                                                                                out_val=out)
        return out


def state_bytes(module, optimizers) -> dict[str, int]:
    """Bytes of the persistent state by category (module tensors by prefix, the frozen encoder, optimizer state)."""
    cats = Counter()
    seen = set()
    prefixes = {"ema.": "EMA", "jko.": "JKO copy", "bank.": "class bank"}
    named = [*module.named_parameters(), *module.named_buffers()]
    encoder = getattr(module.objective, "features", None)
    if encoder is not None:
        named += [("encoder." + n, t) for n, t in [*encoder.named_parameters(), *encoder.named_buffers()]]
    named += [("optimizer.", v) for opt in optimizers for s in opt.state.values() for v in s.values()
              if torch.is_tensor(v)]
    for name, t in named:
        if MemoryProbe._key(t) in seen:
            continue
        seen.add(MemoryProbe._key(t))
        cat = next((c for p, c in prefixes.items() if name.startswith(p)), None)
        cat = cat or {"encoder.": "encoder", "optimizer.": "optimizer state"}.get(name[:name.find(".") + 1])
        cats[cat or ("parameters" if t.requires_grad else "other buffers")] += t.untyped_storage().nbytes()
    cats["gradients"] = sum(p.grad.untyped_storage().nbytes() for p in module.parameters() if p.grad is not None)
    return dict(cats)


# Fake modules stay alive until the process ends: torch 2.13 corrupted memory (segfaults, some runs) when the cyclic
# garbage collector freed fake GWFModules (the module and its attached trainer form a cycle).
_FAKE_OBJECTS: list = []


def measure(cfg, labels: int, count: bool = False) -> dict:
    """Persistent state and the transients of the 2nd update of ``module.training_step`` at full width on fake
    tensors, with ``labels`` labels per rank; with ``count`` also the FLOPs, ops and syncs of the 3rd."""
    from gwf.build import build_module

    shape, num_classes = tuple(cfg.data.shape), int(cfg.data.num_classes)
    gc.collect()  # the garbage collector must not free fake tensors (below); real garbage goes now
    gc.disable()
    with fake_tensors(), FakeHostReads() as reads, as_on_accelerator(), contextlib.ExitStack() as cleanup:
        cleanup.callback(gc.enable)
        module = build_module(as_on_gpu(cfg, {"batch.labels_per_update": labels}), shape, num_classes)
        trainer = attach_trainer(module, str(cfg.trainer.precision))
        training_step(module, trainer, data_batch(cfg), 0)  # optimizer state and gradients exist from here on
        objective = type(module.objective)
        probe = MemoryProbe([getattr(objective, f).__code__ for f in ("field", "fields") if hasattr(objective, f)])
        probe.track([p.grad for p in module.parameters() if p.grad is not None])
        batch = data_batch(cfg)
        reads.reads.clear()  # the steady-state update's reads only (the warm-up fills the bank)
        with probe:
            training_step(module, trainer, batch, 1)
        state = state_bytes(module, trainer.optimizers)
        if count:  # another update: the probe's hooks change which views autograd makes, FlopCounterMode what it keeps
            flop_mode, counter = FlopCounterMode(display=False), SiteCounter(optimizer_step_counters(trainer.optimizers))
            training_step(module, trainer, data_batch(cfg), 2, flop_mode, counter)
        _FAKE_OBJECTS.append((module, trainer, probe, batch))
    out = {"state": state, "peak": probe.peak, "saved": probe.saved_peak, "field_peak": probe.field_peak,
           "flops_by_dtype": dict(probe.flops),
           "host_reads": dict(reads.reads)}
    if count:
        out["flops"], out["counter"] = flop_mode.get_total_flops(), counter
    return out


def affine(x1: int, m1: float, x2: int, m2: float, x: int) -> float:
    """The value at x of the line through (x1, m1) and (x2, m2): a per-label part plus a constant."""
    return m1 + (x - x1) * (m2 - m1) / (x2 - x1)


# ------------------------------------------------------------------------------------------------ the prediction
def predict(cfg, recipe: str = "", mae_channels: int = 640, mae_layers=MAE_LAYERS, cpu_count: bool = False,
            tiny_mae_channels: int = TINY_MAE_CHANNELS) -> dict:
    """Memory, ops, syncs and FLOPs of one update of the composed config ``cfg`` (see the module docstring);
    ``cpu_count``: also count ops and syncs on real CPU tensors at tiny widths (slow: the transport runs)."""
    features = cfg.method.get("features") is not None
    conditional = int(cfg.data.num_classes) > 0
    labels, chunks = int(cfg.batch.labels_per_update) if conditional else 1, int(cfg.batch.get("label_chunks", 1))
    x1, x2 = (chunks, 2 * chunks) if conditional else (1, 1)  # one and two chunks' worth of labels
    shape = tuple(cfg.data.shape)
    compiled = any(c in (True, "auto") for c in (cfg.model.get("compile", False), cfg.method.get("compile", False)))
    with tempfile.TemporaryDirectory(prefix="gwf-bench-step-") as tmp:
        cpu = launches = None
        if cpu_count or compiled:
            tiny_mae = write_mae(Path(tmp) / "tiny.pt", shape, tiny_mae_channels, mae_layers, meta=False)
            tiny = as_on_gpu(cfg, tiny_overrides(cfg, tiny_mae))
            cpu = count_update(tiny)[0] if cpu_count else None
            launches = count_update(tiny, compiled=True)[0] if compiled else None
        if features:
            full_mae = write_mae(Path(tmp) / "full.pt", shape, mae_channels, mae_layers, meta=True)
            cfg = as_on_gpu(cfg, {"method.features.path": str(full_mae)})
        runs = {n: measure(cfg, n, count=n == labels) for n in sorted({x1, x2, labels})}
    lo, hi, full = runs[x1], runs[x2], runs[labels]
    scale = (lambda a, b: affine(x1, a, x2, b, labels)) if x2 > x1 else (lambda a, b: a)
    state, counter = lo["state"], full["counter"]
    transient = {k: scale(lo["peak"][k], hi["peak"][k]) for k in ("total", "saved", "field")}
    persistent = sum(v for k, v in state.items() if k != "gradients")  # gradients: tracked among the transients
    flops, by_dtype = full["flops"], full["flops_by_dtype"]
    fp32 = by_dtype.get("float32", 0) / max(sum(by_dtype.values()), 1)
    memory = {k: v / GIB for k, v in state.items() if k != "gradients"}  # the parts of the peak
    memory.update({"saved activations": transient["saved"] / GIB, "transport workspace": transient["field"] / GIB,
                   "other transients": (transient["total"] - transient["saved"] - transient["field"]) / GIB})
    out = {
        "recipe": recipe or str(cfg.get("name")), "peak_gib": (persistent + transient["total"]) / GIB,
        "ops": (launches or counter).ops, "syncs": (launches or counter).syncs, "compiled": compiled,
        "ops_eager": counter.ops, "syncs_eager": counter.syncs, "tflop": flops / 1e12,
        "floor_s_h100": flops / (H100_BF16 * UTILISATION),
        "floor_s_h100_fp32_aware": flops * (1 - fp32) / (H100_BF16 * UTILISATION)
        + flops * fp32 / (H100_FP32 * UTILISATION),
        "memory_gib": memory, "gradients_gib": state.get("gradients", 0) / GIB,
        "peak_in_backward": bool(full["peak"]["in backward"]),
        "saved_activations_gib": scale(lo["saved"], hi["saved"]) / GIB,
        "transport_peak_gib": scale(lo["field_peak"]["total"], hi["field_peak"]["total"]) / GIB,
        "transport_peak_by_function_gib": {k: v / GIB for k, v in sorted(full["field_peak"].items(), key=lambda kv:
                                                                          -kv[1]) if k != "total" and v > 0},
        "direct_gib": {"peak": (persistent + full["peak"]["total"]) / GIB, "saved activations": full["saved"] / GIB},
        "measured_at_labels": sorted({x1, x2}), "fp32_flop_share": fp32, "host_reads_fake": full["host_reads"],
        "ops_by_name": dict((launches or counter).op_counts.most_common()),
        "ops_by_name_eager": dict(counter.op_counts.most_common()), "syncs_by_op": dict(counter.sync_counts),
        "sync_sites": [{"op": op, "site": site, "count": n} for (op, site), n in counter.sites.most_common()],
        "batch": {"labels_per_update": labels, "label_chunks": chunks, "gen_per_label": int(cfg.batch.gen_per_label),
                  "pos_per_label": int(cfg.batch.pos_per_label), "uncond_per_update": int(cfg.batch.uncond_per_update),
                  "data_batch_size": int(cfg.data.batch_size)},
        "model": str(cfg.model.name), "precision": str(cfg.trainer.precision),
        "encoder": f"MAE {mae_channels} x {list(mae_layers)}" if features else "none (data space)",
        "assumptions": ASSUMPTIONS,
    }
    if cpu is not None:
        out.update(ops_cpu=cpu.ops, syncs_cpu=cpu.syncs, syncs_by_op_cpu=dict(cpu.sync_counts))
    return out


def report(r: dict) -> str:
    """The human-readable form of ``predict``'s result."""
    b, when = r["batch"], "in" if r["peak_in_backward"] else "before"
    lines = [f"{r['recipe']}: {r['model']}, {r['precision']}, encoder {r['encoder']}; per rank {b['labels_per_update']}"
             f" labels ({b['label_chunks']} chunk(s)) x {b['gen_per_label']} generated, {b['pos_per_label']} positives,"
             f" {b['uncond_per_update']} uncond, {b['data_batch_size']} reals pushed",
             f"predicted peak per rank: {r['peak_gib']:.2f} GiB ({when} backward; measured at "
             f"{r['measured_at_labels']} labels; direct at {b['labels_per_update']}: "
             f"{r['direct_gib']['peak']:.2f} GiB)"]
    lines += [f"  {k:<22} {v:8.2f} GiB" for k, v in r["memory_gib"].items()]
    lines.append(f"  (the last three: tensors alive at the peak; other transients include the gradients, "
                 f"{r['gradients_gib']:.2f} GiB, when alive then)")
    parts = ", ".join(f"{k} {v:.2f}" for k, v in list(r["transport_peak_by_function_gib"].items())[:4])
    lines.append(f"  saved activations at their peak {r['saved_activations_gib']:.2f} GiB; transport workspace at its "
                 f"peak {r['transport_peak_gib']:.2f} GiB (at {b['labels_per_update']} labels, by gwf function: "
                 f"{parts or '-'})")
    if r["compiled"]:
        lines.append(f"kernels per update compiled as on CUDA (model.compile, method.compile): {r['ops']:,} (aten ops "
                     f"dispatched {r['ops'] - r['ops_by_name'].get(KernelCounter.KERNEL, 0):,} + Inductor kernels "
                     f"{r['ops_by_name'].get(KernelCounter.KERNEL, 0):,}, counted on CPU tensors at tiny widths); host "
                     f"syncs {r['syncs']:,}; eager:")
    lines.append(f"aten ops per update: {r['ops_eager']:,}; host syncs: {r['syncs_eager']:,} "
                 f"({', '.join(f'{k} {v}' for k, v in r['syncs_by_op'].items()) or 'none'})"
                 + (f"; on CPU tensors at tiny widths: {r['ops_cpu']:,} ops, {r['syncs_cpu']} syncs" if "ops_cpu" in r
                    else ""))
    lines += [f"  {s['count']:6d} x {s['op']:<22} {s['site']}" for s in r["sync_sites"][:12]]
    lines.append(f"FLOPs per update: {r['tflop']:.2f} TFLOP ({r['fp32_flop_share']:.1%} fp32); H100 floor "
                 f"{r['floor_s_h100']:.3f} s (fp32-aware {r['floor_s_h100_fp32_aware']:.3f} s)")
    lines += ["assumptions:", *(f"  - {a}" for a in r["assumptions"])]
    return "\n".join(lines)


def table(rows: list[dict]) -> str:
    """One Markdown row per recipe."""
    head = ("| recipe | peak GiB | saved act. GiB | transport GiB | ops | eager ops | syncs | TFLOP | H100 floor s |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    body = [f"| {r['recipe']} | {r['peak_gib']:.1f} | {r['saved_activations_gib']:.1f} | {r['transport_peak_gib']:.1f}"
            f" | {r['ops']:,} | {r['ops_eager']:,} | {r['syncs']:,} | {r['tflop']:.1f} | {r['floor_s_h100']:.3f} |"
            for r in rows]
    return "\n".join([head, *body])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gwf-bench-step", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", help="an experiment, e.g. imagenet_b2")
    p.add_argument("--all", action="store_true", help="every imagenet_* recipe (a Markdown table)")
    p.add_argument("--data-space", action="store_true", help="method.features=null")
    p.add_argument("--json", action="store_true", help="one JSON object per recipe")
    p.add_argument("--mae-channels", type=int, help="base channels of the MAE (default: the recipe's header, or 640)")
    p.add_argument("--mae-layers", default=",".join(map(str, MAE_LAYERS)), help="blocks per MAE stage (3,4,6,3)")
    p.add_argument("--cpu-count", action="store_true", help="also count on real CPU tensors at tiny widths (slow)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
    args = p.parse_args(argv)
    from gwf.build import conf_dir

    if args.all:
        recipes = sorted(f.stem for f in (Path(conf_dir()) / "experiment").glob("imagenet_*.yaml"))
    elif args.recipe:
        recipes = [args.recipe]
    else:
        p.error("give --recipe NAME or --all")
    rows = []
    for recipe in recipes:
        cfg = compose(recipe, args.overrides, args.data_space)
        if "shape" not in cfg.data or "num_classes" not in cfg.data:
            p.error(f"experiment={recipe} samples its data on the fly ({cfg.data.get('_target_')}): there is no "
                    "data.shape / data.num_classes to predict an update from. gwf-bench-step predicts the recipes "
                    "on prepared data (imagenet_*, cifar10_*, digits_*); time a 2D run on the CPU with gwf-bench-2d")
        r = predict(cfg, recipe + (" (data space)" * args.data_space),
                    args.mae_channels or recipe_mae_channels(recipe),
                    [int(n) for n in args.mae_layers.split(",")], cpu_count=args.cpu_count)
        rows.append(r)
        print(json.dumps(r) if args.json else report(r) + "\n", flush=True)
    if args.all and not args.json:
        print(table(rows))


if __name__ == "__main__":
    main()
