"""Sample from a trained workdir:

  python -m ediff_jax.sample --workdir DIR --prompt "a red circle" [--num 4 --guidance 3 --steps 32 --seed 0 --out DIR]

Writes one PNG per image and a grid (a row per prompt) into --out (default DIR/samples).

Every flag fills one field of a `spec.GenerationSpec`, and `generation.generate` runs it, so
the features combine freely:
- Paint-with-words: `--paint "red circle=left.png" --paint "blue square=right.png" --pww-weight 0.4`
  places each phrase of the prompt in its painted (white) region; masks are PNGs of any size.
- MultiDiffusion canvas: `--height/--width` (a panorama), `--circular`, `--region 'PROMPT=MASK.png'`
  (--prompt is the background); painted masks are stretched to the canvas and cut per crop.
- Cascade (eDiff-I's text -> 64 -> 256 -> 1024): one `--sr_workdir` per SR stage, in order of
  resolution; `--sr_steps/--sr_guidance/--aug_level/--sr_seed` per SR stage (repeat the flag per
  stage). A canvas goes through the SR stages whole (--sr_mode full) or as tiles (--sr_mode tiles),
  and a painting paints every stage. Each stage's PNGs go to OUT/stage{k}_{H}x{W}/ (default
  DIR/cascade).
- Experts: `--guidance` once for every expert, or once per expert (highest noise first).

A flag that the rest of the command gives nothing to act on is refused with one line (`spec.check`),
never dropped.
"""

from __future__ import annotations

import math

from ediff_jax import logs

logs.quiet_startup_banners()  # before anything imports TF or transformers

from absl import app, flags

from ediff_jax.spec import GenerationSpec

flags.DEFINE_string("workdir", None, "A workdir written by ediff_jax.train.", required=True)
flags.DEFINE_multi_string("prompt", None, "Prompt(s); repeat the flag for several.", required=True)
flags.DEFINE_integer("num", 4, "Images per prompt.")
flags.DEFINE_multi_float("guidance", None, "Classifier-free guidance scale (default: the config's); repeat it "
                        "once per expert of an ensemble, highest noise first, for one scale each.")
flags.DEFINE_integer("steps", None, "Sampler steps (default: the config's).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("sampler", None, "heun, euler or dpmpp_2m (default: the config's).")
flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/samples).")
flags.DEFINE_float("ema_decay", None, "Which EMA of the weights to sample with (default: config.train.ema_decay; "
                   "others: config.train.extra_ema_decays).")
flags.DEFINE_float("ema_sigma_rel", None, "Post-hoc EMA (EDM2): reconstruct the EMA of this relative width, e.g. "
                   "0.05-0.15, from the run's snapshots (config.train.posthoc_ema); excludes --ema_decay.")
flags.DEFINE_bool("use_t5", True, "Condition on T5 (False: CLIP only).")
flags.DEFINE_bool("use_clip", True, "Condition on CLIP (False: T5 only).")
flags.DEFINE_multi_string("paint", None, "Paint-with-words: 'PHRASE=MASK.png' (PNG of any size, white = the "
                          "phrase's region), for every prompt; repeat the flag per phrase.")
flags.DEFINE_float("pww_weight", 0.4, "Paint-with-words strength w' (0: off). Also spelled --pww-weight.")
flags.DEFINE_integer("height", None, "MultiDiffusion canvas height (default: the model's image size).")
flags.DEFINE_integer("width", None, "MultiDiffusion canvas width (default: the model's image size).")
flags.DEFINE_integer("stride", None, "MultiDiffusion stride between crops (default: a quarter of the model's size).")
flags.DEFINE_bool("circular", False, "MultiDiffusion: wrap the width around (360-degree panorama).")
flags.DEFINE_multi_string("region", None, "MultiDiffusion region 'PROMPT=MASK.png' (mask at canvas size, white = "
                          "inside); --prompt is the background. Repeat per region.")
flags.DEFINE_integer("chunk_size", None, "MultiDiffusion crops per batched model call (default: all; fewer: less "
                     "memory).")
flags.DEFINE_enum("canvas_strategy", "overlap", ["overlap", "gaussian", "shifted"], "MultiDiffusion: the crops "
                  "of each step: overlap (MultiDiffusion, --stride apart), gaussian (Mixture of Diffusers' tile "
                  "weights) or shifted (SpotDiffusion: non-overlapping windows, shifted at random each step).")
flags.DEFINE_float("coherence", 0.0, "MultiDiffusion: weight of SyncDiffusion's coherence guidance (each crop's "
                   "prediction pulled towards the first crop's in the shipped feature space; 0: off), on top of "
                   "--canvas_strategy.")
flags.DEFINE_integer("coherence_steps", None, "MultiDiffusion: the first steps that --coherence guides (default: "
                     "half of --steps).")
flags.DEFINE_float("bootstrap", 0.2, "MultiDiffusion: fraction of steps with region bootstrapping.")
flags.DEFINE_multi_string("sr_workdir", None, "Cascade: an SR stage's workdir, after --workdir's base model; "
                          "repeat in order of resolution (256, then 1024).")
flags.DEFINE_multi_integer("sr_steps", None, "Cascade: sampler steps per SR stage (default: each stage's config).")
flags.DEFINE_multi_float("sr_guidance", None, "Cascade: guidance per SR stage (default: each stage's config).")
flags.DEFINE_multi_float("aug_level", None, "Cascade: noise-augmentation level of the low-res input per SR stage "
                         "(default: each stage's config.sr.aug_level).")
flags.DEFINE_multi_integer("sr_seed", None, "Cascade: seed per SR stage (default: --seed + stage index).")
flags.DEFINE_enum("sr_mode", "full", ["full", "tiles"], "Cascade: SR stages on the whole image or canvas (full) "
                  "or as MultiDiffusion tiles of each stage's training size (its crop size if trained on crops).")
FLAGS = flags.FLAGS

# The valid range of every numeric flag that has one: (is the value valid, what is valid).
# Checked by check_flags before anything is loaded; a multi flag's every value is checked.
FLAG_RANGES = {
    "num": (lambda v: v >= 1, "an integer >= 1 (images per prompt), e.g. --num 4"),
    "steps": (lambda v: v >= 1, "an integer >= 1 (sampler steps), e.g. --steps 32; leave it out for the config's"),
    "sr_steps": (lambda v: v >= 1, "an integer >= 1 (an SR stage's sampler steps); leave it out for the config's"),
    "height": (lambda v: v >= 1, "a canvas height >= 1 pixel; leave it out for the model's image size"),
    "width": (lambda v: v >= 1, "a canvas width >= 1 pixel; leave it out for the model's image size"),
    "stride": (lambda v: v >= 1, "an integer >= 1 (pixels between crops); leave it out for a quarter of the "
               "model's size"),
    "chunk_size": (lambda v: v >= 1, "an integer >= 1 (crops per model call); leave it out for all at once"),
    "guidance": (math.isfinite, "a finite number, e.g. --guidance 3; leave it out for the config's"),
    "sr_guidance": (math.isfinite, "a finite number; leave it out for the config's"),
    "aug_level": (lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0 (noise std of the low-res input), "
                  "e.g. --aug_level 0.1"),
    "bootstrap": (lambda v: 0 <= v <= 1, "a fraction of the steps in [0, 1], e.g. --bootstrap 0.2"),
    "pww_weight": (math.isfinite, "a finite number, e.g. --pww_weight 0.4 (0: off)"),
    "ema_decay": (lambda v: 0 < v < 1, "an EMA decay in (0, 1) that the workdir keeps; leave it out for the default"),
    "ema_sigma_rel": (lambda v: 0 < v <= 0.30028, "a relative EMA width in (0, 0.30028], e.g. --ema_sigma_rel 0.1"),
}


def check_flags() -> None:
    """Refuses a flag value outside its range (FLAG_RANGES), naming the flag and what is valid."""
    for name, (valid, what) in FLAG_RANGES.items():
        value = FLAGS[name].value
        for v in value if isinstance(value, list) else [value]:
            if v is not None and not valid(v):
                raise ValueError(f"--{name}={v} is out of range: it must be {what}.")


# Each flag's spec field, for the refusal messages (`GenerationSpec.check(names)`).
FLAG_NAMES = {
    "workdir": "--workdir", "prompts": "--prompt", "num": "--num", "seed": "--seed", "base.steps": "--steps",
    "base.guidance": "--guidance", "base.sampler": "--sampler", "base.seed": "--seed", "sr.steps": "--sr_steps",
    "sr.guidance": "--sr_guidance", "sr.aug_level": "--aug_level", "sr.seed": "--sr_seed", "sr.sampler": "--sampler",
    "sr_stages.workdir": "--sr_workdir", "sr_mode": "--sr_mode", "canvas.height": "--height",
    "canvas.width": "--width", "canvas.stride": "--stride", "canvas.circular": "--circular",
    "canvas.chunk_size": "--chunk_size", "canvas.regions": "--region", "canvas.strategy": "--canvas_strategy",
    "canvas.bootstrap_fraction": "--bootstrap", "canvas.coherence": "--coherence",
    "canvas.coherence_steps": "--coherence_steps",
    "paint.phrases": "--paint", "paint.weight": "--pww_weight", "ema_decay": "--ema_decay",
    "ema_sigma_rel": "--ema_sigma_rel",
}


def _changed(name: str):
    """A flag's value when it was given at other than its default (an explicit default changes nothing)."""
    flag = FLAGS[name]
    return flag.value if flag.present and flag.value != flag.default else None


def _per_stage(values: list | None, count: int, name: str) -> list:
    """A per-SR-stage flag: absent, or one value per --sr_workdir."""
    values = list(values or [])
    if values and len(values) != count:
        raise ValueError(f"--{name} was given {len(values)} times but there are {count} --sr_workdir stages; "
                         "give it once per stage, in the same order.")
    return values or [None] * count


def spec_from_flags() -> GenerationSpec:
    """The one `GenerationSpec` the flags describe, checked (`spec.check`) in the flags' names."""
    from ediff_jax.spec import CanvasSpec, GenerationSpec, PaintSpec, SRStage, StageSettings, parse_paint, parse_region

    workdirs = list(FLAGS.sr_workdir or [])
    n = len(workdirs)
    per = zip(workdirs, _per_stage(FLAGS.sr_steps, n, "sr_steps"), _per_stage(FLAGS.sr_guidance, n, "sr_guidance"),
              _per_stage(FLAGS.aug_level, n, "aug_level"), _per_stage(FLAGS.sr_seed, n, "sr_seed"))
    sr_stages = tuple(SRStage(w, StageSettings(steps=st, guidance=g, aug_level=a, seed=sd, sampler=FLAGS.sampler))
                      for w, st, g, a, sd in per)
    canvas = CanvasSpec(height=FLAGS.height, width=FLAGS.width, stride=FLAGS.stride, circular=FLAGS.circular,
                        chunk_size=FLAGS.chunk_size, regions=tuple(parse_region(r) for r in FLAGS.region or []),
                        bootstrap_fraction=_changed("bootstrap"), strategy=FLAGS.canvas_strategy,
                        coherence=FLAGS.coherence, coherence_steps=FLAGS.coherence_steps)
    paint = PaintSpec(parse_paint(FLAGS.paint), FLAGS.pww_weight) if FLAGS.paint or _changed("pww_weight") else None
    guidance = FLAGS.guidance or None
    spec = GenerationSpec(
        workdir=FLAGS.workdir, prompts=tuple(FLAGS.prompt), num=FLAGS.num, seed=FLAGS.seed,
        base=StageSettings(steps=FLAGS.steps, guidance=guidance[0] if guidance and len(guidance) == 1 else
                           (tuple(guidance) if guidance else None), sampler=FLAGS.sampler),
        canvas=None if canvas == CanvasSpec() else canvas, paint=paint, sr_stages=sr_stages, sr_mode=FLAGS.sr_mode,
        ema_decay=FLAGS.ema_decay, ema_sigma_rel=FLAGS.ema_sigma_rel, use_t5=FLAGS.use_t5, use_clip=FLAGS.use_clip,
    )
    spec.check(FLAG_NAMES)
    return spec


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        logs.fail(f"unexpected arguments {argv[1:]}: quote a prompt of several words, e.g. --prompt \"a red circle\".")
    logs.quiet_library_logs()
    from ediff_jax.checkpoints import (
        CheckpointReadError,  # deferred: orbax is slow to import
    )

    # The user's input, and a checkpoint that fails to read (OOM, storage): one line, no traceback.
    with logs.user_errors(ValueError, FileNotFoundError, CheckpointReadError):
        check_flags()
        run()


def run() -> None:
    spec = spec_from_flags()  # every flag checked before anything heavy is imported
    from ediff_jax.generation import generate  # deferred so --help and flag errors are fast

    outputs = generate(spec, out=FLAGS.out)
    out = FLAGS.out or f"{FLAGS.workdir}/{'cascade' if spec.sr_stages else 'samples'}"
    extras = ", masks.png" if spec.paint else ""
    if spec.sr_stages:
        sizes = ", ".join(f"{o.shape[1]}x{o.shape[2]}" for o in outputs)
        print(f"Wrote {len(outputs[-1])} images per stage ({sizes}) to {out}/stage*/.")
    else:
        print(f"Wrote {len(outputs[-1])} images, grid.png{extras} to {out}.")


def parse_flags(argv: list[str]) -> list[str]:
    """absl parsing that also accepts hyphenated names of defined flags (--pww-weight); a flag
    that does not parse ends in one line (`logs.fail`), not a traceback."""

    def normalise(arg: str) -> str:
        name, sep, value = arg[2:].partition("=")
        alt = name.replace("-", "_")
        known = alt in FLAGS or (alt.startswith("no") and alt[2:] in FLAGS)
        return f"--{alt}{sep}{value}" if arg.startswith("--") and "-" in name and known else arg

    end = argv.index("--") if "--" in argv else len(argv)
    try:
        return FLAGS(argv[:1] + [normalise(a) for a in argv[1:end]] + argv[end:])
    except flags.Error as e:  # a missing, unknown or mistyped flag: one line, no traceback
        logs.fail(f"{str(e).rstrip('.')} (--helpshort lists the flags).")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
