"""Orbax checkpoints with named items: `state` (the train state) and `meta` (JSON).

`meta` records what the state belongs to (model config, image size, stage), so a workdir
holding a checkpoint of another model is refused *before* anything is restored or
written: the user's checkpoint is never touched by a mismatched run.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp


# Metadata that legitimately changes during a run (e.g. the current expert phase).
PROGRESS_KEYS = ("progress",)


class CheckpointMismatchError(ValueError):
    """The workdir's checkpoint does not fit the model being built."""


def _normalise(obj: Any) -> Any:
    """JSON round-trip, so tuples and lists compare equal."""
    return json.loads(json.dumps(obj, default=str))


class Checkpointer:
    def __init__(self, workdir: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).expanduser().absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def read_meta(self, step: int | None = None) -> dict | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def check_compatible(self, meta: Mapping[str, Any], saved: Mapping[str, Any] | None = None) -> None:
        """Raises CheckpointMismatchError naming the differing keys, if any.

        `saved`: metadata already read (default: the latest checkpoint's).
        """
        saved = self.read_meta() if saved is None else saved
        if saved is None:
            return
        saved, wanted = _normalise(saved), _normalise(meta)
        diffs = []
        # A section missing from the saved metadata was added to the code after the
        # checkpoint was written; its default (e.g. no experts) is what the old code did.
        for section in sorted(set(saved) - set(PROGRESS_KEYS)):
            a, b = saved.get(section), wanted.get(section)
            if isinstance(a, dict) and isinstance(b, dict):
                for key in sorted(set(a) | set(b)):
                    if a.get(key) != b.get(key):
                        diffs.append(f"{section}.{key}: checkpoint has {a.get(key)!r}, config has {b.get(key)!r}")
            elif a != b:
                diffs.append(f"{section}: checkpoint has {a!r}, config has {b!r}")
        if diffs:
            raise CheckpointMismatchError(
                f"The workdir {str(self.directory.parent)!r} holds a checkpoint (step {self.latest_step()}) of "
                "another model:\n  " + "\n  ".join(diffs) + "\nThe checkpoint was left untouched. Use a new "
                "--workdir, or the config that wrote it."
            )

    def save(self, step: int, state: Any, meta: Mapping[str, Any], force: bool = False) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(_normalise(meta))),
            force=force,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> Any:
        """Restores onto the shardings of `abstract_state` (a tree of ShapeDtypeStructs).

        Fields with no arrays (e.g. `extra_emas=()` when no extra EMA is kept) are left out
        of the request and filled back in, so checkpoints written before such a field
        existed still restore.
        """
        step = self.latest_step() if step is None else step
        fields = dataclasses.fields(abstract_state) if dataclasses.is_dataclass(abstract_state) else ()
        empty = {f.name: getattr(abstract_state, f.name) for f in fields
                 if not jax.tree.leaves(getattr(abstract_state, f.name))}
        try:
            args = ocp.args.StandardRestore(abstract_state)
            return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]
        except ValueError as e:  # written before an (empty) field existed: restore without it
            if not empty or "tree structures do not match" not in str(e):
                raise
        wanted = {f.name: getattr(abstract_state, f.name) for f in fields if f.name not in empty}
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(wanted)))["state"]
        return dataclasses.replace(abstract_state, **restored, **empty)

    def restore_latest_good(self, abstract_for: Callable[[dict], Any]) -> tuple[int, Any, dict]:
        """Restores the newest checkpoint that reads back; returns (step, state, meta).

        `abstract_for(meta)` gives the abstract state to restore onto (it may raise
        CheckpointMismatchError, which is passed on: a config error, not a corrupt file).
        A checkpoint that fails to read (a partial write, a truncated file) is moved aside
        to `checkpoints/unreadable_<step>` -- kept, never deleted -- with a warning, and the
        previous one is tried.
        """
        failed: list[tuple[int, Exception]] = []
        for step in reversed(self.all_steps()):
            try:
                meta = self.read_meta(step)
                abstract = abstract_for(meta)
                state = self.restore(abstract, step)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # orbax raises many types for unreadable data
                failed.append((step, e))
                continue
            # An older checkpoint reads back with the same code, so the newer ones are damaged:
            # set them aside (never deleted) so that training can write those steps again.
            for bad_step, error in failed:
                self._quarantine(bad_step, error)
            return step, state, meta
        # Nothing readable: more likely a code/format mismatch than damage; touch nothing.
        raise RuntimeError(f"No checkpoint in {self.directory} could be read back (left as they are); the newest "
                           f"one failed with: {failed[0][1] if failed else 'no checkpoints'}") from (
            failed[0][1] if failed else None)

    def _quarantine(self, step: int, error: Exception) -> None:
        source = self.directory / str(step)
        target = self.directory / f"unreadable_{step}"
        warnings.warn(f"Checkpoint step {step} in {self.directory} could not be read ({type(error).__name__}: "
                      f"{str(error)[:200]}); moved it to {target} and trying the previous checkpoint.")
        if source.exists():
            shutil.move(str(source), str(target))
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def kept_steps(workdir: str | Path) -> list[int]:
    """The checkpoint steps a workdir holds, ascending ([] when it has none).

    Reads only: a workdir without a `checkpoints` folder is not given one (Checkpointer
    would create it), and the manager is closed again before returning.
    """
    if not (Path(workdir).expanduser() / "checkpoints").is_dir():
        return []
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        return ckpt.all_steps()
    finally:
        ckpt.close()


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), tree, shardings)
