"""What to generate, as one value: `GenerationSpec` (prompts, canvas, painting, stages, EMA, encoders).

`generation.generate(spec)` runs every spec through one pipeline, so every feature combines
with every other; the CLI (`ediff_jax.sample`) builds one spec from its flags. `check` holds
every rule that needs no workdir, with messages in the caller's vocabulary: `names` maps a
field ("canvas.stride") to what the caller calls it ("--stride"), so the CLI's refusals and
the Python API's are the same rules.

This module imports nothing heavy: a spec can be built and checked before JAX is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

SAMPLERS = ("heun", "euler", "dpmpp_2m")  # edm.SAMPLERS' names, without importing JAX
SR_MODES = ("full", "tiles")
CANVAS_STRATEGIES = ("overlap", "gaussian", "shifted")  # multidiffusion/strategies.py
Guidance = float | tuple[float, ...]  # one scale, or one per expert (highest noise first)
MaskLike = Any  # a PNG path or an array [H, W] in [0, 1]


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """Sampling settings of one stage; None takes the stage config's own value.

    `guidance` is one scale or one per expert of the stage's ensemble, highest noise first.
    """

    steps: int | None = None
    guidance: Guidance | None = None
    aug_level: float | None = None  # SR stages only: noise added to the low-res input
    seed: int | None = None  # None: the spec's seed + the stage's index
    sampler: str | None = None


@dataclasses.dataclass(frozen=True)
class SRStage:
    """One super-resolution stage of the cascade: its workdir and its settings."""

    workdir: str | Path
    settings: StageSettings = StageSettings()


@dataclasses.dataclass(frozen=True)
class CanvasSpec:
    """A MultiDiffusion canvas: its size (default: the base model's), crops and region prompts.

    `stride` and `chunk_size` also set up the SR stages' tiles under `sr_mode="tiles"`.
    Region masks are at canvas size (white = inside); `bootstrap_fraction` (default 0.2)
    acts on regions only. `strategy` picks the crops of each evaluation: `overlap`
    (MultiDiffusion), `gaussian` (Mixture of Diffusers' weights) or `shifted` (SpotDiffusion's
    non-overlapping windows under a random offset per step). `coherence` > 0 adds SyncDiffusion's
    guidance of that weight on top of any strategy, for the first `coherence_steps` steps of the
    base stage (default: half; `multidiffusion/coherence.py`).
    """

    height: int | None = None
    width: int | None = None
    stride: int | None = None
    circular: bool = False
    chunk_size: int | None = None
    regions: tuple[tuple[str, MaskLike], ...] = ()
    bootstrap_fraction: float | None = None
    strategy: str = "overlap"
    coherence: float = 0.0
    coherence_steps: int | None = None

    @property
    def places_canvas(self) -> bool:
        """Whether this asks for a canvas (not only crop settings for SR tiles)."""
        return self.height is not None or self.width is not None or bool(self.regions) or self.circular


@dataclasses.dataclass(frozen=True)
class PaintSpec:
    """Paint-with-words: {phrase: mask} (masks of any size, stretched to each stage's output) and w'."""

    phrases: Mapping[str, MaskLike]
    weight: float = 0.4


@dataclasses.dataclass(frozen=True)
class GenerationSpec:
    """Everything one generation run needs besides the weights themselves."""

    workdir: str | Path
    prompts: tuple[str, ...]
    num: int = 4  # images per prompt
    seed: int = 0
    base: StageSettings = StageSettings()
    canvas: CanvasSpec | None = None
    paint: PaintSpec | None = None
    sr_stages: tuple[SRStage, ...] = ()
    sr_mode: str = "full"
    ema_decay: float | None = None
    ema_sigma_rel: float | None = None
    use_t5: bool = True
    use_clip: bool = True

    @property
    def stage_settings(self) -> list[StageSettings]:
        return [self.base] + [s.settings for s in self.sr_stages]

    @property
    def expanded_prompts(self) -> list[str]:
        """Each prompt `num` times, prompt-major: the batch every stage samples."""
        return [p for p in self.prompts for _ in range(self.num)]

    def check(self, names: Mapping[str, str] | None = None) -> None:
        """Raises ValueError (one line, naming the field as `names` spells it) for any rule broken."""
        check_spec(self, names or {})


def _name(names: Mapping[str, str], field: str) -> str:
    return names.get(field, field)


def _whole(value: Any, lo: int = 1) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_guidance(guidance: Any, what: str) -> None:
    """One finite scale, or a non-empty sequence of them (one per expert)."""
    values = list(guidance) if isinstance(guidance, (tuple, list)) else [guidance]
    if not values or not all(_finite(g) for g in values):
        raise ValueError(f"{what}={guidance!r}: give a finite scale (e.g. 3), or one per expert, highest noise first.")


def check_stage_settings(settings: StageSettings, names: Mapping[str, str], prefix: str, is_sr: bool) -> None:
    """One stage's settings in range; aug_level only for SR stages."""
    if settings.steps is not None and not _whole(settings.steps):
        raise ValueError(f"{_name(names, prefix + 'steps')}={settings.steps!r}: sampler steps are an integer >= 1; "
                         "leave it out for the config's.")
    if settings.guidance is not None:
        check_guidance(settings.guidance, _name(names, prefix + "guidance"))
    if settings.sampler is not None and settings.sampler not in SAMPLERS:
        raise ValueError(f"{_name(names, prefix + 'sampler')}={settings.sampler!r}: choose one of {SAMPLERS}.")
    if settings.seed is not None and not _whole(settings.seed, lo=-(2**31)):
        raise ValueError(f"{_name(names, prefix + 'seed')}={settings.seed!r}: a seed is an integer.")
    if settings.aug_level is not None:
        if not is_sr:
            raise ValueError(f"{_name(names, prefix + 'aug_level')} is an SR stage's setting (the noise of its low-res "
                             "input); the base stage has no low-res input. Leave it out.")
        if not _finite(settings.aug_level) or settings.aug_level < 0:
            raise ValueError(f"{_name(names, prefix + 'aug_level')}={settings.aug_level!r}: the low-res noise level "
                             "is a finite number >= 0, e.g. 0.1.")


def check_canvas(canvas: CanvasSpec, names: Mapping[str, str], sr_tiles: bool) -> None:
    """Sizes and crop settings in range; crop settings only where something samples crops."""
    for field in ("height", "width", "stride", "chunk_size"):
        value = getattr(canvas, field)
        if value is not None and not _whole(value):
            raise ValueError(f"{_name(names, 'canvas.' + field)}={value!r} must be an integer >= 1.")
    if canvas.strategy not in CANVAS_STRATEGIES:
        raise ValueError(f"{_name(names, 'canvas.strategy')}={canvas.strategy!r}: choose one of {CANVAS_STRATEGIES}.")
    if canvas.strategy == "shifted" and canvas.stride is not None:
        raise ValueError(f"{_name(names, 'canvas.stride')} spaces overlapping crops, and the shifted strategy's windows "
                         f"do not overlap: drop {_name(names, 'canvas.stride')} or use "
                         f"{_name(names, 'canvas.strategy')} overlap or gaussian.")
    if not canvas.places_canvas and not sr_tiles:
        for field in ("stride", "chunk_size") + (("strategy",) if canvas.strategy != "overlap" else ()):
            if getattr(canvas, field) is not None:
                raise ValueError(
                    f"{_name(names, 'canvas.' + field)} sets up MultiDiffusion crops, and nothing here samples crops: "
                    f"add {_name(names, 'canvas.height')}/{_name(names, 'canvas.width')} (a panorama), "
                    f"{_name(names, 'canvas.regions')}, {_name(names, 'canvas.circular')} or "
                    f"{_name(names, 'sr_mode')} tiles, or drop {_name(names, 'canvas.' + field)}.")
    if not _finite(canvas.coherence) or canvas.coherence < 0:
        raise ValueError(f"{_name(names, 'canvas.coherence')}={canvas.coherence!r}: the coherence guidance weight is a "
                         "finite number >= 0 (0: off).")
    if canvas.coherence_steps is not None:
        if not canvas.coherence:
            raise ValueError(f"{_name(names, 'canvas.coherence_steps')} counts the steps of coherence guidance: set "
                             f"{_name(names, 'canvas.coherence')} > 0 or drop {_name(names, 'canvas.coherence_steps')}.")
        if not _whole(canvas.coherence_steps):
            raise ValueError(f"{_name(names, 'canvas.coherence_steps')}={canvas.coherence_steps!r} must be an integer "
                             ">= 1.")
    if canvas.coherence and not canvas.places_canvas:
        raise ValueError(f"{_name(names, 'canvas.coherence')} pulls a panorama's crops together, and nothing here is a "
                         f"canvas: add {_name(names, 'canvas.height')}/{_name(names, 'canvas.width')}, "
                         f"{_name(names, 'canvas.regions')} or {_name(names, 'canvas.circular')}, or drop it.")
    for region in canvas.regions:
        if not (isinstance(region, (tuple, list)) and len(region) == 2 and str(region[0]).strip()):
            raise ValueError(f"{_name(names, 'canvas.regions')}: each region is (prompt, mask); got {region!r}.")
    if canvas.bootstrap_fraction is not None:
        if not canvas.regions:
            raise ValueError(f"{_name(names, 'canvas.bootstrap_fraction')} acts on {_name(names, 'canvas.regions')} "
                             f"prompts only: add {_name(names, 'canvas.regions')} or drop "
                             f"{_name(names, 'canvas.bootstrap_fraction')}.")
        if not _finite(canvas.bootstrap_fraction) or not 0 <= canvas.bootstrap_fraction <= 1:
            raise ValueError(f"{_name(names, 'canvas.bootstrap_fraction')}={canvas.bootstrap_fraction!r}: a fraction "
                             "of the steps in [0, 1], e.g. 0.2.")


def check_spec(spec: GenerationSpec, names: Mapping[str, str]) -> None:
    """Every rule of a spec that needs no workdir (`generation.generate` checks the rest before loading)."""
    if not str(spec.workdir).strip():
        raise ValueError(f"{_name(names, 'workdir')} is empty: give the workdir written by ediff_jax.train.")
    if isinstance(spec.prompts, str) or not spec.prompts or not all(isinstance(p, str) and p.strip()
                                                                    for p in spec.prompts):
        raise ValueError(f"{_name(names, 'prompts')}: give at least one prompt, as a list of non-empty strings.")
    if not _whole(spec.num):
        raise ValueError(f"{_name(names, 'num')}={spec.num!r}: images per prompt are an integer >= 1, e.g. 4.")
    if not _whole(spec.seed, lo=-(2**31)):
        raise ValueError(f"{_name(names, 'seed')}={spec.seed!r}: a seed is an integer.")
    check_stage_settings(spec.base, names, "base.", is_sr=False)
    for k, stage in enumerate(spec.sr_stages, start=1):
        if not str(stage.workdir).strip():
            raise ValueError(f"{_name(names, 'sr_stages.workdir')} of SR stage {k} is empty.")
        check_stage_settings(stage.settings, names, "sr.", is_sr=True)
    if spec.sr_mode not in SR_MODES:
        raise ValueError(f"{_name(names, 'sr_mode')}={spec.sr_mode!r}: choose one of {SR_MODES}.")
    if spec.sr_mode == "tiles" and not spec.sr_stages:
        raise ValueError(f"{_name(names, 'sr_mode')} tiles sets how SR stages run, and there are none: add "
                         f"{_name(names, 'sr_stages.workdir')} or drop {_name(names, 'sr_mode')}.")
    if spec.canvas is not None:
        check_canvas(spec.canvas, names, sr_tiles=spec.sr_mode == "tiles" and bool(spec.sr_stages))
    if spec.paint is not None:
        if not spec.paint.phrases:
            raise ValueError(f"{_name(names, 'paint.weight')} is the strength of {_name(names, 'paint.phrases')}: "
                             f"paint at least one phrase (e.g. 'red circle=left.png') or drop "
                             f"{_name(names, 'paint.weight')}.")
        if not _finite(spec.paint.weight) or spec.paint.weight < 0:
            raise ValueError(f"{_name(names, 'paint.weight')}={spec.paint.weight!r}: a finite number >= 0, e.g. 0.4 "
                             "(0: off).")
    if spec.ema_decay is not None and spec.ema_sigma_rel is not None:
        raise ValueError(f"{_name(names, 'ema_decay')} and {_name(names, 'ema_sigma_rel')} both pick the EMA: give "
                         "one of them.")
    if spec.ema_decay is not None and not (_finite(spec.ema_decay) and 0 < spec.ema_decay < 1):
        raise ValueError(f"{_name(names, 'ema_decay')}={spec.ema_decay!r}: an EMA decay in (0, 1) that the workdir "
                         "keeps; leave it out for the default.")
    if spec.ema_sigma_rel is not None and not (_finite(spec.ema_sigma_rel) and 0 < spec.ema_sigma_rel <= 0.30028):
        raise ValueError(f"{_name(names, 'ema_sigma_rel')}={spec.ema_sigma_rel!r}: a relative EMA width in "
                         "(0, 0.30028], e.g. 0.1.")


def per_expert_guidance(guidance: Guidance, num_experts: int, what: str) -> Guidance:
    """`guidance` for a stage of `num_experts` experts: a scale, or a tuple of exactly that many."""
    if not isinstance(guidance, (tuple, list)):
        return float(guidance)
    if len(guidance) == 1:
        return float(guidance[0])
    if len(guidance) != num_experts:
        kind = "a single model" if num_experts == 1 else f"an ensemble of {num_experts} experts"
        raise ValueError(f"{what} has {len(guidance)} values but {kind} samples this stage: give one value, or "
                         f"{num_experts} (one per expert, highest noise first).")
    return tuple(float(g) for g in guidance)


def parse_region(spec: str) -> tuple[str, str]:
    """'a red circle=mask.png' -> ('a red circle', 'mask.png') (split at the last '=')."""
    prompt, sep, path = str(spec).rpartition("=")
    if not sep or not prompt.strip() or not path.strip():
        raise ValueError(f"A region is PROMPT=MASK.png (e.g. 'a red circle=mask.png'); got {spec!r}.")
    return prompt.strip(), path.strip()


def parse_paint(items: Sequence[str] | None) -> dict[str, str]:
    """["red circle=left.png", ...] -> {"red circle": "left.png"} (split at the first '=')."""
    out: dict[str, str] = {}
    for item in items or ():
        phrase, sep, path = item.partition("=")
        phrase, path = phrase.strip(), path.strip()
        if not sep or not phrase or not path:
            raise ValueError(f"--paint {item!r} must look like 'PHRASE=MASK.png', e.g. --paint 'red circle=left.png'.")
        if phrase in out:
            raise ValueError(f"Phrase {phrase!r} is painted twice; give one mask per phrase.")
        out[phrase] = path
    return out
