"""Expert ensemble costs, measured side by side in one run.

  python experiments/benchmarks/experts_bench.py [--repeats 5] [--batch 8] [--steps 24]

1. Sampling time of a 3-expert ensemble vs the single model (same UNet, steps, batch);
   eDiff-I's claim is that experts cost nothing at inference (goal <= 1.02x).
2. Train-step throughput per sample of the vmapped 3-expert step vs the single model's
   (goal >= 0.95x).
3. Memory of the compiled sampling program (XLA's memory analysis): arguments grow E-fold
   (the stacked parameters), temporaries must not (no per-step copies of the experts).

Timings are medians of `--repeats` runs after a warm-up (compile) run; the machine is noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from ediff_jax import experts, parallel, training
from ediff_jax.config_utils import load_config
from ediff_jax.sampling import Sampler

REPO = Path(__file__).resolve().parents[2]


def median_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile + warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def sampling_bench(exp, params, boundaries, batch: int, steps: int, repeats: int) -> tuple[float, dict]:
    sampler = Sampler(exp.model, exp.encoders, image_size=exp.image_shape[0], steps=steps, boundaries=boundaries)
    tokens = exp.encoders.tokenize(["a red circle"] * batch)
    args = (params, exp.encoders.params, tokens, {}, jax.random.PRNGKey(0), jnp.float32(2.0))
    run = lambda: sampler._run(*args, use_t5=True, use_clip=True)
    seconds = median_time(run, repeats)
    mem = sampler._run.lower(*args, use_t5=True, use_clip=True).compile().memory_analysis()
    return seconds, {"argument_bytes": int(mem.argument_size_in_bytes), "temp_bytes": int(mem.temp_size_in_bytes)}


def train_bench(exp, phase: int, batch: int, repeats: int) -> float:
    state, shardings = training.init_train_state(exp)
    for p in range(1, phase + 1):
        state, shardings = training.branch_state(exp, state, p)
    step = training.compile_train_step(exp, shardings, phase)
    rng = np.random.default_rng(0)
    data = parallel.shard_batch({"image": rng.uniform(-1, 1, (batch, *exp.image_shape)).astype(np.float32),
                                 **exp.encoders.tokenize(["a red circle"] * batch)}, exp.mesh)
    holder = {"state": state}

    def run():
        holder["state"], metrics = step(holder["state"], exp.encoders.params, data)
        return metrics["loss"]

    return median_time(run, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8, help="sampling batch")
    ap.add_argument("--train_batch", type=int, default=24, help="train batch (divisible by 3)")
    ap.add_argument("--steps", type=int, default=24, help="sampler steps")
    ap.add_argument("--train_maps", nargs="+", default=list(training.EXPERT_TRAIN_MAPS),
                    choices=training.EXPERT_TRAIN_MAPS, help="expert train maps to measure (config.experts.train_map)")
    ap.add_argument("--out", default=None, help="optional JSON output path")
    args = ap.parse_args()

    base = load_config(f"{REPO}/configs/experts.py:experts=3,steps=30,batch={args.train_batch}")
    base.mesh.data = 1  # one device: the question is the cost of experts, not parallelism
    exp3 = training.build_experiment(base)
    single_cfg = base.copy_and_resolve_references()
    single_cfg.experts.phases, single_cfg.experts.phase_steps = (), ()
    exp1 = training.build_experiment(single_cfg)

    state1, _ = training.init_train_state(exp1)
    params1 = state1.params
    params3 = experts.stack_experts([params1] * 3)
    bounds = np.asarray(training.progress_meta(exp3, 2)["boundaries"], np.float32)

    t1, mem1 = sampling_bench(exp1, params1, None, args.batch, args.steps, args.repeats)
    t3, mem3 = sampling_bench(exp3, params3, bounds, args.batch, args.steps, args.repeats)
    s1 = train_bench(exp1, 0, args.train_batch, args.repeats * 4)
    s3 = {}
    for mode in args.train_maps:
        cfg = base.copy_and_resolve_references()
        cfg.experts.train_map = mode
        s3[mode] = train_bench(training.build_experiment(cfg), 2, args.train_batch, args.repeats * 4)
    param_bytes = sum(x.nbytes for x in jax.tree.leaves(params1))

    rows = [
        ("sampling time, 1 model (s)", f"{t1:.3f}", ""),
        ("sampling time, 3 experts (s)", f"{t3:.3f}", f"{t3 / t1:.3f}x (goal <= 1.02x)"),
        ("train step, 1 model (s)", f"{s1:.3f}", ""),
        *[(f"train step, 3 experts, train_map={mode} (s)", f"{t:.3f}",
           f"throughput per sample {s1 / t:.3f}x (goal >= 0.95x)") for mode, t in s3.items()],
        ("params of one expert (MB)", f"{param_bytes / 1e6:.2f}", ""),
        ("sampling arguments, 1 model / 3 experts (MB)",
         f"{mem1['argument_bytes'] / 1e6:.2f} / {mem3['argument_bytes'] / 1e6:.2f}",
         f"+{(mem3['argument_bytes'] - mem1['argument_bytes']) / param_bytes:.2f} expert copies (2 expected)"),
        ("sampling temporaries, 1 model / 3 experts (MB)",
         f"{mem1['temp_bytes'] / 1e6:.2f} / {mem3['temp_bytes'] / 1e6:.2f}",
         f"{(mem3['temp_bytes'] - mem1['temp_bytes']) / param_bytes:+.2f} expert copies"),
    ]
    print(f"device: {jax.devices()[0].device_kind}, sampling batch {args.batch}, {args.steps} Heun steps, "
          f"train batch {args.train_batch}, medians of {args.repeats} (train: {args.repeats * 4})")
    print("| measure | value | ratio |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "mem1": mem1, "mem3": mem3}, indent=2))


if __name__ == "__main__":
    main()
