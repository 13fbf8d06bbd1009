"""gwf: Generative Wasserstein Flows (one-step generators trained as discretized Wasserstein gradient flows)."""

from gwf._compat import patch_torchvision_for_cpu_torch

patch_torchvision_for_cpu_torch()

__version__ = "0.1.0"


def console_main(run):
    """The console script ``main(argv=None)`` of a command whose ``run(argv)`` returns its result (tests call
    ``run``): ``main`` returns None, since a console script exits with its return value."""

    def main(argv=None) -> None:
        run(argv)

    return main
