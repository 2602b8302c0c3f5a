"""Canvas strategies: which crops one denoiser evaluation runs, and how their predictions are weighted.

- `overlap`: MultiDiffusion (Bar-Tal et al. 2023): the `Tiling`'s overlapping views, uniform weights.
- `gaussian`: Mixture of Diffusers (Jiménez 2023): the same views, each crop weighted by a Gaussian
  over its window, so a pixel follows the crops it lies near the centre of and seams fade.
- `shifted`: SpotDiffusion (Frolov et al. 2024): non-overlapping windows under a random offset drawn
  per evaluation, so each step's seams fall elsewhere and the next step repairs them. Far fewer
  crops per evaluation. The offset is a function of (rng, sigma): a run is reproducible, and Heun's
  correction at sigma_{i+1} uses the windows of the next step's first evaluation. Circular canvases
  wrap the windows around the width; otherwise the first and last windows are clamped to the edges.

Every strategy evaluates a fixed number of crops per call (`evaluations_per_call`), known before
tracing, so a sampling run stays one compiled program.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ediff_jax.multidiffusion.views import Pair, Tiling
from ediff_jax.spec import CANVAS_STRATEGIES as STRATEGIES
GAUSSIAN_VAR = 0.01  # Mixture of Diffusers' variance, in units of the window side squared


def check_strategy(strategy: str) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown canvas strategy {strategy!r}; choose one of {STRATEGIES}.")
    return strategy


def gaussian_tile_weights(window: Pair, var: float = GAUSSIAN_VAR) -> np.ndarray:
    """Mixture of Diffusers' tile weights [h, w, 1]: a separable Gaussian centred on the window, its
    standard deviation sqrt(var) times the window side (peak 1; only ratios matter to the fusion)."""
    def axis(n: int) -> np.ndarray:
        mid = (n - 1) / 2
        return np.exp(-((np.arange(n) - mid) ** 2) / (n * n) / (2 * var))

    h, w = window
    return (axis(h)[:, None] * axis(w)[None, :])[..., None].astype(np.float32)


def _shifted_count(size: int, window: int, circular: bool) -> int:
    if size == window:
        return 1
    return math.ceil(size / window) if circular else math.ceil(size / window) + 1


def shifted_num_views(tiling: Tiling) -> int:
    """Windows per evaluation under `shifted`: enough non-overlapping windows to cover the canvas at
    any offset (one more per non-wrapping axis, whose edge windows are clamped)."""
    return (_shifted_count(tiling.height, tiling.window[0], False)
            * _shifted_count(tiling.width, tiling.window[1], tiling.circular))


def _starts(size: int, window: int, offset: jax.Array, circular: bool) -> jax.Array:
    n = _shifted_count(size, window, circular)
    if n == 1:
        return jnp.zeros((1,), jnp.int32)
    k = jnp.arange(n, dtype=jnp.int32)
    if circular:
        return (offset + window * k) % size
    return jnp.clip(offset + window * (k - 1), 0, size - window)


def shifted_views(tiling: Tiling, offset: jax.Array) -> jax.Array:
    """(top, left) offsets [shifted_num_views, 2] of the windows shifted by `offset` (top, left) in
    [0, window): they cover every pixel."""
    offset = jnp.asarray(offset, jnp.int32)
    tops = _starts(tiling.height, tiling.window[0], offset[0], False)
    lefts = _starts(tiling.width, tiling.window[1], offset[1], tiling.circular)
    grid = jnp.stack(jnp.meshgrid(tops, lefts, indexing="ij"), axis=-1)
    return grid.reshape(-1, 2)


def shift_offset(rng: jax.Array, sigma: jax.Array, tiling: Tiling, multiple: int = 1) -> jax.Array:
    """The evaluation's random (top, left) offset, a multiple of `multiple` (an SR stage's scale factor,
    so its low-res crops stay aligned), drawn from `rng` folded with sigma."""
    key = jax.random.fold_in(rng, jax.lax.bitcast_convert_type(jnp.asarray(sigma, jnp.float32), jnp.uint32))
    high = jnp.asarray([max(tiling.window[0] // multiple, 1), max(tiling.window[1] // multiple, 1)])
    return jax.random.randint(key, (2,), 0, high) * multiple


def evaluations_per_call(tiling: Tiling, strategy: str) -> int:
    """Crops one canvas-denoiser call evaluates (per prompt), exactly."""
    return shifted_num_views(tiling) if check_strategy(strategy) == "shifted" else tiling.num_views


def views_and_weights(tiling: Tiling, strategy: str, rng: Any, sigma: jax.Array,
                      multiple: int = 1) -> tuple[jax.Array, jax.Array | None]:
    """This evaluation's views [n, 2] and tile weights ([n, h, w, 1], or None for uniform)."""
    if strategy == "shifted":
        if rng is None:
            raise ValueError("The shifted canvas strategy draws its window offsets from an rng; pass rng.")
        return shifted_views(tiling, shift_offset(rng, sigma, tiling, multiple)), None
    views = jnp.asarray(tiling.views)
    if strategy == "gaussian":
        tile = jnp.asarray(gaussian_tile_weights(tiling.window))
        return views, jnp.broadcast_to(tile[None], (tiling.num_views, *tile.shape))
    return views, None
