"""Sample from a trained workdir:

  python -m ediff_jax.sample --workdir DIR --prompt "a red circle" [--num 4 --guidance 3 --steps 32 --seed 0 --out DIR]

Writes one PNG per image and a grid (a row per prompt) into --out (default DIR/samples).
"""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # TF is only our data loader: hide its C++ banners

import sys

from absl import app, flags

from ediff_jax.logs import quiet_library_logs

flags.DEFINE_string("workdir", None, "A workdir written by ediff_jax.train.", required=True)
flags.DEFINE_multi_string("prompt", None, "Prompt(s); repeat the flag for several.", required=True)
flags.DEFINE_integer("num", 4, "Images per prompt.")
flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: the config's).")
flags.DEFINE_integer("steps", None, "Sampler steps (default: the config's).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("sampler", None, "heun or euler (default: the config's).")
flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/samples).")
flags.DEFINE_bool("use_t5", True, "Condition on T5 (False: CLIP only).")
flags.DEFINE_bool("use_clip", True, "Condition on CLIP (False: T5 only).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    quiet_library_logs()
    try:
        run()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def run() -> None:
    from ediff_jax.sampling import sample_from_workdir  # deferred so --help is fast

    out = FLAGS.out or f"{FLAGS.workdir}/samples"
    images = sample_from_workdir(
        FLAGS.workdir, FLAGS.prompt, num=FLAGS.num, guidance=FLAGS.guidance, steps=FLAGS.steps, seed=FLAGS.seed,
        sampler=FLAGS.sampler, out=out, use_t5=FLAGS.use_t5, use_clip=FLAGS.use_clip,
    )
    print(f"Wrote {len(images)} images and grid.png to {out}.")


if __name__ == "__main__":
    app.run(main)
