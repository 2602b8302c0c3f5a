"""Can XLA:CPU's convolutions be made faster? Two probes behind the train-step gap to diffusers.

  python experiments/benchmarks/cpu_conv_bench.py [--repeats 5]

1. A 3x3 'SAME' convolution, forward + backward (the UNet's main cost), written three ways:
   `lax.conv_general_dilated` (what flax's nn.Conv lowers to), im2col (the 9 shifted
   windows concatenated, then one matmul) and 9 shifted matmuls summed. Same math: the
   script checks the three agree before timing them.
2. Our quickstart train step (batch 16, precomputed text embeddings, as train_bench.py
   times it) under XLA:CPU flags that route work to oneDNN or XNNPACK, each in a fresh
   subprocess (XLA_FLAGS are read once, when JAX starts).

Medians of --repeats timings; run on an idle machine (compare the load averages printed).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FLAG_SETS = ("", "--xla_cpu_use_onednn=true", "--xla_cpu_use_xnnpack=true",
             "--xla_cpu_experimental_onednn_custom_call=true")
SHAPES = ((16, 32, 32), (16, 16, 64), (8, 64, 64))  # (batch, side, channels)


def conv_variants():
    import jax
    import jax.numpy as jnp

    def lax_conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def windows(x, w):
        kh, kw = w.shape[:2]
        xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
        h, wd = x.shape[1:3]
        return [(i, j, xp[:, i:i + h, j:j + wd, :]) for i in range(kh) for j in range(kw)]

    def im2col(x, w):
        cols = jnp.concatenate([win for _, _, win in windows(x, w)], axis=-1)
        return cols @ w.reshape(-1, w.shape[-1])

    def shifted(x, w):
        return sum(win @ w[i, j] for i, j, win in windows(x, w))

    return {"lax.conv": lax_conv, "im2col": im2col, "9 matmuls": shifted}


def time_fn(fn, args, repeats: int, inner: int = 5) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t) / inner)
    return statistics.median(times)


def conv_table(repeats: int) -> list[str]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    lines = ["| batch x side x channels | " + " | ".join(f"{k} (ms)" for k in conv_variants()) + " |",
             "|---|" + "---|" * len(conv_variants())]
    for n, side, c in SHAPES:
        x = jax.random.normal(jax.random.PRNGKey(0), (n, side, side, c))
        w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, c, c)) * 0.1
        reference = None
        cells = []
        for name, conv in conv_variants().items():
            out = jax.jit(conv)(x, w)
            reference = out if reference is None else reference
            np.testing.assert_allclose(np.asarray(out), np.asarray(reference), rtol=2e-3, atol=2e-3)
            grad = jax.jit(jax.grad(lambda x, w, conv=conv: jnp.sum(jnp.tanh(conv(x, w))), argnums=(0, 1)))
            cells.append(f"{time_fn(grad, (x, w), repeats) * 1e3:.2f}")
        lines.append(f"| {n}x{side}x{side}x{c} | " + " | ".join(cells) + " |")
    return lines


def step_worker(repeats: int) -> None:
    from experiments.benchmarks import train_bench

    from ediff_jax.config_utils import load_config

    ours, _ = train_bench.build_ours(load_config(str(REPO / "configs" / "quickstart.py")), 16)
    ours.warm_up()
    print(statistics.median(ours.run(2) for _ in range(repeats)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--step_worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step_worker:
        step_worker(args.repeats)
        return
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print("\n".join(conv_table(args.repeats)))
    print("\n| XLA_FLAGS | quickstart train step (s) |\n|---|---|")
    for flags in FLAG_SETS:
        env = {**os.environ, "XLA_FLAGS": flags, "TF_CPP_MIN_LOG_LEVEL": "2"}
        out = subprocess.run([sys.executable, __file__, "--step_worker", "--repeats", str(args.repeats)], env=env,
                             capture_output=True, text=True, check=True).stdout.split()
        print(f"| `{flags or '(none)'}` | {float(out[-1]):.3f} |")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
