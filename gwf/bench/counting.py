"""What a piece of code asks of the device, counted on any device: aten ops (a proxy for kernel launches) and host
synchronizations (ops whose result the host must wait for: a value read back, or an output whose size depends on
the data).

    with OpCounter(host_tensors=optimizer_step_counters(optimizers)) as counter:
        module.training_step(batch, 0)
    counter.ops, counter.syncs            # totals; counter.op_counts / counter.sync_counts by op name

On a CPU run every tensor is on the host, so a sync is counted where the same op on GPU tensors would block:
tensors that stay on the host during a GPU run (an optimizer's ``step`` counters, unless capturable) are passed as
``host_tensors`` and ignored. Copies to the host (``.cpu()``) cannot be told apart from CPU work here.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that read a value back to the host, or whose output size depends on the data.
SYNC_OPS = frozenset({"_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive",
                      "masked_select", "equal", "_assert_async"})


def optimizer_step_counters(optimizers) -> list[torch.Tensor]:
    """The per-parameter ``step`` tensors of torch optimizers: on the host in a (non-capturable) GPU run."""
    return [v for opt in optimizers for state in opt.state.values() for k, v in state.items()
            if k == "step" and torch.is_tensor(v)]


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched inside the context, and the host synchronizations among them."""

    def __init__(self, host_tensors=()):
        super().__init__()
        self.host = {id(t) for t in host_tensors}
        self.op_counts: Counter = Counter()
        self.sync_counts: Counter = Counter()

    @property
    def ops(self) -> int:
        return sum(self.op_counts.values())

    @property
    def syncs(self) -> int:
        return sum(self.sync_counts.values())

    def _is_sync(self, func, name: str, args, kwargs) -> bool:
        if name == "repeat_interleave":  # tensor repeats without output_size: a data-dependent output size
            return func._overloadname in ("Tensor", "self_Tensor") and kwargs.get("output_size") is None
        if name not in SYNC_OPS:
            return False
        tensors = [a for a in args if torch.is_tensor(a)]
        return not tensors or any(id(t) not in self.host for t in tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.op_counts[name] += 1
        if self._is_sync(func, name, args, kwargs):
            self.sync_counts[name] += 1
        return func(*args, **kwargs)


class KernelCounter(OpCounter):
    """OpCounter for code that runs torch.compile'd graphs: the ops dispatched (eager code, and the extern kernels a
    compiled graph calls: GEMMs, attention) plus, as op ``inductor kernel``, the kernels Inductor generated that
    ran (from the profiler's records of them). Compile the graphs with
    ``torch._inductor.config.cpp.enable_kernel_profile = True`` so that the profiler sees the CPU kernels; the
    graphs must be compiled before entering (dispatch modes see no compilation)."""

    KERNEL = "inductor kernel"
    supports_higher_order_operators = True  # compiled activation checkpointing calls run_and_save_rng_state

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True  # Dynamo runs compiled graphs under this mode instead of falling back to eager

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if isinstance(func, torch._ops.HigherOrderOperator):  # one op wrapping one kernel (its inner op runs below
            self.op_counts[func.name()] += 1  #                  this mode)
            return func(*args, **(kwargs or {}))
        return super().__torch_dispatch__(func, types, args, kwargs)

    def __enter__(self):
        self._profile = profile(activities=[ProfilerActivity.CPU])
        self._profile.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        self._profile.__exit__(*exc)
        kernels = sum(1 for e in self._profile.events() if "cpp_fused" in e.name)
        if kernels:
            self.op_counts[self.KERNEL] += kernels
        return False
