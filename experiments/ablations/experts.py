"""Experts vs no experts at equal training samples: eDiff-I's headline ablation on ediff_shapes.

`configs/experts.py:experts=1|2|3` (the quickstart UNet as one model, 2 experts, or the
paper's 3-expert layout; shared phase first, then branching) is trained for the same
number of steps at the same batch, so every variant sees the same training samples, then
each is scored on the same validation prompts from the same noise:

- alignment accuracy of one sample per prompt (`ediff_jax.eval.score_alignment_batch`),
- Fréchet distance and KID of the samples to real validation images (shipped feature net),
- the held-out denoising loss (EDM-weighted, conditional, no guidance) at fixed noise
  levels: where in the noise range the experts help or hurt, without sampling noise.

  python experiments/ablations/experts.py --out experiments/results/experts           # trains 3 runs
  python experiments/ablations/experts.py --out DIR --workdir 1=workdirs/e1 --workdir 3=workdirs/e3 --experts 1 3
  python experiments/ablations/experts.py --out /tmp/abl_experts --smoke              # the tests run this
  python experiments/ablations/experts.py --out DIR --experts 3 --workdir 3=workdirs/e3 --reuse OLD/results.csv
  python experiments/ablations/experts.py --out DIR --experts 1-wide --workdir 1-wide=workdirs/w45 --reuse OLD/results.csv

`--reuse` keeps the rows of an earlier call's results.csv for the layouts this call does not
score, so an ablation whose runs span sessions (workdirs do not always survive) still ends in
one table. A reused row must come from the same evaluation settings (its `evaluation` column)
and the same number of training samples; anything else is refused.

A row is keyed by its layout label: the expert count E, or E-NAME for a variant of the same
count given by --workdir (e.g. `1-wide`, one wider model with the ensemble's parameter count:
are experts more than parameters?). The `parameters` column counts every expert's weights.

Trained runs land in --workdir_root (default workdirs/ablation_experts/experts{E}) and are
reused when finished, so a rerun only evaluates. Runs given by --workdir must have been
trained on as many samples (steps x batch) as each other; otherwise the script stops.

Run times on the 2-core VM: BENCHMARKS.md, "Experiment run times".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from experiments import shapes_benchmark as reference
from experiments.ablations import common

DEFAULT_LOSS_SIGMAS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0)
LOSS_COLUMNS_PREFIX = "loss@"
# The reference run's prompt sets and scorer (experiments/shapes_benchmark.py, same seeds): the alignment
# table of issue #15, strict (nothing else drawn) and lenient.
REFERENCE_COLUMNS = ("one_object_color_shape_strict_accuracy", "one_object_strict_ci95",
                     "one_object_color_shape_accuracy", "two_object_relation_accuracy", "two_object_ci95",
                     "two_object_relation_strict_accuracy", "two_object_strict_ci95")
COLUMNS = ("layout", "experts", "parameters", "train_steps", "train_batch", "train_samples", "boundaries", "guidance",
           *REFERENCE_COLUMNS, *common.ALIGNMENT_COLUMNS, *common.DISTANCE_COLUMNS, "mean_val_loss", "sample_seconds",
           "workdir", "evaluation")
# The arguments that decide a row's figures for a given model: rows are comparable only when they agree.
EVALUATION_ARGS = ("seed", "num_prompts", "num_per_prompt", "num_relation", "reference_batch", "num_real",
                   "num_loss", "loss_sigmas", "sampler_steps", "sample_batch", "feature_weights")


def evaluation_key(args: Any) -> str:
    """This call's evaluation settings as one string (the `evaluation` column)."""
    return ";".join(f"{name}={getattr(args, name)}" for name in EVALUATION_ARGS)


def parse_layout(text: Any) -> tuple[int, str]:
    """'2' -> (2, '2'); '1-wide' -> (1, '1-wide'): the expert count and the row's label."""
    count, sep, name = str(text).strip().partition("-")
    if not count.isdigit() or int(count) not in (1, 2, 3) or (sep and not name.replace("_", "").isalnum()):
        raise ValueError(f"Layout {text!r} must be an expert count 1, 2 or 3, or COUNT-NAME for a variant "
                         "(e.g. 1-wide), NAME of letters, digits and _.")
    return int(count), f"{int(count)}{sep}{name}"


def layout_name(label: str) -> str:
    """'1' -> '1 model', '3' -> '3 experts', '1-wide' -> '1 model (wide)': legends and notes."""
    count, name = parse_layout(label)[0], str(label).partition("-")[2]
    return (f"{count} expert{'s' if count > 1 else ''}" if count > 1 else "1 model") + (f" ({name})" if name else "")


def _layout_order(label: str) -> tuple[int, str]:
    return parse_layout(label)[0], str(label)


def reused_rows(path: Path, skip: Sequence[str], evaluation: str, samples: int | None) -> list[dict[str, Any]]:
    """The rows of an earlier results.csv for layouts not in `skip`, checked to be comparable with this call's
    (`samples`: this call's training samples, None when it has no run to compare with).

    Read before any run trains or loads, so a table that cannot be kept costs nothing. Tables written before
    rows had labels key each row by its expert count, and have no parameter count."""
    import csv

    if not path.is_file():
        raise ValueError(f"--reuse {path}: no such file; give the results.csv of an earlier experts.py call.")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "evaluation" not in rows[0]:
        raise ValueError(f"--reuse {path}: no `evaluation` column, so its settings are unknown; score those "
                         "layouts again instead.")
    kept = []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        layout = row.get("layout") or row.get("experts")  # older tables key rows by expert count
        try:
            label = parse_layout(layout)[1]
            trained = int(row.get("train_samples") or "")
        except ValueError:
            raise ValueError(f"--reuse {path}: line {line} has no readable layout and train_samples "
                             f"({layout!r}, {row.get('train_samples')!r}); "
                             "give a results.csv written by experts.py, unedited.") from None
        if label in skip:
            continue
        if row["evaluation"] != evaluation:
            raise ValueError(f"--reuse {path}: its {label} row was scored with {row['evaluation']}, "
                             f"this call with {evaluation}; give the same arguments, or score that layout again.")
        if samples is not None and trained != samples:
            raise ValueError(f"--reuse {path}: its {label} row was trained on {trained} "
                             f"samples, this call's runs on {samples}; this ablation compares equal training samples.")
        kept.append({**{k: _parse_cell(v) for k, v in row.items()}, "layout": label,
                     "parameters": _parse_cell(row.get("parameters") or "-")})
    return kept


def _parse_cell(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_workdirs(items: Sequence[str] | None) -> dict[str, Path]:
    """['1=path', '3=path', '1-wide=path'] -> {'1': Path, '3': Path, '1-wide': Path}."""
    out: dict[str, Path] = {}
    for item in items or ():
        key, sep, path = str(item).partition("=")
        if not sep or not path.strip():
            raise ValueError(f"--workdir {item!r} must look like E=PATH, e.g. --workdir 3=workdirs/experts3 "
                             "(or E-NAME=PATH for a variant, e.g. 1-wide=workdirs/wide).")
        out[parse_layout(key)[1]] = Path(path.strip()).expanduser()
    return out


def check_equal_samples(workdirs: dict[str, Path], samples: int | None = None) -> int | None:
    """The ablation compares layouts at equal training samples; refuse runs that differ (or differ from `samples`).
    Returns that one number of samples (None: no run and no `samples`).

    A run's samples are its newest checkpoint's step x batch: a time-boxed run stops before
    config.train.num_steps, and a branched run (`experts.init_from`) counts its shared phase.
    """
    from ediff_jax.checkpoints import kept_steps
    from ediff_jax.workdirs import read_workdir_config

    trained = {}
    for label, workdir in workdirs.items():
        config = read_workdir_config(workdir)
        layout = len(config.experts.phases[-1]) if config.experts.phases else 1
        if layout != parse_layout(label)[0]:
            raise ValueError(f"{workdir} holds a {layout}-expert run, but was given as --workdir {label}=...")
        steps = kept_steps(workdir)
        trained[label] = (steps[-1] if steps else int(config.train.num_steps), int(config.train.batch_size))
    totals = {s * b for s, b in trained.values()} | ({samples} if samples is not None else set())
    if len(totals) > 1:
        listing = ", ".join(f"{layout_name(e)}: {s} steps x batch {b}" for e, (s, b) in sorted(trained.items()))
        target = f" and --steps x --batch = {samples}" if samples is not None else ""
        raise ValueError(f"The runs were trained on different numbers of samples ({listing}{target}); this ablation "
                         "compares expert layouts at equal training samples. Train them with the same --steps and "
                         "--batch.")
    return next(iter(totals), None)


def denoising_loss(model: common.Model, images: Any, captions: Sequence[str], sigmas: Sequence[float],
                   seed: int) -> list[float]:
    """Mean EDM-weighted loss of the conditional denoiser on `images` at each sigma (same noise for all)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ediff_jax import edm
    from ediff_jax.sampling import make_model_fn

    encoders = model.exp.encoders
    cond = encoders.encode(encoders.params, encoders.tokenize(list(captions)))
    x0 = jnp.asarray(np.asarray(images, np.float32) / 127.5 - 1.0)
    noise = jax.random.normal(jax.random.PRNGKey(seed), x0.shape)

    @jax.jit
    def loss_at(params: Any, x0: jax.Array, noise: jax.Array, cond: Any, sigma: jax.Array) -> jax.Array:
        model_fn = make_model_fn(model.exp.model, params, model.sigma_data, model.boundaries)
        return jnp.mean(edm.edm_loss(lambda x, s: model_fn(x, s, cond), x0, sigma, noise, model.sigma_data))

    return [float(loss_at(model.params, x0, noise, cond, jnp.float32(s))) for s in sigmas]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = common.base_parser(__doc__)
    p.add_argument("--experts", nargs="+", default=["1", "2", "3"], metavar="E[-NAME]",
                   help="Expert layouts to compare: E trains configs/experts.py:experts=E unless --workdir gives it; "
                        "E-NAME is a variant that --workdir must give (e.g. 1-wide).")
    p.add_argument("--steps", type=int, default=1200, help="Training steps of every variant.")
    p.add_argument("--batch", type=int, default=24, help="Training batch of every variant (divisible by 1, 2, 3).")
    p.add_argument("--workdir", action="append", metavar="E[-NAME]=PATH",
                   help="Reuse a trained run for layout E (or variant E-NAME) instead of training it (repeatable).")
    p.add_argument("--workdir_root", default=None,
                   help="Where trained runs go (default: workdirs/ablation_experts; OUT/workdirs with --smoke).")
    p.add_argument("--num_prompts", type=int, default=96, help="Validation captions sampled per variant.")
    p.add_argument("--num_per_prompt", type=int, default=8,
                   help="Images per one-object prompt of the reference table (18 prompts; shapes_benchmark.py's).")
    p.add_argument("--num_relation", type=int, default=144,
                   help="Two-object relation prompts of the reference table (one image each).")
    p.add_argument("--reference_batch", type=int, default=reference.SAMPLE_BATCH,
                   help="Images per sampler call for those prompts (shapes_benchmark.py's, so its noise).")
    p.add_argument("--num_real", type=int, default=1000, help="Real validation images for Fréchet distance / KID.")
    p.add_argument("--num_loss", type=int, default=256, help="Validation images for the per-sigma denoising loss.")
    p.add_argument("--loss_sigmas", type=float, nargs="+", default=list(DEFAULT_LOSS_SIGMAS))
    p.add_argument("--sampler_steps", type=int, default=None, help="Sampler steps (default: the config's).")
    p.add_argument("--sample_batch", type=int, default=32, help="Images per sampler call.")
    p.add_argument("--reuse", default=None, metavar="RESULTS_CSV",
                   help="Keep an earlier call's rows for the layouts not in --experts (same evaluation arguments "
                        "and training samples, checked).")
    args = p.parse_args(argv)
    common.configure_smoke_runtime(args.smoke)
    smoke_batch = common.smoke_batch() if args.smoke else None
    common.smoke_overrides(args, steps=common.SMOKE_TRAIN_STEPS, batch=smoke_batch, num_prompts=8, num_per_prompt=1, num_relation=4, reference_batch=8, num_real=16,
                           num_loss=8, loss_sigmas=[0.1, 1.0, 10.0], sample_batch=8,
                           sampler_steps=common.SMOKE_SAMPLER_STEPS)

    from ediff_jax.checkpoints import kept_steps
    from ediff_jax.images import ensure_writable_dir
    out = ensure_writable_dir(args.out)
    clock = common.Clock()
    try:
        layouts = list(dict.fromkeys(parse_layout(e)[1] for e in args.experts))
        given = parse_workdirs(args.workdir)
    except ValueError as err:
        p.error(str(err))
    unknown = sorted(set(given) - set(layouts))
    if unknown:
        p.error(f"--workdir given for {unknown}, which --experts {' '.join(layouts)} does not compare.")
    untrainable = [e for e in layouts if "-" in e and e not in given]
    if untrainable:
        p.error(f"--experts {' '.join(untrainable)}: a named variant is not trained here; give its run with "
                f"--workdir {untrainable[0]}=PATH.")
    root = Path(args.workdir_root or (out / "workdirs" if args.smoke else common.REPO / "workdirs/ablation_experts"))
    try:  # every refusal before anything trains or loads
        for label, workdir in given.items():  # any checkpointed run: equal samples are checked from its checkpoints
            if not kept_steps(workdir):
                raise ValueError(f"--workdir {label}={workdir} holds no checkpoint; train it first.")
        # Runs to be trained get --steps x --batch samples: check the given ones match before training anything.
        samples = check_equal_samples(given, args.steps * args.batch if set(layouts) - set(given) else None)
        earlier = reused_rows(Path(args.reuse), layouts, evaluation_key(args), samples) if args.reuse else []
    except ValueError as err:
        p.error(str(err))
    workdirs = {}
    for label in layouts:
        if label in given:
            workdirs[label] = given[label]
        else:
            num = parse_layout(label)[0]
            config = common.ablation_config(experts=num, steps=args.steps, batch=args.batch, smoke=args.smoke,
                                            data_dir=args.data_dir)
            workdirs[label] = common.train_or_reuse(config, root / f"experts{num}")
    check_equal_samples(workdirs)

    models = {num: common.load_model(workdir) for num, workdir in workdirs.items()}
    size = next(iter(models.values())).image_size
    evaluator = common.Evaluator(size, args.num_real, args.feature_weights)
    _, prompts = common.validation_examples(args.num_prompts, size)
    prompts_one = reference.one_object_prompts(args.num_per_prompt)
    prompts_two = reference.relation_prompts(args.num_relation, seed=args.seed)
    loss_images, loss_captions = common.validation_examples(args.num_loss, size, offset=args.num_prompts)
    rows, curves, grids = [], {}, []
    import jax

    for label, model in models.items():
        sampler = model.sampler(args.sampler_steps)
        draw = lambda chunk, **kw: sampler(model.params, chunk, guidance=model.guidance, **kw)  # noqa: E731
        sample_clock = common.Clock()
        images = common.sample_batched(draw, prompts, args.sample_batch, args.seed)
        sample_seconds = sample_clock.wall
        # shapes_benchmark.py's chunking and seeds: its figures for the same model, image for image
        images_one = common.sample_batched(draw, prompts_one, args.reference_batch, args.seed)
        images_two = common.sample_batched(draw, prompts_two, args.reference_batch, args.seed + 10_000)
        strict_lenient, results = reference.score(images_one, prompts_one, images_two, prompts_two)
        (out / f"breakdown_{label}.md").write_text("\n".join([f"# {layout_name(label)}, guidance {model.guidance:g}",
                                                            "", *reference.breakdown(results)]) + "\n")
        losses = denoising_loss(model, loss_images, loss_captions, args.loss_sigmas, args.seed)
        boundaries = model.boundaries
        rows.append({
            "layout": label, "experts": parse_layout(label)[0],
            "parameters": sum(int(leaf.size) for leaf in jax.tree.leaves(model.params)),
            "train_steps": model.train_samples // int(model.config.train.batch_size),
            "train_batch": int(model.config.train.batch_size), "train_samples": model.train_samples,
            "boundaries": "-" if boundaries is None else "/".join(f"{b:.3g}" for b in boundaries),
            "guidance": model.guidance, **evaluator.score(images, prompts),
            # after the validation-caption scores, whose aggregate has keys of these names too
            **{k: strict_lenient[k] for k in REFERENCE_COLUMNS}, "mean_val_loss": sum(losses) / len(losses),
            **{f"{LOSS_COLUMNS_PREFIX}{s:g}": v for s, v in zip(args.loss_sigmas, losses)},
            "sample_seconds": sample_seconds, "workdir": str(model.workdir), "evaluation": evaluation_key(args),
        })
        curves[layout_name(label)] = (list(args.loss_sigmas), losses)
        grids.append(images[:8])
        print(f"{layout_name(label)}: two objects {rows[-1]['two_object_relation_accuracy']:.3f}, one object strict "
              f"{rows[-1]['one_object_color_shape_strict_accuracy']:.3f}, all_ok {rows[-1]['all_ok_accuracy']:.3f}, "
              f"FD {rows[-1]['frechet_distance']:.2f}, "
              f"mean val loss {rows[-1]['mean_val_loss']:.4f}", flush=True)

    import numpy as np

    for row in earlier:
        curves[layout_name(row["layout"])] = (
            list(args.loss_sigmas), [row[f"{LOSS_COLUMNS_PREFIX}{s:g}"] for s in args.loss_sigmas])
    rows = sorted([*rows, *earlier], key=lambda row: _layout_order(row["layout"]))
    order = [layout_name(row["layout"]) for row in rows]
    curves = {name: curves[name] for name in order}
    columns = [*COLUMNS[:-2], *(f"{LOSS_COLUMNS_PREFIX}{s:g}" for s in args.loss_sigmas), *COLUMNS[-2:]]
    source = ("tiny smoke runs (--smoke): numbers meaningless, the pipeline is real" if args.smoke else
              "the given workdirs" if given else "configs/experts.py (the quickstart UNet)")
    notes = [
        f"Models: {source}. Each layout trained {rows[0]['train_steps']} steps x batch {rows[0]['train_batch']} = "
        f"{rows[0]['train_samples']} samples. Sampling: {len(prompts)} validation captions, one image each, "
        f"guidance from each config, seed {args.seed} (the same noise for every layout).",
        f"One / two objects (strict: nothing else drawn): experiments/shapes_benchmark.py's prompts and scorer, "
        f"{len(prompts_one)} one-object and {len(prompts_two)} relation prompts, its seeds; intervals 95% Wilson; "
        "per colour, shape and relation in breakdown_LAYOUT.md (the layouts scored by this call).",
        f"Fréchet distance / KID: to {args.num_real} real validation images, shipped ediff_shapes feature network. "
        f"`loss@s`: EDM-weighted denoising loss on {args.num_loss} other validation images at sigma = s.",
        f"Command: `{common.command('experts.py', argv)}`. {clock.summary()}.",
    ]
    if earlier:
        notes.append(f"Rows {', '.join(layout_name(r['layout']) for r in earlier)}: kept from {args.reuse} "
                     "(an earlier call's, the same evaluation arguments and training samples; its samples are not "
                     "in samples.png).")
    common.write_results(out, rows, columns, "Experts vs no experts at equal training samples", notes)
    common.plot_metrics(rows, "layout", ["all_ok_accuracy", "frechet_distance", "mean_val_loss"],
                        out / "metrics.png", title="Expert layouts at equal training samples", bar=True)
    common.plot_curves(curves, out / "val_loss_vs_sigma.png", title="Held-out denoising loss by noise level",
                       xlabel="sigma", ylabel="EDM-weighted loss", logx=True, logy=True)
    common.save_grid(np.concatenate(grids), out / "samples.png", cols=len(grids[0]))
    print(f"Wrote results.md, results.csv, metrics.png, val_loss_vs_sigma.png and samples.png to {out} "
          f"({clock.summary()}).")
    return rows


if __name__ == "__main__":
    main()
