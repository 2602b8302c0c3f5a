"""Post-hoc EMA sweep (EDM2): alignment and Fréchet distance against the EMA width sigma_rel.

EDM2 tracks two power-function EMAs during training and saves them periodically; any EMA width
can then be reconstructed after training (`ediff_jax.posthoc_snapshots`), so the EMA length
is chosen on the trained model rather than guessed before it. This sweep reconstructs each
`--sigma_rels` width at the last snapshot and scores it like `guidance.py` does: alignment
accuracy (colour, shape, region and relation from pixels) and Fréchet distance / KID to real
validation images in the shipped feature space. The EMA the run tracked
(config.train.ema_decay) is scored too, as the reference row.

  python experiments/ablations/posthoc_ema.py --out experiments/results/posthoc_ema
  python experiments/ablations/posthoc_ema.py --out /tmp/abl_posthoc --smoke      # the tests run this

Without --workdir the quickstart config is trained with post-hoc snapshots (EDM2's sigma_rel
0.05 and 0.10, every 50 steps) into workdirs/quickstart_posthoc, or reused from there;
--workdir must name a run that kept snapshots (config.train.posthoc_ema).
"""

from __future__ import annotations

from typing import Any, Sequence

from experiments.ablations import common

COLUMNS = ("ema", *common.ALIGNMENT_COLUMNS, "one_object_color_shape_accuracy", "two_object_relation_accuracy",
           *common.DISTANCE_COLUMNS, "sample_seconds")
GAMMAS = (16.97, 6.94)  # EDM2's tracked pair: sigma_rel 0.05 and 0.10
WORKDIR = common.REPO / "workdirs" / "quickstart_posthoc"


def trained_workdir(args: Any, out: Any) -> Any:
    """--workdir, else the smoke or quickstart model trained with post-hoc snapshots (reused once trained)."""
    from pathlib import Path

    if args.workdir:
        return Path(args.workdir).expanduser()
    if args.smoke:
        config = common.ablation_config(experts=1, steps=common.SMOKE_TRAIN_STEPS, batch=common.smoke_batch(),
                                        smoke=True, data_dir=args.data_dir)
        config.train.posthoc_ema.gammas, config.train.posthoc_ema.every = GAMMAS, 1
        return common.train_or_reuse(config, out / "workdir")
    from ediff_jax.config_utils import load_config

    config = load_config(str(common.REPO / "configs/quickstart.py"))
    config.data.data_dir = args.data_dir
    config.train.posthoc_ema.gammas, config.train.posthoc_ema.every = GAMMAS, 50
    return common.train_or_reuse(config, WORKDIR)


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = common.base_parser(__doc__)
    common.add_sampling_args(p, num_prompts=96)
    p.add_argument("--sigma_rels", type=float, nargs="+", default=[0.02, 0.05, 0.08, 0.10, 0.15, 0.25],
                   help="EMA widths to reconstruct (relative standard deviation of the averaging profile).")
    args = p.parse_args(argv)
    for s in args.sigma_rels:
        if not 0 < s <= 0.30028:  # ema.MAX_SIGMA_REL, the widest power-function EMA
            p.error(f"--sigma_rels {s}: an EMA width lies in (0, 0.30028], e.g. 0.05-0.15")
    common.configure_smoke_runtime(args.smoke)
    common.smoke_overrides(args, num_prompts=8, num_real=16, batch=8, steps=common.SMOKE_SAMPLER_STEPS,
                           sigma_rels=[0.05, 0.2])

    import jax
    import numpy as np

    from ediff_jax import posthoc_snapshots
    from ediff_jax.images import ensure_writable_dir
    from ediff_jax.workdirs import read_workdir_config

    out = ensure_writable_dir(args.out)
    clock = common.Clock()
    workdir = trained_workdir(args, out)
    for s in args.sigma_rels:  # a --workdir without snapshots: refused before any checkpoint is read
        posthoc_snapshots.check_sigma_rel(read_workdir_config(workdir), s)
    model = common.load_model(workdir)  # its config, sampler settings and the tracked EMA
    evaluator = common.Evaluator(model.image_size, args.num_real, args.feature_weights)
    _, prompts = common.validation_examples(args.num_prompts, model.image_size)
    sampler = model.sampler(args.steps)
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding), model.params)
    settings = [(f"tracked {float(model.config.train.ema_decay):g}", model.params, model.exp.restored_step)]
    for s in args.sigma_rels:
        params, at = posthoc_snapshots.reconstruct(workdir, abstract, s, up_to_step=model.exp.restored_step)
        settings.append((f"sigma_rel {s:g}", params, at))
    rows, grids = [], []
    for label, params, at in settings:
        sample_clock = common.Clock()
        images = common.sample_batched(lambda chunk, **kw: sampler(params, chunk, guidance=model.guidance, **kw),
                                       prompts, args.batch, args.seed)
        rows.append({"ema": label, **evaluator.score(images, prompts), "sample_seconds": sample_clock.wall})
        grids.append(images[:8])
        print(f"{label} (step {at}): all_ok {rows[-1]['all_ok_accuracy']:.3f}, FD {rows[-1]['frechet_distance']:.2f}",
              flush=True)

    steps = args.steps or model.sampler_steps
    notes = [
        f"Model: `{model.workdir}` ({model.train_samples} training samples; EMA decay "
        f"{float(model.config.train.ema_decay):g} tracked, power EMAs gamma {tuple(model.config.train.posthoc_ema.gammas)} "
        f"saved every {model.config.train.posthoc_ema.every} steps). Post-hoc widths are reconstructed at the last "
        f"snapshot. {len(prompts)} validation captions, one image each per setting, {steps} {model.sampler_name} "
        f"steps, guidance {model.guidance:g}, seed {args.seed} (the same noise for every setting).",
        f"Fréchet distance / KID: to {args.num_real} real validation images, shipped ediff_shapes feature network.",
        f"Command: `{common.command('posthoc_ema.py', argv)}`. {clock.summary()}.",
    ]
    common.write_results(out, rows, COLUMNS, "Post-hoc EMA width: alignment vs Fréchet distance", notes,
                         smoke=args.smoke)
    posthoc = rows[1:]
    common.plot_metrics([{**r, "sigma_rel": s} for r, s in zip(posthoc, args.sigma_rels)], "sigma_rel",
                        ["all_ok_accuracy", "frechet_distance", "kid"], out / "metrics.png",
                        title="Metrics against the post-hoc EMA width", xlabel="sigma_rel")
    common.save_grid(np.concatenate(grids), out / "samples.png", cols=len(grids[0]))
    print(f"Wrote results.md, results.csv, metrics.png and samples.png to {out} ({clock.summary()}).")
    return rows


if __name__ == "__main__":
    main()
