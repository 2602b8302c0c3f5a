"""Quickstart: a small text-to-image model on ediff_shapes at 32x32, trained from scratch
on a 2-core CPU in about ten minutes, then a sample grid written into the workdir.

  python -m ediff_jax.train --config configs/quickstart.py --workdir workdirs/quickstart
"""

from ediff_jax.config_utils import base_config, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(arg, steps=1200, batch=16)
    c = base_config()
    c.data.name = "ediff_shapes/32"
    c.data.image_size = 32
    c.data.shuffle_buffer = 5000

    c.model.channels = 32
    c.model.channel_mult = (1, 2, 2)
    c.model.num_res_blocks = 1
    c.model.attn_resolutions = (8,)
    c.model.cross_attn_resolutions = (8,)
    c.model.num_heads = 2
    c.model.context_dim = 64

    c.train.batch_size = args.batch
    c.train.num_steps = args.steps
    c.train.lr = 1e-3
    c.train.warmup_steps = 100
    c.train.ema_decay = 0.995
    c.train.log_every = 50
    c.train.ckpt_every = 500
    c.train.sample_every = 0

    c.sample.steps = 24
    c.sample.guidance = 2.0
    c.sample.num_per_prompt = 4
    c.sample.prompts = (
        "a red circle",
        "a blue square",
        "a green triangle",
        "a yellow circle",
        "a purple square",
        "a orange triangle",
    )
    return c
