"""FLOP counting from XLA's cost analysis, MFU arithmetic, peak lookup and measurement."""

import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ediff_jax import flops, parallel


@pytest.mark.parametrize("m, k, n", [(64, 32, 16), (128, 256, 8)])
def test_compiled_flops_of_matmul_is_2mkn(m, k, n):
    """A jitted (m,k)x(k,n) matmul costs 2mkn FLOPs (shapes only: ShapeDtypeStructs work, nothing runs)."""
    fn = jax.jit(jnp.matmul)
    a, b = jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((k, n), jnp.float32)
    assert flops.compiled_flops(fn, a, b) == pytest.approx(2 * m * k * n, rel=0.01)
    lowered = fn.lower(a, b)  # a Lowered or Compiled stage is accepted as well
    want = pytest.approx(2 * m * k * n, rel=0.01)
    assert flops.compiled_flops(lowered) == flops.compiled_flops(lowered.compile()) == want


def test_compiled_flops_of_sharded_program_are_per_device():
    """Split over 8 devices, the partitioned program reports 1/8 of the FLOPs: the count is per device."""
    mesh = parallel.make_mesh({"data": -1})
    m, k, n = 64, 32, 16
    fn = jax.jit(jnp.matmul, in_shardings=(NamedSharding(mesh, P("data")), parallel.replicated(mesh)),
                 out_shardings=NamedSharding(mesh, P("data")))
    got = flops.compiled_flops(fn, jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((k, n), jnp.float32))
    assert got == pytest.approx(2 * m * k * n / 8, rel=0.01)


def test_cost_analysis_formats_and_missing_data():
    """Both cost-analysis return types (dict; list of dicts in older jax) are read; no data -> None + warning."""
    assert flops.flops_from_cost_analysis({"flops": 128.0, "bytes accessed": 3.0}) == 128.0
    assert flops.flops_from_cost_analysis([{"flops": 64.0}]) == 64.0
    for missing in (None, [], {}, {"flops": -1.0}, [{"bytes accessed": 1.0}]):
        with pytest.warns(UserWarning, match="no 'flops' entry"):
            assert flops.flops_from_cost_analysis(missing) is None
    with pytest.raises(TypeError, match="jax.jit-wrapped function"):
        flops.compiled_flops(lambda a, b: a @ b, jnp.ones((2, 2)), jnp.ones((2, 2)))


def test_mfu_arithmetic_and_validation():
    """MFU = flops / (time * peak * devices); impossible inputs are refused."""
    assert flops.mfu(4e12, 2.0, 1e12, 4) == pytest.approx(0.5)
    assert flops.mfu(0.0, 1.0, 1e12, 1) == 0.0
    with pytest.raises(ValueError, match="step_time > 0"):
        flops.mfu(1e12, 0.0, 1e12, 1)
    with pytest.raises(ValueError, match="num_devices >= 1"):
        flops.mfu(1e12, 1.0, 1e12, 0)


def test_known_peaks_lookup_by_device_kind():
    """device_kind strings as jax reports them map to the published bf16 dense peaks; CPU has none."""
    dev = lambda kind: types.SimpleNamespace(device_kind=kind)
    assert flops.device_peak_flops(dev("TPU v5 lite")) == 197e12
    assert flops.device_peak_flops(dev("TPU v5")) == 459e12
    assert flops.device_peak_flops(dev("TPU v6 lite")) == 918e12
    assert flops.device_peak_flops(dev("TPU v4")) == 275e12
    assert flops.device_peak_flops(dev("NVIDIA H100 80GB HBM3")) == 989e12
    assert flops.device_peak_flops(dev("NVIDIA H100 PCIe")) == 756e12
    assert flops.device_peak_flops(dev("NVIDIA A100-SXM4-80GB")) == 312e12
    assert flops.device_peak_flops(dev("NVIDIA H200")) == 989e12
    assert flops.device_peak_flops(jax.devices()[0]) is None  # cpu


def test_measure_matmul_peak_is_positive_and_quick():
    """A tiny measurement returns a positive, finite FLOP/s within a few seconds."""
    start = time.perf_counter()
    peak = flops.measure_matmul_peak(size=64, repeats=3)
    assert np.isfinite(peak) and peak > 0
    assert time.perf_counter() - start < 10
    with pytest.raises(ValueError, match="must be >= 1"):
        flops.measure_matmul_peak(size=0)
