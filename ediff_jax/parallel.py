"""Device mesh and shardings.

The mesh comes from config (`config.mesh`: axis name -> size, one size may be -1 to take
the remaining devices). Batches are sharded over every mesh axis that holds data;
parameters are replicated here (FSDP rules extend `param_shardings`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")


def make_mesh(mesh_config: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a Mesh whose axes are `mesh_config`'s keys in order, with -1 auto-filled."""
    devices = list(devices if devices is not None else jax.devices())
    names = list(mesh_config.keys())
    sizes = [int(mesh_config[n]) for n in names]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh {dict(mesh_config)}: at most one axis may be -1 (auto-filled).")
    known = math.prod(s for s in sizes if s != -1)
    if known <= 0 or len(devices) % known:
        raise ValueError(
            f"config.mesh {dict(mesh_config)} does not divide the {len(devices)} available devices."
        )
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"config.mesh {dict(zip(names, sizes))} uses {math.prod(sizes)} devices but {len(devices)} are "
            "available; set one axis to -1 to use them all."
        )
    return Mesh(np.asarray(devices).reshape(sizes), tuple(names))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    return tuple(a for a in mesh.axis_names if a in DATA_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data-holding mesh axes."""
    return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Turns this process's numpy batch into global arrays sharded over the data axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
