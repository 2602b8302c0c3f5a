"""Paint-with-words weight sweep: how strongly w' places objects, and what it costs in image quality.

Two-object prompts ("a red circle and a blue square") are painted with the mask layouts of
`experiments/pww_placement.py` (left/right, top/bottom, diagonal quadrants); every image
is sampled once per w' from the same noise (w' = 0 is exactly plain sampling). Scoring
uses `ediff_jax.eval`: each object of the prompt is matched to the largest blob of its
colour (`score_alignment_batch`), and counts as placed when the centre of that blob's
fitted bounding box lies in its painted region. Also reported: how often both objects are
there with the right shapes (`two_object_color_shape_accuracy`), and Fréchet distance /
KID to real validation images (painting should not make images less realistic).

  python experiments/ablations/pww_weight.py --workdir workdirs/quickstart --out experiments/results/pww_weight
  python experiments/ablations/pww_weight.py --out /tmp/abl_pww --smoke      # the tests run this

`chance` is the mean painted area: the placement accuracy of a centre dropped uniformly at
random. Without --workdir the quickstart model is trained into workdirs/quickstart first
(see the README) or reused
from there.

Run times on the 2-core VM: BENCHMARKS.md, "Experiment run times".
"""

from __future__ import annotations

from typing import Any, Sequence

from experiments import pww_placement
from experiments.ablations import common

COLUMNS = ("pww_weight", "images", "objects", "detection_rate", "placement_accuracy", "all_placed", "chance",
           "two_object_color_shape_accuracy", *common.DISTANCE_COLUMNS, "sample_seconds")


def placement(results: Sequence[Any], case_list: Sequence[dict[str, Any]], num: int) -> dict[str, float]:
    """Placement counts over `AlignmentResult`s laid out case-major (`num` images per case)."""
    objects = detected = placed = all_placed = 0
    areas = []
    for i, result in enumerate(results):
        boxes = [box for _, box in case_list[i // num]["objects"]]
        ok_all = True
        for match, box in zip(result.matched, boxes):
            objects += 1
            areas.append((box[2] - box[0]) * (box[3] - box[1]))
            ok = match is not None and pww_placement.in_box((match.cx, match.cy), box)
            detected += match is not None
            placed += ok
            ok_all &= ok
        all_placed += ok_all
    return {"images": len(results), "objects": objects, "detection_rate": detected / max(objects, 1),
            "placement_accuracy": placed / max(detected, 1), "all_placed": all_placed / max(len(results), 1),
            "chance": sum(areas) / max(len(areas), 1)}


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = common.base_parser(__doc__)
    p.add_argument("--workdir", default=None,
                   help="A trained base-model workdir (default: a smoke model with --smoke, else workdirs/quickstart).")
    p.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.4, 1.0, 3.0],
                   help="w' values; 0 is plain sampling (no painting).")
    p.add_argument("--layouts", nargs="+", default=list(pww_placement.LAYOUTS), choices=list(pww_placement.LAYOUTS))
    p.add_argument("--pairs", type=int, default=len(pww_placement.OBJECT_PAIRS),
                   help=f"How many of the {len(pww_placement.OBJECT_PAIRS)} object pairs to prompt.")
    p.add_argument("--num", type=int, default=2, help="Images per (layout, pair) and w'.")
    p.add_argument("--num_real", type=int, default=1000, help="Real validation images for Fréchet distance / KID.")
    p.add_argument("--steps", type=int, default=None, help="Sampler steps (default: the workdir's config).")
    p.add_argument("--guidance", type=float, default=None, help="Guidance scale (default: the workdir's config).")
    p.add_argument("--batch", type=int, default=24, help="Images per sampler call.")
    args = p.parse_args(argv)
    common.configure_smoke_runtime(args.smoke)
    common.smoke_overrides(args, weights=[0.0, 1.0], layouts=["left/right", "top/bottom"], pairs=1, num=1,
                           num_real=16, steps=common.SMOKE_SAMPLER_STEPS, batch=2)
    if not 1 <= args.pairs <= len(pww_placement.OBJECT_PAIRS):
        p.error(f"--pairs must be in [1, {len(pww_placement.OBJECT_PAIRS)}].")

    import numpy as np

    from ediff_jax.eval import aggregate_alignment, score_alignment_batch
    from ediff_jax.images import ensure_writable_dir
    from ediff_jax.paint_with_words import pww_cond

    out = ensure_writable_dir(args.out)
    clock = common.Clock()
    model = common.load_model(common.default_workdir(args, out))
    guidance = model.guidance if args.guidance is None else args.guidance
    size = model.image_size
    evaluator = common.Evaluator(size, args.num_real, args.feature_weights)
    case_list = pww_placement.cases(args.layouts, pww_placement.OBJECT_PAIRS[:args.pairs])
    prompts = [case["prompt"] for case in case_list for _ in range(args.num)]
    paints = [{phrase: pww_placement.box_mask(box, size) for phrase, box in case["objects"]} for case in case_list]
    paints = [paint for paint in paints for _ in range(args.num)]
    sampler = model.sampler(args.steps)
    rows, grids = [], []
    for w in args.weights:
        sample_clock = common.Clock()
        cond = pww_cond(model.exp.encoders, prompts, paints, size, weight=w)
        images = common.sample_batched(lambda chunk, **kw: sampler(model.params, chunk, guidance=guidance, **kw),
                                       prompts, args.batch, args.seed, extra_cond=cond)
        results = score_alignment_batch(images, prompts)
        rows.append({"pww_weight": w, **placement(results, case_list, args.num),
                     "two_object_color_shape_accuracy": aggregate_alignment(results)["two_object_color_shape_accuracy"],
                     **evaluator.distances(images), "sample_seconds": sample_clock.wall})
        grids.append(images[:len(case_list) * args.num][:12])
        print(f"w'={w:g}: placement {rows[-1]['placement_accuracy']:.3f}, detection {rows[-1]['detection_rate']:.3f}, "
              f"FD {rows[-1]['frechet_distance']:.2f}", flush=True)

    steps = args.steps or model.sampler_steps
    notes = [
        f"Model: `{model.workdir}` ({model.train_samples} training samples). {len(case_list)} (layout, pair) cases x "
        f"{args.num} seeds = {len(prompts)} images per w'; {steps} {model.sampler_name} steps, guidance {guidance:g}, "
        f"seed {args.seed} (the same noise for every w').",
        f"Layouts: {', '.join(args.layouts)}. Pairs: "
        f"{'; '.join(f'{a} + {b}' for a, b in pww_placement.OBJECT_PAIRS[:args.pairs])}.",
        "placement_accuracy: placed / detected objects (detected: a blob of the object's colour exists); "
        "all_placed: images with both objects placed; chance: mean painted area.",
        f"Fréchet distance / KID: to {args.num_real} real validation images, shipped ediff_shapes feature network.",
        f"Command: `{common.command('pww_weight.py', argv)}`. {clock.summary()}.",
    ]
    common.write_results(out, rows, COLUMNS, "Paint-with-words weight sweep", notes, smoke=args.smoke)
    common.plot_metrics(rows, "pww_weight", ["placement_accuracy", "all_placed", "two_object_color_shape_accuracy",
                                             "frechet_distance"], out / "metrics.png",
                        title=f"Paint-with-words weight (chance placement {rows[0]['chance']:.2f})", xlabel="w'")
    common.save_grid(np.concatenate(grids), out / "samples.png", cols=len(grids[0]))
    print(f"Wrote results.md, results.csv, metrics.png and samples.png to {out} ({clock.summary()}).")
    return rows


if __name__ == "__main__":
    main()
