"""Image conversion, grids and PNG writing."""

from __future__ import annotations

import math
import os
from etils import epath
import numpy as np
from PIL import Image

from ediff_jax.paths import as_path


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255] (clipped)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles uint8 [N, H, W, C] into one [rows*H, cols*W, C] image with white gutters."""
    n, h, w, c = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + k * (w + pad): pad + k * (w + pad) + w] = img
    return grid


def ensure_writable_dir(path: str | os.PathLike) -> epath.Path:
    """Creates `path` (local, or an object-store URI such as gs://) if needed and checks it
    can be written, before any work is done."""
    path = as_path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"Output directory {str(path)!r} cannot be written ({e.strerror or e}); choose another "
                         "path.") from None
    return path


def save_png(image: np.ndarray, path: str | os.PathLike, upscale: int = 1) -> None:
    """Writes uint8 [H, W, C]; `upscale` enlarges tiny images (nearest) for viewing."""
    img = Image.fromarray(image)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    with as_path(path).open("wb") as f:  # also on object stores
        img.save(f, format="PNG")
