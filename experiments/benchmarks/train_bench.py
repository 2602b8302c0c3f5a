"""Train-step throughput and MFU on CPU: our jitted step vs diffusers' UNet2DConditionModel.

  pip install -e '.[bench]'   # diffusers + torch, needed only here
  python experiments/benchmarks/train_bench.py [--repeats 5] [--configs quickstart base64] [--batch 16 8]
      [--steps 2] [--torch_threads 2] [--no-torch_compile] [--out results.json]

For each config (quickstart at 32x32, base64 `size=small` at 64x64) on one CPU device:

- Ours: the jitted, donated train step (EDM loss, AdamW with clipping, EMA) on a fixed batch
  whose text embeddings are precomputed (the step then skips the frozen encoders, as
  diffusers gets its embeddings precomputed too). FLOPs per step from XLA's cost analysis
  of the lowered step; MFU against the float32 matmul rate measured in the same run.
- Diffusers: `UNet2DConditionModel` with the same shape as far as diffusers allows (widths,
  blocks per level, attention levels, heads, context length and width, batch, image size),
  train step = forward + MSE + backward + AdamW, `torch.set_num_threads(--torch_threads)`,
  all cores by default. Eager
  timings are interleaved with ours (both see the same machine load); `torch.compile` runs
  afterwards in a subprocess, skipped if it fails or compiles for more than 5 minutes.

Both models' parameter counts and matmul/conv FLOPs (one counting rule: 2 x multiply-adds of
every convolution and matrix product, forward and backward) are printed, so the speed ratio
can be read against how much work each step does: diffusers' attention blocks are
transformer blocks (projections, LayerNorms and a GEGLU feed-forward) that ours do not have.
Timings are medians over `--repeats` of the mean of `--steps` consecutive steps, after warm-up.
On a shared machine, torch's OpenMP threads lose most of their speed as soon as another job
takes a core (XLA's thread pool much less): check the load average printed with the
table, and compare with `--torch_threads 1`, before reading the ratio as a framework result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[2]

import jax  # noqa: E402
import jax.extend as jex  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from ediff_jax import flops, parallel, training  # noqa: E402
from ediff_jax.config_utils import load_config  # noqa: E402

# name -> (config spec, default batch): base64 small at batch 8 so it finishes on 2 cores.
CONFIGS: dict[str, tuple[str, int]] = {
    "quickstart": ("configs/quickstart.py", 16),
    "base64": ("configs/base64.py:size=small", 8),
}
CAPTIONS = ("a red circle", "a blue square", "a green triangle", "a yellow circle")
COMPILE_LIMIT_S = 300.0  # torch.compile is optional: skipped if it compiles for longer than this
GOAL = 1.5  # diffusers step time / our step time


# ----------------------------------------------------------------------------------------
# Counting matmul/conv FLOPs the same way for both frameworks.


def dense_flops_of_jaxpr(jaxpr: Any) -> float:
    """2 x multiply-adds of every dot_general and convolution in `jaxpr` (sub-jaxprs included).

    The same rule as torch's FlopCounterMode, so that both models' work is comparable (XLA's
    cost analysis also counts elementwise ops, which torch's counter does not). Zeros
    inserted by input dilation (the input gradient of a strided conv) are not counted,
    as torch counts that gradient as a transposed conv; `cond` counts its costliest branch.
    """
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out_size = math.prod(eqn.outvars[0].aval.shape) if eqn.outvars else 0
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            total += 2.0 * out_size * math.prod(lhs_shape[d] for d in lhs_contract)
        elif name == "conv_general_dilated":
            rhs_shape = eqn.invars[1].aval.shape
            out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            macs_per_output = math.prod(rhs_shape) / rhs_shape[out_feature_dim]
            total += 2.0 * out_size * macs_per_output / math.prod(eqn.params["lhs_dilation"])
        else:
            subs = [dense_flops_of_jaxpr(sub) for sub in jex.core.jaxprs_in_params(eqn.params)]
            if name == "cond":
                total += max(subs, default=0.0)
            else:
                total += sum(subs) * (eqn.params.get("length", 1) if name == "scan" else 1)
    return total


# ----------------------------------------------------------------------------------------
# Ours.


@dataclasses.dataclass
class OursBench:
    """Our compiled train step with its (donated, carried) state and a fixed batch."""

    config: ml_collections.ConfigDict
    train_step: Callable
    state: Any
    enc_params: Any
    batch: dict[str, jax.Array]
    num_params: int
    xla_flops: float | None
    dense_flops: float
    compile_s: float = 0.0

    def run(self, steps: int) -> float:
        """Runs `steps` steps and returns the mean seconds per step (all outputs ready)."""
        start = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.train_step(self.state, self.enc_params, self.batch)
        jax.block_until_ready((self.state, metrics))
        return (time.perf_counter() - start) / steps

    def warm_up(self) -> None:
        """The first call compiles; the second runs on the donated buffers as timed steps do."""
        start = time.perf_counter()
        self.run(1)
        self.compile_s = time.perf_counter() - start
        self.run(1)


def text_batch(exp: training.Experiment, batch: int) -> dict[str, np.ndarray]:
    """Precomputed text embeddings (t5, clip, masks, pooled) of `batch` captions."""
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    encoded = exp.encoders.encode(exp.encoders.params, exp.encoders.tokenize(captions))
    return {k: np.asarray(v) for k, v in encoded.items()}


def build_ours(config: ml_collections.ConfigDict, batch: int) -> tuple[OursBench, dict[str, np.ndarray]]:
    """Our train step on one CPU device; also returns the host batch (shared with diffusers)."""
    config = config.copy_and_resolve_references()
    config.mesh.data = 1
    config.train.batch_size = batch
    exp = training.build_experiment(config, devices=jax.devices()[:1])
    state, shardings = training.init_train_state(exp)
    train_step = training.compile_train_step(exp, shardings)
    size = int(config.data.image_size)
    rng = np.random.default_rng(0)
    host = {"image": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32), **text_batch(exp, batch)}
    arrays = parallel.shard_batch(host, exp.mesh)
    args = (state, exp.encoders.params, arrays)
    xla_flops = flops.flops_from_cost_analysis(train_step.lower(*args).cost_analysis())
    dense = dense_flops_of_jaxpr(jax.make_jaxpr(train_step)(*args))
    num_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
    return OursBench(config, train_step, state, exp.encoders.params, arrays, num_params, xla_flops, dense), host


# ----------------------------------------------------------------------------------------
# Diffusers.


def diffusers_spec(config: ml_collections.ConfigDict, host: dict[str, np.ndarray]) -> dict[str, Any]:
    """UNet2DConditionModel kwargs and input shapes matching our UNet as far as diffusers allows.

    Matched: widths per level, ResBlocks per level (diffusers' up blocks also have one
    more), scale-shift time conditioning, time-embedding width (4 x channels), GroupNorm
    with 32 groups, strided-conv downsampling and nearest+conv upsampling, self- and
    cross-attention at our attention levels and in the middle block, heads (diffusers'
    `attention_head_dim` is the head count), context width and length, the pooled CLIP
    embedding added to the time embedding (one Linear), the context padding mask.
    Not matchable: each diffusers attention site is a transformer block (1x1 proj in/out,
    three LayerNorms, a GEGLU feed-forward of 4x width) where ours has GroupNorm +
    self-attention then GroupNorm + cross-attention; our T5/CLIP projections and the null
    token are replaced by a ready-made context of the same length and width.
    """
    model = config.model
    if model.attn_levels or model.cross_attn_levels:
        raise ValueError("Attention placed by level index is not mapped to diffusers; use *_resolutions.")
    if tuple(model.attn_resolutions) != tuple(model.cross_attn_resolutions) or not model.mid_self_attn:
        raise ValueError("diffusers' cross-attention blocks always hold self- and cross-attention: the config "
                         "needs attn_resolutions == cross_attn_resolutions and mid_self_attn=True.")
    if not isinstance(model.num_res_blocks, int):
        raise ValueError("Per-level num_res_blocks is not mapped to diffusers here; use an int.")
    size = int(config.data.image_size)
    widths = [int(model.channels) * int(m) for m in model.channel_mult]
    attends = [size // 2**level in tuple(model.attn_resolutions) for level in range(len(widths))]
    context_len = host["t5"].shape[1] + host["clip"].shape[1] + 1  # [T5 ; CLIP ; null]
    kwargs = dict(
        sample_size=size,
        in_channels=3,
        out_channels=3,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)],
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=widths,
        layers_per_block=int(model.num_res_blocks),
        norm_num_groups=32,
        cross_attention_dim=int(model.context_dim),
        attention_head_dim=int(model.num_heads),
        resnet_time_scale_shift="scale_shift",
        class_embed_type="simple_projection",
        projection_class_embeddings_input_dim=int(host["clip_pooled"].shape[-1]),
        dropout=float(model.dropout),
    )
    return {
        "kwargs": kwargs,
        "batch": int(host["image"].shape[0]),
        "size": size,
        "context_len": context_len,
        "context_mask": np.concatenate(
            [host["t5_mask"], host["clip_mask"], np.ones((host["t5_mask"].shape[0], 1), np.float32)], axis=1
        ).tolist(),
        "pooled_dim": int(host["clip_pooled"].shape[-1]),
    }


class DiffusersBench:
    """diffusers' UNet2DConditionModel trained with MSE + AdamW on a fixed batch."""

    def __init__(self, spec: dict[str, Any], threads: int, compile_model: bool = False) -> None:
        import torch
        from diffusers import UNet2DConditionModel

        torch.manual_seed(0)
        torch.set_num_threads(threads)
        self.torch = torch
        self.model = UNet2DConditionModel(**spec["kwargs"]).train()
        self.num_params = sum(p.numel() for p in self.model.parameters())
        self.forward = torch.compile(self.model) if compile_model else self.model
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, weight_decay=0.0)
        b, size, dim = spec["batch"], spec["size"], spec["kwargs"]["cross_attention_dim"]
        self.images = torch.rand(b, 3, size, size) * 2 - 1
        self.context = torch.randn(b, spec["context_len"], dim)
        self.context_mask = torch.tensor(spec["context_mask"], dtype=torch.float32)
        self.pooled = torch.randn(b, spec["pooled_dim"])
        self.compile_s = 0.0

    def step(self) -> None:
        """Noise, forward, MSE, backward, AdamW: what a minimal diffusers training loop does."""
        torch = self.torch
        noise = torch.randn_like(self.images)
        timesteps = torch.randint(0, 1000, (self.images.shape[0],))
        pred = self.forward(self.images + noise, timesteps, encoder_hidden_states=self.context,
                            encoder_attention_mask=self.context_mask, class_labels=self.pooled).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def run(self, steps: int) -> float:
        """Mean seconds per step over `steps` steps (CPU torch runs synchronously)."""
        start = time.perf_counter()
        for _ in range(steps):
            self.step()
        return (time.perf_counter() - start) / steps

    def warm_up(self) -> None:
        """Two steps: the first allocates (and with torch.compile, compiles) the backward too."""
        start = time.perf_counter()
        self.run(1)
        self.compile_s = time.perf_counter() - start
        self.run(1)

    def dense_flops(self) -> float:
        """FLOPs of one train step by torch's FlopCounterMode (matmuls and convolutions).

        Attention runs on the math backend here: the counter has no rule for the CPU flash
        kernel, whose FLOPs it would otherwise miss. Same products, so the same count.
        """
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with sdpa_kernel(SDPBackend.MATH), counter:
            self.step()
        return float(counter.get_total_flops())


def run_compiled_worker(spec: dict[str, Any], threads: int, repeats: int, steps: int) -> dict[str, Any]:
    """Times torch.compile'd diffusers in a subprocess, stopped if compiling exceeds COMPILE_LIMIT_S."""
    payload = {"spec": spec, "threads": threads, "repeats": repeats, "steps": steps}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--compile_worker", json.dumps(payload)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True,  # its own process group: stopping it also stops inductor's compile workers
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    stderr_tail: list[str] = []
    threading.Thread(target=lambda: stderr_tail.extend(proc.stderr), daemon=True).start()
    deadline = time.monotonic() + COMPILE_LIMIT_S
    compiled = None
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.0))
        except queue.Empty:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if compiled is None:
                return {"skipped": f"compiling took over {COMPILE_LIMIT_S:.0f} s"}
            return {"skipped": "the compiled steps ran past their time limit"}
        if line is None:
            proc.wait()
            tail = " ".join("".join(stderr_tail[-5:]).split())[-400:]
            return {"skipped": f"torch.compile worker exited with code {proc.returncode}: {tail}"}
        if line.startswith("COMPILED "):
            compiled = time.monotonic()
            # timing after compiling: generous, the compiled step is not expected to be slower than eager
            deadline = compiled + max(120.0, 20.0 * float(line.split()[1]))
        elif line.startswith("RESULT "):
            proc.wait()
            return json.loads(line[len("RESULT "):])


def compile_worker_main(payload: str) -> None:
    """Subprocess side of `run_compiled_worker`: compile, report, time, report."""
    args = json.loads(payload)
    bench = DiffusersBench(args["spec"], args["threads"], compile_model=True)
    bench.warm_up()
    print(f"COMPILED {bench.compile_s:.1f}", flush=True)
    times = [bench.run(args["steps"]) for _ in range(args["repeats"])]
    print("RESULT " + json.dumps({"step_s": statistics.median(times), "times": times,
                                  "compile_s": bench.compile_s}), flush=True)


# ----------------------------------------------------------------------------------------
# Driver.


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (platform.processor() is often empty on Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def bench_config(name: str, batch: int, repeats: int, steps: int, torch_threads: int,
                 torch_compile: bool) -> dict[str, Any]:
    """Everything measured for one config; eager timings of both frameworks interleaved."""
    spec_path, _ = CONFIGS[name]
    config = load_config(str(REPO / spec_path))
    print(f"[{name}] building our step (batch {batch})...", flush=True)
    ours, host = build_ours(config, batch)
    ours.warm_up()
    spec = diffusers_spec(ours.config, host)
    print(f"[{name}] building diffusers UNet2DConditionModel...", flush=True)
    theirs = DiffusersBench(spec, torch_threads)
    theirs_dense = theirs.dense_flops()
    theirs.warm_up()
    print(f"[{name}] params: ours {ours.num_params:,}, diffusers {theirs.num_params:,} "
          f"({theirs.num_params / ours.num_params:.2f}x); matmul+conv GFLOP/step: ours {ours.dense_flops / 1e9:.2f}, "
          f"diffusers {theirs_dense / 1e9:.2f} ({theirs_dense / ours.dense_flops:.2f}x)", flush=True)
    ours_times, theirs_times = [], []
    for r in range(repeats):
        ours_times.append(ours.run(steps))
        theirs_times.append(theirs.run(steps))
        print(f"[{name}] repeat {r + 1}/{repeats}: ours {ours_times[-1]:.3f} s, diffusers {theirs_times[-1]:.3f} s",
              flush=True)
    theirs_params, theirs_compile_s = theirs.num_params, theirs.compile_s
    del theirs  # frees its memory before the compiled copy runs in a subprocess
    result: dict[str, Any] = {
        "config": name, "spec": spec_path, "batch": batch, "image_size": int(ours.config.data.image_size),
        "ours": {"step_s": statistics.median(ours_times), "times": ours_times, "compile_s": ours.compile_s,
                 "params": ours.num_params, "xla_flops": ours.xla_flops, "dense_flops": ours.dense_flops},
        "diffusers": {"step_s": statistics.median(theirs_times), "times": theirs_times, "compile_s": theirs_compile_s,
                      "params": theirs_params, "dense_flops": theirs_dense, "kwargs": spec["kwargs"]},
    }
    if torch_compile:
        print(f"[{name}] diffusers with torch.compile (subprocess, limit {COMPILE_LIMIT_S:.0f} s to compile)...",
              flush=True)
        result["diffusers_compiled"] = run_compiled_worker(spec, torch_threads, repeats, steps)
        print(f"[{name}] torch.compile: {result['diffusers_compiled']}", flush=True)
    return result


def fmt_ratio(theirs_s: float | None, ours_s: float) -> str:
    return "-" if theirs_s is None else f"{theirs_s / ours_s:.2f}x"


def print_report(results: list[dict[str, Any]], peak: float, info: dict[str, Any]) -> None:
    """Markdown tables: throughput and MFU with the goal, then shape and work of both models."""
    print(f"\ndevice: {info['device']}; jax {info['jax']} ({info['jax_device']}), torch {info['torch']} "
          f"({info['torch_threads']} threads), diffusers {info['diffusers']}")
    print(f"measured CPU matmul peak (float32, 2048^3, median of 5): {peak / 1e9:.1f} GFLOP/s; "
          f"load average at start / end: {info['load_start']:.2f} / {info['load_end']:.2f}")
    print(f"medians of {info['repeats']} repeats x {info['steps']} steps; eager timings interleaved\n")
    print("| config | batch | our step (s) | our images/s | our GFLOP/step (XLA) | MFU vs measured peak "
          "| diffusers step (s) | speed ratio (diffusers / ours) | goal >= 1.5x |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ours, theirs = r["ours"], r["diffusers"]
        gflop = ours["xla_flops"] / 1e9 if ours["xla_flops"] else None
        mfu = flops.mfu(ours["xla_flops"], ours["step_s"], peak, 1) if ours["xla_flops"] else None
        ratio = theirs["step_s"] / ours["step_s"]
        print(f"| {r['config']} ({r['image_size']}x{r['image_size']}) | {r['batch']} | {ours['step_s']:.3f} "
              f"| {r['batch'] / ours['step_s']:.1f} | {'-' if gflop is None else f'{gflop:.2f}'} "
              f"| {'-' if mfu is None else f'{100 * mfu:.1f}%'} | {theirs['step_s']:.3f} | {ratio:.2f}x "
              f"| {'met' if ratio >= GOAL else 'not met'} |")
    print("\n| config | params ours / diffusers | matmul+conv GFLOP/step ours / diffusers | our compile (s) "
          "| diffusers torch.compile step (s) | speed ratio (compiled diffusers / ours) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        ours, theirs = r["ours"], r["diffusers"]
        compiled = r.get("diffusers_compiled")
        if compiled is None:
            compiled_cell, compiled_s = "not run", None
        elif "skipped" in compiled:
            compiled_cell, compiled_s = f"skipped: {compiled['skipped']}".replace("|", "/"), None
        else:
            compiled_s = compiled["step_s"]
            compiled_cell = f"{compiled_s:.3f} (compile {compiled['compile_s']:.0f} s)"
        print(f"| {r['config']} | {ours['params'] / 1e6:.2f}M / {theirs['params'] / 1e6:.2f}M "
              f"({theirs['params'] / ours['params']:.2f}x) | {ours['dense_flops'] / 1e9:.2f} / "
              f"{theirs['dense_flops'] / 1e9:.2f} ({theirs['dense_flops'] / ours['dense_flops']:.2f}x) "
              f"| {ours['compile_s']:.1f} | {compiled_cell} | {fmt_ratio(compiled_s, ours['step_s'])} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per model (the median is reported)")
    ap.add_argument("--steps", type=int, default=2, help="consecutive steps per timed repeat")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--batch", type=int, nargs="+", default=None,
                    help="batch per config (one value for all, or one per --configs entry); "
                         f"default {', '.join(f'{k} {v[1]}' for k, v in CONFIGS.items())}")
    ap.add_argument("--torch_threads", type=int, default=os.cpu_count() or 1,
                    help="torch intra-op threads (default: all cores, as XLA uses)")
    ap.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=True,
                    help=f"also time diffusers under torch.compile (skipped past {COMPILE_LIMIT_S:.0f} s of compiling)")
    ap.add_argument("--out", default=None, help="optional JSON output path")
    ap.add_argument("--compile_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.compile_worker is not None:
        compile_worker_main(args.compile_worker)
        return
    if args.repeats < 1 or args.steps < 1:
        ap.error("--repeats and --steps must be >= 1")
    batches = args.batch or [CONFIGS[c][1] for c in args.configs]
    if len(batches) == 1:
        batches = batches * len(args.configs)
    if len(batches) != len(args.configs):
        ap.error(f"--batch takes one value or one per config ({len(args.configs)}); got {len(batches)}")

    import diffusers
    import torch

    torch.set_num_threads(args.torch_threads)
    device = jax.devices()[0]
    info: dict[str, Any] = {
        "device": f"{cpu_name()}, {os.cpu_count()} cores", "jax": jax.__version__,
        "jax_device": f"{device.platform}: {device.device_kind}, {jax.device_count()} device(s)",
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "diffusers": diffusers.__version__,
        "repeats": args.repeats, "steps": args.steps, "load_start": os.getloadavg()[0],
    }
    peak = flops.measure_matmul_peak(size=2048)
    print(f"CPU matmul peak (float32, measured): {peak / 1e9:.1f} GFLOP/s", flush=True)
    results = [bench_config(name, batch, args.repeats, args.steps, args.torch_threads, args.torch_compile)
               for name, batch in zip(args.configs, batches)]
    info["load_end"] = os.getloadavg()[0]
    print_report(results, peak, info)
    if args.out:
        Path(args.out).write_text(json.dumps({"info": info, "peak_flops": peak, "results": results}, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
