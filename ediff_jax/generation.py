"""Generation from trained workdirs, one pipeline for every feature: `generate(GenerationSpec)`.

The layer above training and sampling. `generate` checks everything it can before a
checkpoint is read (the spec, each stage's config, geometry, masks, EMA choice, sampler and
steps, guidance per expert), loads the stages, runs `cascade.run_cascade` (which composes
experts, guidance, paint-with-words, canvas fusion with regions and the SR stages) and writes
PNGs, grids and records. A plain image, a painting, a panorama and a cascade are the same
call with more of the spec filled in. `sample_from_workdir` is the short form for prompts only.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import numpy as np

from ediff_jax import edm
from ediff_jax import paint_with_words as pww
from ediff_jax.cascade import (CanvasSpec, check_ema_decay, load_stages, num_experts, read_stages, resolve_paint,
                               resolve_regions, resolved_settings, run_cascade)
from ediff_jax.images import ensure_writable_dir
from ediff_jax.multidiffusion.sampler import default_stride
from ediff_jax.multidiffusion.coherence import coherence_sigma
from ediff_jax.multidiffusion.views import Tiling
from ediff_jax.paths import as_path
from ediff_jax.sampling import write_samples
from ediff_jax.spec import GenerationSpec, Guidance, StageSettings, per_expert_guidance
from ediff_jax.workdirs import check_base_workdir


def generate(spec: GenerationSpec, *, out: str | Path | None = None, progress: bool = True) -> list[np.ndarray]:
    """Runs `spec`; returns each stage's uint8 images [len(prompts) * num, H_k, W_k, 3].

    One stage writes one PNG per image, `grid.png` and `prompts.txt` to `out` (default
    WORKDIR/samples); a cascade writes each stage's to out/stage{k}_{H}x{W}/ (default
    WORKDIR/cascade). A painting adds `masks.png` and `paint.txt` beside them.
    """
    spec.check()
    paint = resolve_paint(spec)  # the user's mask files first: a missing one is named before anything else
    check_base_workdir(spec.workdir)  # a mistyped or SR workdir fails here, before any folder is made
    stages = read_stages(spec.workdir, [s.workdir for s in spec.sr_stages])
    check_ema_decay(stages, spec.ema_decay, spec.ema_sigma_rel)
    for k, (stage, given) in enumerate(zip(stages, spec.stage_settings)):
        chosen = resolved_settings(stage, given, k, spec.seed)
        try:
            edm.check_sampler(chosen.sampler, chosen.steps)
            per_expert_guidance(chosen.guidance, num_experts(stage.config), "guidance")
            if k == 0 and spec.canvas and spec.canvas.coherence_steps is not None:
                coherence_sigma(edm.karras_sigmas(chosen.steps), spec.canvas.coherence_steps)
        except ValueError as e:
            raise ValueError(f"{e}" if len(stages) == 1 else f"Stage {k} ({stage.workdir}): {e}") from None
    canvas = spec.canvas or CanvasSpec()
    size = stages[0].image_size
    height, width = canvas.height or size, canvas.width or size
    if canvas.places_canvas:  # the crops' geometry, at the base stage
        Tiling(height, width, size, default_stride(size) if canvas.stride is None else canvas.stride, canvas.circular)
    regions = resolve_regions(spec, height, width)  # at canvas size, read and checked before loading
    cascade = bool(spec.sr_stages)
    out = ensure_writable_dir(out or as_path(spec.workdir) / ("cascade" if cascade else "samples"))
    load_stages(stages, spec.ema_decay, spec.ema_sigma_rel)
    resolved = dataclasses.replace(spec, canvas=dataclasses.replace(canvas, regions=tuple(regions)),
                                   paint=dataclasses.replace(spec.paint, phrases=paint) if spec.paint else None)
    outputs = run_cascade(stages, resolved, progress=progress)
    lines = list(spec.prompts) + [f"region: {p}" for p, _ in regions]
    for k, images in enumerate(outputs):
        folder = ensure_writable_dir(out / f"stage{k}_{images.shape[1]}x{images.shape[2]}") if cascade else out
        cols = spec.num if images.shape[2] <= 2 * images.shape[1] else 1  # panoramas stack one per row
        write_samples(images, folder, spec.num, lines, cols=cols)
        if spec.paint:
            pww.write_paint_record(folder, spec.paint.phrases, paint, images.shape[1:3], spec.paint.weight)
    return outputs


def sample_from_workdir(
    workdir: str | Path,
    prompts: Sequence[str],
    *,
    num: int = 4,
    guidance: Guidance | None = None,
    steps: int | None = None,
    seed: int = 0,
    sampler: str | None = None,
    out: str | Path | None = None,
    progress: bool = True,
    **spec_fields,
) -> np.ndarray:
    """`generate` for prompts with one stage's settings: returns uint8 [len(prompts) * num, H, W, 3].

    `spec_fields` are further `GenerationSpec` fields (canvas, paint, ema_decay, use_t5, ...).
    """
    spec = GenerationSpec(workdir=workdir, prompts=tuple(prompts), num=num, seed=seed,
                          base=StageSettings(steps=steps, guidance=guidance, sampler=sampler), **spec_fields)
    return generate(spec, out=out, progress=progress)[-1]
