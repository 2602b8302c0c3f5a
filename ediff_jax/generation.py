"""Generation from trained workdirs: the layer above training and sampling.

`sample_from_workdir` loads a workdir (`ediff_jax.workdirs`) and samples prompts with the
`sampling.Sampler`; paint-with-words, MultiDiffusion canvases and the SR cascade add their
conditioning or fusion on top of it (`paint_with_words.sample_with_paint`,
`multidiffusion.sample_canvas_from_workdir`, `cascade.sample_cascade_from_workdirs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ediff_jax import edm
from ediff_jax.images import ensure_writable_dir
from ediff_jax.paths import as_path
from ediff_jax.sampling import Sampler, write_samples
from ediff_jax.workdirs import check_base_workdir, load_workdir, read_workdir_config


def sample_from_workdir(
    workdir: str | Path,
    prompts: Sequence[str],
    *,
    num: int = 4,
    guidance: float | None = None,
    steps: int | None = None,
    seed: int = 0,
    sampler: str | None = None,
    out: str | Path | None = None,
    use_t5: bool = True,
    use_clip: bool = True,
    progress: bool = True,
    ema_decay: float | None = None,
    ema_sigma_rel: float | None = None,
    extra_cond_fn: Callable[[Any, list[str]], dict] | None = None,
) -> np.ndarray:
    """Writes one PNG per image and `grid.png` (a row per prompt) to `out`; returns the images.

    `extra_cond_fn(exp, prompts)` may add conditioning arrays for the expanded prompt list
    (e.g. paint-with-words masks, see `Sampler.__call__`).
    """
    if not prompts:
        raise ValueError("Give at least one prompt.")
    check_base_workdir(workdir)  # a mistyped --workdir fails here, before any folder is made
    config = read_workdir_config(workdir)
    edm.check_sampler(sampler or str(config.sample.sampler), int(config.sample.steps) if steps is None else steps)
    out = ensure_writable_dir(out or as_path(workdir) / "samples")  # before any heavy work
    config, exp, ema_params = load_workdir(workdir, ema_decay=ema_decay, ema_sigma_rel=ema_sigma_rel)
    sample = Sampler(exp.model, exp.encoders, image_size=int(config.data.image_size),
                     steps=int(config.sample.steps) if steps is None else steps, sampler=sampler or config.sample.sampler,
                     sigma_data=float(config.edm.sigma_data), progress=progress, boundaries=exp.boundaries)
    guidance = float(config.sample.guidance) if guidance is None else float(guidance)
    expanded = [p for p in prompts for _ in range(num)]
    extra = extra_cond_fn(exp, expanded) if extra_cond_fn else None
    images = sample(ema_params, expanded, guidance=guidance, seed=seed, use_t5=use_t5, use_clip=use_clip,
                    extra_cond=extra)
    write_samples(images, out, num, prompts)
    return images
