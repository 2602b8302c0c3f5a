"""Small builders shared by several test modules (imported as `helpers`; tests/ is on sys.path)."""

from pathlib import Path

from ediff_jax.config_utils import load_config

REPO = Path(__file__).resolve().parents[1]


def tiny_train_config(data_dir: str, **train):
    """The tiny base model at one level (cheap to compile), 4 steps, no sample grids;
    `train` overrides config.train keys."""
    c = load_config(str(REPO / "configs/base64.py:size=tiny"))
    c.data.data_dir = data_dir
    c.model.channel_mult, c.model.attn_resolutions, c.model.cross_attn_resolutions = (1,), (), (32,)
    c.train.update({**dict(num_steps=4, ckpt_every=100, lr=2e-3, warmup_steps=1, log_every=1, log_mfu=False), **train})
    c.sample.prompts = ()
    return c
