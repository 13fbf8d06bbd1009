"""Make torchvision importable next to a CPU-only torch.

torchvision 0.28.0 (the only build matching torch 2.13.0 on PyPI) is a CUDA build. With the CPU wheel of torch,
``import torchvision`` fails in ``torchvision/_meta_registrations.py`` ("operator torchvision::nms does not
exist"), and because torchmetrics imports torchvision whenever it is installed, ``import lightning`` and
``import torch_fidelity`` fail the same way. Registering an empty module under that name before torchvision is
first imported makes everything we use import (utils.make_grid, transforms, models); the compiled ops
(ops.nms, roi_align, io's jpeg functions) stay unavailable, and gwf never calls them.

On a CUDA build of torch nothing is done. Importing ``gwf`` applies this, so import ``gwf`` before
lightning/torchmetrics/torch_fidelity in your own scripts (gwf's entry points and tests do).
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

_META = "torchvision._meta_registrations"


def _torchvision_is_cuda_build() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return False
    version_file = Path(spec.origin).with_name("version.py")
    try:
        return "+cu" in version_file.read_text()
    except OSError:
        return False


def patch_torchvision_for_cpu_torch() -> bool:
    """Apply the workaround when needed; returns True if it was applied."""
    if "torchvision" in sys.modules or _META in sys.modules:
        return False
    import torch

    if torch.version.cuda is not None or not _torchvision_is_cuda_build():
        return False
    sys.modules[_META] = types.ModuleType(_META)
    return True
