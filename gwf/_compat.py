"""Make torchvision importable next to a CPU-only torch.

The CUDA build of torchvision fails to import with a CPU torch (in ``torchvision/_meta_registrations.py``), and
lightning, torchmetrics and torch_fidelity import it. Registering an empty module under that name first makes what gwf
uses import; the compiled ops stay unavailable. Importing ``gwf`` applies this (before lightning and the others).
"""

from __future__ import annotations

import importlib.util
import re
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


def _torch_is_cpu_build() -> bool:
    """Whether the installed torch is built without CUDA, read from its version.py (importing torch takes 1 s, and
    commands like ``gwf-train --help`` need none of it)."""
    if "torch" in sys.modules:
        return sys.modules["torch"].version.cuda is None
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        return False
    try:
        text = Path(spec.origin).with_name("version.py").read_text()
    except OSError:
        return False
    match = re.search(r"^cuda\s*(?::[^=]*)?=\s*(.+)$", text, flags=re.M)
    return match is not None and match.group(1).strip() == "None"


def patch_torchvision_for_cpu_torch() -> bool:
    """Apply the workaround when needed; returns True if it was applied."""
    if "torchvision" in sys.modules or _META in sys.modules:
        return False
    if not _torchvision_is_cuda_build() or not _torch_is_cpu_build():
        return False
    sys.modules[_META] = types.ModuleType(_META)
    return True


EXTRAS = {"diffusers": "latents", "safetensors": "latents", "wandb": "wandb", "hydra_plugins.hydra_submitit_launcher": "slurm"}


def require(module: str, what: str):
    """Import an optional dependency, or raise ModuleNotFoundError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        extra = EXTRAS.get(module, module)
        raise ModuleNotFoundError(
            f"{what} needs the optional package '{module.split('.')[0]}', not installed: "
            f"pip install -c constraints.txt -e \".[{extra}]\" (or pip install 'gwf[{extra}]')") from e
