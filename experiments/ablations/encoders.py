"""T5 only vs CLIP only vs both: eDiff-I's text-encoder ablation, by dropping encoders at sampling.

The model is trained with both encoders and eDiff-I's per-encoder dropout (T5 dropped 25%,
CLIP 20% of the time), so it has seen each encoder alone; at sampling, `use_t5=False` /
`use_clip=False` replaces an encoder's embeddings by its null ("dropped") conditioning.
Every setting samples the same validation captions from the same noise and is scored by
alignment accuracy (colour, shape, region, relation) and Fréchet distance / KID to real
validation images. `none` (both dropped: the unconditional model) is the floor.

  python experiments/ablations/encoders.py --workdir workdirs/quickstart --out experiments/results/encoders
  python experiments/ablations/encoders.py --out /tmp/abl_encoders --smoke      # the tests run this

Without --workdir the quickstart model is trained into workdirs/quickstart first (see the
README) or reused from there.

Run times on the 2-core VM: BENCHMARKS.md, "Experiment run times".
"""

from __future__ import annotations

from typing import Any, Sequence

from experiments.ablations import common

SETTINGS = {"both": (True, True), "t5": (True, False), "clip": (False, True), "none": (False, False)}
COLUMNS = ("encoders", "use_t5", "use_clip", *common.ALIGNMENT_COLUMNS, "one_object_color_shape_accuracy",
           "two_object_relation_accuracy", *common.DISTANCE_COLUMNS, "sample_seconds")


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = common.base_parser(__doc__)
    common.add_sampling_args(p, num_prompts=96)
    p.add_argument("--settings", nargs="+", default=["both", "t5", "clip"], choices=list(SETTINGS),
                   help="Encoders used at sampling ('none': both dropped, the unconditional model).")
    p.add_argument("--guidance", type=float, default=None, help="Guidance scale (default: the workdir's config).")
    args = p.parse_args(argv)
    common.configure_smoke_runtime(args.smoke)
    common.smoke_overrides(args, num_prompts=8, num_real=16, batch=8, steps=common.SMOKE_SAMPLER_STEPS)

    import numpy as np

    from ediff_jax.images import ensure_writable_dir

    out = ensure_writable_dir(args.out)
    clock = common.Clock()
    model = common.load_model(common.default_workdir(args, out))
    guidance = model.guidance if args.guidance is None else args.guidance
    evaluator = common.Evaluator(model.image_size, args.num_real, args.feature_weights)
    _, prompts = common.validation_examples(args.num_prompts, model.image_size)
    sampler = model.sampler(args.steps)
    rows, grids = [], []
    for name in args.settings:
        use_t5, use_clip = SETTINGS[name]
        sample_clock = common.Clock()
        images = common.sample_batched(
            lambda chunk, **kw: sampler(model.params, chunk, guidance=guidance, use_t5=use_t5, use_clip=use_clip, **kw),
            prompts, args.batch, args.seed)
        rows.append({"encoders": name, "use_t5": use_t5, "use_clip": use_clip, **evaluator.score(images, prompts),
                     "sample_seconds": sample_clock.wall})
        grids.append(images[:8])
        print(f"{name}: all_ok {rows[-1]['all_ok_accuracy']:.3f}, FD {rows[-1]['frechet_distance']:.2f}", flush=True)

    steps = args.steps or model.sampler_steps
    notes = [
        f"Model: `{model.workdir}` ({model.train_samples} training samples). {len(prompts)} validation captions, one "
        f"image each per setting, {steps} {model.sampler_name} steps, guidance {guidance:g}, seed {args.seed} "
        "(the same noise for every setting).",
        f"Fréchet distance / KID: to {args.num_real} real validation images, shipped ediff_shapes feature network.",
        f"Command: `{common.command('encoders.py', argv)}`. {clock.summary()}.",
    ]
    common.write_results(out, rows, COLUMNS, "T5 only vs CLIP only vs both (encoders dropped at sampling)", notes,
                         smoke=args.smoke)
    common.plot_metrics(rows, "encoders", ["all_ok_accuracy", "color_accuracy", "shape_accuracy", "frechet_distance"],
                        out / "metrics.png", title="Text encoders used at sampling", bar=True)
    common.save_grid(np.concatenate(grids), out / "samples.png", cols=len(grids[0]))
    print(f"Wrote results.md, results.csv, metrics.png and samples.png to {out} ({clock.summary()}).")
    return rows


if __name__ == "__main__":
    main()
