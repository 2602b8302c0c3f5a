"""Text-to-image sampling with a trained UNet: prompts -> uint8 images.

One `Sampler` compiles one program per (batch size, steps) and reuses it; the guidance
scale, seed, prompts and weights are runtime arguments, so sweeping them does not
recompile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ediff_jax import edm, experts, parallel, sr
from ediff_jax.images import make_grid, save_png, to_uint8
from ediff_jax.spec import Guidance, per_expert_guidance
from ediff_jax.text.conditioning import TextEncoders, select_encoders, unconditional


def make_model_fn(model: nn.Module, params: Any, sigma_data: float,
                  boundaries: Any = None) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
    """D(x; sigma, cond) for the EDM samplers and `edm.guided_denoiser`.

    With `boundaries`, `params` are stacked experts and each call runs the one expert
    whose sigma interval holds sigma (`experts.ensemble_denoiser`).
    """

    def single(p: Any) -> Callable[[jax.Array, jax.Array, Any], jax.Array]:
        denoise = edm.denoiser_from_network(lambda xs, c_noise, cond: model.apply({"params": p}, xs, c_noise, cond),
                                            sigma_data)
        if not getattr(model, "lowres_residual", False):
            return denoise
        # SR residual stages: up(lowres) + D(x - up), lowres from each call's cond (crops included)
        return lambda x, sigma, cond: sr.residual_denoiser(denoise, cond["lowres"])(x, sigma, cond)

    if boundaries is None:
        return single(params)
    return experts.ensemble_denoiser(lambda p, x, sigma, cond: single(p)(x, sigma, cond), params, boundaries)


class Sampler:
    """Text-to-image (or, for an SR stage, text + low-res image to image) sampling.

    `image_size` is an int (square) or (height, width): an SR stage is fully
    convolutional, so it can run on a canvas of another shape (a panorama), given a
    low-res input `lowres_factor` times smaller. With a `mesh`, the batch is spread over
    its data axes (params must then live on that mesh, as `load_workdir` places them).
    """

    def __init__(
        self,
        model: nn.Module,
        encoders: TextEncoders,
        *,
        image_size: int | tuple[int, int],
        steps: int = 32,
        sampler: str = "heun",
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        progress: bool = False,
        boundaries: Any = None,
        lowres_factor: int = 1,
        mesh: Any = None,
    ):
        edm.check_sampler(sampler, steps)
        height, width = (image_size, image_size) if isinstance(image_size, (int, np.integer)) else image_size
        self.model, self.encoders, self.image_size = model, encoders, image_size
        self.height, self.width = int(height), int(width)
        self.sigma_data = sigma_data
        self.is_sr = bool(getattr(model, "lowres_cond", False))
        self.lowres_factor = int(lowres_factor)
        self.mesh = mesh
        if self.is_sr and self.lowres_factor < 2:
            raise ValueError("An SR stage needs lowres_factor >= 2 (image size / low-res size).")
        self.sigmas = edm.karras_sigmas(steps, sigma_min, sigma_max)
        self.num_experts = experts.ensemble_size(boundaries)
        sample_fn = edm.SAMPLERS[sampler]

        def run(params: Any, enc_params: Any, tokens: Any, extra_cond: Any, rng: jax.Array, guidance: jax.Array,
                use_t5: bool, use_clip: bool) -> jax.Array:
            cond = {**select_encoders(encoders.encode(enc_params, tokens), use_t5, use_clip), **extra_cond}
            if "lowres" in cond:  # noise-conditioning augmentation at the chosen level
                cond["lowres"] = sr.noise_lowres(jax.random.fold_in(rng, 2), cond["lowres"], cond["aug_level"])
            model_fn = make_model_fn(model, params, sigma_data, boundaries)
            denoise = edm.guided_denoiser(model_fn, cond, unconditional(cond),
                                          experts.guidance_by_expert(guidance, boundaries))
            batch = tokens["t5_ids"].shape[0]
            x = sr.initial_state(rng, (batch, self.height, self.width, 3), self.sigmas[0], cond.get("lowres"),
                                 bool(getattr(model, "lowres_residual", False)))
            return sample_fn(denoise, x, self.sigmas, progress=progress)

        self._run = jax.jit(run, static_argnames=("use_t5", "use_clip"))

    def __call__(self, params: Any, prompts: Sequence[str], *, guidance: Guidance = 3.0, seed: int = 0,
                 use_t5: bool = True, use_clip: bool = True, extra_cond: dict | None = None,
                 lowres: Any = None, aug_level: float = 0.0) -> np.ndarray:
        """Samples one image per prompt; returns uint8 [N, H, W, 3].

        `extra_cond` holds further conditioning arrays with leading batch axis N (e.g.
        paint-with-words masks); they are runtime inputs, so new values do not recompile.
        `unconditional()` decides what the guidance branch sees of them. An SR stage
        takes `lowres` (uint8 or [-1, 1] floats, [N, H/f, W/f, 3]) and the
        noise-augmentation level `aug_level` (0: the input as it is). `guidance` is one scale or
        one per expert (highest noise first).
        """
        guidance = per_expert_guidance(guidance, self.num_experts, "guidance")
        prompts = list(prompts)
        extra = dict(extra_cond or {})
        if self.is_sr:
            if lowres is None:
                raise ValueError("This is a super-resolution stage: pass `lowres`, the previous stage's images.")
            sr.check_lowres_shape(lowres, len(prompts), self.height, self.width, self.lowres_factor)
            if aug_level < 0:
                raise ValueError(f"aug_level={aug_level} must be >= 0 (the std of the noise added to the low-res input).")
            extra["lowres"] = sr.lowres_to_model(lowres)
            extra["aug_level"] = np.full((len(prompts),), aug_level, np.float32)
        elif lowres is not None:
            raise ValueError("`lowres` was given, but this model is a base (text-to-image) model, not an SR stage.")
        tokens = self.encoders.tokenize(prompts)
        if self.mesh is not None and len(prompts) % parallel.data_parallel_size(self.mesh) == 0:
            tokens, extra = parallel.shard_batch((tokens, extra), self.mesh)
        images = self._run(params, self.encoders.params, tokens, extra, jax.random.PRNGKey(seed),
                           jnp.asarray(guidance, jnp.float32), use_t5=use_t5, use_clip=use_clip)
        return to_uint8(jax.device_get(images))


def write_samples(images: np.ndarray, out: Path, num: int, prompt_lines: Sequence[str], cols: int | None = None) -> None:
    """One PNG per image (named prompt_sample), `grid.png` and `prompts.txt`."""
    upscale = max(1, 128 // images.shape[1])
    for i, img in enumerate(images):
        save_png(img, out / f"{i // num:02d}_{i % num:02d}.png", upscale=upscale)
    save_png(make_grid(images, cols=cols or num), out / "grid.png", upscale=upscale)
    (out / "prompts.txt").write_text("\n".join(prompt_lines) + "\n")
