"""Test-wide setup: eight fake CPU devices, so sharding code runs as on a pod slice."""

import os

# Tiny test programs mostly compile: skipping LLVM's optimisation passes (same semantics,
# slower code) speeds the compile-bound tests and slows the run-bound ones: a net gain for this suite.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# With libtpu installed (the planner, tests/test_plan.py), its one-process lock must not fail a second worker.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest


@pytest.fixture(scope="session")
def shapes_data_dir(tmp_path_factory) -> str:
    """`ediff_shapes/32` prepared once per test session in a temporary data_dir."""
    from ediff_jax.data import pipeline

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    pipeline.prepare(pipeline.get_dataset_builder("ediff_shapes/32", data_dir))
    return data_dir


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """Identical programs (the same tiny step in several tests) compile once per session.

    Under pytest-xdist (`-n 2` in CI) the workers share one cache in the run's common temp
    folder. A size cap turns on JAX's file lock around cache reads and writes, so one worker
    never reads an entry the other is still writing.
    """
    import jax

    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xla_cache"
    cache.mkdir(exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_compilation_cache_max_size", 8 << 30)
    yield


# --- A local object store: gs://bucket served on 127.0.0.1 ---------------------------------

GCS_BUCKET = "bucket"


@pytest.fixture(scope="session")
def gcs_server(tmp_path_factory):
    """The patched gcp-storage-emulator and its TLS proxy (tests/gcs_emulator.py), started as a
    child process for the session (TF's GCS client deadlocks against an in-process server) and
    stopped at the end; it also exits when its stdin closes, so a killed pytest leaves nothing."""
    import json
    import select
    import subprocess
    import sys
    from pathlib import Path

    certdir = tmp_path_factory.mktemp("gcs_emulator")
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("gcs_emulator.py")), "--tf-proxy",
                             "--bucket", GCS_BUCKET, "--cert-dir", str(certdir)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"The GCS emulator did not start (exit code {proc.poll()}).")
        info = json.loads(line)
        info["endpoint"] = f"http://127.0.0.1:{info['port']}"
        info["cloudsdk_config"] = str(tmp_path_factory.mktemp("empty_gcloud_config"))
        yield info
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def gcs_env(info: dict) -> dict:
    """Routes every GCS client of the stack to the emulator, with no real credentials:
    tensorstore (orbax's arrays) and google-cloud-storage (orbax's step listing) by endpoint
    variables; TF's GCS file system (etils.epath, TensorBoard, TFDS), whose endpoint is
    compiled in, through the TLS proxy; and no client ever waits on a metadata server."""
    endpoint, proxy, dead = info["endpoint"], f"http://127.0.0.1:{info['proxy_port']}", "127.0.0.1:1"
    return {
        "TENSORSTORE_GCS_HTTP_URL": endpoint, "STORAGE_EMULATOR_HOST": endpoint,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "https_proxy": proxy, "no_proxy": "127.0.0.1,localhost", "NO_PROXY": "127.0.0.1,localhost",
        "CURL_CA_BUNDLE": info["cert"], "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "NO_GCE_CHECK": "true", "GCE_METADATA_HOST": dead, "GCE_METADATA_IP": dead, "GCE_METADATA_ROOT": dead,
        "GOOGLE_CLOUD_PROJECT": "test-project", "CLOUDSDK_CONFIG": info["cloudsdk_config"],
    }


@pytest.fixture
def gcs_bucket(gcs_server, monkeypatch):
    """"gs://bucket", emptied, with the environment set for this process and its subprocesses."""
    import urllib.request

    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    for key, value in gcs_env(gcs_server).items():
        monkeypatch.setenv(key, value)
    urllib.request.urlopen(gcs_server["endpoint"] + "/wipe?keep-buckets=1", timeout=10).read()
    yield f"gs://{GCS_BUCKET}"
