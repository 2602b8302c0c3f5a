"""Post-hoc EMA in a workdir (EDM2, Karras et al. 2024): training saves the tracked power EMAs
every `config.train.posthoc_ema.every` steps to `WORKDIR/posthoc_ema/`, and sampling
reconstructs the EMA of any width sigma_rel from them (`reconstruct`).

The math (profiles, least squares) is `ediff_jax.ema`'s; this file is only where the snapshots
live and how they are read back, one at a time, so memory stays at two parameter copies
whatever the number of snapshots.

Expert ensembles: a snapshot records the noise intervals of the experts it holds. A power EMA
averages a model's whole trajectory, and a branched expert's trajectory is its parent's up to
the branch (it starts as a copy, EMAs included). So a snapshot taken before a branch holds, for
each later expert, its ancestor's average: reconstruction maps every snapshot onto the target's
experts by ancestry (`experts.parents_of`) and combines them as for one model. A run branched
from another workdir (`config.experts.init_from`) carries the source's power EMAs over and
reconstructs from its own snapshots, those after the branch.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from ediff_jax import ema, experts, logs
from ediff_jax.checkpoints import Checkpointer
from ediff_jax.paths import as_path

SUBDIR = "posthoc_ema"


def _key(i: int) -> str:
    return f"gamma_{i}"


class SnapshotWriter:
    """Saves `state.power_emas` every `every` steps (nothing when no gammas are configured).

    Called on every process, like the checkpointer (orbax writes sharded arrays multi-host).
    A run resumed from checkpoint step S first moves the snapshots of steps after S aside to
    `posthoc_ema/superseded_<step>` (kept, never deleted): they come from the interrupted
    segment, which the resumed run trains again (with any accepted config change, and
    without a NaN it may have hit), and writes anew.
    """

    def __init__(self, workdir: str | os.PathLike, gammas: Any, every: int, start_step: int = 0):
        self.gammas = [float(g) for g in gammas]
        self.every = int(every)
        self.store = None
        if not self.gammas:
            return
        directory = as_path(workdir) / SUBDIR
        if jax.process_index() == 0 and directory.is_dir():
            for entry in directory.iterdir():
                if entry.name.isdigit() and int(entry.name) > int(start_step):
                    target = directory / f"superseded_{entry.name}"
                    for n in range(1, 1000):  # an earlier resume may have set this step aside already
                        if not target.exists():
                            break
                        target = directory / f"superseded_{entry.name}_{n}"
                    logs.warning(f"Post-hoc EMA snapshot {entry} is past the resumed step {start_step}; moved it to "
                                 f"{target.name} (the run writes that step again).")
                    entry.rename(target)
        self.store = Checkpointer(workdir, keep=None, subdir=SUBDIR)

    def maybe_save(self, step: int, state: Any, expert_intervals: Sequence[Sequence[float]] | None = None) -> None:
        """After training step `step` (1-based: the new `state.step`, EDM2's t); `expert_intervals`:
        the quantile intervals of the experts `state` holds (None: one unstacked model)."""
        if self.store is None or not ema.snapshot_due(step, self.every):
            return
        tree = {_key(i): tracked for i, tracked in enumerate(state.power_emas)}
        meta: dict[str, Any] = {"gammas": self.gammas, "step": step}
        if expert_intervals is not None:
            meta["expert_intervals"] = [[float(lo), float(hi)] for lo, hi in expert_intervals]
        self.store.save(step, tree, meta)

    def close(self) -> None:
        if self.store is not None:
            self.store.wait()
            self.store.close()


def check_sigma_rel(config: Any, sigma_rel: float) -> None:
    """Before anything is loaded: the workdir tracked power EMAs, and sigma_rel is a valid width."""
    if not tuple(config.train.posthoc_ema.gammas):
        raise ValueError("--ema_sigma_rel needs post-hoc EMA snapshots, and this workdir's run kept none: train with "
                         "--config.train.posthoc_ema.gammas='(16.97, 6.94)' --config.train.posthoc_ema.every=500 "
                         "(EDM2's sigma_rel 0.05 and 0.10), or pick an EMA with --ema_decay.")
    ema.sigma_rel_to_gamma(sigma_rel)  # raises naming the valid range


def reconstruct(workdir: str | os.PathLike, abstract_params: Any, sigma_rel: float,
                up_to_step: int | None = None,
                expert_intervals: Sequence[Sequence[float]] | None = None) -> tuple[Any, int]:
    """The EMA of width `sigma_rel` at the newest snapshot step <= `up_to_step` (None: the newest),
    as a least-squares combination of every snapshot up to it; returns (params, that step).

    `abstract_params` (ShapeDtypeStructs with shardings, the shape of one parameter tree) says
    where the snapshots are restored to. For an ensemble, `expert_intervals` are the quantile
    intervals of the experts stacked in `abstract_params`; snapshots of earlier phases (fewer,
    wider experts) are mapped onto them by ancestry.
    """
    directory = as_path(workdir) / SUBDIR
    if not directory.is_dir():
        raise FileNotFoundError(f"No post-hoc EMA snapshots in {directory}; the run saves them every "
                                "config.train.posthoc_ema.every steps once that many steps have trained.")
    store = Checkpointer(workdir, read_only=True, subdir=SUBDIR)
    try:
        steps = [s for s in store.all_steps() if up_to_step is None or s <= int(up_to_step)]
        if not steps:
            raise FileNotFoundError(f"No post-hoc EMA snapshot in {directory} at or before step {up_to_step}; the "
                                    f"saved steps are {store.all_steps()}.")
        metas = [store.read_meta(step) for step in steps]
        gammas = [float(g) for g in metas[-1]["gammas"]]
        target = steps[-1]
        coeffs = ema.solve_posthoc_coefficients([s for s in steps for _ in gammas], gammas * len(steps), target,
                                                float(sigma_rel))
        total = None
        for k, (step, meta) in enumerate(zip(steps, metas)):  # one snapshot in memory at a time
            held, parents = _ancestry(meta, expert_intervals, step, directory)
            snapshot_params = abstract_params if parents is None else _stacked_like(abstract_params, len(held))
            tree = store.restore({_key(i): snapshot_params for i in range(len(gammas))}, step)
            for i in range(len(gammas)):
                c = float(coeffs[k * len(gammas) + i])
                part = tree[_key(i)]
                if parents is not None:  # each target expert takes its ancestor's average
                    part = jax.tree.map(lambda x, a: jax.device_put(x[parents], a.sharding), part, abstract_params)
                part = jax.tree.map(lambda x: c * jnp.asarray(x, jnp.float32), part)
                total = part if total is None else jax.tree.map(jnp.add, total, part)
    finally:
        store.close()
    out = jax.tree.map(lambda t, a: t.astype(a.dtype), total, abstract_params)
    return out, target


def _ancestry(meta: dict, target_intervals: Sequence[Sequence[float]] | None, step: int,
              directory: Any) -> tuple[list, jax.Array | None]:
    """The snapshot's expert intervals and, when they differ from the target's, the index of each
    target expert's ancestor among them (None: the snapshot holds the target's own experts)."""
    held = meta.get("expert_intervals")
    if target_intervals is None or held is None:
        if (target_intervals is None) != (held is None):
            raise ValueError(f"The post-hoc EMA snapshot of step {step} in {directory} holds "
                             f"{'an ensemble' if held is not None else 'one model'}, but the checkpoint it is "
                             "reconstructed for does not; were snapshots of another run copied into this workdir?")
        return [], None
    target = [[float(lo), float(hi)] for lo, hi in target_intervals]
    if held == target:
        return held, None
    try:
        return held, jnp.asarray(experts.parents_of(target, held))
    except ValueError as e:
        raise ValueError(f"The post-hoc EMA snapshot of step {step} in {directory} holds experts on {held}, which "
                         f"are not ancestors of the checkpoint's experts {target}: {e}") from None


def _stacked_like(abstract_params: Any, num: int) -> Any:
    """`abstract_params` with `num` experts on the leading axis, replicated along it (an earlier phase
    has fewer experts than the target's expert mesh axis may split)."""
    def one(a: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
        sharding = a.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            spec = tuple(sharding.spec) + (None,) * (len(a.shape) - len(sharding.spec))
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(None, *spec[1:]))
        return jax.ShapeDtypeStruct((num, *a.shape[1:]), a.dtype, sharding=sharding)

    return jax.tree.map(one, abstract_params)
