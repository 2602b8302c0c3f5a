"""Flax CLIP *vision* tower matching Hugging Face's PyTorch ``CLIPVisionModel(WithProjection)``.

Needed for CLIP score (transformers 5 has no Flax CLIP). Follows
``transformers/models/clip/modeling_clip.py``: a bias-free patch convolution, a learned class
token, learned absolute position embeddings, a LayerNorm *before* the encoder (HF spells it
``pre_layrnorm``), pre-LN encoder layers without a mask, ``post_layernorm`` on the class token
and an optional bias-free ``visual_projection``. The encoder layers are the text tower's own
(``ediff_jax.text.clip.CLIPEncoderLayer``): the math is identical, so it is tested once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from ediff_jax.text.clip import CLIPEncoderLayer, CLIPTextEncoderConfig

Dtype = Any


@dataclasses.dataclass(frozen=True)
class CLIPVisionEncoderConfig:
    """The fields of HF ``CLIPVisionConfig`` the forward pass needs (defaults are HF's)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # None: no visual_projection; pooled output is hidden_size wide

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size={self.image_size} is not divisible by patch_size={self.patch_size}"
            )
        self.layer_config()  # validates hidden_act and the head split with the text tower's rules

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1

    def layer_config(self) -> CLIPTextEncoderConfig:
        """The same widths in the config type the shared encoder layer reads."""
        return CLIPTextEncoderConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            hidden_act=self.hidden_act,
            layer_norm_eps=self.layer_norm_eps,
        )

    @classmethod
    def from_hf_dict(
        cls, vision_config: Mapping[str, Any], projection_dim: int | None
    ) -> CLIPVisionEncoderConfig:
        """From a ``clip_vision_model`` config dict; ``projection_dim`` is decided by the weights."""
        names = {f.name for f in dataclasses.fields(cls)} - {"projection_dim"}
        kwargs = {k: vision_config[k] for k in names if k in vision_config}
        return cls(**kwargs, projection_dim=projection_dim)


class CLIPPatchEmbedding(nn.Module):
    """Non-overlapping patch convolution without bias.

    The kernel is kept in PyTorch's ``[out, in, kh, kw]`` layout (param ``weight``) so that
    checkpoints load without a layout shuffle; a generic 2-D ``.T`` would swap kh and kw.
    """

    config: CLIPVisionEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        shape = (cfg.hidden_size, cfg.num_channels, cfg.patch_size, cfg.patch_size)
        init = nn.initializers.lecun_normal(in_axis=(1, 2, 3), out_axis=0)
        weight = self.param("weight", init, shape, self.dtype)
        return jax.lax.conv_general_dilated(
            pixel_values.astype(self.dtype),
            weight,
            window_strides=(cfg.patch_size, cfg.patch_size),
            padding="VALID",
            dimension_numbers=("NHWC", "OIHW", "NHWC"),
        )


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        cfg = self.config
        patches = CLIPPatchEmbedding(cfg, self.dtype, name="patch_embedding")(pixel_values)
        batch = patches.shape[0]
        patches = patches.reshape(batch, -1, cfg.hidden_size)
        class_embedding = self.param(
            "class_embedding", nn.initializers.normal(1.0), (cfg.hidden_size,), self.dtype
        )
        class_tokens = jnp.broadcast_to(class_embedding, (batch, 1, cfg.hidden_size))
        x = jnp.concatenate([class_tokens, patches], axis=1)
        position_embedding = nn.Embed(
            cfg.num_positions, cfg.hidden_size, dtype=self.dtype, param_dtype=self.dtype,
            name="position_embedding",
        )
        positions = position_embedding(jnp.arange(cfg.num_positions))
        return x + positions[None]


def _layer_norm(cfg: CLIPVisionEncoderConfig, dtype: Dtype, name: str) -> nn.LayerNorm:
    # Two-pass variance like torch (see ediff_jax.text.clip).
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=dtype, use_fast_variance=False, name=name
    )


class CLIPVisionEncoder(nn.Module):
    """``apply({"params": p}, pixel_values [B, S, S, C]) -> (hidden [B, 1 + P, D], pooled [B, D'])``.

    ``pixel_values`` are CLIP-normalised, channels last (``clip_preprocess`` makes them).
    ``pooled`` is the post-LayerNorm class token, projected when the checkpoint has a
    ``visual_projection`` (D' = projection_dim) and raw otherwise (D' = hidden_size).
    """

    config: CLIPVisionEncoderConfig
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> tuple[jax.Array, jax.Array]:
        cfg = self.config
        chex.assert_rank(pixel_values, 4)
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must be [B, {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}] "
                f"(channels last), got {pixel_values.shape}; preprocess images with clip_preprocess"
            )
        x = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values)
        x = _layer_norm(cfg, self.dtype, "pre_layrnorm")(x)
        batch, length = x.shape[:2]
        everything = jnp.ones((batch, length, length), bool)  # vision attention is unmasked
        layer_config = cfg.layer_config()
        for i in range(cfg.num_hidden_layers):
            x = CLIPEncoderLayer(layer_config, self.dtype, name=f"layers_{i}")(x, everything)
        pooled = _layer_norm(cfg, self.dtype, "post_layernorm")(x[:, 0])
        if cfg.projection_dim is not None:
            projection = nn.Dense(
                cfg.projection_dim, use_bias=False, dtype=self.dtype, param_dtype=self.dtype,
                name="visual_projection",
            )
            pooled = projection(pooled)
        chex.assert_shape(x, (batch, cfg.num_positions, cfg.hidden_size))
        chex.assert_shape(pooled, (batch, cfg.projection_dim or cfg.hidden_size))
        return x, pooled
