"""Region-based generation (Bar-Tal et al. 2023, Sec. 4.2): prompts painted into masks.

A background prompt and K (prompt, mask) regions share one canvas. Every crop is
denoised once per prompt; prompt k's prediction gets its mask as the least-squares
weight (the background gets 1 - sum of the region masks, clipped to [0, 1]), so each
pixel follows the prompts that claim it and overlaps blend.

Bootstrapping: a region's prompt, seeing only its own mask's pixels early on, would still
"paint" the whole crop and the object would bleed into the background; so for the first
fraction of the steps everything outside a region's mask is replaced, in that region's
crop, by a random constant-colour image noised to the current sigma. The prompt is then
denoised against a neutral background and commits to an object inside its mask.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ediff_jax.multidiffusion.coherence import Coherence, with_coherence
from ediff_jax.multidiffusion.denoiser import (
    DenoiseFn,
    ViewDenoiseFn,
    check_chunk_size,
    map_views,
)
from ediff_jax.multidiffusion.fusion import concrete_or_none, fuse_batched
from ediff_jax.multidiffusion.strategies import check_strategy, evaluations_per_call, views_and_weights
from ediff_jax.multidiffusion.views import Tiling, crop, wrap_canvas

Array = jax.Array


def check_masks(masks: Any, height: int, width: int, prompts: Sequence[str] | None = None) -> np.ndarray:
    """Region masks -> float32 [K, H, W] in [0, 1], checked against the canvas.

    Accepts a [K, H, W] array or a list of [H, W] (or [H, W, 1]) masks; 0 is outside the
    region, 1 inside, values between are soft weights.
    """
    if isinstance(masks, (list, tuple)):
        masks = [np.asarray(m, np.float32) for m in masks]
    else:
        array = np.asarray(masks, np.float32)
        masks = [array] if array.ndim == 2 else list(array)
    names = list(prompts) if prompts is not None else [None] * len(masks)
    out = []
    for i, (mask, name) in enumerate(zip(masks, names)):
        what = f"region {i}" + (f" ({name!r})" if name is not None else "")
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.shape != (height, width):
            raise ValueError(
                f"The mask of {what} has shape {mask.shape} but the canvas is {height}x{width}: "
                f"masks are given at canvas resolution. Resize or redraw it to {height}x{width}."
            )
        if not np.all(np.isfinite(mask)) or mask.min() < 0 or mask.max() > 1:
            raise ValueError(f"The mask of {what} must hold values in [0, 1]; got range [{mask.min()}, {mask.max()}].")
        if not mask.max() > 0:
            raise ValueError(
                f"The mask of {what} covers nothing (all zero), so its prompt would have no effect; "
                "mark the region's pixels with 1 or drop the region."
            )
        out.append(mask)
    if not out:
        return np.zeros((0, height, width), np.float32)
    return np.stack(out)


def region_weights(masks: Array) -> Array:
    """[K, H, W] region masks -> [K + 1, H, W] weights, background first.

    The background takes what the regions leave, clip(1 - sum_k mask_k, 0, 1), so every
    pixel's total weight is max(1, sum_k mask_k) >= 1: nothing is left undetermined.
    """
    masks = jnp.asarray(masks, jnp.float32)
    background = jnp.clip(1.0 - masks.sum(axis=0, keepdims=True), 0.0, 1.0)
    return jnp.concatenate([background, masks], axis=0)


def check_bootstrap_fraction(fraction: float) -> None:
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"The bootstrapping fraction must be in [0, 1] (0 turns it off); got {fraction}.")


def bootstrap_sigma(sigmas: Any, fraction: float) -> float:
    """Noise level above which evaluations are bootstrapped: those of the first `fraction` of steps.

    With n = round(fraction * steps), the evaluations at sigmas[0..n-1] (every step's first
    evaluation, and the Heun corrections that land above sigmas[n]) are bootstrapped and
    none from step n on. Returns +inf (never) for n = 0.
    """
    check_bootstrap_fraction(fraction)
    sigmas = np.asarray(sigmas, np.float64)
    n = int(round(fraction * (sigmas.shape[0] - 1)))
    return math.inf if n == 0 else float(sigmas[n])


def box_mask(height: int, width: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    """A float32 [H, W] mask that is 1 on rows [top, bottom) and columns [left, right)."""
    if not (0 <= top < bottom <= height and 0 <= left < right <= width):
        raise ValueError(
            f"Box rows [{top}, {bottom}) x columns [{left}, {right}) is empty or leaves the {height}x{width} canvas."
        )
    mask = np.zeros((height, width), np.float32)
    mask[top:bottom, left:right] = 1.0
    return mask


def region_denoiser(
    denoise_fn: DenoiseFn,
    tiling: Tiling,
    masks: Array,
    *,
    rng: Array,
    bootstrap_above: float = math.inf,
    chunk_size: int | None = None,
    strategy: str = "overlap",
    coherence: Coherence | None = None,
) -> DenoiseFn:
    """Canvas D(x; sigma) for a background prompt plus K masked region prompts.

    `denoise_fn(x, sigma)` gets (K + 1) * B crops, prompt-major: rows [k*B, (k+1)*B) are
    prompt k, 0 the background (bind the matching conditioning, e.g. with
    `edm.guided_denoiser`). `masks` [K, H, W] are at canvas resolution. Evaluations at
    sigma > `bootstrap_above` (see `bootstrap_sigma`) bootstrap the region crops; their
    random colours and noise come from `rng` folded with sigma and the view index, so a
    run is reproducible.
    """
    return region_view_denoiser(lambda crops, sigma, view: denoise_fn(crops, sigma), tiling, masks, rng=rng,
                                bootstrap_above=bootstrap_above, chunk_size=chunk_size, strategy=strategy,
                                coherence=coherence)


def region_view_denoiser(
    view_fn: ViewDenoiseFn,
    tiling: Tiling,
    masks: Array,
    *,
    rng: Array,
    bootstrap_above: float = math.inf,
    chunk_size: int | None = None,
    strategy: str = "overlap",
    coherence: Coherence | None = None,
) -> DenoiseFn:
    """`region_denoiser` whose crop denoiser also gets the view's offset, `view_fn(crops, sigma, view)`,
    so it can cut the matching crop of canvas-aligned conditioning (paint-with-words masks), as
    `tiled_denoiser` does for a single prompt. `strategy` picks the crops and multiplies their tile
    weights into the region weights (`strategies.py`); shifted offsets come from `rng` too. `coherence`
    pulls each row (background or region prompt, per image) towards the first window's same row."""
    check_chunk_size(chunk_size)
    check_strategy(strategy)
    value = concrete_or_none(masks)
    if value is not None:
        masks = check_masks(value, tiling.height, tiling.width)
    chex.assert_shape(masks, (None, tiling.height, tiling.width))
    k = masks.shape[0]
    h, w = tiling.window
    n = evaluations_per_call(tiling, strategy)
    # Weights as a [K + 1, H, W, 1] "batch" so the same crop() cuts them.
    weights_w = wrap_canvas(region_weights(masks)[..., None], tiling)

    def denoise(x: Array, sigma: Array) -> Array:
        chex.assert_shape(x, (None, tiling.height, tiling.width, None))
        b, c = x.shape[0], x.shape[3]
        xw = wrap_canvas(x, tiling)
        sigma = jnp.asarray(sigma)
        chex.assert_rank(sigma, 0)
        boot = sigma > bootstrap_above
        key = jax.random.fold_in(rng, jax.lax.bitcast_convert_type(sigma.astype(jnp.float32), jnp.uint32))
        views, tile_weights = views_and_weights(tiling, strategy, jax.random.fold_in(rng, 7), sigma)
        item_views = jnp.repeat(views, k + 1, axis=0)  # item (view i, prompt j) at i * (K + 1) + j

        def per_view(args: tuple[Array, Array], view_fn: ViewDenoiseFn = view_fn) -> tuple[Array, Array]:
            view, index = args
            xc = crop(xw, view, tiling)  # [B, h, w, C]
            wc = crop(weights_w, view, tiling)  # [K + 1, h, w, 1]
            xr = jnp.broadcast_to(xc[None], (k, b, h, w, c))
            if k:
                k_colour, k_noise = jax.random.split(jax.random.fold_in(key, index))
                colour = jax.random.uniform(k_colour, (k, b, 1, 1, c), minval=-1.0, maxval=1.0)
                background = colour + sigma * jax.random.normal(k_noise, (k, b, h, w, c))
                m = wc[1:, None]  # [K, 1, h, w, 1]
                xr = jnp.where(boot, xr * m + background * (1.0 - m), xr).astype(x.dtype)
            crops = jnp.concatenate([xc[None], xr], axis=0).reshape((k + 1) * b, h, w, c)
            d = view_fn(crops, sigma, view)
            chex.assert_shape(d, ((k + 1) * b, h, w, c))
            return d.reshape(k + 1, b, h, w, c), wc

        anchor = lambda: per_view((views[0], jnp.int32(0)))[0].reshape((k + 1) * b, h, w, c)  # noqa: E731
        fn = with_coherence(view_fn, coherence, anchor, sigma)
        d, wc = map_views(lambda args: per_view(args, fn), (views, jnp.arange(n)), chunk_size)  # [N, K+1, B, ...]
        if tile_weights is not None:  # Gaussian tiles: each crop's region weights fade towards its edges
            wc = wc * tile_weights[:, None]
        out = fuse_batched(d.reshape(n * (k + 1), b, h, w, c), item_views, tiling.height, tiling.width,
                           wc.reshape(n * (k + 1), h, w, 1), circular=tiling.circular)
        return out.astype(x.dtype)

    return denoise
