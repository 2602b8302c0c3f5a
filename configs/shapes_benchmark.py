"""The reference run (issue #9): train on ediff_shapes for at most 60 minutes on a 2-core CPU.

  python experiments/shapes_benchmark.py --workdir workdirs/shapes_benchmark --out experiments/results/shapes_benchmark

trains this config (or reuses a finished run) and scores samples of one-object prompts
(colour and shape) and two-object prompts with a relation (everything correct), read back
from pixels by `ediff_jax.eval`. Goal: >= 95% and >= 85%. What it reaches is in BENCHMARKS.md.

Why this shape: at 60 CPU minutes the budget buys samples, not parameters. The quickstart
UNet (1.3M parameters) with cross-attention added at 16x16 costs 0.48 s per batch-16 step
on the idle 2-core VM, about 7000 steps (112k samples, 6x the quickstart's) in the budget;
a 3M-parameter variant (width 48, self-attention at 16x16) measured 1.11 s per step, 8x
fewer samples for 2.3x the parameters. Text embeddings are cached (the frozen encoders are
not rerun every step). `train.max_minutes` time-boxes the run whatever the machine's speed.

Variants: `steps=N`, `batch=B`, `minutes=M` (0: no time box).
"""

from pathlib import Path

from ediff_jax.config_utils import base_config, load_config, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(arg, steps=6800, batch=16, minutes=60.0)
    c = load_config(f"{Path(__file__).with_name('quickstart.py')}:steps={args.steps},batch={args.batch}")
    c.data.text_cache = True
    c.model.cross_attn_resolutions = (16, 8)  # word -> place binding at two scales
    c.train.max_minutes = args.minutes
    c.train.warmup_steps = 200
    c.train.ema_decay = 0.999  # ~700-step half-life: averages the last tenth of the run
    c.train.extra_ema_decays = (0.9995,)
    c.train.log_every = 100
    c.train.ckpt_every = max(args.steps // 4, 1)  # four checkpoints: the learning curve
    c.train.keep_ckpts = 4
    c.sample.guidance = 2.0
    # the default grid (every caption template) plus a second relation
    c.sample.prompts = base_config().sample.prompts + ("a blue triangle above a red square",)
    return c
