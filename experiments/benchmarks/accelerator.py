"""The accelerator benchmarks in one go, one Markdown table (issue #19, section 4).

  bash experiments/benchmarks/accelerator.sh [OUT_DIR]            # on a lent GPU or TPU host
  python -m experiments.benchmarks.accelerator --size tiny --out DIR  # the same code at CPU-test sizes

Accelerators are lent to this project now and then, for minutes. This script is written and
tested beforehand so that a lent machine only has to run it. On one chip it measures:

1. the train step at a paper-like width (base64 `size=paper`'s UNet: ADM width 256, bf16):
   seconds per step, images/s, XLA's FLOPs per image and MFU against the chip's published
   bf16 peak (`ediff_jax.flops.KNOWN_PEAKS`; on CPU, a measured matmul rate);
2. the expert ensemble's train maps (`config.experts.train_map`): per-sample throughput of 3
   experts against one model;
3. MultiDiffusion: the vmapped views against a Python loop over views;
4. sampling throughput: images/s of one model and of 3 experts (Heun).

The text embeddings come from the builtin encoders: the paper's T5-XXL and CLIP-L cannot be
loaded offline, and the encoders are frozen, so the UNet's step is the paper's but for its
context projection's input width. Every section reuses the CPU benchmarks' code
(`train_bench`, `experts_bench`, `multidiffusion_bench`), so the figures mean what theirs mean.

`--budget_s` bounds the run: a section that would start after the budget is spent is written
as skipped, and the table is rewritten after every section, so a run cut short by the
wrapper's `timeout` still leaves every finished row.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ediff_jax import edm, experts, flops, training  # noqa: E402
from ediff_jax.config_utils import base_config, expert_schedule, load_config  # noqa: E402
from ediff_jax.multidiffusion import Tiling, multidiffusion_denoiser  # noqa: E402
from experiments.benchmarks import experts_bench, multidiffusion_bench, train_bench  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What each section runs; `paper` is for one accelerator chip, `tiny` for the CPU test."""

    train_config: str  # section 1's model
    train_batch: int
    experts_config: str  # sections 2 and 4 (experts=3 is appended)
    experts_batch: int  # divisible by 3
    sample_batch: int
    sample_steps: int
    canvas: tuple[int, int]  # section 3: height, width (windows of the quickstart UNet, 32)
    stride: int
    repeats: int


SIZES = {
    "paper": Sizes("configs/base64.py:size=paper", 32, "configs/base64.py:size=small", 48, 32, 32,
                   (32, 512), 8, 5),
    "tiny": Sizes("configs/base64.py:size=tiny", 4, "configs/base64.py:size=tiny", 6, 2, 3, (32, 64), 16, 2),
}


class Table:
    """Rows of (section, measure, value, note), rewritten to `path` after every section."""

    def __init__(self, path: Path, header: str):
        self.path, self.header, self.rows = path, header, []

    def add(self, section: str, measure: str, value: str, note: str = "") -> None:
        self.rows.append((section, measure, value, note))

    def markdown(self) -> str:
        lines = [self.header, "", "| section | measure | value | note |", "|---|---|---|---|"]
        lines += [f"| {' | '.join(row)} |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        self.path.write_text(self.markdown())


def paper_like(spec: str):
    """A config whose text section is the builtin encoders' (the paper's cannot be loaded offline)."""
    config = load_config(str(REPO / spec) if not spec.startswith("/") else spec)
    config.text = base_config().text
    return config


def peak_flops(dtype) -> tuple[float, str]:
    """The chip's published dense bf16 peak, or on CPU a matmul's measured rate in the model's dtype."""
    published = flops.device_peak_flops()
    if published is not None:
        return published, "published bf16 peak"
    return flops.measure_matmul_peak(dtype, size=1024, repeats=3), f"measured {jnp.dtype(dtype).name} matmul"


def train_step_section(sizes: Sizes, table: Table) -> None:
    config = paper_like(sizes.train_config)
    bench, _ = train_bench.build_ours(config, sizes.train_batch)
    bench.warm_up()
    step_s = statistics.median(bench.run(2) for _ in range(sizes.repeats))
    dtype = jnp.dtype(str(config.model.get("dtype", "float32")))
    peak, peak_kind = peak_flops(dtype)
    name = f"{sizes.train_config.split('/')[-1]}, batch {sizes.train_batch}, {dtype.name}"
    table.add("train step", "parameters", f"{bench.num_params / 1e6:.1f} M", name)
    table.add("train step", "compile (s)", f"{bench.compile_s:.1f}")
    table.add("train step", "step time, median (s)", f"{step_s:.4f}", f"medians of {sizes.repeats} x 2 steps")
    table.add("train step", "images/s per chip", f"{sizes.train_batch / step_s:.1f}")
    if bench.xla_flops:
        table.add("train step", "XLA FLOPs per image", f"{bench.xla_flops / sizes.train_batch / 1e9:.4g} GFLOP")
        table.add("train step", "MFU", f"{flops.mfu(bench.xla_flops, step_s, peak, 1):.1%}",
                  f"against {peak / 1e12:.4g} TFLOP/s ({peak_kind})")
    else:
        table.add("train step", "MFU", "unknown", "XLA reported no FLOPs for this program")


def _expert_experiments(sizes: Sizes):
    cfg3 = paper_like(sizes.experts_config)
    cfg3.mesh.data = 1
    cfg3.train.batch_size = sizes.experts_batch
    cfg3.train.num_steps = 30
    cfg3.experts.phases, cfg3.experts.phase_steps = expert_schedule(3, 30)  # eDiff-I's shared -> 2 -> 3
    cfg1 = cfg3.copy_and_resolve_references()
    cfg1.experts.phases, cfg1.experts.phase_steps = (), ()
    one_device = jax.devices()[:1]
    return cfg3, training.build_experiment(cfg3, devices=one_device), training.build_experiment(cfg1, devices=one_device)


def experts_section(sizes: Sizes, table: Table, out_of_time: Callable[[], bool], train_maps: tuple[str, ...]) -> None:
    cfg3, _, exp1 = _expert_experiments(sizes)
    repeats = sizes.repeats * 2
    single = experts_bench.train_bench(exp1, 0, sizes.experts_batch, repeats)
    what = f"{sizes.experts_config.split('/')[-1]}, batch {sizes.experts_batch}"
    table.add("experts, training", "step time, 1 model (s)", f"{single:.4f}", what)
    for mode in train_maps:
        if out_of_time():
            table.add("experts, training", f"train_map={mode}", "skipped", "time budget spent")
            continue
        cfg = cfg3.copy_and_resolve_references()
        cfg.experts.train_map = mode
        seconds = experts_bench.train_bench(training.build_experiment(cfg, devices=jax.devices()[:1]), 2,
                                            sizes.experts_batch, repeats)
        table.add("experts, training", f"step time, 3 experts, train_map={mode} (s)", f"{seconds:.4f}",
                  f"throughput per sample {single / seconds:.2f}x of 1 model (goal >= 0.95x)")


def sampling_section(sizes: Sizes, table: Table) -> None:
    _, exp3, exp1 = _expert_experiments(sizes)
    state1, _ = training.init_train_state(exp1)
    params3 = experts.stack_experts([state1.params] * 3)
    bounds = np.asarray(training.progress_meta(exp3, 2)["boundaries"], np.float32)
    args = (sizes.sample_batch, sizes.sample_steps, sizes.repeats)
    t1, _ = experts_bench.sampling_bench(exp1, state1.params, None, *args)
    t3, _ = experts_bench.sampling_bench(exp3, params3, bounds, *args)
    what = (f"{sizes.experts_config.split('/')[-1]}, batch {sizes.sample_batch}, {sizes.sample_steps} Heun steps, "
            "guidance on")
    table.add("sampling", "images/s, 1 model", f"{sizes.sample_batch / t1:.2f}", what)
    table.add("sampling", "images/s, 3 experts", f"{sizes.sample_batch / t3:.2f}",
              f"time {t3 / t1:.3f}x of 1 model (goal <= 1.02x)")


def multidiffusion_section(sizes: Sizes, table: Table) -> None:
    denoise, window = multidiffusion_bench.build_denoiser(1)
    tiling = Tiling(*sizes.canvas, window, sizes.stride)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, *sizes.canvas, 3)) * 2.0, jnp.float32)
    sigma = jnp.float32(2.0)
    fused = jax.jit(multidiffusion_denoiser(denoise, tiling))
    loop = multidiffusion_bench.python_loop_denoiser(denoise, tiling)
    medians = multidiffusion_bench.interleaved({"fused": (fused, (x, sigma)), "loop": (loop, (x, sigma))},
                                               sizes.repeats * 3)
    diff = float(jnp.abs(fused(x, sigma) - loop(x, sigma)).max())
    what = f"canvas {sizes.canvas[0]}x{sizes.canvas[1]}, stride {sizes.stride}: {tiling.num_views} views"
    table.add("MultiDiffusion", "one denoiser call, vmapped views (ms)", f"{medians['fused'] * 1e3:.2f}", what)
    table.add("MultiDiffusion", "one denoiser call, Python loop over views (ms)", f"{medians['loop'] * 1e3:.2f}",
              f"loop time / vmapped time {medians['loop'] / medians['fused']:.2f}; max abs difference {diff:.1e}")


SECTIONS = ("train step", "experts", "MultiDiffusion", "sampling")  # the order


def run(sizes: Sizes, out_dir: Path, budget_s: float, size_name: str,
        train_maps: tuple[str, ...] = training.EXPERT_TRAIN_MAPS) -> Table:
    out_dir.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    header = (f"Accelerator benchmarks ({size_name} sizes), {datetime.date.today().isoformat()}: "
              f"{device.device_kind} ({device.platform}), {jax.local_device_count()} local devices, one used; "
              f"jax {jax.__version__}; budget {budget_s:.0f} s.\n\n"
              f"    python -m experiments.benchmarks.accelerator --size {size_name} --budget_s {budget_s:g} "
              f"--train_maps {' '.join(train_maps)}")
    table = Table(out_dir / "accelerator.md", header)
    table.write()
    start = time.perf_counter()
    out_of_time = lambda: time.perf_counter() - start > budget_s
    steps = {
        "train step": lambda: train_step_section(sizes, table),
        "experts": lambda: experts_section(sizes, table, out_of_time, train_maps),
        "MultiDiffusion": lambda: multidiffusion_section(sizes, table),
        "sampling": lambda: sampling_section(sizes, table),
    }
    for name in SECTIONS:
        if out_of_time():
            table.add(name, "-", "skipped", f"time budget of {budget_s:.0f} s spent")
        else:
            section_start = time.perf_counter()
            steps[name]()
            table.add(name, "section wall time (s)", f"{time.perf_counter() - section_start:.1f}", "compiles included")
        table.write()
    return table


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="paper",
                    help="paper: sizes for one accelerator chip; tiny: the CPU test's")
    ap.add_argument("--out", default="experiments/results/accelerator", help="folder for accelerator.md")
    ap.add_argument("--budget_s", type=float, default=420.0,
                    help="sections that would start after this many seconds are written as skipped")
    ap.add_argument("--train_maps", nargs="+", default=list(training.EXPERT_TRAIN_MAPS),
                    choices=training.EXPERT_TRAIN_MAPS, help="expert train maps to time (config.experts.train_map)")
    args = ap.parse_args(argv)
    if args.budget_s < 0:
        sys.exit(f"error: --budget_s={args.budget_s} is negative; give the seconds the run may take.")
    table = run(SIZES[args.size], Path(args.out), args.budget_s, args.size, tuple(args.train_maps))
    print(table.markdown())


if __name__ == "__main__":
    main()
