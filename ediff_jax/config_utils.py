"""Defaults shared by every config; each config file overrides what it changes.

Config files follow big_vision: `get_config(arg)` where `arg` is a comma-separated list
of `key=value` variants (e.g. `configs/base64.py:size=tiny`).
"""

from __future__ import annotations

import difflib
import math
import os
from statistics import NormalDist

from typing import Sequence

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses 'a=1,b=x' into a ConfigDict over `defaults`, each value of its default's type.

    An unknown key, or a value that is not of that type (`steps=abc`; a bool must be
    true/false), is a ValueError naming the key, the value and what it should be.
    """
    import math

    out = ml_collections.ConfigDict(defaults)
    if not arg:
        return out
    valid = "the keys and their defaults: " + ", ".join(f"{k}={v}" for k, v in sorted(defaults.items()))
    bools = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}
    for item in arg.split(","):
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep:
            raise ValueError(f"{item!r} must look like key=value; {valid}.")
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"unknown key {key!r}{hint}; {valid}.")
        default = defaults[key]
        try:
            if isinstance(default, bool):
                parsed = bools[value.lower()]
            elif isinstance(default, (int, float)):
                parsed = type(default)(value)
                if not math.isfinite(parsed):
                    raise ValueError
            else:
                parsed = type(default)(value)
        except (KeyError, ValueError):
            kind = ("true or false" if isinstance(default, bool) else "an integer" if isinstance(default, int)
                    else "a finite number" if isinstance(default, float) else f"a {type(default).__name__}")
            raise ValueError(f"{key!r} must be {kind} (got {value!r}), e.g. {key}={default} (its default).") from None
        out[key] = parsed
    return out


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.data = ml_collections.ConfigDict()
    c.data.name = "ediff_shapes/64"  # TFDS name; "ediff_shapes/SIZE" is prepared locally
    c.data.data_dir = ml_collections.FieldReference(None, field_type=str)
    c.data.image_size = 64
    # Your own captioned images: name="image_folder" and `folder` a directory of images with
    # captions.tsv (file<TAB>caption) or captions.jsonl; prepared once into TFDS shards.
    c.data.folder = ml_collections.FieldReference(None, field_type=str)
    c.data.validation_fraction = 0.05  # image_folder only: share held out (by a hash of the file name)
    # Resize every image to image_size before any crop. False: crop straight from each
    # image's native size (datasets of photos of different sizes, with sr.crop_size).
    c.data.resize = True
    c.data.shuffle_buffer = 10_000
    # Decode the training split once and keep it in host memory: for a few large photos
    # cropped at random (ediff_photos), which otherwise decode a whole PNG per crop.
    c.data.cache_decoded = False
    # Read precomputed T5/CLIP embeddings (built once, beside the TFDS data) instead of
    # running the encoders every step: `python -m ediff_jax.text.cache --config ...`.
    c.data.text_cache = False
    # Show each example whose caption states a relation ("a red circle above a blue square") this
    # many times per epoch: relations are the rarest captions and the last thing learnt (issue #15).
    c.data.relation_repeats = 1

    c.text = ml_collections.ConfigDict()
    # Hugging Face model directories, hub ids "org/name" or "org/name@REVISION" (fetched
    # through the HF cache; an existing local directory of that name wins), or builtin:NAME
    # for the shipped tiny defaults, pretrained here on the dataset's captions (T5 by span
    # corruption, CLIP contrastively; `python -m ediff_jax.text.build_default_assets`).
    # builtin:t5_shapes / builtin:clip_shapes are the older random ones, kept for old workdirs.
    # For real eDiff-I conditioning point these at T5-XXL (google/t5-v1_1-xxl) and CLIP-L/14
    # (openai/clip-vit-large-patch14).
    c.text.t5_path = "builtin:t5_shapes_v2"
    c.text.clip_path = "builtin:clip_shapes_v2"
    c.text.t5_max_length = 32
    c.text.clip_max_length = 32
    c.text.drop_rates = ml_collections.ConfigDict({"t5": 0.25, "clip": 0.2})  # eDiff-I's rates

    c.model = ml_collections.ConfigDict()
    c.model.name = "unet"
    c.model.channels = 64
    c.model.channel_mult = (1, 2, 3, 4)
    c.model.num_res_blocks = 2
    c.model.attn_resolutions = (16, 8)
    c.model.cross_attn_resolutions = (16, 8)
    c.model.attn_levels = ()  # by level index instead of pixel size (stages trained on crops)
    c.model.cross_attn_levels = ()
    c.model.mid_self_attn = True
    c.model.num_heads = 4
    c.model.context_dim = 256
    c.model.dropout = 0.0
    c.model.dtype = "float32"
    c.model.remat = False
    # Append each pixel's (y, x) to the UNet input (CoordConv): lets region words and
    # relations find their place on the canvas. Not with sr.crop_size (crops != whole images).
    c.model.coord_input = False

    # Super-resolution stage (eDiff-I's 64->256 and 256->1024 models). lowres_size > 0 makes
    # this config an SR stage: the model sees the image downsampled to lowres_size (then
    # degraded and noise-augmented) and learns data.image_size. 0: a base model.
    c.sr = ml_collections.ConfigDict()
    c.sr.lowres_size = 0
    # Train on random crop_size crops of the data.image_size images (the 1024 stage: 256),
    # the low-res input cropped to match; sampling still runs on whole images. 0: no crops.
    c.sr.crop_size = 0
    # Degradations of the low-res training input, by preset name: "none" (a clean area
    # downsample, what the previous stage's samples look like) or "realesrgan" (blur,
    # resize, noise, JPEG).
    c.sr.degradation = "none"
    # Noise-conditioning augmentation: training adds Gaussian noise of std ~ U[0, aug_max]
    # to the low-res input and embeds that level; sampling picks one (aug_level).
    c.sr.aug_max = 0.5
    c.sr.aug_level = 0.1
    # Residual parameterisation: the stage denoises x - up(lowres), up = bicubic upsampling
    # of its (noise-augmented) low-res input, and adds up back: D'(x) = up + D(x - up).
    # The network then learns only what bicubic misses (set edm.sigma_data to that
    # residual's std, e.g. 0.1-0.2), so colours and layout cannot drift from the input.
    c.sr.residual = False

    c.edm = ml_collections.ConfigDict()
    c.edm.sigma_data = 0.5
    c.edm.p_mean = -1.2
    c.edm.p_std = 1.2

    # eDiff-I expert ensemble. `phases` lists, per training phase, the experts' intervals
    # as quantiles (lo, hi) of the training p(sigma); each interval must lie inside one
    # interval of the previous phase (its parent, from which it is branched). Empty: a
    # single model. `phase_steps` gives each phase's length and sums to train.num_steps.
    c.experts = ml_collections.ConfigDict()
    c.experts.phases = ()
    c.experts.phase_steps = ()
    # How the per-expert update runs over the stacked expert axis: "vmap" (one batched
    # program), "unroll" (E single-model updates in one program), "scan" (lax.map, least
    # memory) or "auto": unroll on CPU, where vmapped (grouped) convolutions are slow
    # (BENCHMARKS.md, "Expert ensemble"), else vmap.
    c.experts.train_map = "auto"
    # Start an empty workdir from a single model another run trained, "WORKDIR" (its newest
    # checkpoint) or "WORKDIR@STEP": eDiff-I's branching of a trained shared model. The phases
    # must then begin with the shared phase [(0, 1)], whose phase_steps entry counts the steps
    # the source trained; the run continues from there (`training/warm_start.py`).
    c.experts.init_from = ""

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by other axes
    # Other axes: `fsdp` (parameters and optimizer state split by the sharding rules, the
    # batch split over data x fsdp), `expert` (a stacked expert axis), and `dcn`, a dict of
    # per-axis slice counts for multi-slice pods, e.g. {"data": -1, "fsdp": 8, "dcn": {"data": 2}}.
    # None: the axis is not in the mesh. They are keys here so that `--config.mesh.fsdp=8` works
    # on the command line, where the config is locked against new keys.
    c.mesh.fsdp = ml_collections.FieldReference(None, field_type=int)
    c.mesh.expert = ml_collections.FieldReference(None, field_type=int)

    # Parameter / optimizer-state sharding: (regex, rule) pairs matched in order against
    # '/'-joined parameter paths (first match wins), then the default ".*" -> "fsdp". A
    # rule is a PartitionSpec-like tuple of mesh axes, "replicate", or "fsdp" (split the
    # largest dimension divisible by the fsdp axis of tensors with >= fsdp_min_size
    # elements per device; replicate the rest). Without an fsdp mesh axis, "fsdp" replicates.
    c.sharding = ml_collections.ConfigDict()
    c.sharding.rules = ()
    c.sharding.fsdp_min_size = 2**18

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 64  # global
    c.train.num_steps = 100_000
    c.train.lr = 1e-4
    c.train.warmup_steps = 1000
    # Warmup-stable-decay: the rate falls linearly to 0 over the last lr_decay_fraction of
    # num_steps (0: constant after the warm-up). A fixed budget's last steps then settle the
    # model instead of leaving it at the noise floor of a constant rate.
    c.train.lr_decay_fraction = 0.0
    c.train.weight_decay = 0.0
    c.train.grad_clip = 1.0
    c.train.ema_decay = 0.9999  # the EMA that sampling uses by default (state.ema_params)
    # Further EMAs kept in the train state, sharded like the parameters; sample with one by
    # `python -m ediff_jax.sample --ema_decay D`.
    c.train.extra_ema_decays = ()
    # Post-hoc EMA (EDM2): power-function EMAs of these exponents (gamma; EDM2 tracks sigma_rel
    # 0.05 and 0.10, i.e. gamma 16.97 and 6.94) are tracked in the train state and saved every
    # `every` steps to WORKDIR/posthoc_ema; `python -m ediff_jax.sample --ema_sigma_rel S`
    # reconstructs the EMA of any width S from them. () turns it off.
    c.train.posthoc_ema = ml_collections.ConfigDict(dict(gammas=(), every=0))
    c.train.grad_accum = 1  # micro-batches per step (the batch is split, gradients averaged)
    # NaN/Inf in the loss or gradients: stop naming the step (False), or skip that update
    # and count it in the metrics (True).
    c.train.skip_nonfinite = False
    c.train.log_mfu = True  # model FLOP utilisation from XLA's cost analysis (CPU: vs a measured matmul peak)
    # Wall-clock budget of one run in minutes (0: none), counted from the start of
    # train_and_evaluate (compilation and data preparation included): the run checkpoints
    # and stops at the first step past it. Rerunning resumes for another budget.
    c.train.max_minutes = 0.0
    c.train.profile_steps = ()  # (first, last) steps traced with jax.profiler into WORKDIR/profile
    c.train.log_every = 100
    c.train.ckpt_every = 5000
    c.train.keep_ckpts = 3
    c.train.sample_every = 10_000  # 0 disables periodic sample grids
    # Resuming refuses changes to settings the checkpoint or the data stream depends on
    # (ediff_jax/resume_policy.py); list dotted keys here ("edm.p_mean,train.batch_size")
    # to accept such a change on purpose. The change is recorded in config_history/.
    c.train.allow_resume_change = ""
    # One trainer per workdir (WORKDIR/lock.json, with a heartbeat): a second one is refused
    # while the first is alive. True takes the workdir over from a live run on purpose.
    c.train.take_over_workdir = False

    c.sample = ml_collections.ConfigDict()
    c.sample.steps = 32
    c.sample.guidance = 3.0
    c.sample.sampler = "heun"
    c.sample.num_per_prompt = 4
    c.sample.prompts = (
        "a red circle",
        "a blue square",
        "a green triangle",
        "a yellow circle in the top left",
        "a purple square to the left of a orange circle",
    )
    return c


def use_paper_text_encoders(c: ml_collections.ConfigDict) -> None:
    """eDiff-I's encoders: T5-XXL and CLIP-L/14 from Hugging Face directories (see README)."""
    c.text.t5_path = "~/models/t5-v1_1-xxl"
    c.text.clip_path = "~/models/clip-vit-large-patch14"
    c.text.t5_max_length = 128
    c.text.clip_max_length = 77


def _unknown_keys(config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    out = []
    for key in config.keys():
        if key not in schema:
            by_lower = {k.lower(): k for k in schema.keys()}
            close = [by_lower[m] for m in difflib.get_close_matches(key.lower(), list(by_lower), n=1)]
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            out.append(f"{prefix}{key}{hint}")
        elif isinstance(config[key], ml_collections.ConfigDict) and isinstance(schema[key], ml_collections.ConfigDict):
            if key not in OPEN_SECTIONS:
                out.extend(_unknown_keys(config[key], schema[key], f"{prefix}{key}."))
    return out


# Sections whose keys are free-form (mesh axis names).
OPEN_SECTIONS = ("mesh",)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Rejects keys the code does not read (usually typos) before anything is built."""
    unknown = _unknown_keys(config, base_config())
    if unknown:
        raise ValueError(
            "Unknown config keys: " + ", ".join(unknown) + ". Check the spelling; the valid keys are those "
            "of ediff_jax/config_utils.py:base_config()."
        )
    _check_drop_rates(config.text.drop_rates)
    repeats = config.data.relation_repeats
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"config.data.relation_repeats={repeats!r}: use a whole number >= 1 (1: every example once).")
    _check_posthoc_ema(config.train.posthoc_ema)
    _check_init_from(config.experts)
    decay = config.train.lr_decay_fraction
    if not 0.0 <= float(decay) <= 1.0:  # also refuses nan
        raise ValueError(f"config.train.lr_decay_fraction={decay!r}: use a number in [0, 1], the share of "
                         "num_steps over which the rate falls to 0 (0: no decay).")


def _check_posthoc_ema(posthoc: ml_collections.ConfigDict) -> None:
    """Power-EMA exponents are finite, > -1 and distinct, and snapshots have an interval."""
    gammas = [float(g) for g in posthoc.gammas]
    if not gammas:
        return
    if any(not math.isfinite(g) or g <= -1.0 for g in gammas) or len(set(gammas)) != len(gammas):
        raise ValueError(f"config.train.posthoc_ema.gammas={tuple(posthoc.gammas)} must be distinct finite numbers "
                         "> -1 (EDM2's pair is (16.97, 6.94): sigma_rel 0.05 and 0.10).")
    if int(posthoc.every) < 1:
        raise ValueError(f"config.train.posthoc_ema.every={posthoc.every}: with gammas set, give the snapshot "
                         "interval in steps (>= 1), e.g. every=500.")


def parse_init_from(value: str) -> tuple[str, int | None]:
    """`config.experts.init_from`: 'WORKDIR' or 'WORKDIR@STEP' -> (path, step; None: the newest checkpoint).

    The path stays a string: it may be a gs:// workdir, which pathlib would mangle."""
    text = str(value).strip()
    path, sep, step = text.rpartition("@") if "@" in text else (text, "", "")
    if not path or (sep and not step.strip().isdigit()):
        raise ValueError(f"config.experts.init_from={value!r} must look like WORKDIR or WORKDIR@STEP, "
                         "e.g. workdirs/shared@4000.")
    return os.path.expanduser(path), int(step) if sep else None


def _check_init_from(experts: ml_collections.ConfigDict) -> None:
    """Config-only rules (no files read): the format, and that the phases start with the shared model."""
    value = experts.get("init_from", "") or ""
    if not isinstance(value, str):
        raise ValueError(f"config.experts.init_from={value!r} must be a string, WORKDIR or WORKDIR@STEP.")
    if not value:
        return
    parse_init_from(value)
    phases = [[tuple(float(b) for b in iv) for iv in phase] for phase in experts.phases]
    if phases and phases[0] != [(0.0, 1.0)]:
        raise ValueError(f"config.experts.init_from starts from one shared model, so config.experts.phases must "
                         f"begin with the shared phase [(0.0, 1.0)], not {phases[0]}; its phase_steps entry counts "
                         "the steps the source workdir trained.")


def _check_drop_rates(rates: ml_collections.ConfigDict) -> None:
    """Text-dropout rates are probabilities; an encoder left out is never dropped.

    A misspelt encoder name used to be dropped silently, and then the model never saw the
    fully unconditional input that classifier-free guidance extrapolates from.
    """
    for name, rate in rates.items():
        if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"config.text.drop_rates.{name}={rate!r} is not a probability; use a number in [0, 1].")


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:arg]` as the CLI does (for notebooks and tests)."""
    import importlib.util
    from pathlib import Path

    path, _, arg = spec.partition(":")
    file = Path(path).expanduser()
    if not file.exists():
        raise FileNotFoundError(f"Config file {path!r} not found.")
    module_spec = importlib.util.spec_from_file_location(f"_ediff_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        return module.get_config(arg or None)
    except ValueError as e:  # a bad argument (parse_arg): say which spec it came from
        if str(e).startswith(spec):
            raise
        raise ValueError(f"{spec}: {e}") from e


# Binary-tree branching in quantiles of p(sigma): shared model, then two experts of equal
# probability mass, then the high-noise half split again. The 3-expert layout is the paper's
# final base-model shape: one expert for the highest noise, one for the lowest, one between.
EXPERT_LAYOUTS = {
    1: (),
    2: (((0.0, 1.0),), ((0.0, 0.5), (0.5, 1.0))),
    3: (((0.0, 1.0),), ((0.0, 0.5), (0.5, 1.0)), ((0.0, 0.5), (0.5, 0.75), (0.75, 1.0))),
}


def expert_schedule(num_experts: int, num_steps: int, shared_steps: int | None = None) -> tuple[tuple, tuple]:
    """(phases, phase_steps) for `config.experts`, phases of equal length.

    The total number of training steps (and so of training samples) does not depend on the
    number of experts, which makes ablations across layouts fair. `shared_steps` fixes the
    shared phase's length (a run branched from a trained shared model, `experts.init_from`,
    counts the source's steps there); the later phases split the rest equally.
    """
    if num_experts not in EXPERT_LAYOUTS:
        raise ValueError(f"No expert layout for {num_experts} experts; choose one of {sorted(EXPERT_LAYOUTS)}.")
    phases = EXPERT_LAYOUTS[num_experts]
    if not phases:
        return (), ()
    if shared_steps is None:
        base, extra = divmod(num_steps, len(phases))
        return phases, tuple(base + (1 if i < extra else 0) for i in range(len(phases)))
    if not 0 < shared_steps < num_steps:
        raise ValueError(f"The shared phase ({shared_steps} steps) must be shorter than the run ({num_steps} steps) "
                         "and at least one step.")
    base, extra = divmod(num_steps - shared_steps, len(phases) - 1)
    return phases, (shared_steps, *(base + (1 if i < extra else 0) for i in range(len(phases) - 1)))


def p_sigma_cdf(sigma: float, p_mean: float, p_std: float) -> float:
    """P(sigma' <= sigma) under the lognormal training distribution, in float64 and without JAX, so
    configs can place expert boundaries before JAX loads (`experts.quantile_of_sigma` is the traced
    float32 twin)."""
    return NormalDist(p_mean, p_std).cdf(math.log(sigma))


def p_sigma_quantile(q: float, p_mean: float, p_std: float) -> float:
    """The sigma at quantile q in (0, 1) of the lognormal training distribution (float64, no JAX)."""
    return math.exp(NormalDist(p_mean, p_std).inv_cdf(q))


def layout_split_at_sigmas(sigmas: Sequence[float], p_mean: float, p_std: float) -> tuple:
    """Phases (shared model, then len(sigmas) + 1 experts) whose boundaries are these sigmas.

    The default layouts split p(sigma) into intervals of equal mass; this places the boundaries
    anywhere, e.g. at an SNR as Wan 2.2 does (sigma = sigma_data / sqrt(SNR)). Each expert still
    trains on an equal share of every batch, so an unequal split also reweights the noise levels
    that training sees (an interval of mass m gets 1/E of the samples, not m).
    """
    sigmas = [float(s) for s in sigmas]
    if not sigmas or any(not (math.isfinite(s) and s > 0) for s in sigmas) or sorted(set(sigmas)) != sigmas:
        raise ValueError(f"Expert boundaries {sigmas} must be positive, finite sigmas in ascending order.")
    edges = [0.0, *(p_sigma_cdf(s, p_mean, p_std) for s in sigmas), 1.0]
    if any(not 1e-6 < q < 1 - 1e-6 for q in edges[1:-1]):
        raise ValueError(f"Expert boundaries {sigmas} leave an interval that p(sigma) (lognormal {p_mean:g}, "
                         f"{p_std:g}) almost never samples; pick sigmas inside its range.")
    return (((0.0, 1.0),), tuple(zip(edges[:-1], edges[1:])))


def config_from_json(text: str, source: str = "config.json") -> ml_collections.ConfigDict:
    """A workdir's saved config.json, laid over today's defaults.

    Keys added to the code after the workdir was written take their defaults, so old
    workdirs keep loading; keys the code no longer knows are reported by validate_config.
    Text that is not a JSON object is a ValueError naming `source` and where it breaks.
    """
    import json

    try:
        saved = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{source} is not valid JSON ({e})") from e  # e: what, line, column
    if not isinstance(saved, dict):
        kind = {list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(type(saved), "a number")
        raise ValueError(f"{source} holds {kind}, not a JSON object of config sections")

    def merge(into: ml_collections.ConfigDict, saved: dict) -> None:
        for key, value in saved.items():
            if key in into and isinstance(into[key], ml_collections.ConfigDict) and isinstance(value, dict):
                merge(into[key], value)
            else:
                with into.unlocked():
                    try:
                        into[key] = value
                    except TypeError:  # a default of another type, e.g. num_res_blocks int -> per-level list
                        del into[key]
                        into[key] = value

    config = base_config()
    merge(config, saved)
    return config
