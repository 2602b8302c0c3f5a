"""Device mesh and shardings.

The mesh comes from config (`config.mesh`: axis name -> size, one size may be -1 to take
the remaining devices), e.g. `{"data": -1, "fsdp": 4, "expert": 2}`. An optional `dcn`
sub-dict gives, per axis, how many *slices* (TPU slices joined by the data-centre network,
or hosts of a GPU cluster) that axis spans: `{"data": -1, "fsdp": 4, "dcn": {"data": 2}}`
makes `data` span 2 slices, so only its (cheap, once-per-step) gradient reduction crosses
the slow network while FSDP's all-gathers stay on the fast interconnect.

Batches are sharded over every mesh axis that holds data, `data` and `fsdp` together
(FSDP shards the batch as well as the parameters, as in big_vision and MaxText), so the
data-parallel degree is the product of both. Parameter shardings live in `sharding.py`.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXES = ("data", "fsdp")
DCN_KEY = "dcn"

_log = logging.getLogger(__name__)


def _resolve_sizes(axis_sizes: Mapping[str, Any], num_devices: int, what: str) -> list[int]:
    """Sizes with the (at most one) -1 auto-filled so that their product is `num_devices`."""
    names = list(axis_sizes.keys())
    try:
        sizes = [int(axis_sizes[n]) for n in names]
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} {dict(axis_sizes)}: every axis size must be an integer (or -1).") from e
    if sizes.count(-1) > 1:
        raise ValueError(f"{what} {dict(axis_sizes)}: at most one axis may be -1 (auto-filled).")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"{what} {dict(axis_sizes)}: axis sizes must be positive, or -1 to auto-fill.")
    known = math.prod(s for s in sizes if s != -1)
    if num_devices % known:
        raise ValueError(f"{what} {dict(axis_sizes)} does not divide the {num_devices} available devices.")
    sizes = [num_devices // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"{what} {dict(zip(names, sizes))} uses {math.prod(sizes)} devices but {num_devices} are "
            "available; set one axis to -1 to use them all."
        )
    return sizes


def _dcn_sizes(dcn_config: Mapping[str, Any], names: Sequence[str]) -> list[int]:
    unknown = sorted(set(dcn_config) - set(names))
    if unknown:
        raise ValueError(
            f"config.mesh.dcn names axes {unknown} that config.mesh does not define (axes: {list(names)}); "
            "every DCN axis must also be a mesh axis."
        )
    sizes = []
    for name in names:
        value = dcn_config.get(name, 1)
        if not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"config.mesh.dcn.{name}={value!r}: DCN sizes are positive integers (slices spanned).")
        sizes.append(int(value))
    return sizes


def _slice_groups(devices: Sequence[jax.Device]) -> int:
    """How many TPU slices the devices come from (1 on CPU/GPU, which have no slice_index)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def _emulated_hybrid_mesh(ici: Sequence[int], dcn: Sequence[int], devices: Sequence[jax.Device]) -> np.ndarray:
    """The layout `create_hybrid_device_mesh` would give, with contiguous device blocks as "slices".

    Used where there is a single real slice (CPU tests, one GPU host), so a multi-slice
    config still runs: axis i has size dcn[i] * ici[i], the slice index being the major part.
    """
    k = len(ici)
    grid = np.asarray(devices).reshape(*dcn, *ici)
    interleaved = grid.transpose([j for i in range(k) for j in (i, k + i)])
    return interleaved.reshape([d * i for d, i in zip(dcn, ici)])


def make_mesh(mesh_config: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a Mesh whose axes are `mesh_config`'s keys in order, with -1 auto-filled.

    Without `dcn` the layout is `mesh_utils.create_device_mesh`'s (topology-aware on TPU,
    plain device order on CPU) when all devices are used, else the given device order.
    With `dcn` and several slices (TPU multislice) or several processes (GPU hosts) it is
    `create_hybrid_device_mesh`'s; with a single slice and process it is emulated.
    """
    config = {name: size for name, size in dict(mesh_config).items() if size is not None}  # None: no such axis
    dcn_config = config.pop(DCN_KEY, None) or {}
    if not config:
        raise ValueError("config.mesh defines no axes; use e.g. {'data': -1}.")
    all_devices = jax.devices()
    devices = list(devices if devices is not None else all_devices)
    names = list(config.keys())

    if not dcn_config or math.prod(_dcn_sizes(dcn_config, names)) == 1:
        sizes = _resolve_sizes(config, len(devices), "config.mesh")
        # All of this process's devices, or a compile-only topology's (`ediff_jax.plan`): the physical layout.
        if set(devices) == set(all_devices) or not set(devices) & set(all_devices):
            grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
        else:  # a caller-chosen subset: keep the caller's order
            grid = np.asarray(devices).reshape(sizes)
        return Mesh(grid, tuple(names))

    dcn = _dcn_sizes(dcn_config, names)
    num_slices = math.prod(dcn)
    if len(devices) % num_slices:
        raise ValueError(
            f"config.mesh.dcn {dcn_config} spans {num_slices} slices but the {len(devices)} devices do not split "
            f"evenly into {num_slices}."
        )
    ici = _resolve_sizes(config, len(devices) // num_slices, "config.mesh (per slice, DCN factors excluded)")
    real_slices = _slice_groups(devices)
    if real_slices > 1:
        if real_slices != num_slices:
            raise ValueError(
                f"config.mesh.dcn {dcn_config} spans {num_slices} slices but the devices come from {real_slices} "
                "slices; make the product of the DCN sizes equal the number of slices."
            )
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
    elif jax.process_count() > 1:
        if jax.process_count() != num_slices:
            raise ValueError(
                f"config.mesh.dcn {dcn_config} spans {num_slices} granules but there are {jax.process_count()} "
                "processes (each process's devices form one granule on GPU clusters); make them equal."
            )
        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, process_is_granule=True,
                                                    allow_split_physical_axes=True)
    else:
        _log.info("config.mesh.dcn given but all devices are in one slice/process: emulating %d slices.", num_slices)
        grid = _emulated_hybrid_mesh(ici, dcn, devices)
    return Mesh(grid, tuple(names))


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes the batch is split over, in mesh order: `data` and `fsdp` where present."""
    return tuple(a for a in mesh.axis_names if a in DATA_AXES)


def batch_spec(mesh: Mesh) -> P:
    """PartitionSpec of a batch: leading axis over ("data", "fsdp") jointly, e.g. P(("data", "fsdp"))."""
    return P(batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over the data-holding mesh axes."""
    return NamedSharding(mesh, batch_spec(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_parallel_size(mesh: Mesh) -> int:
    """How many ways the batch is split: the product of the `data` and `fsdp` axis sizes.

    The global batch size must be a multiple of this.
    """
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Turns this process's numpy batch into global arrays sharded over the data axes."""
    sharding = batch_sharding(mesh)
    return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)
