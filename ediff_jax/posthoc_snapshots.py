"""Post-hoc EMA in a workdir (EDM2, Karras et al. 2024): training saves the tracked power EMAs
every `config.train.posthoc_ema.every` steps to `WORKDIR/posthoc_ema/`, and sampling
reconstructs the EMA of any width sigma_rel from them (`reconstruct`).

The math (profiles, least squares) is `ediff_jax.ema`'s; this file is only where the snapshots
live and how they are read back, one at a time, so memory stays at two parameter copies
whatever the number of snapshots.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from ediff_jax import ema, logs
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

    def maybe_save(self, step: int, state: Any) -> None:
        """After training step `step` (1-based: the new `state.step`, EDM2's t)."""
        if self.store is None or not ema.snapshot_due(step, self.every):
            return
        tree = {_key(i): tracked for i, tracked in enumerate(state.power_emas)}
        self.store.save(step, tree, {"gammas": self.gammas, "step": step})

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
                up_to_step: int | None = None) -> tuple[Any, int]:
    """The EMA of width `sigma_rel` at the newest snapshot step <= `up_to_step` (None: the newest),
    as a least-squares combination of every snapshot up to it; returns (params, that step).

    `abstract_params` (ShapeDtypeStructs with shardings, the shape of one parameter tree) says
    where the snapshots are restored to.
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
        gammas = [float(g) for g in store.read_meta(steps[-1])["gammas"]]
        target = steps[-1]
        coeffs = ema.solve_posthoc_coefficients([s for s in steps for _ in gammas], gammas * len(steps), target,
                                                float(sigma_rel))
        abstract = {_key(i): abstract_params for i in range(len(gammas))}
        total = None
        for k, step in enumerate(steps):  # one snapshot in memory at a time
            tree = store.restore(abstract, step)
            for i in range(len(gammas)):
                c = float(coeffs[k * len(gammas) + i])
                part = jax.tree.map(lambda x: c * jnp.asarray(x, jnp.float32), tree[_key(i)])
                total = part if total is None else jax.tree.map(jnp.add, total, part)
    finally:
        store.close()
    out = jax.tree.map(lambda t, a: t.astype(a.dtype), total, abstract_params)
    return out, target
