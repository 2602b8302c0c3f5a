"""eDiff-I's cascade: text -> base (64) -> SR (256) -> SR (1024), one workdir per stage.

Each stage is its own model, checkpoint and mesh (a workdir written by
`ediff_jax.train`); this module only checks that they chain and runs them in turn,
each stage conditioned on the text and on the previous stage's images. A canvas larger
than the base model (a panorama) is generated with MultiDiffusion and then goes through
the SR stages either fully convolutionally (`sr_mode="full"`: the SR UNet on the whole
canvas) or as MultiDiffusion tiles at SR resolution (`sr_mode="tiles"`). Tiles are the
stage's training size, or its training crop when it was trained on crops (`Stage.tile_size`),
and `sr_mode="tiles"` applies to square outputs too.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ediff_jax import logs, sr
from ediff_jax import paint_with_words as pww
from ediff_jax.multidiffusion import MultiDiffusionSampler
from ediff_jax.multidiffusion.regions import check_masks
from ediff_jax.multidiffusion.sampler import Region, canvas_paint_cond, load_mask
from ediff_jax.paths import as_path
from ediff_jax.sampling import Sampler
from ediff_jax.spec import SR_MODES, CanvasSpec, GenerationSpec, StageSettings
from ediff_jax.workdirs import check_ema_choice, load_workdir, read_workdir_config

__all__ = ["SR_MODES", "Stage", "StageSettings", "check_chain", "check_ema_decay", "load_stages", "num_experts",
           "read_stages", "resolve_paint", "resolve_regions", "resolved_settings", "run_cascade"]


@dataclasses.dataclass
class Stage:
    """One trained stage: its workdir's config, experiment and EMA parameters."""

    workdir: Path
    config: Any
    exp: Any = None
    params: Any = None

    @property
    def is_sr(self) -> bool:
        return sr.is_sr(self.config)

    @property
    def image_size(self) -> int:
        return int(self.config.data.image_size)

    @property
    def tile_size(self) -> int:
        """MultiDiffusion tile side of this stage: its training crop when it was trained on crops.

        Why: the UNet's GroupNorm statistics span the whole input, so a stage trained on crops
        sees the statistics it was trained with only on crop-sized windows (on real photos a
        32-pixel-crop stage lost 11 dB PSNR run whole; experiments/sr_photos.py).
        """
        return int(self.config.sr.crop_size) or self.image_size

    @property
    def lowres_size(self) -> int:
        return int(self.config.sr.lowres_size)

    @property
    def factor(self) -> int:
        return sr.scale_factor(self.config)

    def describe(self) -> str:
        kind = f"an SR stage {self.lowres_size}->{self.image_size}" if self.is_sr else f"a base model at {self.image_size}"
        return f"{self.workdir} ({kind})"


def check_chain(stages: Sequence[Stage]) -> None:
    """A base model first, then SR stages whose low-res size is the previous stage's size."""
    if not stages:
        raise ValueError("A cascade needs at least a base model workdir.")
    if stages[0].is_sr:
        raise ValueError(f"The first stage must be a base (text-to-image) model, but {stages[0].describe()} is an SR "
                         "stage; pass it as an SR workdir after a base model.")
    for prev, stage in zip(stages, stages[1:]):
        if not stage.is_sr:
            raise ValueError(f"{stage.describe()} is a base model, not an SR stage; only the first workdir may be a "
                             "base model.")
        if stage.lowres_size != prev.image_size:
            raise ValueError(
                f"Stages do not chain: {prev.describe()} outputs {prev.image_size}x{prev.image_size} but "
                f"{stage.describe()} expects {stage.lowres_size}x{stage.lowres_size} inputs. Order the SR workdirs "
                "by resolution, or train an SR stage with config.sr.lowres_size equal to the previous image size."
            )


def read_stages(base_workdir: str | Path, sr_workdirs: Sequence[str | Path]) -> list[Stage]:
    """The stages' configs only (no checkpoints read), checked to chain: errors come first."""

    stages = [Stage(as_path(w), read_workdir_config(w)) for w in [base_workdir, *sr_workdirs]]
    check_chain(stages)
    return stages


def check_ema_decay(stages: Sequence[Stage], ema_decay: float | None, ema_sigma_rel: float | None = None) -> None:
    """Every stage keeps an EMA of `ema_decay` (None: each its default), or post-hoc EMA snapshots for
    `ema_sigma_rel`; checked before any checkpoint is read."""

    for stage in stages:
        try:
            check_ema_choice(stage.config, ema_decay, ema_sigma_rel)
        except ValueError as e:
            raise ValueError(f"{stage.workdir}: {e}") from None


def load_stages(stages: Sequence[Stage], ema_decay: float | None = None, ema_sigma_rel: float | None = None) -> None:
    """Loads each stage's experiment and EMA parameters (in place); `ema_decay` or `ema_sigma_rel` picks
    every stage's EMA (`check_ema_decay` first, to be told which stage lacks it before anything is read)."""

    for stage in stages:
        _, stage.exp, stage.params = load_workdir(stage.workdir, ema_decay=ema_decay, ema_sigma_rel=ema_sigma_rel)


def resolved_settings(stage: Stage, given: StageSettings, index: int, base_seed: int) -> StageSettings:
    """Stage `index`'s settings with every None replaced by the stage config's value (seed: base_seed + index)."""
    c = stage.config
    return StageSettings(
        steps=int(c.sample.steps) if given.steps is None else given.steps,
        guidance=float(c.sample.guidance) if given.guidance is None else given.guidance,
        aug_level=float(c.sr.aug_level) if given.aug_level is None else float(given.aug_level),
        seed=base_seed + index if given.seed is None else int(given.seed),
        sampler=given.sampler or str(c.sample.sampler),
    )


def num_experts(config: Any) -> int:
    """Experts a finished run of `config` samples with (1: a single model), read from the config alone."""
    phases = tuple(config.experts.phases)
    return len(phases[-1]) if phases else 1


def resolve_regions(spec: GenerationSpec, height: int, width: int) -> list[Region]:
    """The spec's region masks as arrays [H, W] at canvas size, checked (files are read here)."""
    canvas = spec.canvas or CanvasSpec()
    regions = [(str(p), load_mask(m, height, width) if isinstance(m, (str, Path)) else m) for p, m in canvas.regions]
    check_masks([m for _, m in regions], height, width, [p for p, _ in regions])
    return regions


def resolve_paint(spec: GenerationSpec) -> dict[str, np.ndarray]:
    """The painting's masks as arrays (any size; files are read and checked here); {} without a painting."""
    phrases = spec.paint.phrases if spec.paint else {}
    return {phrase: pww.load_mask(m, None, what=repr(phrase)) for phrase, m in phrases.items()}


def run_cascade(stages: Sequence[Stage], spec: GenerationSpec, *, progress: bool = False) -> list[np.ndarray]:
    """Samples every stage of `spec` in turn on its prompts (each `spec.num` times); returns each stage's
    uint8 images [N, H_k, W_k, 3]. `stages` are loaded (`load_stages`): the base, then `spec.sr_stages`.

    The denoiser of each stage is composed in one order: the model or its expert ensemble, then
    classifier-free guidance (one scale or one per expert), then paint-with-words conditioning
    (every stage at its own resolution; on canvases and tiles each crop takes its crop of the
    masks), then MultiDiffusion fusion with region prompts (base stage, when the canvas is not
    the model's own size or has regions or wraps), then each SR stage, whole or as tiles.
    `use_t5`/`use_clip` drop an encoder's conditioning in every stage (eDiff-I's ablation). SR
    stages follow the prompts, not the region prompts.
    """
    check_chain(stages)
    if len(stages) != 1 + len(spec.sr_stages):
        raise ValueError(f"The spec has {1 + len(spec.sr_stages)} stages but {len(stages)} were loaded.")
    canvas = spec.canvas or CanvasSpec()
    base_size = stages[0].image_size
    height, width = canvas.height or base_size, canvas.width or base_size
    regions, paint = resolve_regions(spec, height, width), resolve_paint(spec)
    on_canvas = (height, width) != (base_size, base_size) or bool(regions) or canvas.circular
    bootstrap = 0.2 if canvas.bootstrap_fraction is None else canvas.bootstrap_fraction
    prompts = spec.expanded_prompts
    outputs: list[np.ndarray] = []
    for k, (stage, given) in enumerate(zip(stages, spec.stage_settings)):
        s = resolved_settings(stage, given, k, spec.seed)
        if k:
            height, width = height * stage.factor, width * stage.factor
        common = dict(steps=s.steps, sampler=s.sampler, sigma_data=float(stage.config.edm.sigma_data),
                      progress=progress, boundaries=stage.exp.boundaries)
        lowres = dict(lowres=outputs[-1], aug_level=s.aug_level) if k else {}
        stage_regions = regions if k == 0 else []
        extra = None
        if paint:  # at this stage's resolution; on a canvas each crop is cut from it
            # SR stages see the prompts only: a phrase painted for a region prompt is skipped there.
            extra = canvas_paint_cond(stage.exp.encoders, prompts, stage_regions, paint, (height, width),
                                      spec.paint.weight, only_present=bool(regions))
        if (on_canvas and k == 0) or (k and spec.sr_mode == "tiles"):
            stride = canvas.stride * (stage.factor if k else 1) if canvas.stride else None
            coherence = {}
            if k == 0 and canvas.coherence:  # SyncDiffusion's guidance acts on the base canvas, where layout forms
                from ediff_jax.eval.features import load_differentiable_feature_fn

                coherence = dict(coherence=canvas.coherence, coherence_steps=canvas.coherence_steps,
                                 feature_fn=load_differentiable_feature_fn())
            sampler = MultiDiffusionSampler(stage.exp.model, stage.exp.encoders, image_size=stage.tile_size,
                                            height=height, width=width, circular=canvas.circular,
                                            chunk_size=canvas.chunk_size, stride=stride, lowres_factor=stage.factor,
                                            bootstrap_fraction=bootstrap, strategy=canvas.strategy, **coherence,
                                            **common)
            if stage_regions:
                lowres["regions"] = stage_regions
        else:
            sampler = Sampler(stage.exp.model, stage.exp.encoders, image_size=(height, width),
                              lowres_factor=stage.factor, mesh=stage.exp.mesh, **common)
        logs.info(f"Stage {k}: {stage.describe()} -> {height}x{width}, {s.steps} steps, guidance {s.guidance}"
                  + (f", aug level {s.aug_level}" if k else "") + (", painted" if paint else ""))
        outputs.append(sampler(stage.params, prompts, guidance=s.guidance, seed=s.seed, use_t5=spec.use_t5,
                               use_clip=spec.use_clip, extra_cond=extra, **lowres))
    return outputs
