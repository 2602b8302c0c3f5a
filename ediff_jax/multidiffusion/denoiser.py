"""A denoiser for a canvas larger than the model: crops in, one fused D(x; sigma) out.

Any `denoise_fn(x, sigma)` (one UNet, the expert ensemble, classifier-free guidance:
whatever has that signature) is evaluated on every crop, vmapped so the crops of a chunk
are one batched network call, and the predictions are fused by the least-squares weighted
average. Denoisers with canvas-aligned inputs of their own (paint-with-words masks, a
super-resolution stage's low-res image) use `tiled_denoiser`, which also passes each
crop's offset so they can cut the matching crop. The result is again a `denoise_fn(x, sigma)`, so it plugs
into `edm.heun_sample` / `edm.euler_sample` unchanged. Fusing D rather than x_{t-1}
is the same thing for an ODE step (it is affine in D with the same x for every crop) and
keeps Heun's correction consistent.

All crops of a call share the scalar sigma, so an expert switch inside `denoise_fn` stays
one `lax.switch` branch per step rather than becoming a select over all experts.
"""

from __future__ import annotations

from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ediff_jax.multidiffusion.coherence import Coherence, with_coherence
from ediff_jax.multidiffusion.fusion import concrete_or_none, fuse_batched
from ediff_jax.multidiffusion.strategies import check_strategy, views_and_weights
from ediff_jax.multidiffusion.views import Tiling, crop, view_indices, wrap_canvas

Array = jax.Array
DenoiseFn = Callable[[Array, Array], Array]
# view_fn(x_crop [B, h, w, C], sigma, view [2] int32) -> D of the crop [B, h, w, C]
ViewDenoiseFn = Callable[[Array, Array, Array], Array]


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int (crops per batched call) or None (all); "
                         f"got {chunk_size!r}.")


def map_views(fn: Callable[[Any], Any], xs: Any, chunk_size: int | None = None) -> Any:
    """fn over the leading axis N of the pytree xs: vmapped, at most `chunk_size` items at a time.

    chunk_size=None (or >= N) is one vmapped call. Otherwise the items are split into
    k = ceil(N / chunk_size) balanced chunks of ceil(N / k) <= chunk_size, run one after
    another in a `lax.scan`; the last chunk evaluates only the items left (a `lax.cond`
    branch inside the scan), so fn runs exactly N times and peak activation memory
    follows the chunk size. (`lax.map(batch_size=...)` runs its remainder outside the
    scan, where XLA does not reuse the scan's buffers: up to twice the memory.)
    """
    check_chunk_size(chunk_size)
    n = jax.tree.leaves(xs)[0].shape[0]
    if chunk_size is None or chunk_size >= n:
        return jax.vmap(fn)(xs)
    k = -(-n // int(chunk_size))
    size = -(-n // k)
    last = n - (k - 1) * size  # 1 <= last <= size
    index = np.minimum(np.arange(k * size), n - 1).reshape(k, size)  # padding slots repeat an item, never run
    chunks = jax.tree.map(lambda a: a[index], xs)
    run = jax.vmap(fn)

    def tail(chunk: Any) -> Any:
        out = run(jax.tree.map(lambda a: a[:last], chunk))
        return jax.tree.map(lambda o: jnp.concatenate([o, jnp.zeros((size - last, *o.shape[1:]), o.dtype)]), out)

    def body(carry: None, item: tuple[Array, Any]) -> tuple[None, Any]:
        i, chunk = item
        if last == size:
            return carry, run(chunk)
        return carry, jax.lax.cond(i == k - 1, tail, run, chunk)

    _, ys = jax.lax.scan(body, None, (jnp.arange(k), chunks))
    return jax.tree.map(lambda y: y.reshape(k * size, *y.shape[2:])[:n], ys)


def check_canvas_weights(weights: Any, tiling: Tiling) -> None:
    """Concrete weights [N, h, w, 1]: non-negative, finite, and no pixel with zero total.

    Traced weights (inside jit) can only have their shape checked.
    """
    h, w = tiling.window
    chex.assert_shape(weights, (tiling.num_views, h, w, 1))
    value = concrete_or_none(weights)
    if value is None:
        return
    if not np.all(np.isfinite(value)) or np.any(value < 0):
        raise ValueError("weights must be finite and non-negative (they are least-squares weights).")
    rows, cols = view_indices(tiling.views, tiling.window, tiling.width)
    total = np.zeros(tiling.shape, np.float64)
    np.add.at(total, (rows[:, :, None], cols[:, None, :]), value[..., 0])
    if np.any(total <= 0):
        ys, xs = np.nonzero(total <= 0)
        raise ValueError(
            f"weights leave {ys.size} canvas pixel(s) with zero total weight (first at row {ys[0]}, column {xs[0]}), "
            "so nothing would denoise them; make every pixel's weights sum to > 0."
        )


def tiled_denoiser(
    view_fn: ViewDenoiseFn,
    tiling: Tiling,
    *,
    chunk_size: int | None = None,
    weights: Array | None = None,
    strategy: str = "overlap",
    rng: Array | None = None,
    offset_multiple: int = 1,
    coherence: Coherence | None = None,
) -> DenoiseFn:
    """D(x; sigma) on the canvas from a view-aware crop denoiser `view_fn(x_crop, sigma, view)`.

    The view offset lets a denoiser cut matching crops of other canvas-aligned inputs:
    paint-with-words masks, or a super-resolution stage's (upsampled) low-res image via
    `crop(wrap_canvas(lowres, tiling), view, tiling)`. `weights` [N, h, w, 1] (None: 1)
    are the per-crop least-squares weights. `strategy` picks the crops and their weights
    (`strategies.py`); `shifted` draws its offsets from `rng`, in multiples of
    `offset_multiple` (an SR stage's factor, so its low-res crops stay aligned). `coherence`
    adds SyncDiffusion's guidance towards the first window's prediction (`coherence.py`).
    """
    check_chunk_size(chunk_size)
    check_strategy(strategy)
    if weights is not None:
        if strategy == "shifted":
            raise ValueError("Per-crop weights need fixed views; the shifted strategy moves its windows every step.")
        check_canvas_weights(weights, tiling)

    def denoise(x: Array, sigma: Array) -> Array:
        chex.assert_shape(x, (None, tiling.height, tiling.width, None))
        views, tile_weights = views_and_weights(tiling, strategy, rng, sigma, offset_multiple)
        w = tile_weights if weights is None else (weights if tile_weights is None else weights * tile_weights)
        xw = wrap_canvas(x, tiling)
        fn = with_coherence(view_fn, coherence, lambda: view_fn(crop(xw, views[0], tiling), sigma, views[0]), sigma)
        d = map_views(lambda v: fn(crop(xw, v, tiling), sigma, v), views, chunk_size)
        chex.assert_shape(d, (views.shape[0], x.shape[0], *tiling.window, x.shape[3]))
        return fuse_batched(d, views, tiling.height, tiling.width, w, circular=tiling.circular).astype(x.dtype)

    return denoise


def multidiffusion_denoiser(
    denoise_fn: DenoiseFn,
    tiling: Tiling,
    *,
    chunk_size: int | None = None,
    weights: Array | None = None,
    strategy: str = "overlap",
    rng: Array | None = None,
    coherence: Coherence | None = None,
) -> DenoiseFn:
    """MultiDiffusion on a canvas: `denoise_fn(x, sigma)` on every crop, fused by least squares.

    `denoise_fn` takes window-sized batches [B, h, w, C] and a scalar sigma; the returned
    denoiser takes canvases [B, H, W, C] and is what `edm.heun_sample` expects. Per call it
    evaluates `denoise_fn` once per view (`strategies.evaluations_per_call` crops: `tiling.num_views`
    unless `strategy` is shifted), in batched chunks of `chunk_size`.
    """
    return tiled_denoiser(lambda xc, sigma, view: denoise_fn(xc, sigma), tiling, chunk_size=chunk_size,
                          weights=weights, strategy=strategy, rng=rng, coherence=coherence)
