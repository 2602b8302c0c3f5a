"""x4 super-resolution on real photographs: train on crops of 7 photos, evaluate on 3 held-out.

  python experiments/sr_photos.py --workdir workdirs/sr_photos            # ~55 min on 2 CPU cores
  python experiments/sr_photos.py --workdir workdirs/sr_photos --eval_only
  python experiments/sr_photos.py --workdir /tmp/srp --smoke              # seconds: the tests run this

The photos ship inside the scikit-image and scikit-learn wheels (`ediff_jax.data.photos`).
Each held-out photo is centre-cropped (to at most --max_side, a multiple of 16), reduced
x4 by area averaging (the clean degradation the model was trained on), and brought back
to full size by:

- `bicubic`: bicubic upsampling, the baseline;
- `tiles`: a sample of the SR diffusion model (Heun, --steps, from sigma 80: pure noise,
  or bicubic + noise for a residual stage)
  run as MultiDiffusion tiles of the training crop size (stride half a crop): each tile
  sees what training showed the model, a 32x32 window and its 8x8 low-res input;
- `tiles_mean`: the model's posterior-mean estimate E[x | low-res] on the same tiles: one
  Euler step from --mean_sigma (default 30 sigma_data) to 0, i.e. the denoiser D(x; sigma)
  at a noise level that drowns the residual (the input says almost nothing beyond the
  low-res image) yet lies inside the training distribution of sigma; the noise D lets
  through, about sigma_data^2 / sigma, is then under half a grey level. It is the
  minimum-MSE answer, which is what PSNR rewards, where a sample adds plausible detail;
- `whole`: a sample on the whole photo at once (`--no-whole` skips it). The UNet's
  GroupNorm statistics are then taken over the whole photo instead of a crop; on the
  first model (no residual, 32x32 crops) this alone cost 11 dB (14.8 vs 26.1 dB for
  `tiles_mean` on chelsea): a crop-trained stage should run on crop-sized tiles.
- `fromS`: truncated samples from the bicubic image noised to S (--sigma_start, SDEdit-style),
  whole photo; none by default.

PSNR and SSIM against the original are written to WORKDIR/sr_eval.md and .csv, and the
images side by side (in the order above, then the original) to WORKDIR/sr_eval.png;
`--photos a b` (e.g. training photos, to separate fitting from generalisation) writes
WORKDIR/sr_eval-a-b.* instead, leaving the held-out table in place.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ediff_jax import edm, training
from ediff_jax.checkpoints import kept_steps
from ediff_jax.config_utils import load_config
from ediff_jax.data.photos import HELDOUT_PHOTOS, PHOTOS, load_photo, photo_caption
from ediff_jax.images import save_png, to_uint8
from ediff_jax.multidiffusion import MultiDiffusionSampler
from ediff_jax.sampling import Sampler, make_model_fn
from ediff_jax.workdirs import load_workdir

REPO = Path(__file__).resolve().parents[1]


def center_crop(image: np.ndarray, max_side: int, multiple: int) -> np.ndarray:
    """The largest centred crop with sides <= max_side and divisible by `multiple`."""
    h, w = (min(s, max_side) // multiple * multiple for s in image.shape[:2])
    top, left = (image.shape[0] - h) // 2, (image.shape[1] - w) // 2
    return image[top:top + h, left:left + w]


def area_downsample(image: np.ndarray, factor: int) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [H/f, W/f, 3] by block means (area resampling at an integer factor)."""
    h, w, c = image.shape
    blocks = image.reshape(h // factor, factor, w // factor, factor, c).astype(np.float64)
    return np.clip(np.round(blocks.mean(axis=(1, 3))), 0, 255).astype(np.uint8)


def bicubic(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BICUBIC))


def scores(pred: np.ndarray, target: np.ndarray) -> tuple[float, float]:
    """(PSNR in dB, SSIM) of uint8 images, over all three channels."""
    psnr = peak_signal_noise_ratio(target, pred, data_range=255)
    ssim = structural_similarity(target, pred, data_range=255, channel_axis=-1)
    return float(psnr), float(ssim)


def truncated_sample(exp, params, lowres: np.ndarray, start: np.ndarray, prompt: str, sigma_start: float,
                     steps: int, seed: int) -> np.ndarray:
    """Heun from `start` (uint8, full size) noised to sigma_start down to 0, conditioned on lowres and text."""
    cond = exp.encoders.encode(exp.encoders.params, exp.encoders.tokenize([prompt]))
    cond = {**cond, "lowres": jnp.asarray(lowres[None], jnp.float32) / 127.5 - 1.0, "aug_level": jnp.zeros((1,))}
    model_fn = make_model_fn(exp.model, params, float(exp.config.edm.sigma_data), exp.boundaries)
    sigmas = edm.karras_sigmas(steps, 0.002, sigma_start)
    x0 = jnp.asarray(start[None], jnp.float32) / 127.5 - 1.0

    @jax.jit
    def run(x0: jax.Array, cond: dict) -> jax.Array:
        x = x0 + sigma_start * jax.random.normal(jax.random.PRNGKey(seed), x0.shape)
        return edm.heun_sample(lambda x, s: model_fn(x, s, cond), x, sigmas)

    return to_uint8(jax.device_get(run(x0, cond)))[0]


def tile_sampler(exp, config, height: int, width: int, steps: int, sampler: str,
                 sigma_max: float = 80.0) -> MultiDiffusionSampler:
    """MultiDiffusion over training-crop-sized tiles (stride half a tile) of a height x width photo."""
    tile = int(config.sr.crop_size) or int(config.data.image_size)
    factor = int(config.data.image_size) // int(config.sr.lowres_size)
    return MultiDiffusionSampler(exp.model, exp.encoders, image_size=tile, height=height, width=width,
                                 stride=max(tile // 2, factor), steps=steps, sampler=sampler,
                                 sigma_data=float(config.edm.sigma_data), sigma_max=sigma_max,
                                 sigma_min=min(0.002, sigma_max / 2), boundaries=exp.boundaries,
                                 lowres_factor=factor)


def evaluate(workdir: Path, *, steps: int, max_side: int, sigma_starts: tuple[float, ...] = (),
             seed: int = 0, whole: bool = True, mean_sigmas: tuple[float, ...] = (),
             photos: tuple[str, ...] = HELDOUT_PHOTOS) -> list[dict]:
    if mean_sigmas and min(mean_sigmas) <= 0:
        raise ValueError(f"--mean_sigma {mean_sigmas} must all be > 0 (noise levels of the posterior-mean step).")
    config, exp, params = load_workdir(workdir)
    mean_sigmas = tuple(mean_sigmas) or (30 * float(config.edm.sigma_data),)
    factor = int(config.data.image_size) // int(config.sr.lowres_size)
    stem = results_stem(photos)
    rows, panels = [], []
    for name in photos:
        original = center_crop(load_photo(name), max_side, 16)
        h, w = original.shape[:2]
        low = area_downsample(original, factor)
        prompt = photo_caption(name)
        t = time.perf_counter()
        kwargs = dict(guidance=1.0, seed=seed, lowres=low[None], aug_level=0.0)
        outputs = {"bicubic": bicubic(low, h, w),
                   "tiles": tile_sampler(exp, config, h, w, steps, "heun")(params, [prompt], **kwargs)[0],
                   **{"tiles_mean" + (f"@{s:g}" if i else ""):
                      tile_sampler(exp, config, h, w, 1, "euler", s)(params, [prompt], **kwargs)[0]
                      for i, s in enumerate(mean_sigmas)}}
        if whole:
            sampler = Sampler(exp.model, exp.encoders, image_size=(h, w), steps=steps, lowres_factor=factor,
                              sigma_data=float(config.edm.sigma_data), boundaries=exp.boundaries)
            outputs["whole"] = sampler(params, [prompt], **kwargs)[0]
        for s in sigma_starts:
            outputs[f"from{s:g}"] = truncated_sample(exp, params, low, outputs["bicubic"], prompt, s, steps, seed)
        seconds = time.perf_counter() - t
        row = {"photo": name, "size": f"{h}x{w}", "seconds": round(seconds, 1)}
        for label, image in outputs.items():
            row[f"{label}_psnr"], row[f"{label}_ssim"] = scores(image, original)
        rows.append(row)
        panels.append(np.concatenate([*outputs.values(), original], axis=1))
        print(f"{name}: " + " / ".join(f"{k} {row[k + '_psnr']:.2f} dB" for k in outputs) + f" ({seconds:.0f} s)")
    write_table(rows, workdir, steps, config, mean_sigmas[0], stem)
    width = max(p.shape[1] for p in panels)
    padded = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0)), constant_values=255) for p in panels]
    save_png(np.concatenate(padded, axis=0), workdir / f"{stem}.png")
    return rows


def results_stem(photos: tuple[str, ...]) -> str:
    """File stem of the results: `sr_eval` for the held-out photos, `sr_eval-a-b` for others."""
    return "sr_eval" if set(photos) == set(HELDOUT_PHOTOS) else "-".join(["sr_eval", *photos])


def write_table(rows: list[dict], workdir: Path, steps: int, config, mean_sigma: float, stem: str) -> None:
    keys = [k for k in rows[0] if k.endswith(("psnr", "ssim"))]
    methods = [k[: -len("_psnr")] for k in keys if k.endswith("_psnr")]
    mean = {"photo": "mean", "size": "", "seconds": round(sum(r["seconds"] for r in rows), 1),
            **{k: float(np.mean([r[k] for r in rows])) for k in keys}}
    with open(workdir / f"{stem}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows + [mean])
    lines = [
        f"x{int(config.data.image_size) // int(config.sr.lowres_size)} SR on "
        f"{'held-out photos' if stem == 'sr_eval' else 'chosen photos'}, "
        f"{(kept_steps(workdir) or [0])[-1]} training steps"
        f"{' (residual over bicubic)' if config.sr.get('residual') else ''}; "
        f"Heun {steps} steps, aug level 0, guidance 1. tiles: a sample as MultiDiffusion tiles of the training "
        f"crop; tiles_mean: the posterior mean D(x; {mean_sigma:g}) on those tiles; whole: a sample of the whole "
        "photo at once; fromS: from the bicubic image noised to sigma S.",
        "",
        "| photo | size | " + " | ".join(f"{m} PSNR / SSIM" for m in methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for r in rows + [mean]:
        cells = " | ".join(f"{r[m + '_psnr']:.2f} / {r[m + '_ssim']:.4f}" for m in methods)
        lines.append(f"| {r['photo']} | {r['size']} | {cells} |")
    (workdir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--config", default=f"{REPO}/configs/sr_photos.py")
    ap.add_argument("--eval_only", action="store_true", help="evaluate the workdir's latest checkpoint")
    ap.add_argument("--steps", type=int, default=16, help="Heun steps of the SR sample")
    ap.add_argument("--max_side", type=int, default=256, help="centre crop of each held-out photo")
    ap.add_argument("--sigma_start", type=float, nargs="*", default=[],
                    help="noise levels truncated samples start from (whole photo; none by default)")
    ap.add_argument("--mean_sigma", type=float, nargs="+", default=[],
                    help="noise level of the one-step posterior mean tiles_mean (default 30 sigma_data); "
                         "further values add columns tiles_mean@S")
    ap.add_argument("--photos", nargs="+", default=list(HELDOUT_PHOTOS), choices=sorted(PHOTOS),
                    help="photos to evaluate (default: the 3 held-out ones; training photos show the fit)")
    ap.add_argument("--whole", action=argparse.BooleanOptionalAction, default=True,
                    help="also sample each photo whole, at once (shows the crop/whole-image mismatch)")
    ap.add_argument("--smoke", action="store_true", help="seconds: 2 training steps of a tiny model, 2 sampler steps")
    ap.add_argument("--data_dir", default=None, help="TFDS data_dir (default: TFDS's)")
    args = ap.parse_args()

    workdir = Path(args.workdir).expanduser()
    t = time.perf_counter()
    if not args.eval_only:
        config = load_config(args.config + (":steps=2,batch=4" if args.smoke and ":" not in args.config else ""))
        if args.data_dir:
            config.data.data_dir = args.data_dir
        if args.smoke:
            config.model.channels = 8
            config.sample.prompts = ()
        training.train_and_evaluate(config, workdir)
        print(f"trained in {time.perf_counter() - t:.0f} s")
    steps, max_side = (2, 64) if args.smoke else (args.steps, args.max_side)
    evaluate(workdir, steps=steps, max_side=max_side, sigma_starts=tuple(args.sigma_start), whole=args.whole,
             mean_sigmas=tuple(args.mean_sigma), photos=tuple(args.photos))
    print(f"total {time.perf_counter() - t:.0f} s; table in {workdir / (results_stem(tuple(args.photos)) + '.md')}")


if __name__ == "__main__":
    main()
