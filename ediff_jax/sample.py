"""Sample from a trained workdir:

  python -m ediff_jax.sample --workdir DIR --prompt "a red circle" [--num 4 --guidance 3 --steps 32 --seed 0 --out DIR]

Writes one PNG per image and a grid (a row per prompt) into --out (default DIR/samples).

Cascade (eDiff-I's text -> 64 -> 256 -> 1024): add one `--sr_workdir` per SR stage, in
order of resolution; `--sr_steps/--sr_guidance/--aug_level/--sr_seed` give per-SR-stage
values (repeat the flag per stage). Each stage's PNGs go to OUT/stage{k}_{H}x{W}/. With
--height/--width (or --region) the base canvas is a MultiDiffusion panorama, upsampled by the SR
stages fully convolutionally (--sr_mode full) or as tiles (--sr_mode tiles); --paint paints
every stage at its own resolution.

Paint-with-words: `--paint "red circle=left.png" --paint "blue square=right.png" --pww-weight 0.4`
places each phrase of the prompt in its painted (white) region; masks are PNGs of any size. On a
canvas (--height/--width/--region) the masks are stretched to the canvas and each crop is
conditioned on its own crop of them; with --region prompts each prompt takes the phrases it has.

The flags choose one mode (plain, paint, canvas, cascade; `MODE_FLAGS`). A flag the chosen
mode does not read is refused with one line, never dropped.
"""

from __future__ import annotations

import math

from ediff_jax import logs

logs.quiet_startup_banners()  # before anything imports TF or transformers

from absl import app, flags

flags.DEFINE_string("workdir", None, "A workdir written by ediff_jax.train.", required=True)
flags.DEFINE_multi_string("prompt", None, "Prompt(s); repeat the flag for several.", required=True)
flags.DEFINE_integer("num", 4, "Images per prompt.")
flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: the config's).")
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


# What each mode reads. Every mode reads COMMON_FLAGS; a flag a mode does not read is refused
# (`refuse_unread_flags`), so no flag is silently ignored.
COMMON_FLAGS = ("workdir", "prompt", "num", "guidance", "steps", "seed", "sampler", "out", "ema_decay",
                "ema_sigma_rel", "use_t5", "use_clip")
MODE_FLAGS = {
    "image": (),
    "paint": ("paint", "pww_weight"),
    "canvas": ("height", "width", "stride", "circular", "region", "chunk_size", "bootstrap", "paint", "pww_weight"),
    "cascade": ("sr_workdir", "sr_steps", "sr_guidance", "aug_level", "sr_seed", "sr_mode", "height", "width",
                "stride", "circular", "chunk_size", "region", "bootstrap", "paint", "pww_weight"),
}
MODE_NAMES = {"image": "plain sampling", "paint": "paint-with-words", "canvas": "a MultiDiffusion canvas",
              "cascade": "a cascade"}
MODE_SWITCHES = {"paint": "--paint 'PHRASE=MASK.png'", "canvas": "--height/--width/--region/--circular",
                 "cascade": "--sr_workdir"}
SAMPLE_FLAGS = tuple(dict.fromkeys(COMMON_FLAGS + sum(MODE_FLAGS.values(), ())))


def sample_mode() -> str:
    """The mode the given flags ask for: a cascade, a canvas, a painting, or plain sampling."""
    if FLAGS.sr_workdir:
        return "cascade"
    if FLAGS.height is not None or FLAGS.width is not None or FLAGS.region or FLAGS.circular:
        return "canvas"
    return "paint" if FLAGS.paint else "image"


def conditional_refusal(mode: str, name: str) -> str | None:
    """Why `mode` does not read `name` in this combination of flags, when it reads it in others."""
    if mode in ("canvas", "cascade") and name == "bootstrap" and not FLAGS.region:
        return "--bootstrap acts on --region prompts only: add --region or drop --bootstrap."
    if mode in ("canvas", "cascade") and name == "pww_weight" and not FLAGS.paint:
        return "--pww_weight is the strength of --paint: add --paint 'PHRASE=MASK.png' or drop --pww_weight."
    canvas_in_cascade = (FLAGS.height is not None or FLAGS.width is not None or FLAGS.sr_mode == "tiles"
                         or bool(FLAGS.region))
    if mode == "cascade" and name in ("stride", "circular", "chunk_size") and not canvas_in_cascade:
        return (f"--{name} sets up MultiDiffusion crops, and this cascade samples none: add --height/--width (a "
                f"panorama) or --sr_mode tiles, or drop --{name}.")
    return None


def refuse_unread_flags(mode: str) -> None:
    """A flag given (at a value other than its default) that `mode` does not read: one line, what it is for and
    the fix. An explicit default (`--nocircular`) changes nothing, so it passes."""
    for name in SAMPLE_FLAGS:
        if not FLAGS[name].present or FLAGS[name].value == FLAGS[name].default or name in COMMON_FLAGS:
            continue
        if name in MODE_FLAGS[mode]:
            why = conditional_refusal(mode, name)
            if why:
                raise ValueError(why)
            continue
        users = [m for m in MODE_FLAGS if name in MODE_FLAGS[m]]
        uses = " or ".join(MODE_NAMES[m] for m in users)
        if mode == "image":
            switches = " or ".join(MODE_SWITCHES[m] for m in users)
            raise ValueError(f"--{name} is for {uses}, which plain sampling is not: add {switches}, or drop --{name}.")
        raise ValueError(f"--{name} is for {uses} and does not combine with {MODE_NAMES[mode]} "
                         f"({MODE_SWITCHES[mode]}) yet; drop one of them.")


def _per_stage(values: list | None, count: int, name: str) -> list:
    """A per-SR-stage flag: absent, or one value per --sr_workdir."""
    values = list(values or [])
    if values and len(values) != count:
        raise ValueError(f"--{name} was given {len(values)} times but there are {count} --sr_workdir stages; "
                         "give it once per stage, in the same order.")
    return values or [None] * count


def run_cascade_flags(out: str) -> None:
    from ediff_jax.cascade import StageSettings, sample_cascade_from_workdirs
    from ediff_jax.multidiffusion import parse_region
    from ediff_jax.paint_with_words import parse_paint

    n = len(FLAGS.sr_workdir)
    per = zip(_per_stage(FLAGS.sr_steps, n, "sr_steps"), _per_stage(FLAGS.sr_guidance, n, "sr_guidance"),
              _per_stage(FLAGS.aug_level, n, "aug_level"), _per_stage(FLAGS.sr_seed, n, "sr_seed"))
    settings = [StageSettings(steps=FLAGS.steps, guidance=FLAGS.guidance, seed=FLAGS.seed, sampler=FLAGS.sampler)]
    settings += [StageSettings(steps=st, guidance=g, aug_level=a, seed=sd, sampler=FLAGS.sampler)
                 for st, g, a, sd in per]
    outputs = sample_cascade_from_workdirs(
        FLAGS.workdir, FLAGS.sr_workdir, FLAGS.prompt, settings, num=FLAGS.num, out=out, height=FLAGS.height,
        width=FLAGS.width, stride=FLAGS.stride, circular=FLAGS.circular, sr_mode=FLAGS.sr_mode,
        chunk_size=FLAGS.chunk_size, seed=FLAGS.seed, ema_decay=FLAGS.ema_decay, ema_sigma_rel=FLAGS.ema_sigma_rel,
        use_t5=FLAGS.use_t5, use_clip=FLAGS.use_clip, regions=[parse_region(r) for r in FLAGS.region or []],
        paint=parse_paint(FLAGS.paint) or None, pww_weight=FLAGS.pww_weight, bootstrap_fraction=FLAGS.bootstrap,
    )
    sizes = ", ".join(f"{o.shape[1]}x{o.shape[2]}" for o in outputs)
    print(f"Wrote {len(outputs[-1])} images per stage ({sizes}) to {out}/stage*/.")


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
    from ediff_jax.generation import sample_from_workdir  # deferred so --help is fast

    out = FLAGS.out or f"{FLAGS.workdir}/samples"
    mode = sample_mode()
    refuse_unread_flags(mode)
    if mode == "cascade":
        run_cascade_flags(out)
    elif mode == "canvas":
        from ediff_jax.multidiffusion import parse_region, sample_canvas_from_workdir
        from ediff_jax.paint_with_words import parse_paint

        images = sample_canvas_from_workdir(
            FLAGS.workdir, FLAGS.prompt, height=FLAGS.height, width=FLAGS.width, stride=FLAGS.stride,
            circular=FLAGS.circular, regions=[parse_region(r) for r in FLAGS.region or []], num=FLAGS.num,
            guidance=FLAGS.guidance, steps=FLAGS.steps, seed=FLAGS.seed, sampler=FLAGS.sampler, out=out,
            use_t5=FLAGS.use_t5, use_clip=FLAGS.use_clip, chunk_size=FLAGS.chunk_size,
            bootstrap_fraction=FLAGS.bootstrap, ema_decay=FLAGS.ema_decay, ema_sigma_rel=FLAGS.ema_sigma_rel,
            paint=parse_paint(FLAGS.paint) or None, pww_weight=FLAGS.pww_weight,
        )
        painted = ", masks.png" if FLAGS.paint else ""
        print(f"Wrote {len(images)} canvases, grid.png{painted} to {out}.")
    elif mode == "paint":
        from ediff_jax.paint_with_words import parse_paint, sample_with_paint

        images = sample_with_paint(
            FLAGS.workdir, FLAGS.prompt, parse_paint(FLAGS.paint), weight=FLAGS.pww_weight, num=FLAGS.num,
            guidance=FLAGS.guidance, steps=FLAGS.steps, seed=FLAGS.seed, sampler=FLAGS.sampler, out=out,
            use_t5=FLAGS.use_t5, use_clip=FLAGS.use_clip, ema_decay=FLAGS.ema_decay, ema_sigma_rel=FLAGS.ema_sigma_rel,
        )
        print(f"Wrote {len(images)} painted images, grid.png and masks.png to {out}.")
    else:
        images = sample_from_workdir(
            FLAGS.workdir, FLAGS.prompt, num=FLAGS.num, guidance=FLAGS.guidance, steps=FLAGS.steps,
            seed=FLAGS.seed, sampler=FLAGS.sampler, out=out, use_t5=FLAGS.use_t5, use_clip=FLAGS.use_clip,
            ema_decay=FLAGS.ema_decay, ema_sigma_rel=FLAGS.ema_sigma_rel,
        )
        print(f"Wrote {len(images)} images and grid.png to {out}.")


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
