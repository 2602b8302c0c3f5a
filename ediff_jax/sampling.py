"""Text-to-image sampling with a trained UNet: prompts -> uint8 images.

One `Sampler` compiles one program per (batch size, steps) and reuses it; the guidance
scale, seed, prompts and weights are runtime arguments, so sweeping them does not
recompile.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ediff_jax import edm
from ediff_jax.images import to_uint8
from ediff_jax.text.conditioning import TextEncoders, select_encoders, unconditional

SAMPLERS = {"heun": edm.heun_sample, "euler": edm.euler_sample}


def make_model_fn(model: nn.Module, params: Any, sigma_data: float) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
    """D(x; sigma, cond) for the EDM samplers and `edm.guided_denoiser`."""

    def net(xs: jax.Array, c_noise: jax.Array, cond: Any) -> jax.Array:
        return model.apply({"params": params}, xs, c_noise, cond)

    return edm.denoiser_from_network(net, sigma_data)


class Sampler:
    def __init__(
        self,
        model: nn.Module,
        encoders: TextEncoders,
        *,
        image_size: int,
        steps: int = 32,
        sampler: str = "heun",
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        progress: bool = False,
    ):
        if sampler not in SAMPLERS:
            raise ValueError(f"Unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}.")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}.")
        self.model, self.encoders, self.image_size = model, encoders, image_size
        self.sigma_data = sigma_data
        self.sigmas = edm.karras_sigmas(steps, sigma_min, sigma_max)
        sample_fn = SAMPLERS[sampler]

        def run(params: Any, enc_params: Any, tokens: Any, rng: jax.Array, guidance: jax.Array,
                use_t5: bool, use_clip: bool) -> jax.Array:
            cond = select_encoders(encoders.encode(enc_params, tokens), use_t5, use_clip)
            model_fn = make_model_fn(model, params, sigma_data)
            denoise = edm.guided_denoiser(model_fn, cond, unconditional(cond), guidance)
            batch = tokens["t5_ids"].shape[0]
            x = jax.random.normal(rng, (batch, image_size, image_size, 3)) * self.sigmas[0]
            return sample_fn(denoise, x, self.sigmas, progress=progress)

        self._run = jax.jit(run, static_argnames=("use_t5", "use_clip"))

    def __call__(self, params: Any, prompts: Sequence[str], *, guidance: float = 3.0, seed: int = 0,
                 use_t5: bool = True, use_clip: bool = True) -> np.ndarray:
        """Samples one image per prompt; returns uint8 [N, H, W, 3]."""
        tokens = self.encoders.tokenize(list(prompts))
        images = self._run(params, self.encoders.params, tokens, jax.random.PRNGKey(seed),
                           jnp.float32(guidance), use_t5=use_t5, use_clip=use_clip)
        return to_uint8(jax.device_get(images))
