"""Building blocks of the ADM-style UNet: embeddings, residual blocks, attention.

Attention is written out (not `nn.MultiHeadDotProductAttention`) because later features
add biases to the cross-attention logits (paint-with-words) and need the raw scores.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def zeros_init() -> Callable:
    return nn.initializers.zeros


def group_norm(channels: int, max_groups: int = 32, name: str | None = None) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= max_groups that divides `channels`.

    Normalisation statistics are kept in float32 even under bfloat16 compute.
    """
    groups = math.gcd(channels, max_groups)
    return nn.GroupNorm(num_groups=groups, epsilon=1e-5, dtype=jnp.float32, name=name)


def fourier_embedding(x: jax.Array, dim: int, min_freq: float = 0.5, max_freq: float = 64.0) -> jax.Array:
    """Sinusoidal features of a scalar per example, frequencies geometric in [min, max].

    c_noise = log(sigma)/4 spans about [-1.6, 1.1] for sigma in [0.002, 80], so the
    frequencies are chosen to resolve that range rather than integer timesteps.
    """
    half = dim // 2
    freqs = jnp.exp(jnp.linspace(math.log(min_freq), math.log(max_freq), half))
    angles = x.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def coordinate_channels(batch: int, height: int, width: int, dtype: Any = jnp.float32) -> jax.Array:
    """[B, H, W, 2]: each pixel centre's (y, x) in (-1, 1), top left negative (CoordConv).

    Convolutions are translation-equivariant, so a UNet only learns where it is from the
    zero padding at the borders, weakly and slowly; region words ("in the top left") and
    relations ("to the left of") need to know where on the canvas a pixel lies.
    """
    ys = (2.0 * (jnp.arange(height, dtype=jnp.float32) + 0.5) / height - 1.0).astype(dtype)
    xs = (2.0 * (jnp.arange(width, dtype=jnp.float32) + 0.5) / width - 1.0).astype(dtype)
    grid = jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), axis=-1)
    return jnp.broadcast_to(grid[None], (batch, height, width, 2))


BiasFn = Callable[[jax.Array], jax.Array]


def attention_weights(
    q: jax.Array, k: jax.Array, mask: jax.Array | None = None, bias: jax.Array | None = None,
    bias_fn: BiasFn | None = None,
) -> jax.Array:
    """Softmax attention weights [B, H, Nq, Nk] (float32) of [B, N, H, Dh] queries and keys.

    `mask` [B, Nk] marks valid keys. `bias` (broadcastable to [B, H, Nq, Nk]) and
    `bias_fn(scores)` (called with the unscaled float32 scores QK^T, e.g. paint-with-words,
    whose bias depends on max(QK^T)) are added to QK^T before the 1/sqrt(d) scaling.
    """
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
    raw = scores
    if bias is not None:
        scores = scores + bias
    if bias_fn is not None:
        scores = scores + bias_fn(raw)
    scores = scores * scale
    if mask is not None:
        scores = jnp.where(mask[:, None, None, :] > 0, scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None, bias: jax.Array | None = None,
    bias_fn: BiasFn | None = None,
) -> jax.Array:
    """Multi-head attention on [B, N, H, Dh] tensors, softmax in float32.

    `mask` [B, Nk] marks valid keys; `bias` (broadcastable to [B, H, Nq, Nk]) and
    `bias_fn(QK^T)` are added to the unscaled scores QK^T before the 1/sqrt(d) scaling,
    as paint-with-words specifies (see `attention_weights`).
    """
    weights = attention_weights(q, k, mask, bias, bias_fn).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class ResBlock(nn.Module):
    """ADM residual block with scale-shift conditioning on the embedding."""

    out_channels: int
    dropout: float = 0.0
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, emb: jax.Array, train: bool) -> jax.Array:
        h = nn.silu(group_norm(x.shape[-1], name="norm1")(x)).astype(self.dtype)
        h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, name="conv1")(h)
        scale_shift = nn.Dense(2 * self.out_channels, dtype=self.dtype, name="emb_proj")(nn.silu(emb))
        scale, shift = jnp.split(scale_shift[:, None, None, :].astype(jnp.float32), 2, axis=-1)
        h = group_norm(self.out_channels, name="norm2")(h) * (1.0 + scale) + shift
        h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h)).astype(self.dtype)
        h = nn.Conv(self.out_channels, (3, 3), dtype=self.dtype, kernel_init=zeros_init(), name="conv2")(h)
        skip = x
        if x.shape[-1] != self.out_channels:
            skip = nn.Conv(self.out_channels, (1, 1), dtype=self.dtype, name="skip")(x)
        return skip + h


class SelfAttentionBlock(nn.Module):
    """Pre-norm self-attention over all pixels, zero-initialised output projection."""

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        y = group_norm(c, name="norm")(x).astype(self.dtype).reshape(b, h * w, c)
        qkv = nn.DenseGeneral((3, self.num_heads, c // self.num_heads), dtype=self.dtype, name="qkv")(y)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
        out = nn.DenseGeneral(c, axis=(-2, -1), dtype=self.dtype, kernel_init=zeros_init(), name="out")(out)
        return x + out.reshape(b, h, w, c)


class CrossAttentionBlock(nn.Module):
    """Pre-norm cross-attention from pixels to the text context.

    `bias` (broadcastable to [B, heads, H*W, L]) and `bias_fn(QK^T)` are added to the
    unscaled logits; they are the hooks paint-with-words uses. The attention weights are
    sown into the "intermediates" collection as `attn_weights` [B, heads, H*W, L] (a no-op
    unless that collection is mutable), to inspect where each token attends.
    """

    num_heads: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array, context_mask: jax.Array, bias: jax.Array | None = None,
                 bias_fn: BiasFn | None = None) -> jax.Array:
        b, h, w, c = x.shape
        head_dim = c // self.num_heads
        y = group_norm(c, name="norm")(x).astype(self.dtype).reshape(b, h * w, c)
        q = nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype, name="q")(y)
        kv = nn.DenseGeneral((2, self.num_heads, head_dim), dtype=self.dtype, name="kv")(context.astype(self.dtype))
        weights = attention_weights(q, kv[:, :, 0], mask=context_mask, bias=bias, bias_fn=bias_fn)
        self.sow("intermediates", "attn_weights", weights)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(self.dtype), kv[:, :, 1])
        out = nn.DenseGeneral(c, axis=(-2, -1), dtype=self.dtype, kernel_init=zeros_init(), name="out")(out)
        return x + out.reshape(b, h, w, c)


class Downsample(nn.Module):
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype)(x)


class Upsample(nn.Module):
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        x = jax.image.resize(x, (b, 2 * h, 2 * w, c), method="nearest")
        return nn.Conv(c, (3, 3), dtype=self.dtype)(x)
