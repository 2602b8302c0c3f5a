"""Random blur and noise, the typical defects of generated images, as training negatives.

Why: a network trained only to name colours, shapes and regions learns to *ignore* blur and
noise (its labels do not change), so Fréchet distances in its feature space barely move when a
generator's samples are soft or grainy. Teaching it to also tell rendered images from degraded
copies makes its features encode image quality, which is what FD/KID are meant to measure.
Everything is jittable JAX so the training step degrades its own batch on the fly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

BLUR_SIGMA_RANGE = (0.5, 1.5)  # pixels at the network's 32 px input
NOISE_SIGMA_RANGE = (3.0, 15.0)  # uint8 levels
_TAPS = 7  # blur kernel width: covers +-2 sigma for the largest sigma


def gaussian_blur(images: jax.Array, sigma: jax.Array) -> jax.Array:
    """Separable Gaussian blur of float images [B, H, W, C] with one ``sigma`` [B] per image
    (edge pixels replicated, so the light background does not darken at the border)."""
    half = _TAPS // 2
    offsets = jnp.arange(_TAPS, dtype=jnp.float32) - half
    kernels = jnp.exp(-0.5 * (offsets[None] / sigma[:, None]) ** 2)
    kernels = kernels / kernels.sum(axis=1, keepdims=True)  # [B, taps]
    height, width = images.shape[1:3]
    padded = jnp.pad(images, ((0, 0), (half, half), (half, half), (0, 0)), mode="edge")
    rows = sum(kernels[:, t, None, None, None] * padded[:, t : t + height] for t in range(_TAPS))
    return sum(kernels[:, t, None, None, None] * rows[:, :, t : t + width] for t in range(_TAPS))


def degrade_batch(key: jax.Array, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """About half of the uint8 images [B, H, W, C], at random, blurred, noised or both (1/3 each,
    random strengths), rounded back to uint8 like a sampler's output; returns the batch and
    ``is_clean`` [B] (True where an image was left untouched)."""
    batch = images.shape[0]
    k_clean, k_kind, k_blur, k_noise_sigma, k_noise = jax.random.split(key, 5)
    is_clean = jax.random.bernoulli(k_clean, 0.5, (batch,))
    kind = jax.random.randint(k_kind, (batch,), 0, 3)  # 0 blur, 1 noise, 2 both
    blur_sigma = jax.random.uniform(k_blur, (batch,), minval=BLUR_SIGMA_RANGE[0], maxval=BLUR_SIGMA_RANGE[1])
    noise_sigma = jax.random.uniform(
        k_noise_sigma, (batch,), minval=NOISE_SIGMA_RANGE[0], maxval=NOISE_SIGMA_RANGE[1]
    )
    x = images.astype(jnp.float32)
    blurred = gaussian_blur(x, blur_sigma)
    x = jnp.where(((kind != 1) & ~is_clean)[:, None, None, None], blurred, x)
    noise = noise_sigma[:, None, None, None] * jax.random.normal(k_noise, x.shape)
    x = jnp.where(((kind != 0) & ~is_clean)[:, None, None, None], x + noise, x)
    degraded = jnp.clip(jnp.round(x), 0, 255).astype(jnp.uint8)
    return jnp.where(is_clean[:, None, None, None], images, degraded), is_clean
