"""FLOP counts from XLA and model-FLOPs utilisation (MFU).

`compiled_flops` asks XLA's cost analysis of the compiled program. For a program
partitioned over a mesh (jit with shardings) that program is the *per-device* one, so the
figure is FLOPs per device per call; multiply by the device count for the global figure
when the work is split evenly. XLA counts what is executed: rematerialised forward passes
and work replicated on every device count too, so the derived utilisation is closer to
hardware-FLOPs utilisation than to the 6N-per-token model FLOPs of LLM papers.

Peaks: `KNOWN_PEAKS` lists vendors' dense bf16 figures per chip; on CPU (no published
peak) `measure_matmul_peak` measures what a large matmul achieves and serves as the peak.
"""

from __future__ import annotations

import statistics
import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp

# Dense (no sparsity) bf16 peak FLOP/s per chip, as `jax.Device.device_kind` names the chip.
# Matched by substring in this order (specific names before the family name). Sources:
# Cloud TPU system architecture pages (v4 275, v5e 197, v5p 459, v6e/Trillium 918 TFLOP/s
# per chip; jax reports v5e as "TPU v5 lite", v5p as "TPU v5", v6e as "TPU v6 lite"), and
# NVIDIA's A100/H100/H200 datasheets (A100 312; H100 SXM 989, PCIe 756, NVL 835; H200 SXM
# 989, NVL 835 TFLOP/s; the datasheets' larger figures assume 2:4 sparsity).
KNOWN_PEAKS: dict[str, float] = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "A100": 312e12,
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,
    "H200 NVL": 835e12,
    "H200": 989e12,
}


def _as_compiled(fn: Any, args: tuple, kwargs: dict) -> Any:
    if isinstance(fn, jax.stages.Compiled):
        return fn
    if isinstance(fn, jax.stages.Lowered):
        return fn.compile()
    if not hasattr(fn, "lower"):
        raise TypeError(f"compiled_flops needs a jax.jit-wrapped function (or its .lower()/.compile()); got {fn!r}.")
    return fn.lower(*args, **kwargs).compile()


def compiled_flops(jitted_fn: Callable[..., Any] | Any, *args: Any, **kwargs: Any) -> float | None:
    """FLOPs of one call of `jitted_fn(*args)` per device, from XLA's cost analysis; None if unavailable.

    `args` may be arrays or ShapeDtypeStructs (only shapes are used; nothing runs). jax
    returns a dict, older versions a list with one dict per program; both are handled.
    """
    compiled = _as_compiled(jitted_fn, args, kwargs)
    try:
        analysis = compiled.cost_analysis()
    except Exception as e:  # some backends raise instead of returning nothing
        warnings.warn(f"XLA cost analysis is unavailable on this backend ({e}); FLOPs and MFU are not reported.")
        return None
    return flops_from_cost_analysis(analysis)


def flops_from_cost_analysis(analysis: Any) -> float | None:
    """The 'flops' entry of a cost analysis: a dict (current jax) or a list of dicts (older jax).

    None, with a warning, when there is no usable entry (some backends report nothing or -1).
    """
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0] if analysis else None
    value = analysis.get("flops") if isinstance(analysis, dict) else None
    if value is None or value < 0:
        warnings.warn("XLA cost analysis has no 'flops' entry for this program on this backend; FLOPs and MFU "
                      "are not reported.")
        return None
    return float(value)


def measure_matmul_peak(dtype: Any = jnp.float32, size: int = 2048, repeats: int = 5,
                        device: jax.Device | None = None) -> float:
    """Achieved FLOP/s of a (size x size) @ (size x size) matmul on `device`: median of `repeats` timed runs.

    One untimed warm-up call compiles and touches the memory first. On CPU this stands
    in for the (unpublished) peak; with fake devices (--xla_force_host_platform_device_count)
    they share the same cores, so peak x device count overstates the machine.
    """
    if size < 1 or repeats < 1:
        raise ValueError(f"size={size} and repeats={repeats} must be >= 1.")
    device = device or jax.local_devices()[0]
    key_a, key_b = jax.random.split(jax.random.key(0))
    a = jax.device_put(jax.random.normal(key_a, (size, size), dtype), device)
    b = jax.device_put(jax.random.normal(key_b, (size, size), dtype), device)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * size**3 / statistics.median(times)


def device_peak_flops(device: jax.Device | None = None) -> float | None:
    """Published dense bf16 peak FLOP/s of `device`'s chip (see KNOWN_PEAKS), or None if unknown (CPU)."""
    kind = (device or jax.devices()[0]).device_kind
    for name, peak in KNOWN_PEAKS.items():
        if name.lower() in kind.lower():
            return peak
    return None


def mfu(flops_per_step: float, step_time: float, peak_flops: float, num_devices: int) -> float:
    """Utilisation = flops_per_step / (step_time * peak_flops * num_devices), a fraction in [0, 1].

    `flops_per_step` is the global count (per-device `compiled_flops` x `num_devices` for
    an evenly split program); `peak_flops` is per device.
    """
    if flops_per_step < 0 or step_time <= 0 or peak_flops <= 0 or num_devices < 1:
        raise ValueError(
            f"mfu needs flops_per_step >= 0, step_time > 0, peak_flops > 0 and num_devices >= 1; got "
            f"{flops_per_step}, {step_time}, {peak_flops}, {num_devices}."
        )
    return flops_per_step / (step_time * peak_flops * num_devices)
