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
from typing import Any, Mapping, Sequence

import numpy as np

from ediff_jax import edm, logs, sr
from ediff_jax import paint_with_words as pww
from ediff_jax.images import ensure_writable_dir
from ediff_jax.multidiffusion import MultiDiffusionSampler
from ediff_jax.multidiffusion.regions import check_masks
from ediff_jax.multidiffusion.sampler import Region, canvas_paint_cond, check_bootstrap_fraction, load_mask
from ediff_jax.paths import as_path
from ediff_jax.sampling import Sampler, write_samples
from ediff_jax.workdirs import check_ema_choice, load_workdir, read_workdir_config

SR_MODES = ("full", "tiles")


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """Per-stage sampling settings; None takes the stage config's own value."""

    steps: int | None = None
    guidance: float | None = None
    aug_level: float | None = None  # SR stages only: noise added to the low-res input
    seed: int | None = None
    sampler: str | None = None


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


def _settings(stage: Stage, given: StageSettings, index: int, base_seed: int) -> StageSettings:
    c = stage.config
    return StageSettings(
        steps=int(c.sample.steps) if given.steps is None else given.steps,
        guidance=float(c.sample.guidance) if given.guidance is None else float(given.guidance),
        aug_level=float(c.sr.aug_level) if given.aug_level is None else float(given.aug_level),
        seed=base_seed + index if given.seed is None else int(given.seed),
        sampler=given.sampler or str(c.sample.sampler),
    )


def run_cascade(
    stages: Sequence[Stage],
    prompts: Sequence[str],
    settings: Sequence[StageSettings] = (),
    *,
    height: int | None = None,
    width: int | None = None,
    stride: int | None = None,
    circular: bool = False,
    sr_mode: str = "full",
    chunk_size: int | None = None,
    seed: int = 0,
    progress: bool = False,
    use_t5: bool = True,
    use_clip: bool = True,
    regions: Sequence[Region] = (),
    paint: Mapping[str, Any] | None = None,
    pww_weight: float = 0.4,
    bootstrap_fraction: float = 0.2,
) -> list[np.ndarray]:
    """Samples every stage in turn; returns each stage's uint8 images [N, H_k, W_k, 3].

    `height`/`width` (default: the base size) set the base canvas; beyond the base
    model's size, or with `regions` (MultiDiffusion region prompts on the base canvas, masks
    at its size), it is sampled with MultiDiffusion, and each SR stage scales it by its
    factor. `paint` ({phrase: mask}, any size) paints every stage at its own resolution with
    strength `pww_weight` (on canvases and tiles, each crop takes its crop of the masks).
    `settings[k]` holds stage k's steps, guidance, aug level and seed. `use_t5`/`use_clip` drop
    an encoder's conditioning in every stage (eDiff-I's ablation). SR stages follow the prompts,
    not the region prompts.
    """

    check_chain(stages)
    if sr_mode not in SR_MODES:
        raise ValueError(f"sr_mode={sr_mode!r}; choose one of {SR_MODES}.")
    settings = list(settings) + [StageSettings()] * (len(stages) - len(settings))
    if len(settings) != len(stages):
        raise ValueError(f"Got settings for {len(settings)} stages but the cascade has {len(stages)}.")
    prompts = list(prompts)
    base_size = stages[0].image_size
    height, width = height or base_size, width or base_size
    canvas = (height, width) != (base_size, base_size) or bool(regions)
    outputs: list[np.ndarray] = []
    for k, stage in enumerate(stages):
        s = _settings(stage, settings[k], k, seed)
        if k:
            height, width = height * stage.factor, width * stage.factor
        common = dict(steps=s.steps, sampler=s.sampler, sigma_data=float(stage.config.edm.sigma_data),
                      progress=progress, boundaries=stage.exp.boundaries)
        lowres = dict(lowres=outputs[-1], aug_level=s.aug_level) if k else {}
        stage_regions = list(regions) if k == 0 else []
        extra = None
        if paint:  # at this stage's resolution; on a canvas each crop is cut from it
            # SR stages see the prompts only: a phrase painted for a region prompt is skipped there.
            extra = canvas_paint_cond(stage.exp.encoders, prompts, stage_regions, paint, (height, width), pww_weight,
                                      only_present=bool(regions))
        if (canvas and k == 0) or (k and sr_mode == "tiles"):
            sampler = MultiDiffusionSampler(stage.exp.model, stage.exp.encoders, image_size=stage.tile_size,
                                            height=height, width=width, circular=circular, chunk_size=chunk_size,
                                            stride=stride * (stage.factor if k else 1) if stride else None,
                                            lowres_factor=stage.factor, bootstrap_fraction=bootstrap_fraction, **common)
            if stage_regions:
                lowres["regions"] = stage_regions
        else:
            sampler = Sampler(stage.exp.model, stage.exp.encoders, image_size=(height, width),
                              lowres_factor=stage.factor, mesh=stage.exp.mesh, **common)
        logs.info(f"Stage {k}: {stage.describe()} -> {height}x{width}, {s.steps} steps, guidance {s.guidance}"
                  + (f", aug level {s.aug_level}" if k else "") + (", painted" if paint else ""))
        outputs.append(sampler(stage.params, prompts, guidance=s.guidance, seed=s.seed, use_t5=use_t5,
                               use_clip=use_clip, extra_cond=extra, **lowres))
    return outputs


def sample_cascade_from_workdirs(
    base_workdir: str | Path,
    sr_workdirs: Sequence[str | Path],
    prompts: Sequence[str],
    settings: Sequence[StageSettings] = (),
    *,
    num: int = 1,
    out: str | Path | None = None,
    ema_decay: float | None = None,
    ema_sigma_rel: float | None = None,
    **kwargs: Any,
) -> list[np.ndarray]:
    """Runs the cascade and writes each stage's PNGs, grid and prompts to out/stage{k}_{H}x{W}/.

    `ema_decay` picks the EMA of that decay in every stage (each must keep it), `ema_sigma_rel` the post-hoc
    EMA of that width (each must have snapshots); `kwargs` go to `run_cascade`.
    """

    if not prompts:
        raise ValueError("Give at least one prompt.")
    stages = read_stages(base_workdir, sr_workdirs)  # geometry errors before any checkpoint is read
    if len(settings) > len(stages):
        raise ValueError(f"Got settings for {len(settings)} stages but only {len(stages)} workdirs.")
    check_ema_decay(stages, ema_decay, ema_sigma_rel)
    for k, stage in enumerate(stages):  # each stage's sampler and steps, before any checkpoint is read
        given = settings[k] if k < len(settings) else StageSettings()
        chosen = _settings(stage, given, k, 0)
        try:
            edm.check_sampler(chosen.sampler, chosen.steps)
        except ValueError as e:
            raise ValueError(f"Stage {k} ({stage.workdir}): {e}") from None
    base = stages[0].image_size
    height, width = kwargs.get("height") or base, kwargs.get("width") or base
    regions = [(p, load_mask(m, height, width) if isinstance(m, (str, Path)) else m) for p, m in kwargs.pop("regions", ())]
    check_masks([m for _, m in regions], height, width, [p for p, _ in regions])
    check_bootstrap_fraction(kwargs.get("bootstrap_fraction", 0.2))
    paint = kwargs.pop("paint", None) or {}
    raw_paint = {phrase: pww.load_mask(m, None, what=repr(phrase)) for phrase, m in paint.items()}
    out = ensure_writable_dir(out or as_path(base_workdir) / "cascade")
    load_stages(stages, ema_decay, ema_sigma_rel)
    expanded = [p for p in prompts for _ in range(num)]
    outputs = run_cascade(stages, expanded, settings, progress=True, regions=regions, paint=raw_paint or None, **kwargs)
    for k, images in enumerate(outputs):
        stage_dir = ensure_writable_dir(out / f"stage{k}_{images.shape[1]}x{images.shape[2]}")
        cols = num if images.shape[2] <= 2 * images.shape[1] else 1
        write_samples(images, stage_dir, num, list(prompts) + [f"region: {p}" for p, _ in regions], cols=cols)
        if paint:
            pww.write_paint_record(stage_dir, paint, raw_paint, images.shape[1:3], kwargs.get("pww_weight", 0.4))
    return outputs
