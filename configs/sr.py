"""eDiff-I-style super-resolution stages on ediff_shapes: 64 -> 256 and 256 -> 1024.

  python -m ediff_jax.train --config configs/sr.py:stage=256 --workdir workdirs/sr256
  python -m ediff_jax.train --config configs/sr.py:stage=1024 --workdir workdirs/sr1024
  python -m ediff_jax.sample --workdir workdirs/base64 --sr_workdir workdirs/sr256 \\
      --sr_workdir workdirs/sr1024 --prompt "a red circle"

Variants: `size=tiny` (tests: 16 -> 32 and 32 -> 64 stages on ediff_shapes/32, seconds),
`size=small` (CPU hours), `size=paper` (eDiff-I's shape class for pods). `experts=2`
trains a 2-expert SR stage (eDiff-I's SR models are 2-expert ensembles).

The 256 stage is an Imagen-style efficient UNet: more blocks at low resolution, fewer at
high, attention only at low resolution. The 1024 stage has no self-attention at all
(cross-attention at its lowest level only), trains on random 256x256 crops of the 1024
images and runs on whole 1024x1024 images at sampling time: its attention is placed by
level (`*_levels`), so it does not depend on the feature-map size.
"""

import ml_collections

from ediff_jax.config_utils import base_config, expert_schedule, parse_arg, use_paper_text_encoders

# stage -> size -> (model, data, sr) settings
STAGES = {
    "256": {
        "tiny": dict(model=dict(channels=16, channel_mult=(1, 2), num_res_blocks=(1, 2), attn_resolutions=(),
                                cross_attn_resolutions=(), attn_levels=(1,), cross_attn_levels=(1,), num_heads=2,
                                context_dim=32),
                     data=dict(name="ediff_shapes/32", image_size=32), sr=dict(lowres_size=16, crop_size=0)),
        "small": dict(model=dict(channels=64, channel_mult=(1, 2, 4), num_res_blocks=(1, 2, 3), attn_resolutions=(),
                                 cross_attn_resolutions=(), attn_levels=(2,), cross_attn_levels=(2,), num_heads=4,
                                 context_dim=256),
                      data=dict(name="ediff_shapes/256", image_size=256), sr=dict(lowres_size=64, crop_size=0)),
        "paper": dict(model=dict(channels=128, channel_mult=(1, 2, 4, 8), num_res_blocks=(2, 3, 4, 4),
                                 attn_resolutions=(), cross_attn_resolutions=(), attn_levels=(3,),
                                 cross_attn_levels=(2, 3), num_heads=8, context_dim=1024, dtype="bfloat16"),
                      data=dict(name="ediff_shapes/256", image_size=256), sr=dict(lowres_size=64, crop_size=0)),
    },
    "1024": {
        "tiny": dict(model=dict(channels=16, channel_mult=(1, 2), num_res_blocks=(1, 1), attn_resolutions=(),
                                cross_attn_resolutions=(), cross_attn_levels=(1,), mid_self_attn=False, num_heads=2,
                                context_dim=32),
                     data=dict(name="ediff_shapes/32", image_size=64), sr=dict(lowres_size=32, crop_size=32)),
        "small": dict(model=dict(channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=(1, 1, 2, 2),
                                 attn_resolutions=(), cross_attn_resolutions=(), cross_attn_levels=(3,),
                                 mid_self_attn=False, num_heads=4, context_dim=256),
                      data=dict(name="ediff_shapes/1024", image_size=1024), sr=dict(lowres_size=256, crop_size=256)),
        "paper": dict(model=dict(channels=128, channel_mult=(1, 2, 4, 4, 8), num_res_blocks=(2, 2, 3, 4, 4),
                                 attn_resolutions=(), cross_attn_resolutions=(), cross_attn_levels=(4,),
                                 mid_self_attn=False, num_heads=8, context_dim=1024, dtype="bfloat16"),
                      data=dict(name="ediff_shapes/1024", image_size=1024), sr=dict(lowres_size=256, crop_size=256)),
    },
}


def get_config(arg: str | None = None):
    args = parse_arg(arg, stage="256", size="small", experts=1, degradation="none")
    if args.stage not in STAGES or args.size not in STAGES[args.stage]:
        raise ValueError(f"Unknown SR variant stage={args.stage!r}, size={args.size!r}; stages: {sorted(STAGES)}, "
                         f"sizes: {sorted(STAGES['256'])}.")
    preset = STAGES[args.stage][args.size]
    c = base_config()
    c.model = ml_collections.ConfigDict({**c.model.to_dict(), **preset["model"]})  # num_res_blocks: int -> tuple
    c.data.update(preset["data"])
    c.sr.update(preset["sr"])
    c.sr.degradation = args.degradation
    c.sample.steps = 16
    c.sample.guidance = 1.0  # eDiff-I's SR stages need little guidance: the low-res image carries the content
    c.sample.num_per_prompt = 2
    if args.size == "tiny":
        c.train.batch_size = 8
        c.train.num_steps = 2
        c.train.log_every = 1
        c.train.sample_every = 0
        c.sample.steps = 3
        c.sample.num_per_prompt = 1
        c.sample.prompts = ("a red circle", "a blue square")
    if args.size == "paper":
        use_paper_text_encoders(c)
        c.train.batch_size = 2048
    c.experts.phases, c.experts.phase_steps = expert_schedule(args.experts, c.train.num_steps)
    return c
