"""gwf: Generative Wasserstein Flows (one-step generators trained as discretized Wasserstein gradient flows)."""

from gwf._compat import patch_torchvision_for_cpu_torch

patch_torchvision_for_cpu_torch()

__version__ = "0.1.0"
