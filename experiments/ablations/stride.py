"""MultiDiffusion stride sweep: panorama quality against cost.

A model trained on window x window images samples a window x (k * window) panorama per
prompt, its crops `stride` pixels apart fused by least squares at every step. A smaller
stride means more crops per denoiser call (cost grows as 1/stride) and more overlap to
reconcile neighbouring crops; stride = window tiles without overlap, which leaves seams.
Per stride, from the same noise:

- cost: views per denoiser call, model evaluations per image (views x evaluations of the
  sampler), seconds per image (a second, already-compiled sampler call, timed) and the
  compile overhead of the first call;
- seams: mean |horizontal pixel step| across the columns at multiples of the window (a
  crop edge for every stride that divides the window) over the mean across all columns;
  1 is seamless, larger means visible seams;
- crop quality: window-sized crops every half window along the panorama, each scored
  against the prompt (colour and shape of the single object, `ediff_jax.eval`) and by
  Fréchet distance / KID to real validation images.

  python experiments/ablations/stride.py --workdir workdirs/quickstart --out experiments/results/stride
  python experiments/ablations/stride.py --out /tmp/abl_stride --smoke      # the tests run this

Without --workdir the quickstart model is trained into workdirs/quickstart first (see the
README) or reused from there.

Run times on the 2-core VM: BENCHMARKS.md, "Experiment run times".
"""

from __future__ import annotations

from typing import Any, Sequence

from experiments.ablations import common

DEFAULT_PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow circle", "a purple square",
                   "a orange triangle")
COLUMNS = ("stride", "views", "evals_per_image", "seconds_per_image", "compile_seconds", "seam_ratio",
           "crop_color_shape_accuracy", "crop_color_accuracy", *common.DISTANCE_COLUMNS)


def evaluations_per_run(sampler: str, steps: int) -> int:
    """Denoiser calls of one EDM sampler run: Heun evaluates twice per step but once on the last."""
    return 2 * steps - 1 if sampler == "heun" else steps


def seam_ratio(images: Any, window: int) -> float:
    """Mean |x[:, c] - x[:, c-1]| at columns c = window, 2 window, ... over its mean at all columns."""
    import numpy as np

    steps = np.abs(np.diff(np.asarray(images, np.float64), axis=2)).mean(axis=(0, 1, 3))  # [W - 1]: column c-1 -> c
    seams = [c - 1 for c in range(window, np.shape(images)[2], window)]
    return float(steps[seams].mean() / max(steps.mean(), 1e-12))


def crops(images: Any, window: int) -> tuple[Any, int]:
    """Window-sized crops every half window along the width: (uint8 [K * N, window, window, 3], K), offset-major."""
    import numpy as np

    width = np.shape(images)[2]
    lefts = list(range(0, width - window + 1, max(window // 2, 1)))
    return np.concatenate([np.asarray(images)[:, :, left:left + window] for left in lefts]), len(lefts)


def timed_sampling(sample: Any, prompts: Sequence[str], seed: int) -> tuple[Any, float, float]:
    """Samples the prompts in two equal calls: (images, seconds per image, compile seconds).

    The first call compiles and runs; the second runs the compiled program only, so its
    time per image is the cost of sampling. The first call's extra time is the compilation.
    """
    import time

    import numpy as np

    half = max(1, (len(prompts) + 1) // 2)
    first, second = list(prompts[:half]), list(prompts[half:])
    second_padded = second + [first[-1]] * (half - len(second))
    start = time.perf_counter()
    images_a = np.asarray(sample(first, seed=seed))
    first_seconds = time.perf_counter() - start
    start = time.perf_counter()
    images_b = np.asarray(sample(second_padded, seed=seed + 1))
    per_image = (time.perf_counter() - start) / half
    return np.concatenate([images_a, images_b[:len(second)]]), per_image, max(first_seconds - per_image * half, 0.0)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = common.base_parser(__doc__)
    p.add_argument("--workdir", default=None,
                   help="A trained base-model workdir (default: a smoke model with --smoke, else workdirs/quickstart).")
    p.add_argument("--strides", type=int, nargs="+", default=None,
                   help="Strides in pixels (default: window/8, window/4, window/2, window).")
    p.add_argument("--width_factor", type=int, default=4, help="Panorama width in windows (height: one window).")
    p.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS), help="One-object ediff_shapes prompts.")
    p.add_argument("--num_real", type=int, default=1000, help="Real validation images for Fréchet distance / KID.")
    p.add_argument("--steps", type=int, default=None, help="Sampler steps (default: the workdir's config).")
    p.add_argument("--guidance", type=float, default=None, help="Guidance scale (default: the workdir's config).")
    args = p.parse_args(argv)
    common.configure_smoke_runtime(args.smoke)
    common.smoke_overrides(args, width_factor=2, prompts=list(DEFAULT_PROMPTS[:2]), num_real=16,
                           steps=common.SMOKE_SAMPLER_STEPS)
    if args.width_factor < 1 or len(args.prompts) < 2:
        p.error("--width_factor must be >= 1 and --prompts must list at least 2 prompts (sampled in two timed calls).")

    import numpy as np

    from ediff_jax.eval import score_alignment_batch
    from ediff_jax.images import ensure_writable_dir
    from ediff_jax.multidiffusion import MultiDiffusionSampler

    out = ensure_writable_dir(args.out)
    clock = common.Clock()
    model = common.load_model(common.default_workdir(args, out))
    window = model.image_size
    strides = args.strides or ([window // 2, window] if args.smoke else [window // 8, window // 4, window // 2, window])
    guidance = model.guidance if args.guidance is None else args.guidance
    steps = args.steps or model.sampler_steps
    evaluator = common.Evaluator(window, args.num_real, args.feature_weights)
    rows, grids = [], []
    for stride in strides:
        sampler = MultiDiffusionSampler(model.exp.model, model.exp.encoders, image_size=window, height=window,
                                        width=args.width_factor * window, stride=stride, steps=steps,
                                        sampler=model.sampler_name, sigma_data=model.sigma_data,
                                        boundaries=model.boundaries)
        images, per_image, compile_seconds = timed_sampling(
            lambda chunk, seed: sampler(model.params, chunk, guidance=guidance, seed=seed), args.prompts, args.seed)
        crop_images, per_canvas = crops(images, window)
        crop_prompts = [prompt for _ in range(per_canvas) for prompt in args.prompts]  # crops are offset-major
        results = score_alignment_batch(crop_images, crop_prompts)
        views = int(sampler.tiling.num_views)
        rows.append({
            "stride": stride, "views": views, "evals_per_image": views * evaluations_per_run(model.sampler_name, steps),
            "seconds_per_image": per_image, "compile_seconds": compile_seconds,
            "seam_ratio": seam_ratio(images, window),
            "crop_color_shape_accuracy": float(np.mean([r.color_ok and r.shape_ok for r in results])),
            "crop_color_accuracy": float(np.mean([r.color_ok for r in results])),
            **evaluator.distances(crop_images),
        })
        grids.append(images)
        print(f"stride {stride}: {views} views, {per_image:.2f} s/image, seam ratio {rows[-1]['seam_ratio']:.3f}, "
              f"crop accuracy {rows[-1]['crop_color_shape_accuracy']:.3f}", flush=True)

    notes = [
        f"Model: `{model.workdir}` ({model.train_samples} training samples), window {window}. Canvas {window}x"
        f"{args.width_factor * window}; {len(args.prompts)} prompts ({'; '.join(args.prompts)}), one panorama each, "
        f"{steps} {model.sampler_name} steps, guidance {guidance:g}, seed {args.seed} "
        "(the same noise for every stride).",
        "seconds_per_image: the second (compiled) sampler call; compile_seconds: the first call's extra time. "
        f"seam_ratio: pixel steps across columns at multiples of {window} over all columns (1 = seamless). "
        f"Crops: {window}x{window} every {max(window // 2, 1)} pixels, scored against the panorama's prompt.",
        f"Fréchet distance / KID of the crops: to {args.num_real} real validation images, shipped feature network.",
        f"Command: `{common.command('stride.py', argv)}`. {clock.summary()}.",
    ]
    common.write_results(out, rows, COLUMNS, "MultiDiffusion stride: quality vs cost", notes, smoke=args.smoke)
    common.plot_metrics(rows, "stride", ["seconds_per_image", "seam_ratio", "crop_color_shape_accuracy",
                                         "frechet_distance"], out / "metrics.png",
                        title="MultiDiffusion stride sweep", xlabel="stride (pixels)")
    common.save_grid(np.concatenate(grids), out / "panoramas.png", cols=len(args.prompts))
    print(f"Wrote results.md, results.csv, metrics.png and panoramas.png to {out} ({clock.summary()}).")
    return rows


if __name__ == "__main__":
    main()
