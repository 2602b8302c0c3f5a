"""Flax CLIP text transformer matching Hugging Face's PyTorch ``CLIPTextModel(WithProjection)``.

Own implementation because transformers 5 dropped Flax; inference only (no dropout). Follows
``transformers/models/clip/modeling_clip.py``: token + learned absolute position embeddings,
pre-LN layers with causal self-attention (combined with the padding mask), final LayerNorm, and the
pooled vector read at the EOS token (optionally projected by ``text_projection``, no bias).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": partial(jax.nn.gelu, approximate=False),
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class CLIPTextEncoderConfig:
    """The fields of HF ``CLIPTextConfig`` the forward pass needs (defaults are HF's)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int | None = None  # None: no text_projection; pooled output is hidden_size wide

    def __post_init__(self) -> None:
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(
                f"unsupported CLIP hidden_act {self.hidden_act!r}; supported: {sorted(_ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by "
                f"num_attention_heads={self.num_attention_heads}"
            )

    @classmethod
    def from_hf_dict(
        cls, text_config: Mapping[str, Any], projection_dim: int | None
    ) -> CLIPTextEncoderConfig:
        """From a ``clip_text_model`` config dict; ``projection_dim`` is decided by the weights."""
        names = {f.name for f in dataclasses.fields(cls)} - {"projection_dim"}
        kwargs = {k: text_config[k] for k in names if k in text_config}
        return cls(**kwargs, projection_dim=projection_dim)


class CLIPAttention(nn.Module):
    """Multi-head attention with 1/sqrt(head_dim) scaling and biased projections."""

    config: CLIPTextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
        cfg = self.config
        batch, length, width = x.shape
        heads = cfg.num_attention_heads
        head_dim = width // heads
        dense = partial(nn.Dense, width, dtype=self.dtype, param_dtype=self.dtype)
        split = lambda t: t.reshape(batch, length, heads, head_dim)  # noqa: E731
        q = split(dense(name="q_proj")(x))
        k = split(dense(name="k_proj")(x))
        v = split(dense(name="v_proj")(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * (head_dim**-0.5)
        scores = jnp.where(allowed[:, None], scores, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, length, width)
        return dense(name="out_proj")(out)


class CLIPMLP(nn.Module):
    config: CLIPTextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        h = nn.Dense(cfg.intermediate_size, dtype=self.dtype, param_dtype=self.dtype, name="fc1")(x)
        h = _ACTIVATIONS[cfg.hidden_act](h)
        return nn.Dense(cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype, name="fc2")(h)


def _layer_norm(cfg: CLIPTextEncoderConfig, dtype: Dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance like torch, not E[x^2]-E[x]^2: keeps float32 parity at 1e-6.
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=dtype, use_fast_variance=False, name=name
    )


class CLIPEncoderLayer(nn.Module):
    """Pre-LN residual block."""

    config: CLIPTextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, allowed: jax.Array) -> jax.Array:
        cfg, dtype = self.config, self.dtype
        x = x + CLIPAttention(cfg, dtype, name="self_attn")(_layer_norm(cfg, dtype, "layer_norm1")(x), allowed)
        return x + CLIPMLP(cfg, dtype, name="mlp")(_layer_norm(cfg, dtype, "layer_norm2")(x))


class CLIPTextEncoder(nn.Module):
    """``apply({"params": p}, ids [B, L], attention_mask [B, L] | None) -> (hidden [B, L, D], pooled [B, D'])``.

    ``pooled`` is the final-LayerNorm state at the EOS token, projected when the checkpoint has a
    ``text_projection`` (D' = projection_dim) and raw otherwise (D' = hidden_size).
    """

    config: CLIPTextEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(
        self, input_ids: jax.Array, attention_mask: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        chex.assert_rank(input_ids, 2)
        batch, length = input_ids.shape
        if length > cfg.max_position_embeddings:
            raise ValueError(
                f"sequence length {length} exceeds max_position_embeddings={cfg.max_position_embeddings}; "
                "tokenize with a smaller max_length"
            )
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        chex.assert_equal_shape([input_ids, attention_mask])

        embed = partial(nn.Embed, features=cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype)
        x = embed(cfg.vocab_size, name="token_embedding")(input_ids)
        x = x + embed(cfg.max_position_embeddings, name="position_embedding")(jnp.arange(length))[None]

        causal = jnp.tril(jnp.ones((length, length), bool))
        allowed = causal[None] & attention_mask.astype(bool)[:, None, :]  # [B, q, k]
        for i in range(cfg.num_hidden_layers):
            x = CLIPEncoderLayer(cfg, self.dtype, name=f"layers_{i}")(x, allowed)
        x = _layer_norm(cfg, self.dtype, "final_layer_norm")(x)

        if cfg.eos_token_id == 2:
            # Legacy configs (before transformers PR #24773): EOS is the largest id in the sequence.
            eos_position = jnp.argmax(input_ids, axis=-1)
        else:
            # First EOS (padding may reuse the EOS id, so not the last one).
            eos_position = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = x[jnp.arange(batch), eos_position]
        if cfg.projection_dim is not None:
            projection = nn.Dense(
                cfg.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=self.dtype, name="text_projection"
            )
            pooled = projection(pooled)

        chex.assert_shape(x, (batch, length, cfg.hidden_size))
        chex.assert_shape(pooled, (batch, cfg.projection_dim or cfg.hidden_size))
        return x, pooled
