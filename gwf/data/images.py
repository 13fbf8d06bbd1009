"""Image folders: scanning (class subfolders or one flat folder), decoding, the ADM center crop, and pixel samples
x float16 [3, size, size] = uint8 / 127.5 - 1, from which ``to_uint8`` recovers the pixels exactly (data/README.md).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from gwf.constants import IMAGE_EXTENSIONS, PIXEL_DTYPE

Item = tuple[str, int]  # (image path, class index)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def scan_image_folder(src: str | Path) -> tuple[list[Item], list[str]]:
    """Images under ``src`` and the class names.

    With class subfolders (ImageNet style, ``src/<class>/**/<image>``), classes are the subfolder names sorted, class
    index = position in that list. A flat folder of images is one class named after the folder. Images are listed in
    class then path order, so the scan (and every shard made from it) is deterministic.
    """
    src = Path(src)
    if not src.is_dir():
        raise FileNotFoundError(f"image folder {src.absolute()} does not exist (or is not a directory); pass --src DIR")
    top = sorted(p for p in src.iterdir() if _is_image(p))
    subdirs = sorted(p for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    class_dirs = [d for d in subdirs if any(_is_image(p) for p in d.rglob("*"))]
    if top and class_dirs:
        raise ValueError(
            f"{src} holds both images ({top[0].name}, ...) and class subfolders ({class_dirs[0].name}, ...): "
            "use either one subfolder per class or a flat folder of images (one class)"
        )
    if top:
        return [(str(p), 0) for p in top], [src.name]
    if not class_dirs:
        raise ValueError(
            f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) found in {src.absolute()} or its subfolders; "
            "pass the folder that holds the class subfolders (e.g. ImageNet's train/) or the images themselves"
        )
    classes = [d.name for d in class_dirs]
    items = [(str(p), c) for c, d in enumerate(class_dirs) for p in sorted(d.rglob("*")) if _is_image(p)]
    return items, classes


def sample_key(index: int, path: str) -> str:
    """A unique shard key with no '.' or '/': the global index, then the file stem (e.g. 00000012_n01440764_10026)."""
    return f"{index:08d}_" + re.sub(r"[^A-Za-z0-9_-]", "_", Path(path).stem)


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """The ADM center crop (guided-diffusion ``center_crop_arr``): uint8 [size, size, C]. BOX-halve while the short
    side is >= 2 * size (cheap antialiasing), BICUBIC-resize the short side to ``size``, crop the center."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


def load_image(path: str | Path, size: int) -> np.ndarray | None:
    """RGB image at ``path``, ADM center-cropped: uint8 [3, size, size]; None when the file cannot be decoded."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now: a truncated file fails here, not later
            rgb = image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        return None
    return np.ascontiguousarray(center_crop_arr(rgb, size).transpose(2, 0, 1))


def to_unit(pixels: np.ndarray) -> np.ndarray:
    """uint8 [..] -> float16 in [-1, 1]: x = pixel / 127.5 - 1 (computed in float32, then rounded once)."""
    return (pixels.astype(np.float32) / 127.5 - 1).astype(PIXEL_DTYPE)


def to_uint8(x: np.ndarray) -> np.ndarray:
    """Inverse of ``to_unit`` (exact on its outputs): round((x + 1) * 127.5), clipped to 0..255."""
    return np.clip(np.rint((x.astype(np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


class PixelShards:
    """What ``gwf-prepare images`` writes per sample: (key, x float16 [3, size, size] in [-1, 1], label)."""

    kind = "images"

    def __init__(self, size: int = 32):
        if size < 1:
            raise ValueError(f"--size must be >= 1, got {size}")
        self.size = int(size)

    def settings(self) -> dict:
        return dict(size=self.size, crop="adm_center_crop")

    def describe(self) -> dict:
        """The manifest's format entry."""
        encoding = "x = pixel / 127.5 - 1 (RGB, ADM center crop); pixel = round((x + 1) * 127.5)"
        return dict(shape=[3, self.size, self.size], dtype=PIXEL_DTYPE, encoding=encoding)

    def setup(self, device: str) -> None:
        """Nothing to load (pixels need no model)."""

    def samples(self, items: list[Item], keys: list[str], on_item=lambda n: None):
        """(iterator of (key, x, label) for the decodable images, list of the paths that could not be decoded, filled
        in as the iterator runs). ``on_item(n)`` is called as source images are consumed (progress)."""
        corrupt: list[str] = []

        def gen():
            for (path, label), key in zip(items, keys):
                pixels = load_image(path, self.size)
                on_item(1)
                if pixels is None:
                    corrupt.append(path)
                    continue
                yield key, to_unit(pixels), label

        return gen(), corrupt
