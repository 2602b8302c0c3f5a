"""Text-to-image MultiDiffusion with a trained UNet: prompts (+ regions) -> canvas images.

The canvas counterpart of `ediff_jax.sampling.Sampler`: the same model function,
classifier-free guidance and EDM samplers, with the denoiser swapped for the tiled one.
One compiled program per (batch, number of regions); prompts, masks, guidance and seed are
runtime inputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from ediff_jax import edm, experts, sr
from ediff_jax import paint_with_words as pww
from ediff_jax.images import to_uint8
from ediff_jax.multidiffusion.coherence import Coherence, FeatureFn, coherence_sigma
from ediff_jax.multidiffusion.denoiser import check_chunk_size, tiled_denoiser
from ediff_jax.multidiffusion.regions import bootstrap_sigma, check_masks, region_view_denoiser
from ediff_jax.multidiffusion.strategies import check_strategy, evaluations_per_call
from ediff_jax.multidiffusion.views import Tiling, crop, wrap_canvas
from ediff_jax.sampling import make_model_fn
from ediff_jax.spec import Guidance, parse_region, per_expert_guidance  # noqa: F401  (parse_region: re-exported)
from ediff_jax.text.conditioning import TextEncoders, select_encoders, unconditional

Region = tuple[str, Any]  # (prompt, mask [H, W] in [0, 1] or a path to a PNG)
# Conditioning arrays laid out on the canvas ([rows, H, W, ...]): each crop's denoiser call gets
# its own crop of them. Paint-with-words masks are the one kind today.
CANVAS_COND_KEYS = ("pww_mask",)


def canvas_denoiser(model_fn: Any, cond: dict, tiling: Tiling, *, guidance: Any, region_masks: Any = None,
                    rng: Any = None, bootstrap_above: float = float("inf"), chunk_size: int | None = None,
                    strategy: str = "overlap", coherence: Coherence | None = None) -> Any:
    """D(x; sigma) on the canvas: classifier-free guidance of `model_fn(x, sigma, cond)` on every crop,
    fused by least squares, with region prompts when `region_masks` [K, H, W] are given.

    `cond` holds one row per canvas of the batch, or, with K regions, (K + 1) * B rows prompt-major
    (background first, as `region_denoiser` expects). Entries named in `CANVAS_COND_KEYS` lie on the
    canvas ([rows, H, W, ...]); each crop is conditioned on its own crop of them, so painting a
    region of the canvas conditions exactly the crops that overlap it. `rng` drives region
    bootstrapping (needed with regions) and the shifted strategy's offsets; `strategy` picks the
    crops and their weights (`strategies.py`); `coherence` adds SyncDiffusion's guidance (`coherence.py`).
    """
    canvas = {k: wrap_canvas(cond[k], tiling) for k in CANVAS_COND_KEYS if k in cond}

    def view_fn(xc: jax.Array, sigma: jax.Array, view: jax.Array) -> jax.Array:
        c = {**cond, **{k: crop(v, view, tiling) for k, v in canvas.items()}}
        return edm.guided_denoiser(model_fn, c, unconditional(c), guidance)(xc, sigma)

    if region_masks is not None and region_masks.shape[0]:
        return region_view_denoiser(view_fn, tiling, region_masks, rng=rng, bootstrap_above=bootstrap_above,
                                    chunk_size=chunk_size, strategy=strategy, coherence=coherence)
    return tiled_denoiser(view_fn, tiling, chunk_size=chunk_size, strategy=strategy, rng=rng, coherence=coherence)


def default_stride(window: int) -> int:
    """A quarter window: the paper's 8-latent stride for a 64-latent window."""
    return max(1, window // 4)


def sr_tiling(height: int, width: int, window: int, stride: int | None, circular: bool, factor: int) -> tuple[Tiling, Tiling]:
    """(canvas tiling, low-res tiling) of an SR stage: the same views, the low-res one f times smaller.

    Views must land on whole low-res pixels, so the canvas, window and stride are
    multiples of the factor; building the canvas tiling as `low.scaled(f)` makes the two
    agree view for view.
    """
    stride = default_stride(window) if stride is None else stride
    for name, value in (("height", height), ("width", width), ("window (the stage's image size)", window),
                        ("stride", stride)):
        if value % factor:
            raise ValueError(f"SR tiles: the canvas {name}={value} must be a multiple of the stage's upsampling "
                             f"factor {factor}, so every tile has a whole low-res crop.")
    low = Tiling(height // factor, width // factor, window // factor, stride // factor, circular)
    return low.scaled(factor), low


class MultiDiffusionSampler:
    """Samples canvases of height x width with a model trained at image_size x image_size.

    An SR stage (`lowres_factor` > 1, a UNet with `lowres_cond`) is tiled the same way:
    each tile sees its own crop of the low-res canvas, so a base panorama goes through
    the cascade as MultiDiffusion tiles at SR resolution.
    """

    def __init__(
        self,
        model: nn.Module,
        encoders: TextEncoders,
        *,
        image_size: int,
        height: int,
        width: int,
        stride: int | None = None,
        circular: bool = False,
        steps: int = 32,
        sampler: str = "heun",
        sigma_data: float = 0.5,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        chunk_size: int | None = None,
        bootstrap_fraction: float = 0.2,
        progress: bool = False,
        boundaries: Any = None,
        lowres_factor: int = 1,
        strategy: str = "overlap",
        coherence: float = 0.0,
        coherence_steps: int | None = None,
        feature_fn: FeatureFn | None = None,
    ):
        """`boundaries`: sigma boundaries of a stacked expert ensemble (`params` stacked), else None.
        `strategy`: which crops each evaluation runs and how they are weighted (`strategies.STRATEGIES`).
        `coherence` > 0: SyncDiffusion's guidance of that weight on top of the strategy, for the first
        `coherence_steps` steps (default: half of them), with `feature_fn` as the perceptual network
        (`eval.features.load_differentiable_feature_fn()`; `coherence.py`)."""
        edm.check_sampler(sampler, steps)
        check_chunk_size(chunk_size)
        self.strategy = check_strategy(strategy)
        self.encoders = encoders
        self.is_sr, self.lowres_factor = bool(getattr(model, "lowres_cond", False)), int(lowres_factor)
        if self.is_sr:
            self.tiling, low_tiling = sr_tiling(height, width, image_size, stride, circular, self.lowres_factor)
        else:
            stride = default_stride(image_size) if stride is None else stride
            self.tiling = Tiling(height, width, image_size, stride, circular)
        tiling = self.tiling
        self.evaluations_per_call = evaluations_per_call(tiling, strategy)  # crops per denoiser call, per prompt
        self.sigmas = sigmas = edm.karras_sigmas(steps, sigma_min, sigma_max)
        self.num_experts = experts.ensemble_size(boundaries)
        self.bootstrap_above = bootstrap_sigma(np.asarray(sigmas), bootstrap_fraction)
        self.coherence = None
        if coherence:
            self.coherence = Coherence(feature_fn, float(coherence), coherence_sigma(
                np.asarray(sigmas), max(1, steps // 2) if coherence_steps is None else coherence_steps))
        elif coherence_steps is not None:
            raise ValueError("coherence_steps was given without a coherence weight; set coherence > 0 or drop it.")
        guide = self.coherence
        sample_fn = edm.SAMPLERS[sampler]

        def run(params: Any, enc_params: Any, tokens: Any, region_tokens: Any, masks: jax.Array, rng: jax.Array,
                guidance: jax.Array, lowres: Any, aug_level: Any, extra_cond: dict, use_t5: bool,
                use_clip: bool) -> jax.Array:
            cond = select_encoders(encoders.encode(enc_params, tokens), use_t5, use_clip)
            batch, num_regions = tokens["t5_ids"].shape[0], masks.shape[0]
            if num_regions:  # prompt-major batch: [background x B, region 1 x B, ...]
                rcond = select_encoders(encoders.encode(enc_params, region_tokens), use_t5, use_clip)
                cond = jax.tree.map(lambda c, r: jnp.concatenate([c, jnp.repeat(r, batch, axis=0)]), cond, rcond)
            model_fn = make_model_fn(model, params, sigma_data, boundaries)
            scales = experts.guidance_by_expert(guidance, boundaries)  # one scale, or one per expert
            if self.is_sr:  # each tile conditions on its own crop of the (noise-augmented) low-res canvas
                noisy_low = sr.noise_lowres(jax.random.fold_in(rng, 2), lowres, aug_level)
                low = wrap_canvas(noisy_low, low_tiling)
                f = self.lowres_factor
                canvas = {k: wrap_canvas(extra_cond[k], tiling) for k in CANVAS_COND_KEYS if k in extra_cond}

                def view_fn(xc: jax.Array, sigma: jax.Array, view: jax.Array) -> jax.Array:
                    c = {**cond, **extra_cond, **{k: crop(v, view, tiling) for k, v in canvas.items()},
                         "lowres": crop(low, view // f, low_tiling), "aug_level": aug_level}
                    return edm.guided_denoiser(model_fn, c, unconditional(c), scales)(xc, sigma)

                denoise = tiled_denoiser(view_fn, tiling, chunk_size=chunk_size, strategy=strategy,
                                         rng=jax.random.fold_in(rng, 3), offset_multiple=f, coherence=guide)
                x = sr.initial_state(rng, (batch, tiling.height, tiling.width, 3), sigmas[0], noisy_low,
                                     bool(getattr(model, "lowres_residual", False)))
                return sample_fn(denoise, x, sigmas, progress=progress)
            denoise = canvas_denoiser(model_fn, {**cond, **extra_cond}, tiling, guidance=scales, region_masks=masks,
                                      rng=jax.random.fold_in(rng, 1), bootstrap_above=self.bootstrap_above,
                                      chunk_size=chunk_size, strategy=strategy, coherence=guide)
            # Same initial noise as `Sampler` for the same seed: one view reproduces it exactly.
            x = jax.random.normal(rng, (batch, tiling.height, tiling.width, 3)) * sigmas[0]
            return sample_fn(denoise, x, sigmas, progress=progress)

        self._run = jax.jit(run, static_argnames=("use_t5", "use_clip"))

    def __call__(self, params: Any, prompts: Sequence[str], *, regions: Sequence[Region] = (), guidance: Guidance = 3.0,
                 seed: int = 0, use_t5: bool = True, use_clip: bool = True, lowres: Any = None,
                 aug_level: float = 0.0, extra_cond: dict | None = None) -> np.ndarray:
        """One canvas per prompt (its background prompt when `regions` are given); uint8 [N, H, W, 3].

        `regions` are (prompt, mask) pairs shared by all canvases; masks are [H, W] in [0, 1].
        An SR stage takes `lowres` [N, H/f, W/f, 3] (uint8 or [-1, 1]) and `aug_level`.
        `extra_cond` adds conditioning arrays with one row per prompt row the model sees: N rows,
        or (K + 1) * N prompt-major with K regions (the background prompts, then each region's
        prompt N times); `CANVAS_COND_KEYS` entries are at canvas size (e.g. paint-with-words
        masks from `paint_with_words.pww_cond(..., (H, W))`) and are cut per crop. They are
        runtime inputs: a new painting does not recompile. `guidance` is one scale or one per expert
        (highest noise first).
        """
        guidance = per_expert_guidance(guidance, self.num_experts, "guidance")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("Give at least one prompt.")
        low, level = None, None
        if self.is_sr:
            if lowres is None or regions:
                raise ValueError("An SR stage on a canvas takes `lowres` (the previous stage's canvases) and no regions.")
            sr.check_lowres_shape(lowres, len(prompts), self.tiling.height, self.tiling.width, self.lowres_factor)
            low, level = jnp.asarray(sr.lowres_to_model(lowres)), jnp.full((len(prompts),), aug_level, jnp.float32)
        elif lowres is not None:
            raise ValueError("`lowres` was given, but this model is a base (text-to-image) model, not an SR stage.")
        region_prompts = [str(p) for p, _ in regions]
        masks = check_masks([m for _, m in regions], self.tiling.height, self.tiling.width, region_prompts)
        extra = self._check_extra_cond(extra_cond, len(prompts) * (len(regions) + 1))
        tokens = self.encoders.tokenize(prompts)
        region_tokens = self.encoders.tokenize(region_prompts) if region_prompts else None
        images = self._run(params, self.encoders.params, tokens, region_tokens, jnp.asarray(masks),
                           jax.random.PRNGKey(seed), jnp.asarray(guidance, jnp.float32), low, level, extra, use_t5=use_t5,
                           use_clip=use_clip)
        return to_uint8(jax.device_get(images))

    def _check_extra_cond(self, extra_cond: dict | None, rows: int) -> dict:
        """`extra_cond` as arrays, after checking their rows and (canvas entries) their canvas size."""
        extra = {k: jnp.asarray(v) for k, v in (extra_cond or {}).items()}
        for key, value in extra.items():
            if value.shape[:1] != (rows,):
                raise ValueError(f"extra_cond[{key!r}] has {value.shape[:1]} rows; it needs one per prompt row the "
                                 f"model sees ({rows}: prompts x (regions + 1), background prompts first).")
            if key in CANVAS_COND_KEYS and value.shape[1:3] != self.tiling.shape:
                raise ValueError(f"extra_cond[{key!r}] is {value.shape[1]}x{value.shape[2]}; it lies on the canvas, "
                                 f"so it must be {self.tiling.height}x{self.tiling.width}.")
        return extra


def load_mask(path: str | Path, height: int, width: int) -> np.ndarray:
    """A PNG mask (grayscale: white = inside the region) as float32 [H, W] in [0, 1]."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Mask file {str(path)!r} not found.")
    with Image.open(path) as img:
        mask = np.asarray(img.convert("L"), np.float32) / 255.0
    return check_masks([mask], height, width, [str(path)])[0]


def canvas_paint_cond(encoders: TextEncoders, prompts: Sequence[str], regions: Sequence[Region],
                      paint: Mapping[str, Any], size: tuple[int, int], weight: float,
                      only_present: bool | None = None) -> dict:
    """Paint-with-words conditioning for `MultiDiffusionSampler` at canvas size, one row per prompt
    row it samples (the prompts, then each region's prompt once per prompt).

    Without regions every prompt must contain every painted phrase (as in plain sampling); with
    regions each prompt takes the phrases it has, and a phrase that no prompt has is refused.
    `only_present=True` lets each prompt take the phrases it has without regions too (the SR
    stages of a region-prompted cascade, which see the prompts only).
    """
    rows = list(prompts) + [str(p) for p, _ in regions for _ in prompts]
    if regions:
        missing = [ph for ph in paint if not any(pww.phrase_in_prompt(encoders, p, ph) for p in set(rows))]
        if missing:
            raise ValueError(f"Painted phrase(s) {missing} occur in neither the prompt nor any --region prompt; paint "
                             "phrases copied word for word from one of them.")
    only_present = bool(regions) if only_present is None else only_present
    return pww.pww_cond(encoders, rows, paint, size, weight, only_present=only_present)
