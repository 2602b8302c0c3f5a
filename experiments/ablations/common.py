"""What every ablation script shares: configs, training or reusing workdirs, the evaluation
set, batched sampling, scoring, and the results table (Markdown + CSV) and plots.

Why one module: the five ablations differ only in what they vary. Sampling, scoring against
`ediff_jax.eval` and writing results the same way makes their numbers comparable with each
other (the same prompts, the same real images, the same feature network).

Evaluation set: the first N captions of the `ediff_shapes` validation split at the model's
resolution (all four caption templates mixed), and the first M validation images as the
"real" distribution for Fréchet distance / KID. Both are generated in-process from the
dataset's own seeds, `(0, crc32("validation"), index)`: byte-identical to the prepared TFDS
split (PNG is lossless) without importing TensorFlow or preparing anything.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[2]

import numpy as np

# The smoke model: one UNet level with cross-attention (paint-with-words acts on it) at the
# 32x32 data resolution. Compiling the train step dominates a smoke run; one level compiles
# in a fraction of the tiny two-level UNet's time.
SMOKE_MODEL = dict(channels=16, channel_mult=(1,), num_res_blocks=1, attn_resolutions=(), cross_attn_resolutions=(32,),
                   mid_self_attn=False, num_heads=2, context_dim=32)
SMOKE_TRAIN_STEPS = 3  # one step per phase of the 3-expert layout
SMOKE_SAMPLER_STEPS = 2
QUICKSTART_WORKDIR = REPO / "workdirs" / "quickstart"  # the README quickstart's workdir, reused when trained

# Columns every sampling ablation reports (see `Evaluator.score`).
ALIGNMENT_COLUMNS = ("all_ok_accuracy", "color_accuracy", "shape_accuracy", "region_accuracy", "relation_accuracy")
DISTANCE_COLUMNS = ("frechet_distance", "kid", "kid_std")


# ---------------------------------------------------------------------------------------
# Configs, training and loading
# ---------------------------------------------------------------------------------------


def configure_smoke_runtime(smoke: bool) -> None:
    """A --smoke run from the command line compiles fast and once.

    Compilation is nearly all of a smoke run: XLA:CPU's backend optimisation level 0 halves
    it (the programs run slower, which does not matter for a few tiny steps), and a
    persistent compilation cache in the temp dir compiles identical programs (the same
    init and train step in every expert layout's run) once. Only applied before JAX is
    imported, so an in-process caller (the tests, a notebook) keeps its own settings.
    """
    if not smoke or "jax" in sys.modules:
        return
    import tempfile

    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
    import jax

    jax.config.update("jax_compilation_cache_dir", str(Path(tempfile.gettempdir()) / "ediff_jax_smoke_xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def smoke_batch() -> int:
    """A batch every expert layout (1, 2, 3) and the data-parallel device count divide."""
    import jax

    return math.lcm(jax.device_count(), 6)


def ablation_config(*, experts: int = 1, steps: int = 1200, batch: int = 24, smoke: bool = False,
                    data_dir: str | None = None) -> Any:
    """`configs/experts.py:experts=E,steps=S,batch=B` (the quickstart model), or its smoke variant.

    The smoke variant keeps the expert layout and data and shrinks everything else: the
    one-level UNet, a few training steps, no periodic or final sample grid and no MFU
    measurement (each would compile another program).
    """
    from ediff_jax.config_utils import load_config

    config = load_config(f"{REPO / 'configs/experts.py'}:experts={experts},steps={steps},batch={batch}")
    config.data.data_dir = data_dir
    if smoke:
        config.model.update(SMOKE_MODEL)
        config.data.shuffle_buffer = 64
        config.train.lr, config.train.warmup_steps = 2e-3, 1
        config.train.log_every = config.train.ckpt_every = max(steps, 1)
        config.train.log_mfu = False
        config.sample.steps, config.sample.sampler = SMOKE_SAMPLER_STEPS, "euler"
        config.sample.prompts = ()
    return config


def is_trained(workdir: str | Path, num_steps: int | None = None) -> bool:
    """Whether `workdir` holds a checkpoint of a finished run (of `num_steps` steps, when given)."""
    from ediff_jax.checkpoints import kept_steps
    from ediff_jax.workdirs import read_workdir_config

    workdir = Path(workdir).expanduser()
    if not (workdir / "config.json").exists():
        return False
    steps = kept_steps(workdir)
    target = int(read_workdir_config(workdir).train.num_steps) if num_steps is None else int(num_steps)
    return bool(steps) and steps[-1] >= target


def train_or_reuse(config: Any, workdir: str | Path) -> Path:
    """Trains `config` into `workdir` unless a finished run is already there (then it is reused as is).

    An unfinished run resumes (the trainer restarts from its last checkpoint).
    """
    from ediff_jax import training

    workdir = Path(workdir).expanduser()
    if is_trained(workdir, int(config.train.num_steps)):
        print(f"Reusing the trained workdir {workdir}.", flush=True)
        return workdir
    print(f"Training {workdir} ({config.train.num_steps} steps at batch {config.train.batch_size}).", flush=True)
    training.train_and_evaluate(config, workdir)
    return workdir


def default_workdir(args: argparse.Namespace, out: Path) -> Path:
    """The model a sampling ablation evaluates: --workdir, else a trained smoke or quickstart model.

    Without --workdir, --smoke trains the smoke model into OUT/workdir, and the full setting
    trains `configs/quickstart.py` into workdirs/quickstart (the README's run; reused when done).
    """
    if args.workdir:
        return Path(args.workdir).expanduser()
    if args.smoke:
        return train_or_reuse(ablation_config(experts=1, steps=SMOKE_TRAIN_STEPS, batch=smoke_batch(), smoke=True,
                                              data_dir=args.data_dir), out / "workdir")
    from ediff_jax.config_utils import load_config

    config = load_config(str(REPO / "configs/quickstart.py"))
    config.data.data_dir = args.data_dir
    return train_or_reuse(config, QUICKSTART_WORKDIR)


@dataclasses.dataclass
class Model:
    """A trained base model with the settings its workdir samples with."""

    workdir: Path
    config: Any
    exp: Any
    params: Any

    @property
    def image_size(self) -> int:
        return int(self.config.data.image_size)

    @property
    def boundaries(self) -> Any:
        return getattr(self.exp, "boundaries", None)

    @property
    def sigma_data(self) -> float:
        return float(self.config.edm.sigma_data)

    @property
    def guidance(self) -> float:
        return float(self.config.sample.guidance)

    @property
    def sampler_steps(self) -> int:
        return int(self.config.sample.steps)

    @property
    def sampler_name(self) -> str:
        return str(self.config.sample.sampler)

    @property
    def train_samples(self) -> int:
        """Samples seen up to the loaded checkpoint (a time-boxed run stops before config.train.num_steps)."""
        step = self.exp.restored_step
        return int(self.config.train.num_steps if step is None else step) * int(self.config.train.batch_size)

    def sampler(self, steps: int | None = None, name: str | None = None) -> Any:
        """A `Sampler` with the workdir's settings (`steps` and the sampler's `name` override the config's)."""
        from ediff_jax.sampling import Sampler

        return Sampler(self.exp.model, self.exp.encoders, image_size=self.image_size,
                       steps=steps or self.sampler_steps, sampler=name or self.sampler_name,
                       sigma_data=self.sigma_data, boundaries=self.boundaries)


def load_model(workdir: str | Path, ema_decay: float | None = None, ema_sigma_rel: float | None = None) -> Model:
    """The EMA parameters of a base-model workdir (an SR stage is refused: it needs low-res inputs).

    `ema_decay` picks one of the EMAs the run kept (default: config.train.ema_decay);
    `ema_sigma_rel` reconstructs the post-hoc EMA of that width from the run's snapshots.
    """
    from ediff_jax.workdirs import check_base_workdir, load_workdir

    workdir = Path(workdir).expanduser()
    check_base_workdir(workdir)
    config, exp, params = load_workdir(workdir, ema_decay=ema_decay, ema_sigma_rel=ema_sigma_rel)
    return Model(workdir, config, exp, params)


def load_model_params(workdir: str | Path, step: int, ema_decay: float | None = None,
                      ema_sigma_rel: float | None = None) -> Any:
    """The EMA parameters of checkpoint `step` of a workdir (learning curves)."""
    from ediff_jax.workdirs import load_workdir

    return load_workdir(Path(workdir).expanduser(), ema_decay=ema_decay, step=step, ema_sigma_rel=ema_sigma_rel)[2]


# ---------------------------------------------------------------------------------------
# Evaluation set, sampling and scoring
# ---------------------------------------------------------------------------------------


def validation_examples(count: int, size: int, offset: int = 0) -> tuple[np.ndarray, list[str]]:
    """uint8 images [count, size, size, 3] and captions of the ediff_shapes validation split."""
    import zlib

    from ediff_jax.data import shapes

    split = zlib.crc32(b"validation")  # == ediff_jax.data.shapes_tfds.split_seed("validation")
    examples = [shapes.generate_example((0, split, offset + i), size) for i in range(count)]
    return np.stack([e["image"] for e in examples]), [e["caption"] for e in examples]


def sample_batched(sample: Callable[..., np.ndarray], prompts: Sequence[str], batch_size: int, seed: int,
                   extra_cond: Mapping[str, np.ndarray] | None = None, **kwargs: Any) -> np.ndarray:
    """`sample(prompts_chunk, seed=..., extra_cond=..., **kwargs)` over fixed-size chunks -> uint8 [N, ...].

    Every chunk has `batch_size` prompts (the last is padded, the padding dropped), so the
    sampler compiles once; chunk k uses seed + k, so two calls with the same seed (two
    settings of an ablation) start from the same noise for the same prompt.
    """
    prompts = list(prompts)
    batch_size = max(1, min(batch_size, len(prompts)))
    out = []
    for k, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start:start + batch_size]
        real = len(chunk)
        pad = batch_size - real
        chunk += [chunk[-1]] * pad
        call = dict(kwargs)
        if extra_cond is not None:
            last = start + real - 1
            call["extra_cond"] = {key: np.concatenate([v[start:last + 1], np.repeat(v[last:last + 1], pad, axis=0)])
                                  for key, v in extra_cond.items()}
        out.append(np.asarray(sample(chunk, seed=seed + k, **call))[:real])
    return np.concatenate(out)


class Evaluator:
    """Alignment of images with their ediff_shapes prompts, and Fréchet distance / KID to real images.

    The real features are computed once (the first `num_real` validation images at
    `image_size`) with the shipped feature network (`ediff_jax.eval.load_feature_fn`); every
    setting of an ablation is then compared with the same reference.
    """

    def __init__(self, image_size: int, num_real: int, feature_weights: str | None = None):
        from ediff_jax.eval import compute_features, load_feature_fn

        self.image_size = int(image_size)
        self.feature_fn = load_feature_fn(feature_weights)
        real, _ = validation_examples(num_real, self.image_size)
        self.real_features = compute_features(self.feature_fn, real)

    def features(self, images: np.ndarray) -> np.ndarray:
        from ediff_jax.eval import compute_features

        return compute_features(self.feature_fn, images)

    def distances(self, images: np.ndarray) -> dict[str, float]:
        """Fréchet distance and KID (mean, std over subsets) of `images` to the real set.

        With fewer images than feature dimensions the Fréchet distance is biased upwards;
        it stays comparable between settings scored with the same number of images.
        """
        from ediff_jax.eval import frechet_distance_from_features, kid

        fake = self.features(images)
        subset = min(100, len(fake), len(self.real_features))
        result = kid(fake, self.real_features, subset_size=subset, num_subsets=100)
        return {"frechet_distance": frechet_distance_from_features(fake, self.real_features),
                "kid": result.mean, "kid_std": result.std}

    def score(self, images: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
        """`aggregate_alignment` of `score_alignment_batch`, plus `distances`."""
        return {**alignment(images, prompts), **self.distances(images)}


def alignment(images: np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
    """Alignment accuracies of uint8 images with their ediff_shapes prompts (NaN: no such prompt)."""
    from ediff_jax.eval import aggregate_alignment, score_alignment_batch

    return aggregate_alignment(score_alignment_batch(images, list(prompts)))


# ---------------------------------------------------------------------------------------
# Results: table, CSV, plots, timing
# ---------------------------------------------------------------------------------------


class Clock:
    """Wall and process CPU seconds since construction (CPU counts every thread of this process)."""

    def __init__(self) -> None:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()

    @property
    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    @property
    def cpu(self) -> float:
        return time.process_time() - self.cpu0

    def summary(self) -> str:
        return f"wall {self.wall:.0f} s, CPU (process, all threads) {self.cpu:.0f} s"


def command(script: str, argv: Sequence[str] | None) -> str:
    """The command line that reproduces this run."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", f"experiments/ablations/{script}", *map(shlex.quote, args)])


def _format(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.3f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


SMOKE_NOTE = "Smoke run (--smoke): a tiny, barely trained model; numbers meaningless, the pipeline is real."


def write_results(out: Path, rows: Sequence[Mapping[str, Any]], columns: Sequence[str], title: str,
                  notes: Iterable[str] = (), smoke: bool = False) -> None:
    """`results.csv` (all digits) and `results.md` (title, notes, the table rounded to 3 digits).

    `smoke` puts SMOKE_NOTE first, so no smoke table can be read as a result.
    """
    notes = [SMOKE_NOTE, *notes] if smoke else list(notes)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({c: row[c] for c in columns} for row in rows)
    lines = [f"# {title}", "", *notes, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_format(row[c]) for c in columns) + " |" for row in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def read_results(out: str | Path) -> list[dict[str, str]]:
    """The rows of a `results.csv` (strings), for tests and notebooks."""
    with open(Path(out) / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure outside pyplot: no backend, no global state, so it is headless and
    leaves a notebook's inline plotting alone."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def plot_metrics(rows: Sequence[Mapping[str, Any]], x: str, metrics: Sequence[str], path: Path, *, title: str,
                 bar: bool = False, logx: bool = False, xlabel: str | None = None) -> None:
    """One panel per metric against `x` (bars for categorical settings, else lines with markers)."""
    fig = _figure(3.6 * len(metrics), 3.2)
    axes = fig.subplots(1, len(metrics), squeeze=False)
    xs = [row[x] for row in rows]
    for ax, metric in zip(axes[0], metrics):
        ys = [float(row[metric]) for row in rows]
        if bar:
            ax.bar([str(v) for v in xs], ys, color="tab:blue")
        else:
            ax.plot(xs, ys, marker="o")
            if logx:
                ax.set_xscale("log")
        if "accuracy" in metric or metric == "all_placed":
            ax.set_ylim(-0.02, 1.02)  # accuracies on one scale, so settings compare across panels
        ax.set_title(metric.replace("_", " "), fontsize=9)
        ax.set_xlabel(xlabel or x)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_curves(curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path, *, title: str,
                xlabel: str, ylabel: str, logx: bool = False, logy: bool = False,
                ylim: tuple[float, float] | None = None,
                annotations: Mapping[str, Sequence[str]] | None = None) -> None:
    """Named (x, y) curves on one axis; `annotations[name]` labels each point of a curve."""
    fig = _figure(5.0, 3.8)
    ax = fig.subplots()
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", label=name)
        for label, xv, yv in zip((annotations or {}).get(name, ()), xs, ys):
            ax.annotate(label, (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if len(curves) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def save_grid(images: np.ndarray, path: Path, cols: int) -> None:
    """A PNG grid of uint8 images, upscaled so 32-pixel samples stay visible."""
    from ediff_jax.images import make_grid, save_png

    save_png(make_grid(images, cols=cols), path, upscale=max(1, 64 // images.shape[1]))


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    """Arguments every ablation takes: --out, --smoke, --seed, --data_dir, --feature_weights."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="Output directory: results.md, results.csv and PNG plots.")
    p.add_argument("--smoke", action="store_true",
                   help="Tiny model and few samples (seconds of real work): checks the pipeline, numbers meaningless.")
    p.add_argument("--seed", type=int, default=0, help="Sampling seed (the same noise for every setting).")
    p.add_argument("--data_dir", default=None, help="TFDS data_dir for training (default: TFDS's).")
    p.add_argument("--feature_weights", default=None,
                   help="Feature-network weights for Fréchet distance / KID (default: the shipped ones).")
    return p


def add_sampling_args(p: argparse.ArgumentParser, num_prompts: int) -> None:
    """Arguments of the ablations that sample one trained model."""
    p.add_argument("--workdir", default=None,
                   help="A trained base-model workdir (default: train a smoke model with --smoke, else the "
                        "quickstart model into workdirs/quickstart, reused once trained).")
    p.add_argument("--num_prompts", type=int, default=num_prompts,
                   help="Validation captions sampled per setting (one image each).")
    p.add_argument("--num_real", type=int, default=1000, help="Real validation images for Fréchet distance / KID.")
    p.add_argument("--steps", type=int, default=None, help="Sampler steps (default: the workdir's config).")
    p.add_argument("--batch", type=int, default=32, help="Images per sampler call (one compiled program).")


def smoke_overrides(args: argparse.Namespace, **values: Any) -> None:
    """With --smoke, shrink the given arguments (explicitly given flags are overridden too)."""
    if args.smoke:
        for key, value in values.items():
            setattr(args, key, value)
