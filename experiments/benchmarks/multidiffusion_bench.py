"""MultiDiffusion benchmark: evaluations per step, fusion overhead, vmap vs a Python loop
over views, and peak memory against the chunk size.

  python experiments/benchmarks/multidiffusion_bench.py [--repeats 15 --height 32 --width 128 --stride 8]

The quickstart UNet (configs/quickstart.py, 32x32) with random parameters and classifier-
free guidance (the builtin text encoders encode the prompt) denoises a 32x128 canvas. All
variants are timed side by side, interleaved, in one process; the table quotes medians
(the machine may be shared and noisy) and ratios. Prints a markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ediff_jax import edm  # noqa: E402
from ediff_jax.config_utils import load_config  # noqa: E402
from ediff_jax.models import build_model  # noqa: E402
from ediff_jax.multidiffusion import Tiling, crop_views, fuse_batched, multidiffusion_denoiser  # noqa: E402
from ediff_jax.sampling import make_model_fn  # noqa: E402
from ediff_jax.text.conditioning import load_text_encoders, unconditional  # noqa: E402


def build_denoiser(batch: int, seed: int = 0):
    """Guided D(x, sigma) of the quickstart UNet with random params; returns (D, window)."""
    config = load_config(str(Path(__file__).resolve().parents[2] / "configs/quickstart.py"))
    model = build_model(config.model)
    encoders = load_text_encoders(config.text)
    cond = encoders.encode(encoders.params, encoders.tokenize(["a red circle"] * batch))
    size = int(config.data.image_size)
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, size, size, 3)), jnp.zeros((1,)),
                            jax.tree.map(lambda a: a[:1], cond))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):  # fan-in scaled, nothing zero (a zero output layer would make D trivial)
        noise = rng.normal(size=leaf.shape).astype(np.float32)
        if leaf.ndim >= 2:
            return jnp.asarray(noise / np.sqrt(np.prod(leaf.shape[:-1])))
        return jnp.asarray((1.0 if "scale" in jax.tree_util.keystr(path) else 0.0) + 0.2 * noise)

    params = jax.tree_util.tree_map_with_path(draw, shapes["params"])
    model_fn = make_model_fn(model, params, float(config.edm.sigma_data))
    return edm.guided_denoiser(model_fn, cond, unconditional(cond), 2.0), size


def timed(fn, *args) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def interleaved(variants: dict, repeats: int) -> dict[str, float]:
    """Median seconds per variant; variants run in turn each repeat so load drifts hit all alike."""
    for fn, args in variants.values():  # compile + warm up
        timed(fn, *args)
        timed(fn, *args)
    times = {name: [] for name in variants}
    for _ in range(repeats):
        for name, (fn, args) in variants.items():
            times[name].append(timed(fn, *args))
    return {name: statistics.median(t) for name, t in times.items()}


def count_evaluations(denoise, tiling: Tiling, x: jax.Array, sigmas: jax.Array, chunk_size: int | None):
    """Crop evaluations counted from inside the compiled programs (a callback per crop)."""
    calls = []

    def counted(xc, sigma):
        jax.debug.callback(lambda crop: calls.append(crop.shape), xc)  # unrolled once per vmapped crop
        return denoise(xc, sigma)

    canvas = multidiffusion_denoiser(counted, tiling, chunk_size=chunk_size)
    jax.block_until_ready(jax.jit(canvas)(x, sigmas[0]))
    jax.effects_barrier()
    per_call = len(calls)
    calls.clear()
    jax.block_until_ready(jax.jit(lambda x: edm.heun_sample(canvas, x, sigmas))(x))
    jax.effects_barrier()
    return per_call, len(calls)


def python_loop_denoiser(denoise, tiling: Tiling):
    """The original algorithm: one model call per view from Python, value/count accumulated per view."""
    one = jax.jit(denoise)
    h, w = tiling.window

    @jax.jit
    def accumulate(value, count, d, top, left):
        zero = jnp.zeros((), jnp.int32)
        at = (zero, top, left, zero)
        value = jax.lax.dynamic_update_slice(value, jax.lax.dynamic_slice(value, at, d.shape) + d, at)
        count = jax.lax.dynamic_update_slice(count, jax.lax.dynamic_slice(count, at, d.shape) + 1.0, at)
        return value, count

    def run(x, sigma):
        value, count = jnp.zeros_like(x), jnp.zeros_like(x)
        for top, left in tiling.views:
            d = one(x[:, top:top + h, left:left + w], sigma)
            value, count = accumulate(value, count, d, top, left)
        return value / count

    return run


def chunk_sizes(n: int, chunk: int) -> list[int]:
    """How `map_views` splits n crops for a chunk size: k balanced chunks, the last holds the rest."""
    if chunk >= n:
        return [n]
    k = -(-n // chunk)
    size = -(-n // k)
    return [size] * (k - 1) + [n - (k - 1) * size]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--stride", type=int, default=8)
    parser.add_argument("--batch", type=int, default=1, help="canvases per call (guidance doubles the UNet batch)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps", type=int, default=4, help="Heun steps for the evaluation count")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1, 2, 4, 8])
    args = parser.parse_args()

    denoise, window = build_denoiser(args.batch)
    tiling = Tiling(args.height, args.width, window, args.stride)
    n = tiling.num_views
    x = jnp.asarray(np.random.default_rng(1).normal(size=(args.batch, args.height, args.width, 3)) * 2.0, jnp.float32)
    sigma = jnp.float32(2.0)
    sigmas = edm.karras_sigmas(args.steps)
    views = jnp.asarray(tiling.views)
    print(f"# {jax.devices()[0].device_kind} x{jax.device_count()} ({os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}), jax {jax.__version__}; canvas {args.height}x{args.width}, window {window}, "
          f"stride {args.stride}: {n} views, batch {args.batch}", file=sys.stderr)

    # 1. Evaluations per step.
    per_call, per_run = count_evaluations(denoise, tiling, x, sigmas, chunk_size=4)
    expected_run = n * (2 * args.steps - 1)

    # 2-3. Timings, side by side.
    crops = jax.jit(lambda x: crop_views(x, tiling))(x)
    fused = jax.jit(multidiffusion_denoiser(denoise, tiling))
    evals_only = jax.jit(lambda crops, sigma: jax.vmap(lambda c: denoise(c, sigma))(crops))
    d_crops = evals_only(crops, sigma)
    fuse_only = jax.jit(lambda d: fuse_batched(d, views, tiling.height, tiling.width))
    loop = python_loop_denoiser(denoise, tiling)
    medians = interleaved({
        "fused": (fused, (x, sigma)),
        "evals": (evals_only, (crops, sigma)),
        "fuse": (fuse_only, (d_crops,)),
        "loop": (loop, (x, sigma)),
    }, args.repeats)
    diff_loop = float(jnp.abs(fused(x, sigma) - loop(x, sigma)).max())

    # 4. Memory and time against the chunk size.
    chunk_rows = []
    chunk_fns = {}
    for c in sorted(set(args.chunks) | {n}):
        fn = jax.jit(multidiffusion_denoiser(denoise, tiling, chunk_size=c))
        temp = fn.lower(x, sigma).compile().memory_analysis().temp_size_in_bytes
        chunk_fns[c] = (fn, temp)
    chunk_medians = interleaved({c: (fn, (x, sigma)) for c, (fn, _) in chunk_fns.items()}, max(3, args.repeats // 3))
    for c, (fn, temp) in chunk_fns.items():
        diff = float(jnp.abs(fn(x, sigma) - fused(x, sigma)).max())
        chunk_rows.append((c, temp, chunk_medians[c], diff))
    single = jax.jit(denoise).lower(crops[0], sigma).compile().memory_analysis().temp_size_in_bytes

    ms = lambda s: f"{s * 1e3:.1f} ms"
    print("| measure | value |\n|---|---|")
    print(f"| views (canvas {args.height}x{args.width}, window {window}, stride {args.stride}) | {n} |")
    print(f"| crop evaluations per fused denoiser call (counted) | {per_call} (expected {n}) |")
    print(f"| crop evaluations in a {args.steps}-step Heun run (counted) | {per_run} "
          f"(expected {n} x {2 * args.steps - 1} = {expected_run}) |")
    print(f"| fused step: gather + {n} vmapped evaluations + fusion (median) | {ms(medians['fused'])} |")
    print(f"| the {n} vmapped evaluations alone (median) | {ms(medians['evals'])} |")
    print(f"| fusion overhead, fused / evaluations - 1 | {100 * (medians['fused'] / medians['evals'] - 1):+.1f}% |")
    print(f"| fusion alone (fuse_batched, median) / fused step | {ms(medians['fuse'])} "
          f"({100 * medians['fuse'] / medians['fused']:.1f}%) |")
    print(f"| Python loop over views, one call per view (median) | {ms(medians['loop'])} |")
    print(f"| speed-up of vmapped views over the loop | {medians['loop'] / medians['fused']:.2f}x "
          f"(max abs difference {diff_loop:.1e}) |")
    print()
    print("| chunk size | crops per chunk | XLA temp bytes | temp / largest chunk | median time "
          "| max abs diff vs all |")
    print("|---|---|---|---|---|---|")
    for c, temp, t, diff in chunk_rows:
        sizes = chunk_sizes(n, c)
        print(f"| {c}{' (all)' if c == n else ''} | {'+'.join(map(str, sizes))} | {temp / 2**20:.1f} MiB | "
              f"{temp / max(sizes) / 2**20:.2f} MiB | {ms(t)} | {diff:.1e} |")
    print(f"\nOne crop batch alone (no MultiDiffusion): {single / 2**20:.1f} MiB temp. Load average at the end: "
          f"{os.getloadavg()[0]:.1f}.")
    if per_call != n or per_run != expected_run:
        sys.exit("error: the denoiser ran a different number of crops than there are views")


if __name__ == "__main__":
    main()
