"""A small x4 super-resolution model on real photographs (they ship inside the
scikit-image and scikit-learn wheels): trained on random 32x32 crops (8x8 low-res
inputs) of 7 photos, evaluated on 3 held-out photos against bicubic upsampling (PSNR
and SSIM), sampled as MultiDiffusion tiles of the crop size (see experiments/sr_photos.py).

  python experiments/sr_photos.py --workdir workdirs/sr_photos    # train + evaluation table
  python -m ediff_jax.train --config configs/sr_photos.py --workdir workdirs/sr_photos  # train only

Training is time-boxed: `minutes=M` (default 58, under the issue's 60-minute budget with
compilation included) stops it at the first step past M minutes, with a checkpoint;
`steps=N` caps it (default 20000: on the idle 2-core VM the time box ends the run first,
near 7,000 steps). `residual=False` trains the plain parameterisation instead.

Residual parameterisation (`sr.residual`): the model denoises HR - bicubic(LR) and adds the
bicubic image back, so colours and layout come from the input and the network learns the
missing detail. Its sigma_data is that residual's std: 0.07-0.18 on the training photos at
x4 (0.10 mean; retina 0.01). The training p(sigma) is EDM's log-normal (`p_mean=-1.2`), i.e.
mostly sigma >> sigma_data, where the network learns E[residual | low-res]; `p_mean=-2.8`
(median sigma = 0.6 sigma_data) is the session-3 setting, which left that regime untrained.
The decoded photos are cached in memory (`data.cache_decoded`).
"""

import ml_collections

from ediff_jax.config_utils import base_config, parse_arg


def get_config(arg: str | None = None):
    args = parse_arg(arg, steps=20000, batch=16, degradation="none", minutes=58.0, residual=True, p_mean=-1.2)
    c = base_config()
    c.data.name = "ediff_photos"
    c.data.image_size = 32  # the crop: photos are cropped at native resolution (resize=False)
    c.data.resize = False
    c.data.shuffle_buffer = 16
    c.data.cache_decoded = True  # 7 photos: decode once instead of once per crop
    c.sr.lowres_size = 8
    c.sr.crop_size = 32
    c.sr.degradation = args.degradation
    c.sr.aug_max = 0.1  # bicubic upsampling keeps 0.83 of it: up to 0.08, below the residual std (0.1)
    c.sr.aug_level = 0.0

    # Fully convolutional (no self-attention), so it runs on whole photos of any size.
    c.model.channels = 32
    c.model.channel_mult = (1, 2, 2)
    c.model = ml_collections.ConfigDict({**c.model.to_dict(), "num_res_blocks": (1, 1, 2)})  # int -> per level
    c.model.attn_resolutions = ()
    c.model.cross_attn_resolutions = ()
    c.model.cross_attn_levels = (2,)
    c.model.mid_self_attn = False
    c.model.num_heads = 2
    c.model.context_dim = 64
    c.text.t5_max_length = 64  # photo captions are long in the shapes-trained default tokenizers
    c.text.clip_max_length = 64
    c.sr.residual = args.residual
    if args.residual:
        c.edm.sigma_data = 0.1
        # EDM's log-normal, so that ~16% of training has sigma >= 10 sigma_data, where the noisy
        # residual says almost nothing and D learns E[residual | low-res]: the minimum-MSE
        # answer that PSNR scores (experiments/sr_photos.py's tiles_mean, at sigma = 3).
        # Centred on sigma_data instead (p_mean=-2.8) that regime got about 1% of the steps and the
        # posterior mean stayed below bicubic even on the training photos.
        c.edm.p_mean = args.p_mean
        c.edm.p_std = 1.2
    else:
        # More weight on high noise levels than the base models' log-normal (-1.2, 1.2): the
        # low-res input fixes the content.
        c.edm.p_mean = -0.6
        c.edm.p_std = 1.4
    c.text.drop_rates.t5 = 0.1
    c.text.drop_rates.clip = 0.1

    c.train.batch_size = args.batch
    c.train.num_steps = args.steps
    c.train.max_minutes = args.minutes
    c.train.lr = 5e-4
    c.train.warmup_steps = 100
    c.train.ema_decay = 0.999
    c.train.log_every = 50
    c.train.ckpt_every = 500
    c.train.sample_every = 0

    c.sample.steps = 16
    c.sample.guidance = 1.0
    c.sample.num_per_prompt = 1
    c.sample.prompts = ("held-out", "photos")  # two validation photos in the final grid
    return c
