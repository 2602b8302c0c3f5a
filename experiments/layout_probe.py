"""Does the denoiser put an object where its region word says, and at which noise levels?

Sampling scores only the end of a trajectory. This probe asks the denoiser directly: for
`a {colour} {shape} in the {region}` (all nine regions, the same noise for each), where is
the prompt's colour in D(x; sigma, text), the posterior mean of the clean image? Colour
weight per pixel: the projection of D - background onto (colour - background), clipped to
[0, 1]; its centre of mass is the predicted place.

The *placement slope* regresses that centre on the region's centre (1/6, 1/2, 5/6 of the
side per axis, pooled over x and y): 1 puts the object's expected centre at the region's
centre, 0 ignores the region word. At high sigma the posterior mean is a faint blob at the
region; by the noise level where the noise itself fixes the layout, a model that never
learned region words has left the choice to the noise.

  python experiments/layout_probe.py --workdir workdirs/shapes_benchmark_v2 --out /tmp/layout_probe
  python experiments/layout_probe.py --out /tmp/layout_probe --smoke      # the tests run this

Writes results.md / results.csv: one row per sigma (slope, slope of x and of y alone, and
the mean colour mass in pixels).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from experiments.ablations import common

import numpy as np

COLUMNS = ("sigma", "placement_slope", "slope_x", "slope_y", "colour_mass_pixels", "num_prompts")
DEFAULT_SIGMAS = (40.0, 20.0, 10.0, 5.0, 2.0, 1.0, 0.5)


def region_centres() -> dict[str, tuple[float, float]]:
    """Each region word's cell centre (y, x) as a fraction of the side."""
    from ediff_jax.data.shapes import REGION_GRID

    return {word: ((row + 0.5) / 3, (col + 0.5) / 3) for row, words in enumerate(REGION_GRID)
            for col, word in enumerate(words)}


def colour_centres(images: np.ndarray, colours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centres of mass (y, x) [N, 2] as fractions of the side, and masses [N] in pixels, of
    each image's colour: weight = clip(<image - bg, c - bg> / |c - bg|^2, 0, 1) per pixel.

    images: float [N, H, W, 3] in [-1, 1]; colours: [N, 3] in [-1, 1].
    """
    from ediff_jax.data.shapes import BACKGROUND

    background = np.asarray(BACKGROUND, np.float32) / 127.5 - 1.0
    direction = colours - background  # [N, 3]
    weight = np.einsum("nhwc,nc->nhw", images - background, direction) / (direction ** 2).sum(-1)[:, None, None]
    weight = np.clip(weight, 0.0, 1.0)
    height, width = images.shape[1:3]
    ys = (np.arange(height) + 0.5) / height
    xs = (np.arange(width) + 0.5) / width
    mass = weight.sum((1, 2))
    safe = np.maximum(mass, 1e-8)
    centres = np.stack([(weight.sum(2) * ys).sum(1) / safe, (weight.sum(1) * xs).sum(1) / safe], axis=-1)
    return centres, mass


def slope(predicted: np.ndarray, target: np.ndarray) -> float:
    """Least-squares slope of `predicted` on `target` (flattened): cov / var of the target."""
    p, t = predicted.ravel(), target.ravel()
    t0 = t - t.mean()
    return float((t0 * (p - p.mean())).sum() / (t0 ** 2).sum())


def probe_prompts(count_per_region: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Prompts (every region `count_per_region` times, colours and shapes cycling), their
    colours in [-1, 1] [N, 3] and their regions' centres [N, 2]."""
    from ediff_jax.data.shapes import COLORS, PALETTE, SHAPES

    centres = region_centres()
    prompts, colours, targets = [], [], []
    for k in range(count_per_region):
        for i, word in enumerate(centres):
            colour = COLORS[(i + k) % len(COLORS)]
            prompts.append(f"a {colour} {SHAPES[(i + 2 * k) % len(SHAPES)]} in the {word}")
            colours.append(np.asarray(PALETTE[colour], np.float32) / 127.5 - 1.0)
            targets.append(centres[word])
    return prompts, np.stack(colours), np.asarray(targets, np.float32)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = common.base_parser(__doc__)
    p.add_argument("--workdir", default=None,
                   help="A trained base-model workdir (default with --smoke: the smoke model, trained into OUT/workdir).")
    p.add_argument("--sigmas", type=float, nargs="+", default=list(DEFAULT_SIGMAS), help="Noise levels to probe.")
    p.add_argument("--per_region", type=int, default=8, help="Prompts (and noise draws) per region word.")
    args = p.parse_args(argv)
    common.configure_smoke_runtime(args.smoke)
    common.smoke_overrides(args, per_region=1, sigmas=[10.0, 1.0])
    if args.per_region < 1:
        p.error(f"--per_region must be at least 1, got {args.per_region}")
    if any(s <= 0 for s in args.sigmas):
        p.error(f"--sigmas must be positive, got {args.sigmas}")
    if args.workdir is None and not args.smoke:
        p.error("--workdir is required (a trained base model), or --smoke")

    import jax
    import jax.numpy as jnp

    from ediff_jax.images import ensure_writable_dir
    from ediff_jax.sampling import make_model_fn

    out = ensure_writable_dir(args.out)
    clock = common.Clock()
    workdir = common.default_workdir(args, out)
    model = common.load_model(workdir)
    prompts, colours, targets = probe_prompts(args.per_region)
    encoders = model.exp.encoders
    cond = encoders.encode(encoders.params, encoders.tokenize(prompts))
    denoise = jax.jit(make_model_fn(model.exp.model, model.params, model.sigma_data, model.boundaries))
    size = model.image_size
    # the same noise draw for the k-th prompt of every region: only the region word differs
    base = np.random.default_rng(args.seed).standard_normal((args.per_region, size, size, 3)).astype(np.float32)
    noise = np.repeat(base, len(region_centres()), axis=0)

    rows = []
    for sigma in args.sigmas:
        images = np.asarray(denoise(jnp.asarray(noise * sigma), jnp.full((len(prompts),), sigma, jnp.float32), cond))
        centres, mass = colour_centres(images, colours)
        rows.append({"sigma": sigma, "placement_slope": slope(centres, targets),
                     "slope_x": slope(centres[:, 1], targets[:, 1]), "slope_y": slope(centres[:, 0], targets[:, 0]),
                     "colour_mass_pixels": float(mass.mean()), "num_prompts": len(prompts)})
        print(f"sigma {sigma:g}: placement slope {rows[-1]['placement_slope']:.3f} "
              f"(x {rows[-1]['slope_x']:.3f}, y {rows[-1]['slope_y']:.3f})", flush=True)
    notes = [f"Model: `{workdir}`. {len(prompts)} prompts, {args.per_region} per region word, noise seed {args.seed}.",
             "Slope 1: the denoised colour's centre sits at the region's centre; 0: the region word is ignored.",
             f"Command: `python experiments/layout_probe.py {' '.join(sys.argv[1:] if argv is None else argv)}`. "
             f"{clock.summary()}."]
    common.write_results(out, rows, COLUMNS, "Region words in the denoiser's posterior mean", notes, smoke=args.smoke)
    return rows


if __name__ == "__main__":
    main()
