"""Sample from a trained workdir:

  python -m ediff_jax.sample --workdir DIR --prompt "a red circle" [--num 4 --guidance 3 --steps 32 --seed 0 --out DIR]

Writes one PNG per image and a grid (a row per prompt) into --out (default DIR/samples).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from absl import app, flags

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
    logging.getLogger().setLevel(logging.INFO)
    try:
        run()
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def run() -> None:
    import ml_collections
    import numpy as np

    from ediff_jax import trainer
    from ediff_jax.checkpoints import Checkpointer, abstract_with_shardings
    from ediff_jax.images import ensure_writable_dir, make_grid, save_png
    from ediff_jax.sampling import Sampler

    workdir = Path(FLAGS.workdir).expanduser()
    config_path = workdir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: --workdir must be a directory written by ediff_jax.train.")
    out = ensure_writable_dir(FLAGS.out or workdir / "samples")
    config = ml_collections.ConfigDict(json.loads(config_path.read_text()))
    ckpt = Checkpointer(workdir, async_save=False)
    if ckpt.latest_step() is None:
        raise FileNotFoundError(f"No checkpoint in {ckpt.directory}; train first.")
    exp = trainer.build_experiment(config)
    ckpt.check_compatible(trainer.model_meta(config))
    abstract, shardings = trainer.state_shardings(exp)
    state = ckpt.restore(abstract_with_shardings(abstract, shardings))
    sampler = Sampler(exp.model, exp.encoders, image_size=int(config.data.image_size),
                      steps=FLAGS.steps or int(config.sample.steps), sampler=FLAGS.sampler or config.sample.sampler,
                      sigma_data=float(config.edm.sigma_data), progress=True)
    prompts = [p for p in FLAGS.prompt for _ in range(FLAGS.num)]
    guidance = FLAGS.guidance if FLAGS.guidance is not None else float(config.sample.guidance)
    images = sampler(state.ema_params, prompts, guidance=guidance, seed=FLAGS.seed,
                     use_t5=FLAGS.use_t5, use_clip=FLAGS.use_clip)
    upscale = max(1, 128 // images.shape[1])
    for i, img in enumerate(images):
        save_png(img, out / f"{i // FLAGS.num:02d}_{i % FLAGS.num:02d}.png", upscale=upscale)
    save_png(make_grid(images, cols=FLAGS.num), out / "grid.png", upscale=upscale)
    (out / "prompts.txt").write_text("\n".join(FLAGS.prompt) + "\n")
    print(f"Wrote {len(images)} images and grid.png to {out} (step {ckpt.latest_step()}, guidance {guidance}).")


if __name__ == "__main__":
    app.run(main)
