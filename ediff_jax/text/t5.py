"""Flax T5 encoder (T5 v1.0, v1.1 / mT5, UMT5) matching Hugging Face's PyTorch ``T5EncoderModel``.

transformers 5 no longer ships Flax models, and eDiff-I only needs the frozen encoder for inference,
so this is a small, dropout-free re-implementation whose parameter tree ``loading.py`` fills from
HF safetensors. The math follows ``transformers/models/t5/modeling_t5.py`` exactly:

* RMS norm without mean subtraction or bias, variance accumulated in float32 (``T5LayerNorm``);
* no 1/sqrt(d) scaling of the QK product (T5 folds it into the initialisation);
* bucketed relative position bias computed by layer 0 and shared by all layers (T5), or one bias
  table per layer (UMT5, ``per_layer_position_bias=True``);
* ReLU feed-forward (v1.0) or gated GELU with the tanh approximation (``gated-gelu`` = ``gelu_new``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# Names as in transformers' ACT2FN, restricted to what T5-family configs use.
_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    """The encoder-relevant subset of HF ``T5Config`` (defaults are HF's)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    per_layer_position_bias: bool = False  # UMT5: every layer owns a relative-bias table

    def __post_init__(self) -> None:
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                f"feed_forward_proj={self.feed_forward_proj!r} is not of the form 'ACT' or 'gated-ACT'"
            )
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"unsupported T5 activation {self.activation!r}; supported: {sorted(_ACTIVATIONS)}"
            )

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        # HF keeps the legacy quirk: "gated-gelu" means the tanh approximation (gelu_new).
        if self.feed_forward_proj == "gated-gelu":
            return "gelu_new"
        return self.feed_forward_proj.split("-")[-1]

    @classmethod
    def from_hf_dict(cls, config: Mapping[str, Any]) -> T5EncoderConfig:
        """Picks the encoder fields out of a HF ``config.json`` dict (t5, mt5 or umt5)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"per_layer_position_bias"}
        kwargs = {k: config[k] for k in names if k in config}
        return cls(**kwargs, per_layer_position_bias=config.get("model_type") == "umt5")


def relative_position_buckets(
    query_length: int,
    key_length: int,
    num_buckets: int = 32,
    max_distance: int = 128,
    bidirectional: bool = True,
) -> np.ndarray:
    """Bucket index [q, k] of ``key_pos - query_pos``, as HF ``T5Attention._relative_position_bucket``.

    Computed with NumPy at trace time (lengths are static), in float32 like the torch code, so the
    log-spaced bucket boundaries agree bit for bit.
    """
    relative = np.arange(key_length)[None, :] - np.arange(query_length)[:, None]
    buckets = np.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative > 0).astype(relative.dtype) * num_buckets
        relative = np.abs(relative)
    else:
        relative = -np.minimum(relative, 0)
    max_exact = num_buckets // 2
    is_small = relative < max_exact
    # max(., 1) only avoids log(0); those entries take the `is_small` branch anyway.
    scaled = np.log(np.maximum(relative, 1).astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact)) * np.float32(num_buckets - max_exact)
    large = np.minimum(max_exact + scaled.astype(relative.dtype), num_buckets - 1)
    return (buckets + np.where(is_small, relative, large)).astype(np.int32)


class T5LayerNorm(nn.Module):
    """Scale-only RMS norm; variance in float32 so bf16 activations normalise accurately."""

    epsilon: float = 1e-6
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.initializers.ones, (x.shape[-1],), self.dtype)
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        normed = x32 * jax.lax.rsqrt(variance + self.epsilon)
        return weight.astype(self.dtype) * normed.astype(self.dtype)


class T5Attention(nn.Module):
    """Bidirectional self-attention with additive relative position bias and no QK scaling."""

    config: T5EncoderConfig
    has_relative_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, valid: jax.Array, position_bias: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        batch, length, _ = x.shape
        inner = cfg.num_heads * cfg.d_kv
        dense = partial(nn.Dense, use_bias=False, dtype=self.dtype, param_dtype=self.dtype)
        split = lambda t: t.reshape(batch, length, cfg.num_heads, cfg.d_kv)  # noqa: E731
        q = split(dense(inner, name="q")(x))
        k = split(dense(inner, name="k")(x))
        v = split(dense(inner, name="v")(x))

        if position_bias is None:
            if self.has_relative_bias:
                buckets = relative_position_buckets(
                    length,
                    length,
                    cfg.relative_attention_num_buckets,
                    cfg.relative_attention_max_distance,
                    bidirectional=True,
                )
                table = nn.Embed(
                    cfg.relative_attention_num_buckets,
                    cfg.num_heads,
                    dtype=self.dtype,
                    param_dtype=self.dtype,
                    name="relative_attention_bias",
                )
                position_bias = jnp.transpose(table(jnp.asarray(buckets)), (2, 0, 1))[None]
            else:
                position_bias = jnp.zeros((1, cfg.num_heads, length, length), self.dtype)

        # Softmax in float32 whatever the weight dtype: the bias terms can be large.
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32)
        scores = scores + position_bias.astype(jnp.float32)
        scores = jnp.where(valid[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, inner)
        return dense(cfg.d_model, name="o")(out), position_bias


class T5FeedForward(nn.Module):
    """``wo(act(wi x))`` (v1.0) or ``wo(act(wi_0 x) * wi_1 x)`` (gated, v1.1)."""

    config: T5EncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        dense = partial(nn.Dense, use_bias=False, dtype=self.dtype, param_dtype=self.dtype)
        act = _ACTIVATIONS[cfg.activation]
        if cfg.is_gated:
            h = act(dense(cfg.d_ff, name="wi_0")(x)) * dense(cfg.d_ff, name="wi_1")(x)
        else:
            h = act(dense(cfg.d_ff, name="wi")(x))
        return dense(cfg.d_model, name="wo")(h)


class T5Block(nn.Module):
    """Pre-norm residual block: self-attention then feed-forward."""

    config: T5EncoderConfig
    has_relative_bias: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, valid: jax.Array, position_bias: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        eps = self.config.layer_norm_epsilon
        h = T5LayerNorm(eps, self.dtype, name="attn_norm")(x)
        h, position_bias = T5Attention(
            self.config, self.has_relative_bias, self.dtype, name="attention"
        )(h, valid, position_bias)
        x = x + h
        h = T5LayerNorm(eps, self.dtype, name="ff_norm")(x)
        x = x + T5FeedForward(self.config, self.dtype, name="ff")(h)
        return x, position_bias


class T5Encoder(nn.Module):
    """``apply({"params": p}, input_ids [B, L], attention_mask [B, L] | None) -> [B, L, d_model]``."""

    config: T5EncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        cfg = self.config
        chex.assert_rank(input_ids, 2)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        chex.assert_equal_shape([input_ids, attention_mask])
        valid = attention_mask.astype(bool)

        x = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=self.dtype, param_dtype=self.dtype, name="shared")(
            input_ids
        )
        position_bias = None
        for i in range(cfg.num_layers):
            own_bias = cfg.per_layer_position_bias or i == 0
            x, bias = T5Block(cfg, own_bias, self.dtype, name=f"block_{i}")(
                x, valid, None if own_bias else position_bias
            )
            position_bias = bias if position_bias is None else position_bias
        x = T5LayerNorm(cfg.layer_norm_epsilon, self.dtype, name="final_layer_norm")(x)
        chex.assert_shape(x, (*input_ids.shape, cfg.d_model))
        return x
