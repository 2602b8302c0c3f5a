"""eDiff-I expert ablation at quickstart scale, equal total training samples.

  configs/experts.py:experts=1   no experts (the paper's Config-A)
  configs/experts.py:experts=2   shared model, then 2 experts (equal-mass halves of p(sigma))
  configs/experts.py:experts=3   shared -> 2 -> 3 experts (highest / between / lowest noise; Config-D)

All variants train `steps` steps at batch `batch`: the same number of samples.
"""

from pathlib import Path

from ediff_jax.config_utils import expert_schedule, load_config, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(arg, experts=3, steps=1200, batch=24)  # divisible by 1, 2 and 3 experts
    c = load_config(f"{Path(__file__).with_name('quickstart.py')}:steps={args.steps},batch={args.batch}")
    c.experts.phases, c.experts.phase_steps = expert_schedule(args.experts, args.steps)
    c.train.ckpt_every = max(args.steps // 4, 1)
    return c
