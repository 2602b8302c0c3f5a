"""Super-resolution stages: the config checks and the low-res input math.

An SR stage is the same UNet with `lowres_cond=True`: it sees the low-res image
(upsampled and concatenated to its input) and the noise-augmentation level. The pieces
here are pure functions shared by training, sampling and the cascade:

- noise-conditioning augmentation (Imagen / eDiff-I): training corrupts the low-res
  input with Gaussian noise of a random std and tells the model that std, so at sampling
  time a small chosen level hides the previous stage's artefacts;
- the geometry checks that make stages chain (64 -> 256 -> 1024), done at the boundary.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

DEGRADATION_PRESETS = ("none", "realesrgan")


def is_sr(config: Any) -> bool:
    """Whether a config describes an SR stage (`config.sr.lowres_size > 0`)."""
    return int(config.sr.lowres_size) > 0


def scale_factor(config: Any) -> int:
    """Upsampling factor image_size / lowres_size of an SR stage (1 for a base model)."""
    if not is_sr(config):
        return 1
    return int(config.data.image_size) // int(config.sr.lowres_size)


def train_size(config: Any) -> int:
    """Side of the training images: the crop for stages trained on crops, else image_size."""
    crop = int(config.sr.crop_size)
    return crop if crop else int(config.data.image_size)


def lowres_train_size(config: Any) -> int:
    """Side of the low-res training input (the crop's low-res counterpart)."""
    return train_size(config) // scale_factor(config)


def check_sr_config(config: Any) -> None:
    """Clear errors for SR settings that cannot work, before anything is built."""
    size, low, crop = int(config.data.image_size), int(config.sr.lowres_size), int(config.sr.crop_size)
    if low < 0 or crop < 0:
        raise ValueError(f"config.sr.lowres_size={low} and config.sr.crop_size={crop} must be >= 0.")
    if crop and config.model.get("coord_input", False):
        raise ValueError(f"config.model.coord_input=True with config.sr.crop_size={crop}: the stage would learn "
                         "coordinates of crops and sample whole images with other ones; set one of them off.")
    if not low:
        if crop:
            raise ValueError(f"config.sr.crop_size={crop} is set but config.sr.lowres_size=0 (a base model); crops "
                             "are for SR stages: set sr.lowres_size or crop_size=0.")
        return
    if low >= size or size % low:
        raise ValueError(f"config.sr.lowres_size={low} must divide config.data.image_size={size} and be smaller "
                         "(an SR stage upsamples by an integer factor, e.g. 64 -> 256).")
    factor = size // low
    if crop and (crop > size or crop % factor):
        raise ValueError(f"config.sr.crop_size={crop} must be <= image_size={size} and a multiple of the "
                         f"upsampling factor {factor}, so that its low-res crop has whole pixels.")
    if str(config.sr.degradation) not in DEGRADATION_PRESETS:
        raise ValueError(f"config.sr.degradation={config.sr.degradation!r}; choose one of {DEGRADATION_PRESETS}.")
    for key in ("aug_max", "aug_level"):
        if float(config.sr[key]) < 0:
            raise ValueError(f"config.sr.{key}={config.sr[key]} must be >= 0 (a noise std).")


def is_residual(config: Any) -> bool:
    """Whether an SR stage denoises the residual over bicubic upsampling (`config.sr.residual`)."""
    residual = bool(config.sr.get("residual", False))
    if residual and not is_sr(config):
        raise ValueError("config.sr.residual=True needs an SR stage (config.sr.lowres_size > 0): a base model "
                         "has no low-res input to take the residual over. Set sr.residual=False.")
    return residual


def upsample_lowres(lowres: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Bicubic upsampling of low-res inputs [B, h, w, C] to `shape` [B, H, W, C]."""
    return jax.image.resize(lowres.astype(jnp.float32), shape, method="cubic").astype(lowres.dtype)


def initial_state(rng: jax.Array, shape: tuple[int, ...], sigma: Any, lowres: jax.Array | None,
                  residual: bool) -> jax.Array:
    """The sampler's start at noise level `sigma`: sigma * N(0, I), plus bicubic(lowres) for a residual stage.

    Why: a residual stage diffuses r = x - bicubic(lowres), so its prior at sigma is
    r ~ N(0, sigma^2), i.e. x ~ bicubic + sigma * N(0, I). At sigma = 80 the shift is
    invisible; a sampler started at a low sigma (a one-step posterior mean at sigma = 3)
    would otherwise feed the network -bicubic as its residual.
    """
    x = sigma * jax.random.normal(rng, shape)
    return x + upsample_lowres(lowres, shape) if residual else x


def residual_denoiser(denoise: Any, lowres: jax.Array) -> Any:
    """D'(x; sigma, ...) = up + D(x - up; sigma, ...), up = bicubic(lowres) at x's size.

    Why: EDM's D then denoises only the detail bicubic upsampling misses; trained with the
    EDM loss on images, ||D'(x) - x0|| = ||D(r + sigma n) - r|| with r = x0 - up, i.e. the
    plain EDM loss on residuals. `lowres` is the (noise-augmented) input the model sees.
    """

    def wrapped(x: jax.Array, sigma: Any, *args: Any, **kwargs: Any) -> jax.Array:
        up = upsample_lowres(lowres, x.shape)
        return up + denoise(x - up, sigma, *args, **kwargs)

    return wrapped


def degradation_config(config: Any) -> Mapping[str, Any] | None:
    """The degradation mapping the input pipeline takes for `config.sr.degradation`."""
    if str(config.sr.degradation) == "none":
        return None
    from ediff_jax.data.degradations import DEFAULT_DEGRADATION

    return dict(DEFAULT_DEGRADATION)


def augment_lowres(rng: jax.Array, lowres: jax.Array, aug_max: float) -> tuple[jax.Array, jax.Array]:
    """Training-time noise-conditioning augmentation: per example std ~ U[0, aug_max].

    Returns (noisy low-res input, the std per example [B]) -- the model embeds the std.
    """
    r_level, r_noise = jax.random.split(rng)
    level = jax.random.uniform(r_level, (lowres.shape[0],), jnp.float32, 0.0, aug_max)
    return noise_lowres(r_noise, lowres, level), level


def noise_lowres(rng: jax.Array, lowres: jax.Array, level: jax.Array) -> jax.Array:
    """lowres + level * N(0, I), per example; level 0 leaves the input exactly unchanged."""
    noise = jax.random.normal(rng, lowres.shape, lowres.dtype)
    return lowres + level.astype(lowres.dtype)[:, None, None, None] * noise


def lowres_to_model(images: Any) -> np.ndarray:
    """uint8 [N, h, w, 3] (a previous stage's output) or float in [-1, 1] -> float32 in [-1, 1]."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"Low-res images must be [N, h, w, 3]; got shape {arr.shape}.")
    if arr.dtype == np.uint8:
        return arr.astype(np.float32) / 127.5 - 1.0
    return arr.astype(np.float32)


def check_lowres_shape(lowres: Any, batch: int, height: int, width: int, factor: int) -> None:
    """The low-res input must be the output size divided by the stage's factor."""
    want = (batch, height // factor, width // factor, 3)
    if tuple(np.shape(lowres)) != want:
        raise ValueError(
            f"This SR stage upsamples x{factor} to {height}x{width}, so it needs low-res images of shape {want}; "
            f"got {tuple(np.shape(lowres))}. Resize the input or use the stage that matches its size."
        )
