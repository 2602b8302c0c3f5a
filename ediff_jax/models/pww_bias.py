"""Paint-with-words' attention bias: the network-side math (pure, jit-able).

Every cross-attention layer of the UNet adds `pww_bias(...)` to its logits, from masks
pooled to its resolution by `pool_masks`. It lives beside the layers that use it, so the
network does not import `ediff_jax.paint_with_words` (masks from files, tokens, the CLI).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

MODES = ("max", "std")


def _per_example(value: Any, lead: tuple[int, ...], ndim: int, what: str) -> jax.Array:
    """A scalar, or one value per example (shape `lead`), reshaped to broadcast over scores."""
    value = jnp.asarray(value, jnp.float32)
    if value.ndim == 0:
        return value
    if value.shape != lead:
        raise ValueError(f"{what} must be a scalar or have shape {lead} (one value per example), got {value.shape}.")
    return value.reshape(lead + (1,) * (ndim - len(lead)))


def pww_bias(
    scores: jax.Array,
    token_masks: jax.Array,
    sigma: Any,
    w_prime: Any,
    mode: str = "max",
    *,
    valid: jax.Array | None = None,
    batch_dims: int | None = None,
) -> jax.Array:
    """Paint-with-words logit bias w' * log(1 + sigma) * stat(scores) * token_masks.

    Args:
      scores: unscaled logits QK^T, [..., Nq, Nk] (e.g. [B, heads, Nq, Nk]).
      token_masks: A in [0, 1], [Nq, Nk] or broadcastable to `scores` (e.g. [B, 1, Nq, Nk]).
      sigma, w_prime: scalars, or one value per example (shape `scores.shape[:batch_dims]`).
      mode: "max" (eDiff-I: stat = max(QK^T)) or "std" (stat = std(QK^T), a variant that
        is less sensitive to one outlier logit).
      valid: optional boolean, broadcastable to `scores`; the statistic is taken over the
        True entries only (the UNet passes its key mask, so padded tokens do not count).
      batch_dims: number of leading axes that index examples. The statistic is reduced
        over all other axes (all heads, queries and keys), i.e. per example: a batch mixes
        examples (and, under guidance, conditional and unconditional branches), so one
        example's logits must not set another's scale. Default: 1 for 4-D scores
        [B, heads, Nq, Nk], else 0 (the whole tensor is one example).

    Returns the bias, broadcast against the statistic's shape; add it to `scores`, then
    scale by 1/sqrt(d) and softmax.
    """
    if mode not in MODES:
        raise ValueError(f"Unknown paint-with-words mode {mode!r}; choose one of {MODES}.")
    scores = jnp.asarray(scores, jnp.float32)
    if scores.ndim < 2:
        raise ValueError(f"scores must be [..., Nq, Nk], got shape {scores.shape}.")
    if batch_dims is None:
        batch_dims = 1 if scores.ndim == 4 else 0
    if not 0 <= batch_dims <= scores.ndim - 2:
        raise ValueError(f"batch_dims={batch_dims} leaves no [Nq, Nk] axes in scores of shape {scores.shape}.")
    token_masks = jnp.asarray(token_masks, jnp.float32)
    try:
        out_shape = jnp.broadcast_shapes(scores.shape, token_masks.shape)
    except ValueError:
        out_shape = None
    if out_shape != scores.shape:
        raise ValueError(
            f"token_masks of shape {token_masks.shape} do not broadcast to scores of shape {scores.shape}; "
            "give [Nq, Nk] or [B, 1, Nq, Nk] masks."
        )
    lead = scores.shape[:batch_dims]
    axes = tuple(range(batch_dims, scores.ndim))
    ok = jnp.ones(scores.shape, bool) if valid is None else jnp.broadcast_to(jnp.asarray(valid, bool), scores.shape)
    if mode == "max":
        stat = jnp.max(jnp.where(ok, scores, -jnp.inf), axis=axes, keepdims=True)
    else:
        count = jnp.maximum(jnp.sum(ok, axis=axes, keepdims=True), 1).astype(jnp.float32)
        mean = jnp.sum(jnp.where(ok, scores, 0.0), axis=axes, keepdims=True) / count
        stat = jnp.sqrt(jnp.sum(jnp.where(ok, (scores - mean) ** 2, 0.0), axis=axes, keepdims=True) / count)
    stat = jnp.where(jnp.isfinite(stat), stat, 0.0)  # no valid entry: no bias (and no 0 * inf = nan)
    sigma = _per_example(sigma, lead, scores.ndim, "sigma")
    w_prime = _per_example(w_prime, lead, scores.ndim, "w_prime")
    return w_prime * jnp.log1p(sigma) * stat * token_masks


def pool_masks(masks: jax.Array, size: tuple[int, int]) -> jax.Array:
    """[B, H, W, L] masks -> [B, h, w, L]: exact average pooling when h, w divide H, W
    (always so for the UNet's power-of-two levels), else an antialiased linear resize."""
    b, height, width, length = masks.shape
    h, w = size
    if (height, width) == (h, w):
        return masks
    if height % h == 0 and width % w == 0:
        return masks.reshape(b, h, height // h, w, width // w, length).mean(axis=(2, 4))
    return jax.image.resize(masks, (b, h, w, length), method="linear", antialias=True)
