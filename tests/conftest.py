"""Test-wide setup: eight fake CPU devices, so sharding code runs as on a pod slice."""

import os

# Tiny test programs mostly compile: skipping LLVM's optimisation passes (same semantics,
# slower code) speeds the compile-bound tests and slows the run-bound ones, about 30 s net.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory) -> str:
    """`ediff_shapes/32` prepared once per test session (about 10 s) in a temporary data_dir."""
    from ediff_jax.data import pipeline

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    pipeline.prepare(pipeline.get_dataset_builder("ediff_shapes/32", data_dir))
    return data_dir


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """Identical programs (the same tiny step in several tests) compile once per session."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    yield
