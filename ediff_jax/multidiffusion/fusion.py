"""Fusing overlapping crop predictions into one canvas: the MultiDiffusion step.

Bar-Tal et al. (2023, eq. 3-5) ask, at every step, for the canvas J closest to all crop
predictions: J = argmin_J sum_i sum_p W_i(p) (J(p) - crop_i(p))^2 over the pixels p each
crop covers. The objective separates per pixel, and its minimiser is the weighted
average  J(p) = sum_i W_i(p) crop_i(p) / sum_i W_i(p).

Both sums are one scatter-add into a [H, W, (C + 1) * B] buffer (the weights ride along
as an extra channel), so the graph does not grow with the number of views.
"""

from __future__ import annotations

from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ediff_jax.multidiffusion.views import check_views_in_bounds, view_indices


def concrete_or_none(x: Any) -> np.ndarray | None:
    """x as numpy when it is known at trace time (checks at the boundary), else None."""
    try:
        return np.asarray(x)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def fuse_batched(
    crops: jax.Array,
    views: Any,
    height: int,
    width: int,
    weights: jax.Array | None = None,
    *,
    circular: bool = False,
) -> jax.Array:
    """Least-squares fusion of a batch: crops [N, B, h, w, C] -> canvas [B, H, W, C].

    `weights` is [N, h, w, 1] (shared by the batch), [N, B, h, w, 1], or None (all 1).
    Columns are taken modulo `width` when `circular`. Pixels no crop covers with a
    positive weight come out as 0 (there is no least-squares information there); views
    from `get_views` cover every pixel.
    """
    chex.assert_rank(crops, 5)
    n, b, h, w, c = crops.shape
    view_values = concrete_or_none(views)
    if view_values is not None:  # known at trace time: check bounds (XLA drops out-of-range updates)
        check_views_in_bounds(view_values, (h, w), height, width, circular)
    views = jnp.asarray(views, jnp.int32)
    chex.assert_shape(views, (n, 2))
    acc_dtype = jnp.promote_types(crops.dtype, jnp.float32)
    if weights is None:
        weights = jnp.ones((n, 1, h, w, 1), acc_dtype)
    else:
        weights = jnp.asarray(weights, acc_dtype)
        if weights.ndim == 4:
            weights = weights[:, None]
        chex.assert_shape(weights, (n, {1, b}, h, w, 1))
    weights = jnp.broadcast_to(weights, (n, b, h, w, 1))
    # [N, B, h, w, C + 1] -> [N, h, w, B * (C + 1)]: weighted crops with their weights as
    # the last channel, batch folded into the channels so one scatter does everything.
    updates = jnp.concatenate([crops.astype(acc_dtype) * weights, weights], axis=-1)
    updates = updates.transpose(0, 2, 3, 1, 4).reshape(n, h, w, b * (c + 1))
    rows, cols = view_indices(views, (h, w), width)
    acc = jnp.zeros((height, width, b * (c + 1)), acc_dtype)
    acc = acc.at[rows[:, :, None], cols[:, None, :]].add(updates, indices_are_sorted=False, unique_indices=False)
    acc = acc.reshape(height, width, b, c + 1).transpose(2, 0, 1, 3)
    total, count = acc[..., :c], acc[..., c:]
    out = total / jnp.where(count > 0, count, 1.0)
    return out.astype(crops.dtype)


def fuse(
    crops: jax.Array,
    views: Any,
    height: int,
    width: int,
    weights: jax.Array | None = None,
    *,
    circular: bool = False,
) -> jax.Array:
    """Least-squares fusion of one image: crops [N, h, w, C] -> [H, W, C].

    Per pixel sum_i W_i * crop_i / sum_i W_i, with weights [N, h, w, 1] (None: all 1);
    see `fuse_batched`.
    """
    chex.assert_rank(crops, 4)
    if weights is not None:
        chex.assert_rank(weights, 4)
    return fuse_batched(crops[:, None], views, height, width, weights, circular=circular)[0]
