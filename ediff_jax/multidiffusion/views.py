"""Where the crops of a MultiDiffusion canvas lie, and how to cut them out.

A view is the (top, left) offset of one window-sized crop. Views are plain numpy (they
are fixed by the canvas geometry, so they are known before tracing and can be checked
then); cutting crops works on traced offsets too, so it can run under `vmap`/`lax.map`.
In a circular (360-degree) canvas the width wraps around: a crop whose left offset runs
past `width - window` continues at column 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

Pair = tuple[int, int]


def as_pair(value: int | tuple[int, int] | Any, what: str) -> Pair:
    """An int or an (h, w) pair -> (h, w) of Python ints."""
    if isinstance(value, (int, np.integer)):
        return int(value), int(value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2:
        raise ValueError(f"{what} must be an int or an (height, width) pair; got {value!r}.")
    return pair


def _check_geometry(height: int, width: int, window: Pair, stride: Pair) -> None:
    """Errors that name the bad number and the fix, raised before anything is traced."""
    for name, size, win in (("height", height, window[0]), ("width", width, window[1])):
        if win <= 0:
            raise ValueError(f"The window {name} must be positive; got {win}.")
        if size < win:
            raise ValueError(
                f"The canvas {name} {size} is smaller than the model's window {name} {win}: MultiDiffusion "
                f"tiles a canvas at least as large as the window. Use a canvas {name} >= {win}."
            )
    for name, step, win in (("height", stride[0], window[0]), ("width", stride[1], window[1])):
        if step <= 0:
            raise ValueError(f"The stride ({name}) must be positive; got {step}. Use 1 <= stride <= {win}.")
        if step > win:
            raise ValueError(
                f"The stride ({name}) {step} is larger than the window {name} {win}, which would leave pixels "
                f"between crops uncovered. Use 1 <= stride <= {win}."
            )


def _offsets(size: int, window: int, stride: int) -> np.ndarray:
    """0, stride, 2*stride, ... plus size - window, so the last crop ends on the edge."""
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return np.asarray(starts, np.int32)


def get_views(
    height: int,
    width: int,
    window: int | Pair,
    stride: int | Pair,
    circular: bool = False,
) -> np.ndarray:
    """(top, left) offsets [N, 2] (int32, row-major) of crops that cover the canvas.

    The last row/column of views is aligned to the bottom/right edge even when
    `size - window` is not a multiple of the stride (the original code drops those
    pixels). With `circular=True` the width wraps: left offsets are 0, stride, ... < width,
    so crops near the right edge continue at column 0 and the seam is denoised like any
    other column (360-degree panoramas).
    """
    window, stride = as_pair(window, "window"), as_pair(stride, "stride")
    height, width = int(height), int(width)
    _check_geometry(height, width, window, stride)
    tops = _offsets(height, window[0], stride[0])
    lefts = np.arange(0, width, stride[1], dtype=np.int32) if circular else _offsets(width, window[1], stride[1])
    grid = np.stack(np.meshgrid(tops, lefts, indexing="ij"), axis=-1)
    return grid.reshape(-1, 2).astype(np.int32)


@dataclasses.dataclass(frozen=True, eq=False)
class Tiling:
    """A canvas, the model's window, the stride, and the resulting views.

    One object carries the whole geometry so that everything that must agree on it (the
    crops of x, of region masks, of a super-resolution stage's low-res input) reads it
    from one place. `scaled(f)` gives the same layout at f-times the resolution.
    """

    height: int
    width: int
    window: Pair
    stride: Pair
    circular: bool = False
    views: np.ndarray = dataclasses.field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", as_pair(self.window, "window"))
        object.__setattr__(self, "stride", as_pair(self.stride, "stride"))
        object.__setattr__(self, "views", get_views(self.height, self.width, self.window, self.stride, self.circular))

    @property
    def num_views(self) -> int:
        return int(self.views.shape[0])

    @property
    def shape(self) -> Pair:
        return self.height, self.width

    def scaled(self, factor: int) -> "Tiling":
        """The same views at `factor` times the resolution (for a super-resolution stage)."""
        if int(factor) != factor or factor < 1:
            raise ValueError(f"The scale factor must be a positive int; got {factor!r}.")
        f = int(factor)
        return Tiling(self.height * f, self.width * f, (self.window[0] * f, self.window[1] * f),
                      (self.stride[0] * f, self.stride[1] * f), self.circular)

    def coverage(self) -> np.ndarray:
        """How many crops cover each pixel [height, width] (all >= 1 by construction)."""
        count = np.zeros((self.height, self.width), np.int32)
        rows, cols = view_indices(self.views, self.window, self.width)
        np.add.at(count, (rows[:, :, None], cols[:, None, :]), 1)
        return count


def view_indices(views: Any, window: Pair, width: int) -> tuple[Any, Any]:
    """Row indices [N, h] and column indices [N, w] (modulo width) of every crop.

    numpy in, numpy out (for checks at the boundary); jax in, jax out (under jit).
    """
    xp = np if isinstance(views, np.ndarray) else jnp
    h, w = window
    rows = views[:, :1] + xp.arange(h, dtype=np.int32)[None]
    cols = (views[:, 1:] + xp.arange(w, dtype=np.int32)[None]) % width
    return rows, cols


def check_views_in_bounds(views: np.ndarray, window: Pair, height: int, width: int, circular: bool) -> None:
    """Out-of-range offsets would be silently dropped by XLA's scatter: refuse them here."""
    views = np.asarray(views)
    if views.ndim != 2 or views.shape[1] != 2 or views.shape[0] == 0:
        raise ValueError(f"views must be a non-empty [N, 2] array of (top, left); got shape {views.shape}.")
    bad_top = (views[:, 0] < 0) | (views[:, 0] + window[0] > height)
    bad_left = (views[:, 1] < 0) | ((views[:, 1] >= width) if circular else (views[:, 1] + window[1] > width))
    bad = np.flatnonzero(bad_top | bad_left)
    if bad.size:
        raise ValueError(
            f"View(s) {views[bad[:5]].tolist()} do not fit a {height}x{width} canvas with a {window[0]}x{window[1]} "
            f"window{' (circular in width)' if circular else ''}; build views with get_views(...)."
        )


def wrap_canvas(x: jax.Array, tiling: Tiling) -> jax.Array:
    """x [B, H, W, C] with its first window-width columns appended when circular.

    Every crop is then a plain rectangle of the wrapped canvas: one concatenation per
    denoiser call instead of a modulo gather per crop.
    """
    if not tiling.circular:
        return x
    return jnp.concatenate([x, x[:, :, : tiling.window[1]]], axis=2)


def crop(x_wrapped: jax.Array, view: jax.Array, tiling: Tiling) -> jax.Array:
    """The crop [B, h, w, C] at `view` (top, left; may be traced) of a `wrap_canvas` output."""
    chex.assert_rank(x_wrapped, 4)
    view = jnp.asarray(view, jnp.int32)
    h, w = tiling.window
    zero = jnp.zeros((), jnp.int32)
    return jax.lax.dynamic_slice(
        x_wrapped, (zero, view[0], view[1], zero), (x_wrapped.shape[0], h, w, x_wrapped.shape[3])
    )


def crop_views(x: jax.Array, tiling: Tiling) -> jax.Array:
    """All crops [N, B, h, w, C] of a canvas x [B, H, W, C] (for tests and small canvases)."""
    chex.assert_shape(x, (None, tiling.height, tiling.width, None))
    xw = wrap_canvas(x, tiling)
    return jax.vmap(lambda v: crop(xw, v, tiling))(jnp.asarray(tiling.views))
