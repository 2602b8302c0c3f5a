"""Canvas strategies and samplers side by side: MultiDiffusion (`overlap`), Mixture of Diffusers
(`gaussian`) and SpotDiffusion (`shifted`), each with Heun, Euler and DPM-Solver++(2M), and
SyncDiffusion's coherence guidance on top of `overlap` (`--coherence W ...`: first sampler, 32x128
panorama only, since every guided evaluation runs a backward pass per crop).

Every setting samples the same prompts from the same noise on each canvas (`--canvases`): a window x
4 windows panorama (`panorama`: 32x128 for a 32x32 model; overlap at stride window/4, the issue's 13
views), a circular window x 8 windows panorama (`circular`: 32x256), the first with a region prompt
(`regions`: a red circle in the left quarter), and the first wrapped as SpotDiffusion's own code
does (`wrapped`, `shifted` only): its reference implementation rolls the whole latent every step,
so the plain panorama is tiled as a circular one, 4 windows and no clamped fifth, and its two
ends are denoised as neighbours. Per setting:

- cost: crops per denoiser call (`multidiffusion.evaluations_per_call`, counted exactly by the
  tests), model evaluations per panorama (crops x prompts x sampler evaluations) and seconds per
  panorama (a second, already-compiled call);
- seam ratio: mean |horizontal pixel step| across the columns at multiples of the window over
  the mean across all columns (1 = seamless; `stride.py`);
- coherence: the mean feature distance between window-sized crops of one panorama, in the shipped
  feature network (the analogue of SyncDiffusion's intra-LPIPS; lower is more coherent);
- crop alignment and Fréchet distance: window-sized crops every half window, scored against the
  panorama's prompt (colour and shape) and against real validation images (no-region rows).

  python experiments/ablations/canvas.py --workdir WORKDIR --out experiments/results/canvas
  python experiments/ablations/canvas.py --out /tmp/abl_canvas --smoke      # the tests run this
"""

from __future__ import annotations

from typing import Any, Sequence

from experiments.ablations import common
from experiments.ablations.stride import crops, evaluations_per_run, seam_ratio, timed_sampling

DEFAULT_PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow circle")
# name -> (width in windows, circular, with the region prompt, strategies it runs: None = all)
CANVASES = {"panorama": (4, False, False, None), "circular": (8, True, False, None),
            "regions": (4, False, True, None), "wrapped": (4, True, False, ("shifted",))}
COLUMNS = ("canvas", "regions", "strategy", "coherence", "sampler", "steps", "crops_per_call", "evals_per_panorama",
           "grad_crops_per_panorama",
           "seconds_per_panorama", "seam_ratio", "coherence_distance", "crop_color_shape_accuracy",
           "frechet_distance")


def selected_canvases(asked: Sequence[str] | None, strategies: Sequence[str]) -> list[str]:
    """The canvases to run: those asked for, or (None) every canvas whose strategies `strategies` includes."""
    if asked is None:
        return [name for name, spec in CANVASES.items() if spec[3] is None or set(spec[3]) & set(strategies)]
    for name in asked:
        only = CANVASES[name][3]
        if only is not None and not set(only) & set(strategies):
            raise ValueError(f"--canvases {name} runs the {'/'.join(only)} strategy only; add it to --strategies.")
    return list(asked)


def coherence_distance(features: Any, per_canvas: int) -> float:
    """Mean pairwise Euclidean distance between the crop features of each panorama, averaged over
    panoramas. `features` [K * N, D] are offset-major (crop k of panorama n at row k * N + n)."""
    import numpy as np

    f = np.asarray(features, np.float64)
    f = f.reshape(per_canvas, -1, f.shape[-1]).transpose(1, 0, 2)  # [N, K, D]
    d = np.linalg.norm(f[:, :, None] - f[:, None, :], axis=-1)  # [N, K, K]
    k = f.shape[1]
    return float(d.sum(axis=(1, 2)).mean() / max(k * (k - 1), 1))


def guided_evaluations(sigmas: Any, sampler_name: str, coherence: Any) -> int:
    """Denoiser evaluations of one sampling run at which coherence guidance acts (sigma > its threshold).

    Heun evaluates at every sigma_k and corrects at sigma_{k+1} (not on the step to 0); Euler and
    DPM-Solver++(2M) evaluate once per step, at sigma_k.
    """
    import numpy as np

    if coherence is None:
        return 0
    s = np.asarray(sigmas, np.float64)
    at = list(s[:-1]) + (list(s[1:-1]) if sampler_name == "heun" else [])
    return int(sum(v > coherence.active_above for v in at))


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = common.base_parser(__doc__)
    p.add_argument("--workdir", default=None,
                   help="A trained base-model workdir (default: a smoke model with --smoke, else workdirs/quickstart).")
    p.add_argument("--strategies", nargs="+", default=["overlap", "gaussian", "shifted"])
    p.add_argument("--samplers", nargs="+", default=["heun", "euler", "dpmpp_2m"])
    p.add_argument("--steps", type=int, default=None, help="Sampler steps (default: the workdir's config).")
    p.add_argument("--canvases", nargs="+", default=None, choices=list(CANVASES),
                   help="Canvases to run (module docstring; default: all, `wrapped` only when --strategies has "
                        "shifted, the one strategy it runs).")
    p.add_argument("--prompts", nargs="+", default=list(DEFAULT_PROMPTS), help="One-object ediff_shapes prompts.")
    p.add_argument("--num_real", type=int, default=1000, help="Real validation images for Fréchet distance.")
    p.add_argument("--guidance", type=float, default=None, help="Guidance scale (default: the workdir's config).")
    p.add_argument("--coherence", type=float, nargs="*", default=[],
                   help="SyncDiffusion coherence-guidance weights to add as rows (overlap, first sampler).")
    p.add_argument("--coherence_steps", type=int, default=None,
                   help="Steps that coherence guidance acts on (default: half of them).")
    args = p.parse_args(argv)
    common.configure_smoke_runtime(args.smoke)
    common.smoke_overrides(args, prompts=list(DEFAULT_PROMPTS[:2]), num_real=16, steps=common.SMOKE_SAMPLER_STEPS,
                           samplers=["euler"])
    if len(args.prompts) < 2:
        p.error("--prompts must list at least 2 prompts (sampled in two timed calls).")
    try:
        args.canvases = selected_canvases(args.canvases, args.strategies)
    except ValueError as err:
        p.error(str(err))

    import numpy as np

    from ediff_jax.eval.features import load_differentiable_feature_fn
    from ediff_jax.images import ensure_writable_dir
    from ediff_jax.multidiffusion import MultiDiffusionSampler, box_mask

    out = ensure_writable_dir(args.out)
    clock = common.Clock()
    model = common.load_model(common.default_workdir(args, out))
    window = model.image_size
    guidance = model.guidance if args.guidance is None else args.guidance
    steps = args.steps or model.sampler_steps
    evaluator = common.Evaluator(window, args.num_real, args.feature_weights)
    region = [("a red circle", box_mask(window, 4 * window, 0, 0, window, window))]
    canvases = [(name, windows * window, circular, tuple(region) if with_region else (), only)
                for name, (windows, circular, with_region, only) in CANVASES.items() if name in args.canvases]
    feature_fn = load_differentiable_feature_fn(args.feature_weights) if args.coherence else None
    settings = [(s, 0.0) for s in args.strategies] + [("overlap", float(w)) for w in args.coherence]
    rows, grids = [], []
    for name, width, circular, regions, only in canvases:
        for strategy, weight in settings:
            if only is not None and (strategy not in only or weight):
                continue
            if weight and (circular or regions):
                continue  # coherence: the plain panorama only (a backward pass per crop; circular has 32 crops)
            for sampler_name in args.samplers:
                if (regions or weight) and sampler_name != args.samplers[0]:
                    continue  # regions and coherence: one sampler is enough to see the effect
                guided = dict(coherence=weight, coherence_steps=args.coherence_steps, feature_fn=feature_fn) \
                    if weight else {}
                sampler = MultiDiffusionSampler(
                    model.exp.model, model.exp.encoders, image_size=window, height=window, width=width,
                    stride=None if strategy == "shifted" else max(window // 4, 1), circular=circular, steps=steps,
                    sampler=sampler_name, sigma_data=model.sigma_data, boundaries=model.boundaries, strategy=strategy,
                    **guided)
                images, per_image, _ = timed_sampling(
                    lambda chunk, seed: sampler(model.params, chunk, guidance=guidance, seed=seed, regions=regions),
                    args.prompts, args.seed)
                crop_images, per_canvas = crops(images, window)
                crop_prompts = [prompt for _ in range(per_canvas) for prompt in args.prompts]
                calls = sampler.evaluations_per_call
                rows_per_prompt = len(regions) + 1
                guided_evals = guided_evaluations(sampler.sigmas, sampler_name, sampler.coherence)
                row = {
                    "canvas": f"{window}x{width}" + (" wrapped" if name == "wrapped" else
                                                     " circular" if circular else ""),
                    "regions": len(regions), "strategy": strategy, "coherence": weight, "sampler": sampler_name,
                    "steps": steps, "crops_per_call": calls,
                    # the anchor crop once more per guided evaluation; a backward pass per crop then
                    "evals_per_panorama": rows_per_prompt * (calls * evaluations_per_run(sampler_name, steps)
                                                             + guided_evals),
                    "grad_crops_per_panorama": rows_per_prompt * calls * guided_evals,
                    "seconds_per_panorama": per_image, "seam_ratio": seam_ratio(images, window),
                    "coherence_distance": coherence_distance(evaluator.features(crop_images), per_canvas),
                    "crop_color_shape_accuracy": float("nan"), "frechet_distance": float("nan"),
                }
                if not regions:
                    scored = common.alignment(crop_images, crop_prompts)
                    row["crop_color_shape_accuracy"] = scored["all_ok_accuracy"]
                    row["frechet_distance"] = evaluator.distances(crop_images)["frechet_distance"]
                rows.append(row)
                if sampler_name == args.samplers[0]:
                    grids.append(images[:, :, :4 * window])
                print(f"{row['canvas']} regions={row['regions']} {strategy} coherence={weight:g} {sampler_name}: "
                      f"{calls} crops/call, "
                      f"{per_image:.2f} s/panorama, seam {row['seam_ratio']:.3f}, "
                      f"coherence {row['coherence_distance']:.3f}, accuracy {row['crop_color_shape_accuracy']:.3f}",
                      flush=True)

    notes = [
        f"Model: `{model.workdir}` ({model.train_samples} training samples), window {window}. "
        f"{len(args.prompts)} prompts ({'; '.join(args.prompts)}), one panorama each, {steps} steps, guidance "
        f"{guidance:g}, seed {args.seed} (the same noise for every setting). overlap and gaussian: stride "
        f"{max(window // 4, 1)}; shifted: non-overlapping windows under a random offset per step.",
        "evals_per_panorama: crops per call x prompts (background + regions) x sampler evaluations (Heun: 2 per "
        "step, 1 on the last). seconds_per_panorama: the second (compiled) call. seam_ratio: pixel steps at "
        f"multiples of {window} columns over all columns (1 = seamless). coherence: SyncDiffusion's guidance weight "
        f"(0: off), for the first {args.coherence_steps or 'half of the'} steps; grad_crops_per_panorama: crops "
        "evaluated with a backward pass. coherence_distance: mean feature distance "
        "between crops of one panorama (lower = more coherent). Crop accuracy and Fréchet distance: "
        f"{window}x{window} crops every {max(window // 2, 1)} pixels (regions rows: not scored, the crops hold "
        f"two prompts); Fréchet distance to {args.num_real} validation images, biased up by few crops: compare rows.",
        f"Command: `{common.command('canvas.py', argv)}`. {clock.summary()}.",
    ]
    common.write_results(out, rows, COLUMNS, "Canvas strategies and samplers", notes, smoke=args.smoke)
    common.save_grid(np.concatenate(grids), out / "panoramas.png", cols=len(args.prompts))
    print(f"Wrote results.md, results.csv and panoramas.png to {out} ({clock.summary()}).")
    return rows


if __name__ == "__main__":
    main()
