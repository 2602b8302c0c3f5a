"""Multi-host (multi-process) start-up, and a local launcher to test it on one machine.

Call `initialize()` first thing in the program, before anything touches a JAX device:

* TPU pods and SLURM/Open MPI jobs: no arguments; jax detects the cluster from its
  environment.
* GPU or CPU clusters without a scheduler: pass the coordinator's `host:port`, the number
  of processes and this process's id, or set `EDIFF_COORDINATOR`, `EDIFF_NUM_PROCESSES`,
  `EDIFF_PROCESS_ID` (and optionally `EDIFF_LOCAL_DEVICE_IDS`, comma-separated).
* A single process: nothing to do, `initialize()` returns False.

CPU processes need a collectives backend to talk to each other; `initialize` selects gloo
(`jax_cpu_collectives_implementation`) unless another one was chosen.

`launch_local_processes` starts N such processes on localhost (free port, N fake CPU
devices each) and collects their output, so multi-process code (a global mesh, a
training step) can be tested without a cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Sequence

import jax

ENV_COORDINATOR = "EDIFF_COORDINATOR"
ENV_NUM_PROCESSES = "EDIFF_NUM_PROCESSES"
ENV_PROCESS_ID = "EDIFF_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "EDIFF_LOCAL_DEVICE_IDS"

_log = logging.getLogger(__name__)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError as e:
        raise ValueError(f"Environment variable {name}={value!r} must be an integer.") from e


def _env_device_ids() -> list[int] | None:
    value = os.environ.get(ENV_LOCAL_DEVICE_IDS)
    if not value:
        return None
    try:
        return [int(v) for v in value.split(",")]
    except ValueError as e:
        raise ValueError(f"{ENV_LOCAL_DEVICE_IDS}={value!r} must be comma-separated integers, e.g. '0,1'.") from e


def _cluster_processes_from_env() -> int:
    """Processes a scheduler says this job has (TPU pod, SLURM, Open MPI); 1 if none is detected.

    Read from the environment only: querying devices would start the backends, which must
    not happen before `jax.distributed.initialize`.
    """
    counts = [1]
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES")
    if hosts:
        counts.append(len([h for h in hosts.split(",") if h.strip()]))
    if os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"):
        counts.append(2)  # TPU multislice: one process per host of every slice
    if "SLURM_JOB_ID" in os.environ:
        counts.append(_env_int("SLURM_NTASKS") or 1)
    counts.append(_env_int("OMPI_COMM_WORLD_SIZE") or 1)
    return max(counts)


def _select_cpu_collectives() -> None:
    """Gloo for cross-process CPU collectives, unless the user chose another implementation."""
    try:
        current = jax.config.jax_cpu_collectives_implementation
    except AttributeError:  # older jax: a boolean flag instead
        jax.config.update("jax_cpu_enable_gloo_collectives", True)
        return
    if current in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")


def is_initialized() -> bool:
    return jax.distributed.is_initialized()


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None, *,
               auto: bool | None = None, initialization_timeout: int = 300) -> bool:
    """Joins this process to the multi-process job; returns whether JAX runs multi-process now.

    Arguments override the EDIFF_* environment variables. With none of them set, a
    detected cluster (TPU pod, SLURM, Open MPI) is joined automatically (`auto=None`),
    or always (`auto=True`) or never (`auto=False`). Calling it again is a no-op.
    """
    if jax.distributed.is_initialized():
        if num_processes is not None and num_processes != jax.process_count():
            raise ValueError(
                f"jax.distributed is already initialised with {jax.process_count()} processes, not {num_processes}; "
                "initialize() can only be called once per process with one configuration."
            )
        return True
    coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR) or None
    num_processes = num_processes if num_processes is not None else _env_int(ENV_NUM_PROCESSES)
    process_id = process_id if process_id is not None else _env_int(ENV_PROCESS_ID)
    local_device_ids = list(local_device_ids) if local_device_ids is not None else _env_device_ids()

    explicit = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if num_processes == 1:
        return False
    given = [k for k, v in explicit.items() if v is not None]
    if given and len(given) < len(explicit):
        missing = [k for k in explicit if k not in given]
        env_names = {"coordinator_address": ENV_COORDINATOR, "num_processes": ENV_NUM_PROCESSES,
                     "process_id": ENV_PROCESS_ID}
        raise ValueError(
            f"Multi-process start-up got {given} but not {missing}; give all three (or set "
            f"{', '.join(env_names[k] for k in missing)}), or none of them on a TPU pod / SLURM job."
        )
    if given:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id={process_id} must lie in [0, num_processes={num_processes}).")
        if ":" not in coordinator_address:
            raise ValueError(f"coordinator_address={coordinator_address!r} must be 'host:port', e.g. '10.0.0.1:1234'.")
        kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id,
                      local_device_ids=local_device_ids)
    elif auto or (auto is None and _cluster_processes_from_env() > 1):
        kwargs = {}
    else:
        return False

    _select_cpu_collectives()
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=initialization_timeout)
    except RuntimeError as e:
        if "before any JAX" in str(e) or "backend" in str(e).lower():
            raise RuntimeError(
                f"{e}\nCall ediff_jax.distributed.initialize() at the very start of the program, before anything "
                "queries devices (jax.devices(), jnp arrays, a mesh)."
            ) from e
        raise
    _log.info("jax.distributed initialised: process %d of %d.", jax.process_index(), jax.process_count())
    return True


def is_main_process() -> bool:
    """Process 0, which writes logs, sample grids and other single-writer files."""
    return jax.process_index() == 0


# ----------------------------------------------------------------------------- local launcher


def free_port() -> int:
    """A TCP port that was free a moment ago on localhost (for a local coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class ProcessResult:
    process_id: int
    returncode: int
    output: str  # stdout and stderr together


def _cpu_xla_flags(existing: str, devices: int) -> str:
    kept = re.sub(r"--xla_force_host_platform_device_count=\S+", "", existing).split()
    return " ".join([*kept, f"--xla_force_host_platform_device_count={devices}"])


def launch_local_processes(argv: Sequence[str], num_processes: int = 2, devices_per_process: int = 1, *,
                           env: Mapping[str, str] | None = None, timeout: float = 120.0,
                           cwd: str | Path | None = None, check: bool = True) -> list[ProcessResult]:
    """Runs `python *argv` as `num_processes` CPU processes of one JAX job on localhost.

    Each gets `devices_per_process` fake CPU devices and the EDIFF_* variables, so a
    program that calls `initialize()` joins the job (coordinator on a free port). Output
    goes to temporary files (pipes could fill and stall a process). With `check`, a
    non-zero exit or a timeout raises with every process's output.
    """
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(f"num_processes={num_processes} and devices_per_process={devices_per_process} must be >= 1.")
    base = dict(os.environ)
    base.update(env or {})
    base["XLA_FLAGS"] = _cpu_xla_flags(base.get("XLA_FLAGS", ""), devices_per_process)
    base["JAX_PLATFORMS"] = "cpu"
    base[ENV_COORDINATOR] = f"127.0.0.1:{free_port()}"
    base[ENV_NUM_PROCESSES] = str(num_processes)
    base.pop(ENV_LOCAL_DEVICE_IDS, None)

    with tempfile.TemporaryDirectory(prefix="ediff_procs_") as tmp:
        logs = [Path(tmp) / f"process_{i}.log" for i in range(num_processes)]
        procs = []
        for i, log in enumerate(logs):
            with open(log, "w") as out:
                procs.append(subprocess.Popen([sys.executable, *argv], stdout=out, stderr=subprocess.STDOUT,
                                              env={**base, ENV_PROCESS_ID: str(i)}, cwd=cwd))
        deadline = time.monotonic() + timeout
        timed_out = False
        for proc in procs:
            try:
                proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        if timed_out:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        results = [ProcessResult(i, proc.returncode, log.read_text()) for i, (proc, log) in enumerate(zip(procs, logs))]

    if check and (timed_out or any(r.returncode != 0 for r in results)):
        report = "\n".join(f"--- process {r.process_id} (exit {r.returncode}) ---\n{r.output[-4000:]}" for r in results)
        what = f"timed out after {timeout:.0f} s" if timed_out else "failed"
        raise RuntimeError(f"Local {num_processes}-process run of {list(argv)} {what}:\n{report}")
    return results
