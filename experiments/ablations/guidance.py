"""Guidance-scale sweep: prompt alignment vs Fréchet distance (eDiff-I's FID vs CLIP-score curve).

Classifier-free guidance D = D_uncond + w (D_cond - D_uncond) trades diversity and fidelity
to the data distribution for agreement with the prompt. For each w the same validation
captions are sampled from the same noise (w is a runtime input: one compiled sampler for
the whole sweep) and scored by alignment accuracy (the ediff_shapes stand-in for CLIP
score: colour, shape, region and relation checked from pixels) and by Fréchet distance /
KID to real validation images (the stand-in for FID: the shipped ediff_shapes feature net).

  python experiments/ablations/guidance.py --workdir workdirs/quickstart --out experiments/results/guidance
  python experiments/ablations/guidance.py --out /tmp/abl_guidance --smoke      # the tests run this

Without --workdir the quickstart model is trained into workdirs/quickstart first (see the
README) or reused from there.

Run times on the 2-core VM: BENCHMARKS.md, "Experiment run times".
"""

from __future__ import annotations

from typing import Any, Sequence

from experiments.ablations import common

COLUMNS = ("guidance", *common.ALIGNMENT_COLUMNS, "one_object_color_shape_accuracy", "two_object_relation_accuracy",
           *common.DISTANCE_COLUMNS, "sample_seconds")


def parse_scale(text: str) -> float | tuple[float, ...]:
    """'3' -> 3.0; '4/2' -> (4.0, 2.0), one scale per expert (highest noise first)."""
    import argparse
    import math

    try:
        values = tuple(float(v) for v in str(text).split("/"))
    except ValueError:
        values = ()
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} is not a guidance scale: give a number (3) or one per expert "
                                         "(4/2)")
    return values[0] if len(values) == 1 else values


def label(scale: float | tuple[float, ...]) -> str:
    return "/".join(f"{v:g}" for v in scale) if isinstance(scale, tuple) else f"{scale:g}"


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = common.base_parser(__doc__)
    common.add_sampling_args(p, num_prompts=96)
    p.add_argument("--scales", type=parse_scale, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
                   help="Guidance scales w (0: unconditional, 1: conditional without guidance); for an expert "
                        "ensemble also one scale per expert, highest noise first, as 4/2.")
    args = p.parse_args(argv)
    common.configure_smoke_runtime(args.smoke)
    common.smoke_overrides(args, num_prompts=8, num_real=16, batch=8, steps=common.SMOKE_SAMPLER_STEPS,
                           scales=[1.0, 3.0])

    import numpy as np

    from ediff_jax.images import ensure_writable_dir

    out = ensure_writable_dir(args.out)
    clock = common.Clock()
    model = common.load_model(common.default_workdir(args, out))
    evaluator = common.Evaluator(model.image_size, args.num_real, args.feature_weights)
    _, prompts = common.validation_examples(args.num_prompts, model.image_size)
    sampler = model.sampler(args.steps)
    from ediff_jax.spec import per_expert_guidance

    for w in args.scales:  # a per-expert list must match the ensemble: refused before any sampling
        try:
            per_expert_guidance(w, sampler.num_experts, f"--scales {label(w)}")
        except ValueError as e:
            p.error(str(e))
    per_expert = any(isinstance(w, tuple) for w in args.scales)
    rows, grids = [], []
    for w in args.scales:
        sample_clock = common.Clock()
        images = common.sample_batched(lambda chunk, **kw: sampler(model.params, chunk, guidance=w, **kw),
                                       prompts, args.batch, args.seed)
        rows.append({"guidance": label(w) if per_expert else w, **evaluator.score(images, prompts),
                     "sample_seconds": sample_clock.wall})
        grids.append(images[:8])
        print(f"w={label(w)}: all_ok {rows[-1]['all_ok_accuracy']:.3f}, FD {rows[-1]['frechet_distance']:.2f}", flush=True)

    steps = args.steps or model.sampler_steps
    notes = [
        f"Model: `{model.workdir}` ({model.train_samples} training samples). {len(prompts)} validation captions, one "
        f"image each per scale, {steps} {model.sampler_name} steps, seed {args.seed} (the same noise for every scale).",
        f"Fréchet distance / KID: to {args.num_real} real validation images, shipped ediff_shapes feature network.",
        f"Command: `{common.command('guidance.py', argv)}`. {clock.summary()}.",
    ]
    common.write_results(out, rows, COLUMNS, "Guidance scale: alignment vs Fréchet distance", notes, smoke=args.smoke)
    distances = [r["frechet_distance"] for r in rows]
    common.plot_curves({"all objects correct": (distances, [r["all_ok_accuracy"] for r in rows]),
                        "colour correct": (distances, [r["color_accuracy"] for r in rows])},
                       out / "tradeoff.png", title="Guidance sweep (labels: w)",
                       xlabel="Fréchet distance (lower: closer to real)", ylabel="alignment accuracy",
                       ylim=(-0.02, 1.02),
                       annotations={"all objects correct": [label(w) for w in args.scales]})
    common.plot_metrics(rows, "guidance", ["all_ok_accuracy", "frechet_distance", "kid"], out / "metrics.png",
                        title="Metrics against the guidance scale", xlabel="guidance w (per expert: highest noise "
                        "first)" if per_expert else "guidance w", bar=per_expert)
    common.save_grid(np.concatenate(grids), out / "samples.png", cols=len(grids[0]))
    print(f"Wrote results.md, results.csv, tradeoff.png, metrics.png and samples.png to {out} ({clock.summary()}).")
    return rows


if __name__ == "__main__":
    main()
