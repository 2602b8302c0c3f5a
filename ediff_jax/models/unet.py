"""ADM-style conditional UNet (eDiff-I's base and super-resolution backbone).

Conditioning, as in eDiff-I:
- c_noise (= log(sigma)/4) through a Fourier embedding and an MLP;
- pooled CLIP text embedding added to that time embedding;
- cross-attention over [T5 tokens ; CLIP tokens ; learned null token], each encoder
  projected to `context_dim`. The null token is always attendable, so a prompt with
  both encoders dropped (classifier-free guidance) still has a valid attention target;
- for super-resolution: a low-resolution image upsampled and concatenated to the input,
  plus an embedding of its noise-augmentation level;
- optionally (`coord_input`) each pixel's (y, x) as two more input channels, so that
  region words and relations can be tied to places on the canvas;
- paint-with-words (optional cond keys `pww_mask` [B, H, W, L] and `pww_weight` [B], see
  `ediff_jax.paint_with_words`): every cross-attention layer adds
  w' log(1 + sigma) max(QK^T) A to its logits, A being the mask pooled to that layer's
  resolution. Without those keys the network is exactly the plain one (no parameters).

The network is F in D(x; sigma) = c_skip x + c_out F(c_in x; c_noise): EDM's
preconditioning lives in `ediff_jax.edm`, not here.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from ediff_jax.models.layers import (
    BiasFn,
    CrossAttentionBlock,
    Downsample,
    ResBlock,
    SelfAttentionBlock,
    Upsample,
    coordinate_channels,
    fourier_embedding,
    group_norm,
    zeros_init,
)
from ediff_jax.models.pww_bias import MODES as PWW_MODES
from ediff_jax.models.pww_bias import pool_masks, pww_bias

Conditioning = Mapping[str, jax.Array]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(name: str | Any) -> Any:
    if isinstance(name, str):
        if name not in DTYPES:
            raise ValueError(f"Unknown compute dtype {name!r}; use one of {sorted(DTYPES)}.")
        return DTYPES[name]
    return name


class UNet(nn.Module):
    """Text-conditional UNet on NHWC images.

    Attributes:
      channels: base width; level i has channels * channel_mult[i].
      num_res_blocks: an int, or one int per level (Imagen's efficient UNet puts more
        blocks at low resolution and fewer at high).
      attn_resolutions / cross_attn_resolutions: feature-map sizes (in pixels) that get
        self-attention / cross-attention.
      attn_levels / cross_attn_levels: the same by level index (0 = full resolution).
        A stage trained on crops and run on whole images (eDiff-I's 1024 stage: 256 crops,
        1024 inference) must place attention by level, since its feature maps change size.
      mid_self_attn: self-attention in the middle block; the 1024 SR stage has none.
      lowres_cond: if True, `lowres` and `aug_level` must be given (SR stages), as keyword
        arguments or as cond["lowres"] / cond["aug_level"] (which is how the samplers,
        guidance and MultiDiffusion pass them along with the text).
      lowres_residual: SR stages only: the network denoises x - bicubic(lowres) and the
        samplers and the loss add bicubic(lowres) back (`sr.residual_denoiser`); the
        network itself is unchanged, the flag says how its output is read.
      pww_mode: paint-with-words statistic of QK^T scaling the bias, "max" (eDiff-I) or "std".
      coord_input: append each pixel's (y, x) in (-1, 1) to the input (`coordinate_channels`).
        The coordinates span whatever the network is given: a MultiDiffusion crop is its own
        canvas. Not for stages trained on crops and run on whole images (refused in config).
    """

    out_channels: int = 3
    channels: int = 64
    channel_mult: Sequence[int] = (1, 2, 2)
    num_res_blocks: int | Sequence[int] = 2
    attn_resolutions: Sequence[int] = (16, 8)
    cross_attn_resolutions: Sequence[int] = (16, 8)
    attn_levels: Sequence[int] = ()
    cross_attn_levels: Sequence[int] = ()
    mid_self_attn: bool = True
    num_heads: int = 4
    context_dim: int = 128
    emb_mult: int = 4
    dropout: float = 0.0
    dtype: Any = "float32"
    remat: bool = False
    lowres_cond: bool = False
    lowres_residual: bool = False
    pww_mode: str = "max"
    coord_input: bool = False

    def _blocks_per_level(self) -> list[int]:
        if isinstance(self.num_res_blocks, int):
            return [self.num_res_blocks] * len(self.channel_mult)
        blocks = list(self.num_res_blocks)
        if len(blocks) != len(self.channel_mult):
            raise ValueError(
                f"num_res_blocks has {len(blocks)} entries but channel_mult has {len(self.channel_mult)}; "
                "give one count per level or a single int."
            )
        return blocks

    def _context(self, cond: Conditioning, batch: int) -> tuple[jax.Array | None, jax.Array | None]:
        """Projects the encoders' tokens into one context sequence: [T5 ; CLIP ; null]."""
        tokens, masks = [], []
        for name in ("t5", "clip"):
            if name in cond:
                chex.assert_rank(cond[name], 3)
                tokens.append(nn.Dense(self.context_dim, dtype=self.compute_dtype, name=f"{name}_proj")(cond[name]))
                masks.append(cond[f"{name}_mask"].astype(jnp.float32))
        null = self.param("null_token", nn.initializers.normal(0.02), (1, 1, self.context_dim))
        tokens.append(jnp.broadcast_to(null, (batch, 1, self.context_dim)).astype(self.compute_dtype))
        masks.append(jnp.ones((batch, 1), jnp.float32))
        context = nn.LayerNorm(dtype=jnp.float32, name="context_norm")(jnp.concatenate(tokens, axis=1))
        return context, jnp.concatenate(masks, axis=1)

    def _paint_with_words(
        self, cond: Conditioning, c_noise: jax.Array, context_mask: jax.Array
    ) -> Callable[[int, int], BiasFn] | None:
        """Per cross-attention resolution (h, w), the paint-with-words bias_fn; None when unused.

        sigma = exp(4 c_noise) per example (c_noise = log(sigma)/4, EDM). The statistic
        max(QK^T) is per example, over valid (unmasked) keys only.
        """
        if "pww_mask" not in cond and "pww_weight" not in cond:
            return None
        if "pww_mask" not in cond or "pww_weight" not in cond:
            raise ValueError(
                "Paint-with-words needs both `pww_mask` and `pww_weight` in cond; build them with "
                "ediff_jax.paint_with_words.pww_cond."
            )
        if self.pww_mode not in PWW_MODES:
            raise ValueError(f"Unknown pww_mode {self.pww_mode!r}; choose one of {PWW_MODES}.")
        batch, length = context_mask.shape
        masks = jnp.asarray(cond["pww_mask"], jnp.float32)
        weight = jnp.asarray(cond["pww_weight"], jnp.float32)
        if masks.ndim != 4 or masks.shape[0] != batch or masks.shape[-1] != length:
            raise ValueError(
                f"pww_mask has shape {masks.shape}; expected [B={batch}, H, W, L={length}], L being the context "
                "length (T5 max length + CLIP max length + 1 null token). Build it with "
                "ediff_jax.paint_with_words.pww_cond from the model's own TextEncoders."
            )
        if weight.shape != (batch,):
            raise ValueError(f"pww_weight has shape {weight.shape}; expected [B={batch}] (one w' per example).")
        sigma = jnp.exp(4.0 * c_noise.astype(jnp.float32))
        valid = context_mask[:, None, None, :] > 0

        def at(h: int, w: int) -> BiasFn:
            a = pool_masks(masks, (h, w)).reshape(batch, 1, h * w, length)
            return functools.partial(pww_bias, token_masks=a, sigma=sigma, w_prime=weight, mode=self.pww_mode,
                                     valid=valid, batch_dims=1)

        return at

    @property
    def compute_dtype(self) -> Any:
        return resolve_dtype(self.dtype)

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        c_noise: jax.Array,
        cond: Conditioning,
        *,
        lowres: jax.Array | None = None,
        aug_level: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        batch, height, width, _ = x.shape
        chex.assert_shape(c_noise, (batch,))
        dtype = self.compute_dtype
        emb_dim = self.channels * self.emb_mult

        emb = fourier_embedding(c_noise, self.channels)
        emb = nn.Dense(emb_dim, dtype=dtype, name="time_mlp_0")(emb)
        emb = nn.Dense(emb_dim, dtype=dtype, name="time_mlp_1")(nn.silu(emb))
        if "clip_pooled" in cond:
            emb = emb + nn.Dense(emb_dim, dtype=dtype, name="pooled_proj")(cond["clip_pooled"])

        lowres = cond.get("lowres") if lowres is None else lowres
        aug_level = cond.get("aug_level") if aug_level is None else aug_level
        if self.lowres_cond:
            if lowres is None or aug_level is None:
                raise ValueError("This UNet is a super-resolution stage: pass `lowres` and `aug_level` "
                                 "(keyword arguments or cond keys).")
            chex.assert_rank(lowres, 4)
            chex.assert_shape(aug_level, (batch,))
            up = jax.image.resize(lowres, (batch, height, width, lowres.shape[-1]), method="bilinear")
            x = jnp.concatenate([x, up.astype(x.dtype)], axis=-1)
            aug = nn.Dense(emb_dim, dtype=dtype, name="aug_mlp_0")(fourier_embedding(aug_level, self.channels))
            emb = emb + nn.Dense(emb_dim, dtype=dtype, name="aug_mlp_1")(nn.silu(aug))
        elif lowres is not None:
            raise ValueError("`lowres` was given to a base (non-SR) UNet; set lowres_cond=True for SR stages.")

        if self.coord_input:
            x = jnp.concatenate([x, coordinate_channels(batch, height, width, x.dtype)], axis=-1)

        context, context_mask = self._context(cond, batch)
        pww = self._paint_with_words(cond, c_noise, context_mask)
        res_block = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock

        def attend(h: jax.Array, prefix: str, level: int) -> jax.Array:
            res = h.shape[1]
            if res in self.attn_resolutions or level in self.attn_levels:
                h = SelfAttentionBlock(self.num_heads, dtype=dtype, name=f"{prefix}_self_attn")(h)
            if res in self.cross_attn_resolutions or level in self.cross_attn_levels:
                h = CrossAttentionBlock(self.num_heads, dtype=dtype, name=f"{prefix}_cross_attn")(
                    h, context, context_mask, bias_fn=pww(h.shape[1], h.shape[2]) if pww else None
                )
            return h

        blocks = self._blocks_per_level()
        h = nn.Conv(self.channels, (3, 3), dtype=dtype, name="conv_in")(x.astype(dtype))
        skips = [h]
        for level, mult in enumerate(self.channel_mult):
            for i in range(blocks[level]):
                h = res_block(self.channels * mult, self.dropout, dtype, name=f"down_{level}_{i}")(h, emb, train)
                h = attend(h, f"down_{level}_{i}", level)
                skips.append(h)
            if level != len(self.channel_mult) - 1:
                h = Downsample(dtype=dtype, name=f"downsample_{level}")(h)
                skips.append(h)

        mid_channels = self.channels * self.channel_mult[-1]
        h = res_block(mid_channels, self.dropout, dtype, name="mid_0")(h, emb, train)
        if self.mid_self_attn:
            h = SelfAttentionBlock(self.num_heads, dtype=dtype, name="mid_self_attn")(h)
        h = CrossAttentionBlock(self.num_heads, dtype=dtype, name="mid_cross_attn")(
            h, context, context_mask, bias_fn=pww(h.shape[1], h.shape[2]) if pww else None
        )
        h = res_block(mid_channels, self.dropout, dtype, name="mid_1")(h, emb, train)

        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(blocks[level] + 1):
                h = jnp.concatenate([h, skips.pop()], axis=-1)
                h = res_block(self.channels * mult, self.dropout, dtype, name=f"up_{level}_{i}")(h, emb, train)
                h = attend(h, f"up_{level}_{i}", level)
            if level != 0:
                h = Upsample(dtype=dtype, name=f"upsample_{level}")(h)

        h = nn.silu(group_norm(h.shape[-1], name="norm_out")(h))
        out = nn.Conv(self.out_channels, (3, 3), dtype=dtype, kernel_init=zeros_init(), name="conv_out")(h)
        out = out.astype(jnp.float32)
        chex.assert_shape(out, (batch, height, width, self.out_channels))
        return out
