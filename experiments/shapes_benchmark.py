"""The reference run (issue #9): train `configs/shapes_benchmark.py` for at most 60 CPU minutes,
then score what it draws.

  python experiments/shapes_benchmark.py --workdir workdirs/shapes_benchmark \\
      --out experiments/results/shapes_benchmark
  python experiments/shapes_benchmark.py --out /tmp/shapes_bench --smoke      # the tests run this

Three prompt sets, scored from pixels by `ediff_jax.eval` (colour blobs, shape, relation):
- one object: all 18 `a {colour} {shape}` prompts, `--num_per_prompt` images each; counted
  correct when an object of that colour has that shape (lenient) and, strictly, when nothing
  else is drawn (goal, strict: >= 95%);
- two objects with a relation: `--num_relation` seeded random `a {cA} {sA} {relation} a {cB}
  {sB}` prompts (cA != cB, as in the data), one image each, correct when both colours, both
  shapes and the relation are right (goal: >= 85%), and strictly when nothing else is drawn;
- a diagnostic, not a goal: `--num_region` `a {colour} {shape} in the {region}` prompts, the
  nine regions in turn, counted when the object's centre is in its region (chance 1/9).
  Region words and relations both need the model to know where on the canvas it draws.

Every kept checkpoint is scored (the last with all prompts, the earlier ones with a quarter,
`--curve_fraction`), so the table is a learning curve. Accuracies come with 95% Wilson
intervals: with 144 images an accuracy is known to about +-4 points. Writes results.md/.csv,
breakdown.md (the last checkpoint per colour, shape, relation and region), curve.png and
samples.png. `--config` trains a variant into an empty --workdir (the rows of the alignment
table in BENCHMARKS.md); `--guidance`, `--steps`, `--sampler`, `--ema_decay` and `--ema_sigma_rel` score a
trained run with other sampling settings.

A workdir that already holds checkpoints is evaluated as it is (a run stopped by its time
box included); without checkpoints the config is trained first (`/usr/bin/time` around
this script gives the training's wall time; the trainer's log prints it too).

Run times on the 2-core VM (`--smoke`, scoring the 60-minute run): BENCHMARKS.md.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Sequence

from experiments.ablations import common

CONFIG = common.REPO / "configs" / "shapes_benchmark.py"
DEFAULT_WORKDIR = common.REPO / "workdirs" / "shapes_benchmark"
# ediff_jax.edm.SAMPLERS' names, written out so --help does not import JAX (a test keeps them equal).
SAMPLER_NAMES = ("heun", "euler", "dpmpp_2m")
SAMPLE_BATCH = 48  # images per sampler call; chunk k of a prompt set starts from seed + k
GOALS = {"one_object_color_shape_strict_accuracy": 0.95, "two_object_relation_accuracy": 0.85}
COLUMNS = ("step", "train_samples", "one_object_color_shape_strict_accuracy", "one_object_strict_ci95",
           "one_object_color_shape_accuracy", "one_object_ci95", "num_one_object",
           "two_object_relation_accuracy", "two_object_ci95", "two_object_relation_strict_accuracy",
           "two_object_strict_ci95", "num_two_object", "color_accuracy", "shape_accuracy",
           "relation_accuracy", "region_accuracy", "region_ci95", "num_region", "goals_met", "sample_seconds")


def one_object_prompts(num_per_prompt: int) -> list[str]:
    """Every colour x shape, `num_per_prompt` times each (consecutive copies)."""
    from ediff_jax.data.shapes import COLORS, SHAPES

    return [f"a {c} {s}" for c in COLORS for s in SHAPES for _ in range(num_per_prompt)]


def relation_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` seeded random two-object relation prompts with two different colours."""
    import numpy as np

    from ediff_jax.data.shapes import COLORS, RELATIONS, SHAPES

    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(count):
        ca, cb = rng.choice(len(COLORS), size=2, replace=False)
        sa, sb = rng.integers(len(SHAPES), size=2)
        relation = RELATIONS[rng.integers(len(RELATIONS))]
        prompts.append(f"a {COLORS[ca]} {SHAPES[sa]} {relation} a {COLORS[cb]} {SHAPES[sb]}")
    return prompts


def region_prompts(count: int, seed: int = 0) -> list[str]:
    """`count` one-object `a {colour} {shape} in the {region}` prompts, the 9 regions in turn.

    Not a goal of the issue, a diagnostic: region words need the model to know where on the
    canvas it draws, and so do relations. Chance is 1/9.
    """
    import numpy as np

    from ediff_jax.data.shapes import COLORS, REGIONS, SHAPES

    rng = np.random.default_rng(seed + 1)
    return [f"a {COLORS[rng.integers(len(COLORS))]} {SHAPES[rng.integers(len(SHAPES))]} in the "
            f"{REGIONS[i % len(REGIONS)]}" for i in range(count)]


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (sound near 0 and 1, unlike +-2 SE)."""
    if total == 0:
        return (math.nan, math.nan)
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def score(images_one: Any, prompts_one: Sequence[str], images_two: Any, prompts_two: Sequence[str],
          images_region: Any = None, prompts_region: Sequence[str] = ()) -> tuple[dict, list]:
    """The table row's accuracies (with intervals) and the per-image results."""
    from ediff_jax.eval import aggregate_alignment, score_alignment_batch

    one = score_alignment_batch(images_one, list(prompts_one))
    two = score_alignment_batch(images_two, list(prompts_two))
    region = score_alignment_batch(images_region, list(prompts_region)) if len(prompts_region) else []
    agg = aggregate_alignment(one + two)
    ci95 = lambda hits, results: "{:.3f}-{:.3f}".format(*wilson_interval(sum(hits), len(results)))  # noqa: E731
    row = {
        "one_object_color_shape_strict_accuracy": agg["one_object_color_shape_strict_accuracy"],
        "one_object_strict_ci95": ci95([r.color_ok and r.shape_ok and r.count_ok for r in one], one),
        "one_object_color_shape_accuracy": agg["one_object_color_shape_accuracy"],
        "one_object_ci95": ci95([r.color_ok and r.shape_ok for r in one], one),
        "num_one_object": len(one),
        "two_object_relation_accuracy": agg["two_object_relation_accuracy"],
        "two_object_ci95": ci95([r.all_ok for r in two], two),
        "two_object_relation_strict_accuracy": agg["two_object_relation_strict_accuracy"],
        "two_object_strict_ci95": ci95([r.all_ok and r.count_ok for r in two], two),
        "num_two_object": len(two),
        "color_accuracy": agg["color_accuracy"],
        "shape_accuracy": agg["shape_accuracy"],
        "relation_accuracy": agg["relation_accuracy"],
        "region_accuracy": aggregate_alignment(region)["region_accuracy"] if region else math.nan,
        "region_ci95": ci95([bool(r.region_ok) for r in region], region) if region else "",
        "num_region": len(region),
    }
    row["goals_met"] = all(row[k] >= goal for k, goal in GOALS.items())
    return row, one + two + region


def breakdown(results: Sequence[Any]) -> list[str]:
    """Markdown tables: accuracy by colour and shape (one object) and by relation (two objects)."""
    from ediff_jax.data.shapes import COLORS, RELATIONS, SHAPES

    from ediff_jax.data.shapes import REGIONS

    one = [r for r in results if len(r.parsed.objects) == 1 and r.parsed.region is None]
    two = [r for r in results if r.parsed.relation is not None]
    regions = [r for r in results if r.parsed.region is not None]
    lines = ["## One object: colour and shape correct", "", "| colour | " + " | ".join(SHAPES) + " |",
             "|---|" + "---|" * len(SHAPES)]
    for color in COLORS:
        cells = []
        for shape in SHAPES:
            hits = [r.color_ok and r.shape_ok for r in one
                    if r.parsed.objects[0].color == color and r.parsed.objects[0].shape == shape]
            cells.append(f"{sum(hits)}/{len(hits)}")
        lines.append(f"| {color} | " + " | ".join(cells) + " |")
    lines += ["", "## Two objects with a relation", "", "| relation | both colours | both shapes | relation | all |",
              "|---|---|---|---|---|"]
    for relation in RELATIONS:
        rs = [r for r in two if r.parsed.relation == relation]
        count = lambda flags: f"{sum(flags)}/{len(rs)}"  # noqa: E731
        lines.append(f"| {relation} | {count([r.color_ok for r in rs])} | {count([r.shape_ok for r in rs])} | "
                     f"{count([bool(r.relation_ok) for r in rs])} | {count([r.all_ok for r in rs])} |")
    if regions:
        lines += ["", "## One object in a named region (chance 1/9)", "", "| region | in its region | colour and shape |",
                  "|---|---|---|"]
        for word in REGIONS:
            rs = [r for r in regions if r.parsed.region == word]
            lines.append(f"| {word} | {sum(bool(r.region_ok) for r in rs)}/{len(rs)} | "
                         f"{sum(r.color_ok and r.shape_ok for r in rs)}/{len(rs)} |")
    return lines


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = common.base_parser(__doc__)
    p.add_argument("--workdir", default=None,
                   help=f"The run to score (default: {DEFAULT_WORKDIR}, trained first when it has no checkpoint; "
                        "with --smoke a tiny model trained into OUT/workdir).")
    p.add_argument("--num_per_prompt", type=int, default=8, help="Images per one-object prompt (18 prompts).")
    p.add_argument("--num_relation", type=int, default=144, help="Two-object relation prompts (one image each).")
    p.add_argument("--num_region", type=int, default=72,
                   help="One-object prompts with a region word (one image each; a diagnostic, not a goal; 0: none).")
    p.add_argument("--curve_fraction", type=float, default=0.25,
                   help="Share of the prompts used for the checkpoints before the last (0: score the last only).")
    p.add_argument("--guidance", type=float, nargs="+", default=None,
                   help="Guidance scale, or one per expert, highest noise first (default: the workdir's config).")
    p.add_argument("--steps", type=int, default=None, help="Sampler steps (default: the workdir's config).")
    p.add_argument("--sampler", default=None, choices=SAMPLER_NAMES, help="Sampler (default: the workdir's config).")
    p.add_argument("--ema_decay", type=float, default=None,
                   help="Which EMA the run kept to score (default: config.train.ema_decay; others: its extra_ema_decays).")
    p.add_argument("--ema_sigma_rel", type=float, default=None,
                   help="Score the post-hoc EMA of this width (EDM2), reconstructed from the run's snapshots "
                        "(config.train.posthoc_ema); excludes --ema_decay.")
    p.add_argument("--batch", type=int, default=SAMPLE_BATCH, help="Images per sampler call (one compiled program; "
                   "chunk k starts from seed + k, so another batch draws other noise).")
    p.add_argument("--step", type=int, default=None,
                   help="Score this kept checkpoint alone, with all prompts (default: every kept one, the newest last).")
    p.add_argument("--config", default=None,
                   help=f"Config to train a new --workdir with, PATH or PATH:ARG (default: {CONFIG.relative_to(common.REPO)}"
                        ", e.g. configs/shapes_benchmark.py:xattn32=true); refused for a workdir that already holds "
                        "checkpoints, which is scored as it is.")
    args = p.parse_args(argv)
    common.configure_smoke_runtime(args.smoke)
    common.smoke_overrides(args, num_per_prompt=1, num_relation=8, num_region=9, batch=8,
                           steps=common.SMOKE_SAMPLER_STEPS)
    for name in ("num_per_prompt", "num_relation", "batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.num_region < 0:
        p.error(f"--num_region must be at least 0, got {args.num_region}")
    if not 0 <= args.curve_fraction <= 1:
        p.error(f"--curve_fraction must lie in [0, 1], got {args.curve_fraction}")

    import numpy as np

    from ediff_jax.checkpoints import kept_steps
    from ediff_jax.images import ensure_writable_dir

    out = ensure_writable_dir(args.out)
    clock = common.Clock()
    workdir = _trained_workdir(args, out)
    steps = kept_steps(workdir)
    newest = steps[-1]  # the checkpoint load_model reads
    if args.step is not None:
        if args.step not in steps:
            raise SystemExit(f"--step {args.step}: {workdir} keeps checkpoints {steps}; pick one of them.")
        steps = [args.step]
    # the newest checkpoint: its config, encoders and sampler settings
    model = common.load_model(workdir, ema_decay=args.ema_decay, ema_sigma_rel=args.ema_sigma_rel)
    sampler = model.sampler(args.steps, args.sampler)
    guidance = model.guidance if args.guidance is None else _guidance_arg(args.guidance, sampler.num_experts, p)
    checkpoints = steps if args.curve_fraction > 0 else steps[-1:]

    rows = []
    for step in checkpoints:
        last = step == steps[-1]
        share = 1.0 if last else args.curve_fraction
        prompts_one = one_object_prompts(max(1, round(args.num_per_prompt * share)))
        prompts_two = relation_prompts(max(1, round(args.num_relation * share)), seed=args.seed)
        prompts_region = region_prompts(round(args.num_region * share), seed=args.seed)
        params = (model.params if step == newest
                  else common.load_model_params(workdir, step, ema_decay=args.ema_decay,
                                                ema_sigma_rel=args.ema_sigma_rel))
        sample_clock = common.Clock()
        draw = lambda chunk, **kw: sampler(params, chunk, guidance=guidance, **kw)  # noqa: E731
        images_one = common.sample_batched(draw, prompts_one, args.batch, args.seed)
        images_two = common.sample_batched(draw, prompts_two, args.batch, args.seed + 10_000)
        images_region = (common.sample_batched(draw, prompts_region, args.batch, args.seed + 20_000)
                         if prompts_region else None)
        row, results = score(images_one, prompts_one, images_two, prompts_two, images_region, prompts_region)
        rows.append({"step": step, "train_samples": step * int(model.config.train.batch_size), **row,
                     "sample_seconds": sample_clock.wall})
        print(f"step {step}: one object {row['one_object_color_shape_strict_accuracy']:.3f} strict "
              f"({row['one_object_strict_ci95']}), {row['one_object_color_shape_accuracy']:.3f} lenient; "
              f"two objects with a relation {row['two_object_relation_accuracy']:.3f} ({row['two_object_ci95']}), "
              f"{row['two_object_relation_strict_accuracy']:.3f} strict; in the named region "
              f"{row['region_accuracy']:.3f}", flush=True)
    (out / "breakdown.md").write_text("\n".join([f"# Step {steps[-1]}, guidance {_show(guidance)}", "",
                                                 *breakdown(results)]) + "\n")

    final = rows[-1]
    notes = [
        f"Model: `{workdir}`, {model.config.train.batch_size} images per step. "
        f"Sampler: {args.steps or model.sampler_steps} "
        f"{args.sampler or model.sampler_name} steps, guidance {_show(guidance)}, seed {args.seed}, "
        + (f"post-hoc EMA sigma_rel {args.ema_sigma_rel:g}." if args.ema_sigma_rel is not None else
           f"EMA decay {args.ema_decay or model.config.train.ema_decay:g}."),
        f"Goals: one-object colour and shape with no extra object >= "
        f"{GOALS['one_object_color_shape_strict_accuracy']:.0%}, two-object prompts "
        f"with a relation fully correct >= {GOALS['two_object_relation_accuracy']:.0%}. Strict columns also "
        "require that nothing else is drawn. Last checkpoint: "
        f"{'met' if final['goals_met'] else 'not met'}.",
        f"Earlier checkpoints are scored on {args.curve_fraction:.0%} of the prompts. Intervals: 95% Wilson.",
        f"Command: `python experiments/shapes_benchmark.py {' '.join(sys.argv[1:] if argv is None else argv)}`. "
        f"{clock.summary()}.",
    ]
    common.write_results(out, rows, COLUMNS, "ediff_shapes reference run: prompt accuracy", notes, smoke=args.smoke)
    common.plot_metrics(rows, "step", ["one_object_color_shape_strict_accuracy", "one_object_color_shape_accuracy",
                                       "two_object_relation_accuracy", "two_object_relation_strict_accuracy"],
                        out / "curve.png", title="Accuracy over training (goals: 0.95 and 0.85)", xlabel="train step")
    cols = min(8, len(images_one), len(images_two))
    pick_one = np.linspace(0, len(images_one) - 1, cols).astype(int)  # spread over colours and shapes
    common.save_grid(np.concatenate([images_one[pick_one], images_two[:cols]]), out / "samples.png", cols=cols)
    print(f"Wrote results.md, results.csv, breakdown.md, curve.png and samples.png to {out} ({clock.summary()}).")
    return rows


def _guidance_arg(values: Sequence[float], num_experts: int, parser: Any) -> float | tuple[float, ...]:
    """One scale, or one per expert of the loaded ensemble (highest noise first), else a parser error."""
    from ediff_jax.spec import per_expert_guidance

    if len(values) == 1:
        return float(values[0])
    try:
        return tuple(float(g) for g in per_expert_guidance(tuple(values), num_experts, "--guidance"))
    except ValueError as e:
        parser.error(str(e))


def _show(guidance: float | Sequence[float]) -> str:
    return "/".join(f"{g:g}" for g in guidance) if isinstance(guidance, (tuple, list)) else f"{guidance:g}"


def _trained_workdir(args: Any, out: Path) -> Path:
    """--workdir as it is when it has checkpoints; otherwise train the benchmark (or smoke) config into it."""
    from ediff_jax.checkpoints import kept_steps

    if args.smoke and args.workdir is None:
        if args.config is not None:
            raise SystemExit("--config trains the full benchmark; --smoke without --workdir trains the fixed smoke "
                             "model. Drop one of them.")
        return common.default_workdir(args, out)
    workdir = Path(args.workdir or DEFAULT_WORKDIR).expanduser()
    if kept_steps(workdir):
        if args.config is not None:
            raise SystemExit(f"--config trains a new workdir, but {workdir} already holds checkpoints (scored as "
                             "they are); drop --config, or give an empty --workdir to train it there.")
        print(f"Scoring the checkpoints in {workdir} as they are.", flush=True)
        return workdir
    from ediff_jax.config_utils import load_config

    try:
        config = load_config(args.config or str(CONFIG))
    except (ValueError, FileNotFoundError, ImportError) as error:
        raise SystemExit(f"--config: {error}") from None
    config.data.data_dir = args.data_dir
    return common.train_or_reuse(config, workdir)


if __name__ == "__main__":
    main()
