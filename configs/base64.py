"""eDiff-I-style 64x64 base model on ediff_shapes.

Variants: `configs/base64.py:size=tiny` (tests, seconds), `size=small` (CPU hours),
`size=paper` (eDiff-I's shape class for pods: ADM width 256, T5-XXL + CLIP-L/14).
`experts=2` or `experts=3` trains eDiff-I's expert ensemble (shared -> branched phases of
equal length); `experts=1` (default) a single model.
"""

from ediff_jax.config_utils import base_config, expert_schedule, parse_arg, use_paper_text_encoders

SIZES = {
    "tiny": dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                 cross_attn_resolutions=(8,), num_heads=2, context_dim=32),
    "small": dict(channels=64, channel_mult=(1, 2, 3, 4), num_res_blocks=2, attn_resolutions=(16, 8),
                  cross_attn_resolutions=(16, 8), num_heads=4, context_dim=256),
    "paper": dict(channels=256, channel_mult=(1, 2, 3, 4), num_res_blocks=3, attn_resolutions=(32, 16, 8),
                  cross_attn_resolutions=(32, 16, 8), num_heads=8, context_dim=1024, dtype="bfloat16"),
}


def get_config(arg: str | None = None):
    args = parse_arg(arg, size="small", experts=1)
    if args.size not in SIZES:
        raise ValueError(f"Unknown size {args.size!r}; choose one of {sorted(SIZES)}.")
    c = base_config()
    c.model.update(SIZES[args.size])
    if args.size == "tiny":
        c.data.name = "ediff_shapes/32"
        c.data.image_size = 32
        c.train.batch_size = 8
        c.train.num_steps = 4
        c.train.log_every = 2
        c.sample.steps = 4
        c.sample.num_per_prompt = 1
    if args.size == "paper":
        use_paper_text_encoders(c)
        c.train.batch_size = 2048
    c.experts.phases, c.experts.phase_steps = expert_schedule(args.experts, c.train.num_steps)
    return c
