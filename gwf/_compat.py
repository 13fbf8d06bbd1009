"""Make torchvision importable next to a CPU-only torch.

The CUDA build of torchvision fails to import with a CPU torch (in ``torchvision/_meta_registrations.py``), and
lightning, torchmetrics and torch_fidelity import it. Registering an empty module under that name first makes what gwf
uses import; the compiled ops stay unavailable. Importing ``gwf`` applies this (before lightning and the others).
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
