"""MultiDiffusion (Bar-Tal et al., ICML 2023) on this codebase's EDM samplers.

A model trained at window x window denoises a larger canvas crop by crop; at every
denoiser evaluation the crop predictions are fused by their least-squares optimum (a
per-pixel weighted average), so the sampler sees one canvas-sized D(x; sigma).

  views.py     where the crops lie (`get_views`, `Tiling`) and how to cut them out
  fusion.py    the least-squares fusion (`fuse`, `fuse_batched`)
  denoiser.py  any denoise_fn(x, sigma) -> a canvas denoiser, crops vmapped in chunks
  regions.py   region prompts with masks, and bootstrapping (paper Sec. 4.2)
  strategies.py  which crops an evaluation runs and their weights: overlap (MultiDiffusion),
               gaussian (Mixture of Diffusers), shifted (SpotDiffusion)
  coherence.py SyncDiffusion's guidance on top of any strategy: each crop's prediction pulled
               towards an anchor crop's in a feature space, for the first steps
  sampler.py   text-to-image canvases with a trained model (`MultiDiffusionSampler`; workdirs go
               through `ediff_jax.generation.generate`); `canvas_denoiser` composes guidance, canvas-aligned conditioning (paint-with-words
               masks at canvas size, cut per crop) and region prompts

Typical use with any denoiser:

  tiling = Tiling(height=32, width=128, window=32, stride=8, circular=False)
  denoise = multidiffusion_denoiser(denoise_fn, tiling, chunk_size=8)
  x = edm.heun_sample(denoise, sigmas[0] * noise, sigmas)
"""

from ediff_jax.multidiffusion.coherence import Coherence, coherence_sigma
from ediff_jax.multidiffusion.denoiser import map_views, multidiffusion_denoiser, tiled_denoiser
from ediff_jax.multidiffusion.fusion import fuse, fuse_batched
from ediff_jax.multidiffusion.regions import (bootstrap_sigma, box_mask, check_masks, region_denoiser,
                                              region_view_denoiser, region_weights)
from ediff_jax.multidiffusion.sampler import (CANVAS_COND_KEYS, MultiDiffusionSampler, canvas_denoiser, load_mask,
                                              parse_region)
from ediff_jax.multidiffusion.strategies import (STRATEGIES, evaluations_per_call, gaussian_tile_weights,
                                                 shifted_views)
from ediff_jax.multidiffusion.views import Tiling, crop, crop_views, get_views, wrap_canvas

__all__ = [
    "Coherence",
    "coherence_sigma",
    "Tiling",
    "get_views",
    "crop",
    "crop_views",
    "wrap_canvas",
    "fuse",
    "fuse_batched",
    "map_views",
    "tiled_denoiser",
    "multidiffusion_denoiser",
    "region_denoiser",
    "region_view_denoiser",
    "region_weights",
    "bootstrap_sigma",
    "check_masks",
    "box_mask",
    "MultiDiffusionSampler",
    "canvas_denoiser",
    "CANVAS_COND_KEYS",
    "load_mask",
    "parse_region",
    "STRATEGIES",
    "evaluations_per_call",
    "gaussian_tile_weights",
    "shifted_views",
]
