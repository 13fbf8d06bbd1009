"""Pictures people look at: image grids (rows = classes), 2D scatter plots, metric curves. Headless (Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import LineCollection  # noqa: E402
from PIL import Image  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402


def to_uint8(x: Tensor) -> Tensor:
    """float images in [-1, 1] -> uint8 in [0, 255], rounded as a PNG writer would (grids, gwf-sample's arr_0 and
    the images gwf-eval scores must agree to the gray level)."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(x: Tensor, nrow: int, pad: int = 1) -> np.ndarray:
    """x [N, C, H, W] in [-1, 1] -> uint8 [rows*(H+pad)+pad, nrow*(W+pad)+pad, 3]; N is padded to full rows."""
    x = to_uint8(x.cpu())
    n, c, h, w = x.shape
    if c not in (1, 3):
        raise ValueError(f"image_grid shows 1- or 3-channel images, got {c} channels (decode latents first)")
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, 3), 255, dtype=np.uint8)
    imgs = x.numpy().transpose(0, 2, 3, 1)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = imgs[i]
    return grid


def save_image_grid(x: Tensor, nrow: int, path: str | Path, upscale: int = 8) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(image_grid(x, nrow))
    img.resize((img.width * upscale, img.height * upscale), Image.NEAREST).save(path)
    return path


# The pictures written during training (every evaluation) have fixed margins in inches instead of tight_layout,
# which measures every text artist in a draw of its own (a third of the figure's time); report figures keep it.
MARGINS = {"left": 0.55, "right": 0.2, "bottom": 0.45, "top": 0.35, "wspace": 0.65}  # inches


def fixed_margins(fig, xlabel: bool = False) -> None:
    """Margins of ``MARGINS`` (inches) around a row of panels: room for tick labels, titles and an x label."""
    width, height = fig.get_size_inches()
    ncols = fig.axes[0].get_gridspec().ncols if fig.axes else 1
    left, right, top = MARGINS["left"], MARGINS["right"], MARGINS["top"]
    bottom = MARGINS["bottom"] + (0.2 if xlabel else 0.0)
    panel = (width - left - right - (ncols - 1) * MARGINS["wspace"]) / ncols
    fig.subplots_adjust(left=left / width, right=1 - right / width, bottom=bottom / height, top=1 - top / height,
                        wspace=MARGINS["wspace"] / panel)


def _target_axes(x_real: Tensor):
    """A square figure with the target samples drawn in blue."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(*x_real.cpu().numpy().T, s=2, alpha=0.3, c="tab:blue", label="target")
    return fig, ax


def save_figure(fig, path: str | Path, dpi: int = 110, tight: bool = True) -> Path:
    """Lay out (``tight``: tight_layout; else the figure's own margins), write and close ``fig``."""
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return Path(path)


def wide_range(values) -> bool:
    """Positive values spanning more than a factor 20 (e.g. a distance falling 100x): worth a log scale."""
    return min(values) > 0 and max(values) / min(values) > 20


def _save_2d(fig, ax, path: str | Path, title: str, markerscale: float) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    ax.set_aspect("equal")
    ax.legend(loc="upper right", markerscale=markerscale)
    ax.set_title(title)
    fixed_margins(fig)
    return save_figure(fig, path, dpi=120, tight=False)


def save_scatter(x_gen: Tensor, x_real: Tensor, path: str | Path, title: str = "") -> Path:
    fig, ax = _target_axes(x_real)
    ax.scatter(*x_gen.detach().cpu().numpy().T, s=2, alpha=0.4, c="tab:orange", label="generated")
    return _save_2d(fig, ax, path, title, markerscale=4)


def save_metric_curves(rows: list[dict], path: str | Path, x_key: str = "update") -> Path:
    """One panel per metric of ``rows`` (dicts with ``x_key`` and float metrics)."""
    keys = [k for k in rows[0] if k != x_key]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    steps = [r[x_key] for r in rows]
    for ax, k in zip(axes[0], keys):
        values = [r[k] for r in rows]
        ax.plot(steps, values, marker="o")
        if max(values) > 1 and wide_range(values):
            ax.set_yscale("log")
        ax.set_xlabel(x_key)
        ax.set_title(k)
        ax.grid(alpha=0.3)
    fixed_margins(fig, xlabel=True)
    return save_figure(fig, path, tight=False)


def save_trajectories(path_points: list[Tensor], x_real: Tensor, path: str | Path, title: str = "") -> Path:
    """Paths of fixed particles across evaluations: ``path_points`` is a list (one per evaluation) of [K, 2]."""
    traj = torch.stack([p.detach().float().cpu() for p in path_points], 1).numpy()  # [K, T, 2]
    fig, ax = _target_axes(x_real)
    ax.add_collection(LineCollection(traj, lw=0.7, colors="tab:gray", alpha=0.8))  # one artist for all paths
    ax.scatter(traj[:, 0, 0], traj[:, 0, 1], s=8, c="k", label="start")
    ax.scatter(traj[:, -1, 0], traj[:, -1, 1], s=8, c="tab:orange", label="end")
    return _save_2d(fig, ax, path, title, markerscale=2)
